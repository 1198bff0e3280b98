//! DHCP messages through the whole core: each message is a UDP payload from 0.0.0.0:68 to
//! 255.255.255.255:67 in a broadcast frame from the message's `chaddr` (so the server's
//! source-MAC checks pass and the message itself is what is tested). The input is one or more
//! DHCP messages separated by the 4 bytes `SEPARATOR`; the whole exchange is played by three
//! clients in turn against one server (the last byte of `chaddr` changed for each), a second
//! apart, then the server's timers run (offers, leases and quarantines expire).
//!
//! Seeds: exchanges of dhclient, udhcpc and dhcpcd captured against hubnat and dnsmasq
//! (fuzz/corpus/dhcp, see fuzz/README.md).
#![no_main]

use std::net::Ipv4Addr;
use std::time::Duration;

use hubnat::core::dhcp::{Reservation, StaticRoute};
use hubnat::core::testkit;
use hubnat_fuzz::Harness;
use libfuzzer_sys::fuzz_target;

/// What separates messages in an input.
const SEPARATOR: &[u8] = b"\xfe\xed\xfa\xce";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(4).position(|w| w == SEPARATOR) {
        out.push(&rest[..at]);
        rest = &rest[at + 4..];
    }
    out.push(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let messages = split(data);
    if messages.len() > 16 {
        return;
    }
    let mut settings = testkit::settings();
    // Everything the server can put in a reply.
    settings.dhcp.domain = Some("fuzz.test".into());
    settings.dhcp.dns = vec![Ipv4Addr::new(192, 168, 30, 1), Ipv4Addr::new(10, 77, 0, 53)];
    settings.dhcp.routes = vec![StaticRoute {
        dest: Ipv4Addr::new(10, 99, 0, 0),
        prefix_len: 16,
        gateway: Ipv4Addr::new(192, 168, 30, 1),
    }];
    settings.dhcp.statics = vec![Reservation {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
        ip: Ipv4Addr::new(192, 168, 30, 5),
        hostname: Some("reserved".into()),
    }];
    settings.dhcp.lease = Duration::from_secs(120);
    let mut h = Harness::new(settings);
    for round in 0u8..3 {
        for body in &messages {
            let mut body = body.to_vec();
            let mut mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
            if body.len() >= 34 {
                body[33] ^= round;
                let chaddr: [u8; 6] = body[28..34].try_into().expect("6 bytes");
                if chaddr[0] & 1 == 0 && chaddr != [0; 6] {
                    mac = chaddr;
                }
            }
            h.frame(&hubnat_fuzz::dhcp_frame(mac, &body));
            h.advance(1000);
        }
    }
    for _ in 0..8 {
        h.next_timeout();
    }
    h.report();
});
