//! A session policy that refuses sessions to configured ports and IPv4 networks.
//!
//! Configuration (`[policy.config]`), every key optional:
//!
//! - `ports = "25,465,587"`: remote ports refused (TCP and UDP);
//! - `cidrs = "10.0.0.0/8, 203.0.113.7/32"`: remote IPv4 networks refused;
//! - `verdict = "reject"` (the default: the client is told) or `"drop"` (silent).
//!
//! Everything else is allowed. A malformed entry is logged once and ignored.

use std::sync::OnceLock;

wit_bindgen::generate!({
    world: "session-policy",
    path: "../../wit",
});

use exports::hubnat::policy::session_filter::{Guest, Session, Verdict};
use hubnat::policy::host::{self, Level};
use hubnat::policy::types::{IpAddress, Protocol};

/// The configuration, read from the host on the first call.
struct Rules {
    ports: Vec<u16>,
    /// (network, mask) pairs.
    nets: Vec<(u32, u32)>,
    drop: bool,
}

static RULES: OnceLock<Rules> = OnceLock::new();

fn rules() -> &'static Rules {
    RULES.get_or_init(|| {
        let mut rules = Rules {
            ports: Vec::new(),
            nets: Vec::new(),
            drop: false,
        };
        for item in list(host::config("ports")) {
            match item.parse::<u16>() {
                Ok(port) => rules.ports.push(port),
                Err(_) => host::log(Level::Warn, &format!("ports: {item:?} is not a port")),
            }
        }
        for item in list(host::config("cidrs")) {
            match parse_cidr(&item) {
                Some(net) => rules.nets.push(net),
                None => host::log(
                    Level::Warn,
                    &format!("cidrs: {item:?} is not an IPv4 network such as 10.0.0.0/8"),
                ),
            }
        }
        match host::config("verdict").as_deref() {
            None | Some("reject") => {}
            Some("drop") => rules.drop = true,
            Some(other) => host::log(
                Level::Warn,
                &format!("verdict: {other:?} is neither \"reject\" nor \"drop\"; rejecting"),
            ),
        }
        host::log(
            Level::Info,
            &format!(
                "refusing {} ports and {} networks",
                rules.ports.len(),
                rules.nets.len()
            ),
        );
        rules
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

/// "a.b.c.d/len" (or a bare address, /32) as (network, mask).
fn parse_cidr(text: &str) -> Option<(u32, u32)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, len.trim().parse::<u32>().ok()?),
        None => (text, 32),
    };
    if len > 32 {
        return None;
    }
    let addr: std::net::Ipv4Addr = addr.trim().parse().ok()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(addr) & mask, mask))
}

struct DenyDestinations;

impl Guest for DenyDestinations {
    fn check(s: Session) -> Verdict {
        let rules = rules();
        let port_refused = s.protocol != Protocol::Icmp && rules.ports.contains(&s.remote.port);
        let net_refused = match s.remote.address {
            IpAddress::Ipv4((a, b, c, d)) => {
                let ip = u32::from_be_bytes([a, b, c, d]);
                rules.nets.iter().any(|&(net, mask)| ip & mask == net)
            }
            IpAddress::Ipv6(_) => false,
        };
        match (port_refused || net_refused, rules.drop) {
            (false, _) => Verdict::Allow,
            (true, false) => Verdict::Reject,
            (true, true) => Verdict::Drop,
        }
    }
}

export!(DenyDestinations);
