//! A policy that misbehaves on request, for hubnat's tests (not an example to follow).
//!
//! Session filter, by remote port: 1 loops forever, 2 grows its memory without bound, 3
//! panics (a trap), 4 redirects to 192.0.2.1:8080, 5 rejects, 6 logs 100 lines; anything else
//! is allowed. DHCP customizer, by the client's host name: "spin", "hog" and "panic" as above,
//! "silence" asks for no reply; anything else sets option 252 to the value of the config key
//! `wpad` (if set).

use std::hint::black_box;

wit_bindgen::generate!({
    world: "policy",
    path: "../../wit",
});

use exports::hubnat::policy::dhcp_customizer::{self, Changes, Client, DhcpOption, Reply};
use exports::hubnat::policy::session_filter::{self, Session, Verdict};
use hubnat::policy::host::{self, Level};
use hubnat::policy::types::{IpAddress, SocketAddress};

fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn hog() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(black_box(vec![1u8; 1 << 20]));
        black_box(&hoard);
    }
}

struct Misbehave;

impl session_filter::Guest for Misbehave {
    fn check(s: Session) -> Verdict {
        match s.remote.port {
            1 => spin(),
            2 => hog(),
            3 => panic!("asked to panic"),
            4 => Verdict::Redirect(SocketAddress {
                address: IpAddress::Ipv4((192, 0, 2, 1)),
                port: 8080,
            }),
            5 => Verdict::Reject,
            6 => {
                for i in 0..100 {
                    host::log(Level::Info, &format!("line {i}"));
                }
                Verdict::Allow
            }
            _ => Verdict::Allow,
        }
    }
}

impl dhcp_customizer::Guest for Misbehave {
    fn customize(c: Client, _r: Reply) -> dhcp_customizer::Decision {
        match c.hostname.as_deref() {
            Some("spin") => spin(),
            Some("hog") => hog(),
            Some("panic") => panic!("asked to panic"),
            Some("silence") => dhcp_customizer::Decision::NoReply,
            _ => match host::config("wpad") {
                Some(url) => dhcp_customizer::Decision::Change(Changes {
                    set_options: vec![DhcpOption {
                        code: 252,
                        value: url.into_bytes(),
                    }],
                    remove_options: Vec::new(),
                    lease_seconds: None,
                }),
                None => dhcp_customizer::Decision::Unchanged,
            },
        }
    }
}

export!(Misbehave);
