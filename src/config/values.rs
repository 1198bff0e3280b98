//! Value types of the configuration, and how each is written in the file.
//!
//! # Theory of operation
//!
//! Every value a person writes is one TOML string (or a number where that is natural), parsed
//! by the type's `FromStr` or by one of the serde adapters below and written back the same way,
//! so `hubnat config` prints what a file may hold and a printed configuration loads back
//! unchanged:
//!
//! - [`MacAddr`] `"00:ac:12:34:56:78"`, [`Route`] `"10.0.0.0/8 via 192.168.30.1"`,
//!   [`SocketMode`] `"0600"` (or a TOML integer taken as the bits);
//! - `opt_text`: an optional value where `""` means "not set", so a higher layer can unset what
//!   a lower one set;
//! - `text_list`: a list of strings, where one string is a list of one and `""` the empty list
//!   (convenient in environment variables);
//! - `duration_text`: humantime durations (`"90s"`, `"10m"`, `"2h"`, `"1day"`); a bare number
//!   is refused, because its unit would be a guess;
//! - `size_text`, `size_required`: byte sizes with units (`"64KiB"`, `"10MB"`) or plain byte
//!   counts.
//!
//! Parse errors say what was given and show a correct example; the loader adds the key and the
//! value's source.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use hubnat_hub::Endpoint;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::core::subnet::Subnet;

/// An error from parsing one of this module's text forms ([`MacAddr`], [`Route`], …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

/// An Ethernet MAC address, written `00:ac:12:34:56:78` (or with `-` separators).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// True for an address one station may own: not multicast (which includes broadcast;
    /// the low bit of the first octet), and not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ParseError(format!(
                "invalid MAC address {s:?}: expected six two-digit hex octets separated by ':' \
                 or '-', like 00:ac:12:34:56:78"
            ))
        };
        let sep = if s.contains(':') { ':' } else { '-' };
        let mut octets = [0u8; 6];
        let mut parts = s.split(sep);
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(octets))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A MAC address or a prefix of one, written `"52:54:00:12:34:56"` (one address) or
/// `"52:54:00:00:00:00/24"` (every address starting with those 24 bits: a vendor's OUI).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacPrefix(pub crate::core::dhcp::MacPattern);

impl fmt::Display for MacPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", MacAddr(self.0.mac))?;
        if self.0.prefix_len != 48 {
            write!(f, "/{}", self.0.prefix_len)?;
        }
        Ok(())
    }
}

impl fmt::Debug for MacPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacPrefix({self})")
    }
}

impl FromStr for MacPrefix {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| {
            ParseError(format!(
                "invalid MAC address or prefix {s:?}: {why}; write one address like                  \"52:54:00:12:34:56\" or a prefix like \"52:54:00:00:00:00/24\""
            ))
        };
        let (mac, len) = match s.trim().split_once('/') {
            Some((mac, len)) => {
                let len: u8 = len
                    .parse()
                    .ok()
                    .filter(|l| (1..=48).contains(l))
                    .ok_or_else(|| bad(format!("prefix length {len:?} is not 1 to 48")))?;
                (mac, len)
            }
            None => (s.trim(), 48),
        };
        let mac: MacAddr = mac.parse().map_err(|e: ParseError| bad(e.0))?;
        let pattern = crate::core::dhcp::MacPattern {
            mac: mac.0,
            prefix_len: len,
        };
        let to_u64 = |m: [u8; 6]| m.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        let host_bits = to_u64(mac.0) & ((1u64 << (48 - u32::from(len))) - 1);
        if host_bits != 0 {
            return Err(bad(format!("bits beyond the first {len} are set in {mac}")));
        }
        Ok(MacPrefix(pattern))
    }
}

impl Text for MacPrefix {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.parse().map_err(|e: ParseError| e.0)
    }
}

/// A classless static route handed to DHCP clients (option 121), written
/// `"10.0.0.0/8 via 192.168.30.1"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// The destination network; no bits beyond `prefix_len` are set.
    pub dest: Ipv4Addr,
    /// The destination's prefix length, 0..=32.
    pub prefix_len: u8,
    /// The router on the segment that reaches `dest`.
    pub gateway: Ipv4Addr,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} via {}", self.dest, self.prefix_len, self.gateway)
    }
}

impl FromStr for Route {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| {
            ParseError(format!(
                "invalid route {s:?}: {why}; write it as \"NETWORK/PREFIX via GATEWAY\", e.g. \
                 \"10.0.0.0/8 via 192.168.30.1\""
            ))
        };
        let words: Vec<&str> = s.split_whitespace().collect();
        let [cidr, via, gateway] = words[..] else {
            return Err(bad("expected three words".into()));
        };
        if via != "via" {
            return Err(bad(format!("expected \"via\", found {via:?}")));
        }
        let (dest, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| bad(format!("{cidr:?} has no /PREFIX")))?;
        let dest: Ipv4Addr = dest
            .parse()
            .map_err(|_| bad(format!("{dest:?} is not an IPv4 address")))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad(format!("prefix {prefix:?} is not a number from 0 to 32")))?;
        let gateway: Ipv4Addr = gateway
            .parse()
            .map_err(|_| bad(format!("{gateway:?} is not an IPv4 address")))?;
        let network = Subnet::new(dest, prefix_len)
            .map_err(|e| bad(e.to_string()))?
            .network();
        if network != dest {
            return Err(bad(format!(
                "{cidr} has host bits set (did you mean {network}/{prefix_len}?)"
            )));
        }
        Ok(Route {
            dest,
            prefix_len,
            gateway,
        })
    }
}

impl Serialize for Route {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Permission bits of a socket file, written as an octal string such as `"0600"` (a TOML
/// integer, e.g. the octal `0o600`, is taken as the bits themselves).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketMode(pub u32);

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl fmt::Debug for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SocketMode({self})")
    }
}

impl FromStr for SocketMode {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        if digits.is_empty()
            || digits.len() > 4
            || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
        {
            return Err(ParseError(format!(
                "invalid file mode {s:?}: expected up to four octal digits, like \"0600\" (owner \
                 only) or \"0660\" (owner and group)"
            )));
        }
        u32::from_str_radix(digits, 8)
            .map(SocketMode)
            .map_err(|e| ParseError(format!("invalid file mode {s:?}: {e}")))
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModeVisitor;

        impl serde::de::Visitor<'_> for ModeVisitor {
            type Value = SocketMode;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a file mode such as \"0600\"")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SocketMode, E> {
                s.parse().map_err(|e: ParseError| E::custom(e.0))
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<SocketMode, E> {
                u32::try_from(n)
                    .map(SocketMode)
                    .map_err(|_| E::custom(format!("file mode {n} is too large")))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<SocketMode, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("file mode {n} is negative")))
                    .and_then(|n| self.visit_u64(n))
            }
        }

        d.deserialize_any(ModeVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Text forms for serde
// ---------------------------------------------------------------------------------------------

/// A value written as one string in the configuration.
pub(super) trait Text: Sized {
    fn to_text(&self) -> String;
    fn from_text(s: &str) -> Result<Self, String>;
}

impl Text for Ipv4Addr {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("invalid IPv4 address {s:?}"))
    }
}

impl Text for MacAddr {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|e: ParseError| e.0)
    }
}

impl Text for Route {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.parse().map_err(|e: ParseError| e.0)
    }
}

impl Text for String {
    fn to_text(&self) -> String {
        self.clone()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Ok(s.to_string())
    }
}

impl Text for PathBuf {
    fn to_text(&self) -> String {
        self.to_string_lossy().into_owned()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Ok(PathBuf::from(s))
    }
}

/// A hub socket address: `unix:/path` or `tcp:IP:PORT`.
impl Text for Endpoint {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.parse()
            .map_err(|e: hubnat_hub::EndpointError| e.to_string())
    }
}

/// A network, `ADDRESS/PREFIX`. IPv6 parses too, so that validation can say why it is refused
/// where it is (`nat.deny`) rather than call it malformed.
impl Text for IpNet {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|_| {
            format!("invalid network {s:?}: write it as ADDRESS/PREFIX, like \"10.0.0.0/8\"")
        })
    }
}

/// A DNS server: `IP` (port 53), `IP:PORT`, `[IPv6]:PORT`.
impl Text for SocketAddr {
    fn to_text(&self) -> String {
        upstream_text(*self)
    }
    fn from_text(s: &str) -> Result<Self, String> {
        parse_upstream(s)
    }
}

pub(super) fn upstream_text(server: SocketAddr) -> String {
    match server.port() {
        53 => server.ip().to_string(),
        _ => server.to_string(),
    }
}

pub(super) fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| {
            format!(
                "invalid DNS server {s:?}: expected an address with an optional port, like \
                 \"1.1.1.1\", \"1.1.1.1:5353\", \"::1\" or \"[::1]:5353\""
            )
        })
}

/// `Option<T>` as a string, where `""` (or nothing) means `None`.
pub(super) mod opt_text {
    use super::Text;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Text, S: Serializer>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&value.as_ref().map(Text::to_text).unwrap_or_default())
    }

    pub fn deserialize<'de, T: Text, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.trim().is_empty() => Ok(None),
            Some(s) => T::from_text(&s).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// `Vec<T>` as a list of strings; one string is a list of one, `""` an empty list.
pub(super) mod text_list {
    use super::Text;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::marker::PhantomData;

    pub fn serialize<T: Text, S: Serializer>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(Text::to_text))
    }

    pub fn deserialize<'de, T: Text, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);

        impl<'de, T: Text> Visitor<'de> for ListVisitor<T> {
            type Value = Vec<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings")
            }

            fn visit_str<E: Error>(self, s: &str) -> Result<Vec<T>, E> {
                if s.trim().is_empty() {
                    return Ok(Vec::new());
                }
                T::from_text(s).map(|item| vec![item]).map_err(E::custom)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(text) = seq.next_element::<String>()? {
                    items.push(T::from_text(&text).map_err(A::Error::custom)?);
                }
                Ok(items)
            }
        }

        d.deserialize_any(ListVisitor(PhantomData))
    }
}

/// A `Duration` in humantime form (`"90s"`, `"10m"`, `"2h"`, `"1day"`).
pub(super) mod duration_text {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&words(*d))
    }

    /// Humantime form, but whole days as days ("365days", not "11months 30days 7h 30m").
    pub fn words(d: Duration) -> String {
        const DAY: u64 = 24 * 3600;
        match d.as_secs() {
            secs if d.subsec_nanos() == 0 && secs >= DAY && secs % DAY == 0 => {
                format!("{}days", secs / DAY)
            }
            _ => humantime::format_duration(d).to_string(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"90s\", \"10m\" or \"2h\"")
            }

            fn visit_str<E: Error>(self, s: &str) -> Result<Duration, E> {
                humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format!(
                        "invalid duration {s:?} ({e}); write a number and a unit, such as \
                         \"90s\", \"10m\", \"2h\" or \"1day\""
                    ))
                })
            }

            fn visit_u64<E: Error>(self, n: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}s\" for {n} seconds, or e.g. \"10m\", \"2h\""
                )))
            }

            fn visit_i64<E: Error>(self, n: i64) -> Result<Duration, E> {
                if let Ok(n) = u64::try_from(n) {
                    return self.visit_u64(n);
                }
                Err(E::custom(format!(
                    "invalid duration {n}: write a positive number and a unit, such as \"90s\""
                )))
            }
        }

        d.deserialize_any(DurationVisitor)
    }
}

/// A size that must be given (`size_text` allows "" for none).
pub(super) mod size_required {
    use serde::de::Error;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(size: &u64, s: S) -> Result<S::Ok, S::Error> {
        super::size_text::serialize(&Some(*size), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        super::size_text::deserialize(d)?.ok_or_else(|| {
            D::Error::custom("a size is needed here, such as \"1MiB\" or \"256KiB\"")
        })
    }
}

/// An optional byte size: `""` (none), a number of bytes, or a string with a unit: `B`,
/// `kB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024), case-insensitive.
pub(super) mod size_text {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    const UNITS: [(&str, u64); 7] = [
        ("gib", 1 << 30),
        ("mib", 1 << 20),
        ("kib", 1 << 10),
        ("gb", 1_000_000_000),
        ("mb", 1_000_000),
        ("kb", 1_000),
        ("b", 1),
    ];

    pub fn serialize<S: Serializer>(size: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&size.map(words).unwrap_or_default())
    }

    /// The shortest exact form: "100MiB", "5MB", "1234B".
    pub fn words(n: u64) -> String {
        for (name, factor) in [
            ("GiB", 1u64 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("kB", 1_000),
        ] {
            if n >= factor && n % factor == 0 {
                return format!("{}{name}", n / factor);
            }
        }
        format!("{n}B")
    }

    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = (&t[..split], t[split..].trim().to_ascii_lowercase());
        let bad = || {
            format!(
                "invalid size {text:?}: write a number of bytes, or a number and a unit such as \
                 \"100MiB\", \"10MB\", \"64KiB\""
            )
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, f)| *f)
                .ok_or_else(bad)?
        };
        n.checked_mul(factor)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = Option<u64>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"100MiB\", or a number of bytes")
            }

            fn visit_str<E: Error>(self, s: &str) -> Result<Option<u64>, E> {
                if s.trim().is_empty() {
                    return Ok(None);
                }
                parse(s).map(Some).map_err(E::custom)
            }

            fn visit_u64<E: Error>(self, n: u64) -> Result<Option<u64>, E> {
                Ok(Some(n))
            }

            fn visit_i64<E: Error>(self, n: i64) -> Result<Option<u64>, E> {
                u64::try_from(n)
                    .map(Some)
                    .map_err(|_| E::custom(format!("invalid size {n}: it must not be negative")))
            }
        }

        d.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result
mod tests {
    use std::time::Duration;

    use figment::Jail;

    use crate::config::testing::*;
    use crate::config::*;

    use super::*;

    #[test]
    fn durations_use_humantime() {
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                r#"
                dhcp.lease = "90s"
                nat.tcp_timeout = "1day"
                nat.udp_timeout = "10m 30s"
            "#,
            )
            .expect("valid");
            assert_eq!(c.dhcp.lease, Duration::from_secs(90));
            assert_eq!(c.nat.tcp_timeout, Duration::from_secs(86400));
            assert_eq!(c.nat.udp_timeout, Duration::from_secs(630));
            Ok(())
        });
        let json = serde_json::to_value(Config::default()).expect("serialize");
        assert_eq!(json["dhcp"]["lease"], "2h");
        assert_eq!(json["nat"]["udp_timeout"], "10m");
        assert_eq!(duration_text::words(MAX_LEASE), "365days");
        assert_eq!(humantime::parse_duration("365days").ok(), Some(MAX_LEASE));
    }

    #[test]
    fn bad_durations_name_key_value_and_source() {
        assert_rejects(
            "[dhcp]\nlease = \"soon\"",
            &["config key dhcp.lease = \"soon\" (from file x.toml): invalid duration"],
        );
        assert_rejects(
            "[dhcp]\nlease = 7200",
            &["dhcp.lease = 7200", "needs a unit", "\"7200s\""],
        );
        assert_rejects(
            "[nat]\nudp_timeout = -5",
            &["nat.udp_timeout = -5", "invalid duration"],
        );
    }

    #[test]
    fn empty_gateway_and_domain_mean_none() {
        Jail::expect_with(|jail| {
            let c =
                load_toml(jail, "[dhcp]\ngateway = \"\"\ndomain = \"\"\ndns = []").expect("valid");
            assert_eq!(c.dhcp.gateway, None);
            assert_eq!(c.dhcp.domain, None);
            assert!(c.dhcp.dns.is_empty());
            let json = serde_json::to_value(&c).expect("serialize");
            assert_eq!(json["dhcp"]["gateway"], "");
            assert_eq!(json["dhcp"]["domain"], "");
            let c = load_toml(
                jail,
                "[dhcp]\ngateway = \"192.168.30.254\"\ndomain = \"example.lan\"",
            )
            .expect("valid");
            assert_eq!(c.dhcp.gateway, Some(ip("192.168.30.254")));
            assert_eq!(c.dhcp.domain.as_deref(), Some("example.lan"));
            Ok(())
        });
    }

    #[test]
    fn mac_addresses_parse_display_and_classify() {
        let m = mac("00:AC:12:34:56:78");
        assert_eq!(m, MacAddr([0x00, 0xac, 0x12, 0x34, 0x56, 0x78]));
        assert_eq!(m.to_string(), "00:ac:12:34:56:78");
        assert_eq!(format!("{m:?}"), "MacAddr(00:ac:12:34:56:78)");
        assert_eq!(mac("00-ac-12-34-56-78"), m);
        assert!(m.is_unicast());
        assert!(!MacAddr::BROADCAST.is_unicast());
        assert!(!mac("01:00:5e:00:00:01").is_unicast());
        assert!(!mac("00:00:00:00:00:00").is_unicast());
        assert!(mac("02:00:00:00:00:01").is_unicast()); // locally administered is fine
        for bad in [
            "",
            "00:ac:12:34:56",
            "00:ac:12:34:56:78:9a",
            "0:ac:12:34:56:78",
            "00:ac-12:34:56:78",
            "gg:ac:12:34:56:78",
            "00:ac:12:34:56:+7",
        ] {
            let err = bad.parse::<MacAddr>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert_eq!(
            serde_json::to_string(&m).expect("ser"),
            "\"00:ac:12:34:56:78\""
        );
        assert_eq!(
            serde_json::from_str::<MacAddr>("\"00-ac-12-34-56-78\"").expect("de"),
            m
        );
        assert!(m < MacAddr::BROADCAST);
    }

    #[test]
    fn mac_prefixes_parse_display_match_and_reject() {
        let one: MacPrefix = "52:54:00:12:34:56".parse().expect("one address");
        assert_eq!(one.0.prefix_len, 48);
        assert_eq!(one.to_string(), "52:54:00:12:34:56");
        assert!(one.0.matches([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(!one.0.matches([0x52, 0x54, 0, 0x12, 0x34, 0x57]));
        let oui: MacPrefix = "52-54-00-00-00-00/24".parse().expect("an OUI");
        assert_eq!(oui.to_string(), "52:54:00:00:00:00/24");
        assert!(oui.0.matches([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert!(!oui.0.matches([0x5e, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        for (bad, why) in [
            ("52:54:00:12:34:56/24", "bits beyond the first 24"),
            ("52:54:00:00:00:00/0", "prefix length \"0\""),
            ("52:54:00:00:00:00/49", "prefix length \"49\""),
            ("52:54:00", "six two-digit hex octets"),
        ] {
            let err = bad.parse::<MacPrefix>().expect_err(bad).to_string();
            assert!(
                err.contains(why) && err.contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                "[dhcp]\nserve_macs = [\"5e:00:00:00:00:00/8\"]\nignore_macs = \"5e:11:22:33:44:55\"\nauthoritative = true",
            )
            .expect("valid");
            assert_eq!(c.dhcp.serve_macs.len(), 1);
            assert_eq!(c.dhcp.ignore_macs[0].to_string(), "5e:11:22:33:44:55");
            assert!(c.dhcp.authoritative);
            Ok(())
        });
        assert_rejects(
            "[dhcp]\nignore_macs = [\"52:54:00:12:34:56/24\"]",
            &["dhcp.ignore_macs", "52:54:00:12:34:56/24", "bits beyond"],
        );
    }

    #[test]
    fn routes_parse_display_and_reject() {
        let r: Route = "10.0.0.0/8 via 192.168.30.1".parse().expect("valid");
        assert_eq!(
            r,
            Route {
                dest: ip("10.0.0.0"),
                prefix_len: 8,
                gateway: ip("192.168.30.1")
            }
        );
        assert_eq!(r.to_string(), "10.0.0.0/8 via 192.168.30.1");
        assert_eq!(
            "  0.0.0.0/0   via 192.168.30.254 "
                .parse::<Route>()
                .expect("default route")
                .prefix_len,
            0
        );
        assert_eq!(
            "192.168.40.7/32 via 192.168.30.2"
                .parse::<Route>()
                .expect("host route")
                .prefix_len,
            32
        );
        for (bad, why) in [
            ("10.0.0.1/8 via 192.168.30.1", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33 via 192.168.30.1", "prefix \"33\""),
            ("10.0.0.0 via 192.168.30.1", "no /PREFIX"),
            ("10.0.0.0/8 192.168.30.1", "three words"),
            ("10.0.0.0/8 through 192.168.30.1", "expected \"via\""),
            ("10.0.0.0/8 via gw", "\"gw\" is not an IPv4 address"),
            (
                "10.0.0/8 via 192.168.30.1",
                "\"10.0.0\" is not an IPv4 address",
            ),
            ("", "three words"),
        ] {
            let err = bad.parse::<Route>().expect_err(bad).to_string();
            assert!(
                err.contains(why) && err.contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
        Jail::expect_with(|jail| {
            let c = load_toml(jail, "[dhcp]\nroutes = [\"10.0.0.0/8 via 192.168.30.254\", \"172.16.0.0/12 via 192.168.30.1\"]")
                .expect("valid");
            assert_eq!(c.dhcp.routes.len(), 2);
            Ok(())
        });
        assert_rejects(
            "[dhcp]\nroutes = [\"10.0.0.1/8 via 192.168.30.1\"]",
            &[
                "dhcp.routes = [\"10.0.0.1/8 via 192.168.30.1\"]",
                "host bits",
            ],
        );
        assert_rejects(
            "[dhcp]\nroutes = [\"10.0.0.0/8 via 10.1.1.1\"]",
            &[
                "dhcp.routes[0] = 10.0.0.0/8 via 10.1.1.1",
                "10.1.1.1 outside the subnet 192.168.30.0/24",
            ],
        );
    }

    #[test]
    fn upstream_forms() {
        let p = |s: &str| parse_upstream(s).expect(s);
        assert_eq!(p("1.2.3.4"), "1.2.3.4:53".parse().expect("addr"));
        assert_eq!(p("1.2.3.4:5353"), "1.2.3.4:5353".parse().expect("addr"));
        assert_eq!(p("::1"), "[::1]:53".parse().expect("addr"));
        assert_eq!(p("[::1]:53"), "[::1]:53".parse().expect("addr"));
        assert_eq!(upstream_text(p("1.2.3.4")), "1.2.3.4");
        assert_eq!(upstream_text(p("::1")), "::1");
        assert_eq!(upstream_text(p("[::1]:5353")), "[::1]:5353");
        assert!(parse_upstream("dns.google").is_err());
        assert_rejects(
            "[dns]\nupstream = [\"1.1.1.1\", \"resolver\"]",
            &[
                "dns.upstream = [\"1.1.1.1\", \"resolver\"]",
                "invalid DNS server \"resolver\"",
            ],
        );
        assert_rejects(
            "[dns]\nupstream = [\"1.1.1.1:0\"]",
            &["dns.upstream[0] = \"1.1.1.1:0\"", "port 0"],
        );
        assert_rejects(
            "[dns]\nupstream = [\"224.0.0.251\"]",
            &["dns.upstream[0]", "unicast"],
        );
    }

    #[test]
    fn tcp_buffer_takes_sizes() {
        Jail::expect_with(|jail| {
            let c = load_toml(jail, "[nat]\ntcp_buffer = \"256KiB\"").expect("loads");
            assert_eq!(c.nat.tcp_buffer, 256 * 1024);
            let c = load_toml(jail, "[nat]\ntcp_buffer = 65536").expect("loads");
            assert_eq!(c.nat.tcp_buffer, 65536);
            Ok(())
        });
    }
}
