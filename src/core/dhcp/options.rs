//! The options the server puts in its replies, and the parameter request list that filters them.
//!
//! Always sent in an OFFER or ACK: message type (53), server identifier (54), lease time (51),
//! T1 (58, half the lease), T2 (59, seven eighths), subnet mask (1). Sent when configured and
//! either requested in option 55 or when the client sent no option 55 at all: router (3), DNS
//! servers (6), domain name (15), host name of a static reservation (12), and the classless
//! static routes in both the RFC 3442 code (121) and Microsoft's (249). RFC 3442 makes a client
//! that gets option 121 ignore option 3, so when routes are pushed and a router is configured,
//! a default route via the router is added to the list.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, DhcpOptions, OptionCode, UnknownOption};
use ipnet::Ipv4Net;

/// A classless static route: `dest/prefix_len via gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticRoute {
    /// Destination network.
    pub dest: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
    /// Next hop, on the segment.
    pub gateway: Ipv4Addr,
}

/// A static reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The client's MAC.
    pub mac: [u8; 6],
    /// Its address.
    pub ip: Ipv4Addr,
    /// Host name to hand to the client (option 12), if any.
    pub hostname: Option<String>,
}

/// What the DHCP server hands out; built from the configuration by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
    /// Whether the server answers at all.
    pub enabled: bool,
    /// First address of the dynamic range.
    pub range_start: Ipv4Addr,
    /// Last address of the dynamic range (inclusive).
    pub range_end: Ipv4Addr,
    /// Subnet mask sent in option 1.
    pub mask: Ipv4Addr,
    /// Lease time.
    pub lease: Duration,
    /// Router (option 3); `None` = not sent.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers (option 6); empty = not sent.
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15); `None` = not sent.
    pub domain: Option<String>,
    /// Classless static routes (options 121 and 249); empty = not sent.
    pub routes: Vec<StaticRoute>,
    /// Static reservations.
    pub statics: Vec<Reservation>,
    /// The most addresses (offered or bound) one MAC may hold at once.
    pub max_leases_per_mac: usize,
    /// Only clients whose MAC matches one of these are served; empty: every client.
    pub serve_macs: Vec<MacPattern>,
    /// Clients whose MAC matches one of these are never served (this wins over
    /// `serve_macs`).
    pub ignore_macs: Vec<MacPattern>,
    /// Answer even while another DHCP server answers on the segment. When `false` the server
    /// stays quiet while one does (see *Other servers* in [`server`](super::server)).
    pub authoritative: bool,
}

impl DhcpSettings {
    /// Whether the client with this MAC is to be served at all (`serve_macs`, `ignore_macs`).
    pub fn serves(&self, mac: [u8; 6]) -> bool {
        (self.serve_macs.is_empty() || self.serve_macs.iter().any(|p| p.matches(mac)))
            && !self.ignore_macs.iter().any(|p| p.matches(mac))
    }
}

/// A MAC address, or a prefix of one: the first `prefix_len` bits of `mac` (48 for one
/// address, 24 for a vendor's OUI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacPattern {
    /// The address; bits beyond `prefix_len` are zero.
    pub mac: [u8; 6],
    /// How many leading bits must match, 1..=48.
    pub prefix_len: u8,
}

impl MacPattern {
    /// Whether `mac` starts with the pattern's bits.
    pub fn matches(&self, mac: [u8; 6]) -> bool {
        let bits = u32::from(self.prefix_len.min(48));
        let to_u64 = |m: [u8; 6]| m.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        let mask = if bits == 0 {
            0
        } else {
            (!0u64 << (48 - bits)) & 0xffff_ffff_ffff
        };
        to_u64(mac) & mask == to_u64(self.mac) & mask
    }
}

/// Microsoft's code for classless static routes.
const MS_CLASSLESS_STATIC_ROUTE: u8 = 249;

/// The route list as sent: the configured routes, plus a default route via the router when
/// one is configured and the list has none (RFC 3442 §1).
pub fn effective_routes(settings: &DhcpSettings) -> Vec<StaticRoute> {
    let mut routes = settings.routes.clone();
    if let Some(gw) = settings.gateway {
        if !routes.is_empty() && !routes.iter().any(|r| r.prefix_len == 0) {
            routes.push(StaticRoute {
                dest: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                gateway: gw,
            });
        }
    }
    routes
}

/// RFC 3442 encoding: per route, the prefix length, the significant octets of the destination,
/// then the router.
pub fn encode_routes(routes: &[StaticRoute]) -> Vec<u8> {
    let mut out = Vec::with_capacity(routes.len() * 9);
    for r in routes {
        let significant = usize::from(r.prefix_len).div_ceil(8);
        out.push(r.prefix_len);
        out.extend_from_slice(&r.dest.octets()[..significant]);
        out.extend_from_slice(&r.gateway.octets());
    }
    out
}

/// Whether the client asked for `code`; a client without option 55 gets everything configured.
fn wanted(prl: Option<&[OptionCode]>, code: OptionCode) -> bool {
    prl.is_none_or(|list| list.contains(&code))
}

/// Adds the configuration options to `opts`.
///
/// `lease` is `None` for an ACK to INFORM, which carries no lease times.
pub fn add_config_options(
    opts: &mut DhcpOptions,
    settings: &DhcpSettings,
    prl: Option<&[OptionCode]>,
    lease: Option<Duration>,
    static_hostname: Option<&str>,
) {
    opts.insert(DhcpOption::SubnetMask(settings.mask));
    if let Some(lease) = lease {
        let secs = u32::try_from(lease.as_secs()).unwrap_or(u32::MAX);
        opts.insert(DhcpOption::AddressLeaseTime(secs));
        opts.insert(DhcpOption::Renewal(secs / 2));
        opts.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
    }
    if let Some(gw) = settings.gateway {
        if wanted(prl, OptionCode::Router) {
            opts.insert(DhcpOption::Router(vec![gw]));
        }
    }
    if !settings.dns.is_empty() && wanted(prl, OptionCode::DomainNameServer) {
        opts.insert(DhcpOption::DomainNameServer(settings.dns.clone()));
    }
    if let Some(domain) = settings.domain.as_deref().filter(|d| !d.is_empty()) {
        if wanted(prl, OptionCode::DomainName) {
            opts.insert(DhcpOption::DomainName(domain.to_owned()));
        }
    }
    if let Some(name) = static_hostname {
        if wanted(prl, OptionCode::Hostname) {
            opts.insert(DhcpOption::Hostname(name.to_owned()));
        }
    }
    let routes = effective_routes(settings);
    if !routes.is_empty() {
        if wanted(prl, OptionCode::ClasslessStaticRoute) {
            let list = routes
                .iter()
                .filter_map(|r| {
                    Ipv4Net::new(r.dest, r.prefix_len)
                        .ok()
                        .map(|n| (n, r.gateway))
                })
                .collect();
            opts.insert(DhcpOption::ClasslessStaticRoute(list));
        }
        if wanted(prl, OptionCode::Unknown(MS_CLASSLESS_STATIC_ROUTE)) {
            opts.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(MS_CLASSLESS_STATIC_ROUTE),
                encode_routes(&routes),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3442_encoding_matches_the_rfc_examples() {
        let routes = [
            StaticRoute {
                dest: Ipv4Addr::new(10, 0, 0, 0),
                prefix_len: 8,
                gateway: Ipv4Addr::new(192, 168, 30, 1),
            },
            StaticRoute {
                dest: Ipv4Addr::new(10, 17, 0, 0),
                prefix_len: 16,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
            StaticRoute {
                dest: Ipv4Addr::new(10, 229, 0, 128),
                prefix_len: 25,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
            StaticRoute {
                dest: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
        ];
        assert_eq!(
            encode_routes(&routes),
            vec![
                8, 10, 192, 168, 30, 1, //
                16, 10, 17, 10, 0, 0, 1, //
                25, 10, 229, 0, 128, 10, 0, 0, 1, //
                0, 10, 0, 0, 1,
            ]
        );
    }
}
