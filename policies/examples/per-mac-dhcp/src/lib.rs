//! A DHCP policy: clients whose MAC address starts with a configured prefix get their own DNS
//! servers, domain name and classless static routes (option 121, RFC 3442).
//!
//! Configuration (`[policy.config]`):
//!
//! - `mac_prefix = "52:54:00"` (required): one to six octets in hex, `:` or `-` between them;
//! - `dns = "10.1.1.1, 10.1.1.2"`: option 6;
//! - `domain = "lab.example"`: option 15;
//! - `routes = "10.20.0.0/16 via 192.168.30.254, 0.0.0.0/0 via 192.168.30.1"`: option 121;
//! - `lease = "600"`: the lease time in seconds.
//!
//! Other clients' replies are left unchanged. A malformed entry is logged and ignored.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

wit_bindgen::generate!({
    world: "dhcp-policy",
    path: "../../wit",
});

use exports::hubnat::policy::dhcp_customizer::{
    Changes, Client, Decision, DhcpOption, Guest, Reply,
};
use hubnat::policy::host::{self, Level};

/// What matching clients get, read from the host on the first call.
struct Plan {
    prefix: Vec<u8>,
    options: Vec<DhcpOption>,
    lease_seconds: Option<u32>,
}

static PLAN: OnceLock<Plan> = OnceLock::new();

fn warn(message: String) {
    host::log(Level::Warn, &message);
}

fn plan() -> &'static Plan {
    PLAN.get_or_init(|| {
        let prefix = match host::config("mac_prefix").map(|p| parse_prefix(&p)) {
            Some(Some(prefix)) => prefix,
            Some(None) => {
                warn(
                    "mac_prefix is not 1 to 6 hex octets such as \"52:54:00\"; matching nobody"
                        .into(),
                );
                Vec::new()
            }
            None => {
                warn("mac_prefix is not set; matching nobody".into());
                Vec::new()
            }
        };
        let mut options = Vec::new();
        let dns: Vec<u8> = list(host::config("dns"))
            .iter()
            .filter_map(|s| match s.parse::<Ipv4Addr>() {
                Ok(ip) => Some(ip.octets()),
                Err(_) => {
                    warn(format!("dns: {s:?} is not an IPv4 address"));
                    None
                }
            })
            .flatten()
            .collect();
        if !dns.is_empty() {
            options.push(DhcpOption {
                code: 6,
                value: dns,
            });
        }
        if let Some(domain) = host::config("domain").filter(|d| !d.trim().is_empty()) {
            options.push(DhcpOption {
                code: 15,
                value: domain.trim().as_bytes().to_vec(),
            });
        }
        let mut routes = Vec::new();
        for item in list(host::config("routes")) {
            match parse_route(&item) {
                Some(bytes) => routes.extend(bytes),
                None => warn(format!(
                    "routes: {item:?} is not a route such as \"10.20.0.0/16 via 192.168.30.254\""
                )),
            }
        }
        if !routes.is_empty() {
            options.push(DhcpOption {
                code: 121,
                value: routes,
            });
        }
        let lease_seconds = host::config("lease").and_then(|s| match s.trim().parse() {
            Ok(n) => Some(n),
            Err(_) => {
                warn(format!("lease: {s:?} is not a number of seconds"));
                None
            }
        });
        Plan {
            prefix,
            options,
            lease_seconds,
        }
    })
}

/// The comma-separated items of a config value, trimmed, empty ones left out.
fn list(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn parse_prefix(text: &str) -> Option<Vec<u8>> {
    let octets: Option<Vec<u8>> = text
        .trim()
        .split([':', '-'])
        .map(|h| u8::from_str_radix(h, 16).ok().filter(|_| h.len() == 2))
        .collect();
    octets.filter(|o| (1..=6).contains(&o.len()))
}

/// "a.b.c.d/len via g.h.i.j" encoded for option 121: the prefix length, the significant
/// octets of the destination, then the router.
fn parse_route(text: &str) -> Option<Vec<u8>> {
    let (net, via) = text.split_once(" via ")?;
    let (addr, len) = net.trim().split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let router: Ipv4Addr = via.trim().parse().ok()?;
    let significant = usize::from(len).div_ceil(8);
    let mut bytes = vec![len];
    bytes.extend_from_slice(&addr.octets()[..significant]);
    bytes.extend_from_slice(&router.octets());
    Some(bytes)
}

struct PerMacDhcp;

impl Guest for PerMacDhcp {
    fn customize(c: Client, _r: Reply) -> Decision {
        let plan = plan();
        let mac = [c.mac.0, c.mac.1, c.mac.2, c.mac.3, c.mac.4, c.mac.5];
        if plan.prefix.is_empty() || !mac.starts_with(&plan.prefix) {
            return Decision::Unchanged;
        }
        Decision::Change(Changes {
            set_options: plan.options.clone(),
            remove_options: Vec::new(),
            lease_seconds: plan.lease_seconds,
        })
    }
}

export!(PerMacDhcp);
