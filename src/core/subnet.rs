//! IPv4 subnets: a network address and a prefix length, and the arithmetic on them.
//!
//! # Theory of operation
//!
//! A [`Subnet`] is always normalised: its network address has no bits set beyond the prefix, and
//! the prefix is at most 32. The two ways in are [`Subnet::new`] (an address and a prefix
//! length; the host bits are cleared) and [`Subnet::from_mask`] (an address and a netmask, as
//! `host.ip`/`host.mask` give them); a netmask whose one bits have gaps is refused (see
//! [`prefix_len`]) rather than guessed at. `"192.168.30.0/24".parse()` is the strict textual
//! form: host bits are an error there, because a person who wrote `10.0.0.1/8` may have meant
//! something else.
//!
//! Everything here is pure arithmetic on `u32`: no I/O, no allocation, no panics. The core asks
//! it per frame ([`Subnet::contains`], [`Subnet::broadcast`]), the configuration's validation
//! asks it once per check ([`Subnet::special`], [`Subnet::first_host`], …).
//!
//! The network and broadcast addresses of a subnet are not host addresses, except in a /31
//! (RFC 3021: both addresses of a point-to-point link are hosts) and a /32 (one host).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 subnet: a network address with no host bits set, and a prefix length 0..=32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a subnet cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// The netmask's one bits are not all at the top.
    #[error(
        "{0} is not a contiguous netmask (its one bits must all come first, e.g. 255.255.255.0)"
    )]
    NonContiguousMask(Ipv4Addr),
    /// The prefix length is more than 32.
    #[error("prefix length {0} is more than 32")]
    PrefixTooLong(u8),
    /// The text is not `ADDRESS/PREFIX` with an IPv4 address and a prefix of 0 to 32.
    #[error("invalid subnet {text:?}: {reason}")]
    Syntax {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The two addresses of a subnet that are not host addresses (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpecialAddress {
    /// The first address: the network itself.
    Network,
    /// The last address: the subnet's broadcast.
    Broadcast,
}

impl fmt::Display for SpecialAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpecialAddress::Network => "network",
            SpecialAddress::Broadcast => "broadcast",
        })
    }
}

/// The netmask of a prefix length: `mask_of(24)` is 255.255.255.0. `None` above 32.
pub fn mask_of(prefix_len: u8) -> Option<Ipv4Addr> {
    (prefix_len <= 32).then(|| Ipv4Addr::from(mask_bits(prefix_len)))
}

/// The prefix length of a netmask: `prefix_len(255.255.255.0)` is 24. `None` when the mask is
/// not contiguous (its one bits have gaps, as in 255.0.255.0).
pub fn prefix_len(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    // `ones` is at most 32, so it fits in a u8.
    (ones + m.trailing_zeros() == 32).then_some(ones as u8)
}

/// The mask bits of a prefix length already known to be at most 32.
fn mask_bits(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

impl Subnet {
    /// The subnet of `addr` with a prefix of `prefix_len` bits; the host bits of `addr` are
    /// cleared (`new(192.168.30.1, 24)` is 192.168.30.0/24). Fails above 32.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Subnet, SubnetError> {
        if prefix_len > 32 {
            return Err(SubnetError::PrefixTooLong(prefix_len));
        }
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask_bits(prefix_len)),
            prefix_len,
        })
    }

    /// The subnet of `addr` under the netmask `mask` (`from_mask(192.168.30.1,
    /// 255.255.255.0)` is 192.168.30.0/24). Fails when the mask is not contiguous.
    pub fn from_mask(addr: Ipv4Addr, mask: Ipv4Addr) -> Result<Subnet, SubnetError> {
        let prefix_len = prefix_len(mask).ok_or(SubnetError::NonContiguousMask(mask))?;
        Subnet::new(addr, prefix_len)
    }

    /// The network address: the first address of the subnet.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length, 0..=32.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The netmask (255.255.255.0 for a /24).
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask_bits(self.prefix_len))
    }

    /// The broadcast address: the last address of the subnet.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask_bits(self.prefix_len))
    }

    /// Whether `ip` is in the subnet (its network and broadcast addresses included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask_bits(self.prefix_len) == u32::from(self.network)
    }

    /// How many addresses the subnet holds: 2^(32 − prefix), 256 for a /24.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// How many host addresses it holds: [`size`](Subnet::size) less the network and broadcast
    /// addresses, which a /31 and a /32 do not set aside (254 for a /24, 2 for a /31, 1 for a
    /// /32).
    pub fn host_count(&self) -> u64 {
        match self.prefix_len {
            31 | 32 => self.size(),
            _ => self.size() - 2,
        }
    }

    /// The first host address (192.168.30.1 in 192.168.30.0/24).
    pub fn first_host(&self) -> Ipv4Addr {
        match self.prefix_len {
            31 | 32 => self.network,
            _ => Ipv4Addr::from(u32::from(self.network) + 1),
        }
    }

    /// The last host address (192.168.30.254 in 192.168.30.0/24).
    pub fn last_host(&self) -> Ipv4Addr {
        match self.prefix_len {
            31 | 32 => self.broadcast(),
            _ => Ipv4Addr::from(u32::from(self.broadcast()) - 1),
        }
    }

    /// Whether `ip` is the network or the broadcast address of this subnet (never in a /31 or
    /// a /32, whose every address is a host's).
    pub fn special(&self, ip: Ipv4Addr) -> Option<SpecialAddress> {
        if self.prefix_len >= 31 {
            None
        } else if ip == self.network {
            Some(SpecialAddress::Network)
        } else if ip == self.broadcast() {
            Some(SpecialAddress::Broadcast)
        } else {
            None
        }
    }

    /// Whether `ip` is a host address of this subnet: inside it, and not
    /// [special](Subnet::special).
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && self.special(ip).is_none()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    /// Parses `ADDRESS/PREFIX`, such as `10.0.0.0/8`. Host bits are refused: `10.0.0.1/8`
    /// is an error that suggests `10.0.0.0/8`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| SubnetError::Syntax {
            text: s.into(),
            reason,
        };
        let (addr, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX, like 10.0.0.0/8".into()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| bad(format!("{addr:?} is not an IPv4 address")))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad(format!("prefix {prefix:?} is not a number from 0 to 32")))?;
        let subnet = Subnet::new(addr, prefix_len)?;
        if subnet.network != addr {
            return Err(bad(format!("host bits are set (did you mean {subnet}?)")));
        }
        Ok(subnet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn net(s: &str) -> Subnet {
        s.parse().expect("test subnet")
    }

    #[test]
    fn masks_and_prefix_lengths_convert_both_ways() {
        for p in 0..=32u8 {
            let mask = mask_of(p).expect("0..=32");
            assert_eq!(prefix_len(mask), Some(p), "{mask}");
        }
        assert_eq!(mask_of(24), Some(ip("255.255.255.0")));
        assert_eq!(mask_of(0), Some(ip("0.0.0.0")));
        assert_eq!(mask_of(33), None);
        assert_eq!(prefix_len(ip("255.255.255.0")), Some(24));
        assert_eq!(prefix_len(ip("255.255.255.255")), Some(32));
        assert_eq!(prefix_len(ip("255.255.128.128")), None);
        assert_eq!(prefix_len(ip("255.0.255.0")), None);
        assert_eq!(prefix_len(ip("0.0.0.1")), None);
    }

    #[test]
    fn from_mask_normalises_and_refuses_gaps() {
        let s = Subnet::from_mask(ip("192.168.30.1"), ip("255.255.255.0")).expect("valid");
        assert_eq!(s, net("192.168.30.0/24"));
        assert_eq!((s.network(), s.prefix_len()), (ip("192.168.30.0"), 24));
        assert_eq!(s.mask(), ip("255.255.255.0"));
        assert_eq!(
            Subnet::from_mask(ip("10.1.2.3"), ip("255.0.255.0")),
            Err(SubnetError::NonContiguousMask(ip("255.0.255.0")))
        );
        assert_eq!(
            Subnet::new(ip("10.1.2.3"), 33),
            Err(SubnetError::PrefixTooLong(33))
        );
        assert_eq!(
            Subnet::new(ip("10.1.2.3"), 8).expect("valid"),
            net("10.0.0.0/8")
        );
    }

    #[test]
    fn contains_broadcast_and_counts() {
        let s = net("192.168.30.0/24");
        assert!(s.contains(ip("192.168.30.0")));
        assert!(s.contains(ip("192.168.30.255")));
        assert!(!s.contains(ip("192.168.31.0")));
        assert_eq!(s.broadcast(), ip("192.168.30.255"));
        assert_eq!((s.size(), s.host_count()), (256, 254));
        assert_eq!(
            (s.first_host(), s.last_host()),
            (ip("192.168.30.1"), ip("192.168.30.254"))
        );
        let all = net("0.0.0.0/0");
        assert!(all.contains(ip("255.255.255.255")));
        assert_eq!(all.broadcast(), Ipv4Addr::BROADCAST);
        assert_eq!(all.size(), 1 << 32);
        let p2p = net("10.0.0.0/31");
        assert_eq!(p2p.host_count(), 2);
        assert_eq!(
            (p2p.first_host(), p2p.last_host()),
            (ip("10.0.0.0"), ip("10.0.0.1"))
        );
        assert_eq!(p2p.special(ip("10.0.0.0")), None);
        let one = net("10.0.0.7/32");
        assert_eq!((one.host_count(), one.broadcast()), (1, ip("10.0.0.7")));
        assert!(one.is_host(ip("10.0.0.7")));
        assert!(!one.contains(ip("10.0.0.6")));
    }

    #[test]
    fn network_and_broadcast_are_special() {
        let s = net("192.168.30.0/24");
        assert_eq!(s.special(ip("192.168.30.0")), Some(SpecialAddress::Network));
        assert_eq!(
            s.special(ip("192.168.30.255")),
            Some(SpecialAddress::Broadcast)
        );
        assert_eq!(s.special(ip("192.168.30.1")), None);
        assert!(s.is_host(ip("192.168.30.1")));
        assert!(!s.is_host(ip("192.168.30.255")));
        assert!(!s.is_host(ip("192.168.31.1")));
        assert_eq!(SpecialAddress::Broadcast.to_string(), "broadcast");
    }

    #[test]
    fn text_form_is_strict() {
        assert_eq!(net(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
        for (bad, why) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
            ("10.0.0.0", "expected ADDRESS/PREFIX"),
            ("10.0.0.0/33", "prefix \"33\""),
            ("10.0.0/8", "\"10.0.0\" is not an IPv4 address"),
            ("fd00::/8", "is not an IPv4 address"),
        ] {
            let err = bad.parse::<Subnet>().expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
