//! Configuration: the layered settings of one hubnat instance, and their validation.
//!
//! # Theory of operation
//!
//! A [`Config`] is built from four layers with [figment]; a later layer wins key by key:
//!
//! 1. **built-in defaults** — [`Config::default()`]: the reference behaviour (192.168.30.1/24,
//!    DHCP range .10–.200, 2 h leases, MTU 1500, …) plus four values taken from the host:
//!    `dhcp.domain` (the host's domain), `dns.upstream` (the nameservers of `/etc/resolv.conf`),
//!    `state.dir` (per user or system-wide) and `host.mac` (unset: generated elsewhere and kept
//!    in the state directory);
//! 2. **the TOML file** given with `--config FILE` ([`Sources::file`]); it must exist;
//! 3. **environment variables** `HUBNAT_…` ([`Sources::env`]); `__` separates the levels, so
//!    `HUBNAT_DHCP__RANGE_START=192.168.30.50` sets `dhcp.range_start`. Values are parsed the
//!    way figment parses them (`1500` is a number, `true` a boolean, `[1.1.1.1, 9.9.9.9]` a
//!    list). `HUBNAT_CONFIG` is not a key: it is left to the CLI, which may use it for the path
//!    of the file;
//! 4. **command-line overrides** `--set KEY=VALUE` ([`Override`]): VALUE is read as a TOML
//!    value when it is one (`1400`, `true`, `"text"`, `["1.1.1.1"]`), else like an environment
//!    value, else as a plain string.
//!
//! Every table rejects unknown keys, and every key may be left out. An empty string means
//! "not set" for the optional values (`dhcp.gateway = ""` sends no router option,
//! `dhcp.domain = ""` no domain), so a higher layer can unset what a lower one set.
//! Durations are written the humantime way: `"90s"`, `"10m"`, `"2h"`, `"1day"`.
//!
//! [`Config::load`] extracts the layers and then [`Config::validate`]s the result. Every
//! error, from either step, names the key, the offending value, where that value came from (the
//! file path, the environment variable's name, the command line or the built-in defaults) and
//! what is wrong, e.g.
//!
//! ```text
//! config key dhcp.range_end = 192.168.31.5 (from file ./x.toml): outside the subnet 192.168.30.0/24 given by host.ip and host.mask
//! ```
//!
//! Validation reports every problem it finds, not only the first; figment's own type errors
//! stop at the first one.
//!
//! ## Bounds, and why
//!
//! - `dhcp.lease`: 10 s to 365 days. Ten seconds keeps tests fast while still leaving room for
//!   a client's renewal at T1 = ½ lease; a year is far beyond any sane lease and keeps every
//!   expiry time representable (the DHCP lease-time option is 32-bit seconds, and
//!   `Instant + lease` cannot overflow).
//! - `nat.tcp_timeout`, `nat.udp_timeout`: 1 s to 365 days, for the same overflow reason.
//! - `nat.mtu`, `backend.tap.mtu`: 576 (the IPv4 minimum datagram every host must accept) to
//!   65520 (the largest MTU a Linux TAP device and other user-mode NATs use).
//! - The DHCP range holds at most 65536 addresses, so the lease pool stays bounded.
//! - `host.mask` is at most /30: the subnet must hold the virtual host and at least one client.
//! - `nat.max_sessions`: 1 to 1,000,000, so the session table stays bounded; and
//!   `nat.max_sessions_per_client` from 1 to `nat.max_sessions`.
//! - `backend.hub.max_peers`: 1 to 4096 (each peer costs a thread-free task and ~130 KiB of
//!   buffers). `backend.hub.socket_mode`: permission bits only (at most 0777).
//! - `capture.snaplen`: 14 (an Ethernet header) to 262144 (tcpdump's "everything");
//!   `capture.max_size` at least 4 KiB; `capture.max_files` 1 to 1000.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use hubnat_backend::capture::{MAX_SNAPLEN, MIN_SNAPLEN};
use hubnat_hub::Endpoint;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The prefix of hubnat's environment variables.
pub const ENV_PREFIX: &str = "HUBNAT_";
/// What separates the levels of a key in an environment variable's name.
pub const ENV_SEPARATOR: &str = "__";
/// The smallest MTU accepted for `nat.mtu` and `backend.tap.mtu`.
pub const MIN_MTU: u32 = 576;
/// The largest MTU accepted for `nat.mtu` and `backend.tap.mtu`.
pub const MAX_MTU: u32 = 65520;
/// The shortest DHCP lease accepted.
pub const MIN_LEASE: Duration = Duration::from_secs(10);
/// The longest DHCP lease accepted (365 days).
pub const MAX_LEASE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest NAT idle timeout accepted.
pub const MIN_NAT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest NAT idle timeout accepted (365 days).
pub const MAX_NAT_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The most addresses a DHCP range may hold.
pub const MAX_RANGE_SIZE: u64 = 65536;
/// The longest network interface name Linux accepts (IFNAMSIZ − 1).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// The most NAT sessions `nat.max_sessions` may allow.
pub const MAX_NAT_SESSIONS: u32 = 1_000_000;
/// The most peers `backend.hub.max_peers` may allow.
pub const MAX_HUB_PEERS: u32 = 4096;
/// `nat.tcp_buffer` by default: 1 MiB, window scale 5 (see DESIGN.md).
pub const DEFAULT_TCP_BUFFER: u64 = 1 << 20;
/// `nat.tcp_buffer` at least (a few segments of a 1500-byte MTU).
pub const MIN_TCP_BUFFER: u64 = 16 << 10;
/// `nat.tcp_buffer` at most.
pub const MAX_TCP_BUFFER: u64 = 64 << 20;

/// The smallest capture file size limit (`capture.max_size`).
pub const MIN_CAPTURE_SIZE: u64 = 4096;
/// The most capture files kept when rotating (`capture.max_files`).
pub const MAX_CAPTURE_FILES: u32 = 1000;

/// Metadata names of the layers; [`describe_origin`] turns them into "(from …)" texts.
const ORIGIN_DEFAULTS: &str = "the built-in defaults";
const ORIGIN_ENV: &str = "environment variable";
const ORIGIN_CLI: &str = "the command line";

/// The file whose `nameserver`, `domain` and `search` lines give host-derived defaults.
const RESOLV_CONF: &str = "/etc/resolv.conf";

// ---------------------------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------------------------

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
        let network = Ipv4Addr::from(u32::from(dest) & prefix_mask(prefix_len));
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

/// A fixed address for one client, a `[[dhcp.static]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticLease {
    /// The client's MAC address.
    pub mac: MacAddr,
    /// The address it always gets; inside the subnet, may be inside or outside the range.
    pub ip: Ipv4Addr,
    /// The host name to record for it (and offer, if the client sends none).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// The whole configuration of one hubnat instance. `Default` is the reference behaviour with
/// the host-derived values described in the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The virtual host's own identity on the segment.
    pub host: HostConfig,
    /// The virtual DHCP server.
    pub dhcp: DhcpConfig,
    /// The virtual NAT.
    pub nat: NatConfig,
    /// The DNS redirect.
    pub dns: DnsConfig,
    /// Where the segment's frames come from.
    pub backend: BackendConfig,
    /// Persistent state (leases, generated MAC).
    pub state: StateConfig,
    /// Logging and the security log.
    pub log: LogConfig,
    /// Packet capture of the segment's frames to a pcap file.
    pub capture: CaptureConfig,
}

/// The virtual host's MAC and IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The virtual host's MAC. `None`: `00:ac` + 4 random bytes, generated once and kept in
    /// the state directory.
    #[serde(with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The virtual host's address; clients use it as router and DNS server.
    pub ip: Ipv4Addr,
    /// The segment's netmask; with `ip` it gives the subnet everything else must fit in.
    pub mask: Ipv4Addr,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            mac: None,
            ip: Ipv4Addr::new(192, 168, 30, 1),
            mask: Ipv4Addr::new(255, 255, 255, 0),
        }
    }
}

/// The virtual DHCP server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    /// Whether the DHCP server answers at start-up (it can be toggled at run time).
    pub enabled: bool,
    /// The first address handed out dynamically.
    pub range_start: Ipv4Addr,
    /// The last address handed out dynamically (inclusive).
    pub range_end: Ipv4Addr,
    /// The netmask sent to clients (option 1).
    pub mask: Ipv4Addr,
    /// The lease time (option 51).
    #[serde(with = "duration_text")]
    pub lease: Duration,
    /// The router sent to clients (option 3); `None` (`""` in TOML): not sent.
    #[serde(with = "opt_text")]
    pub gateway: Option<Ipv4Addr>,
    /// The DNS servers sent to clients (option 6); empty: not sent.
    #[serde(with = "text_list")]
    pub dns: Vec<Ipv4Addr>,
    /// The domain name sent to clients (option 15); `None` (`""` in TOML): not sent.
    #[serde(with = "opt_text")]
    pub domain: Option<String>,
    /// Classless static routes (option 121), each `"CIDR via GATEWAY"`.
    #[serde(with = "text_list")]
    pub routes: Vec<Route>,
    /// Fixed addresses for known clients.
    #[serde(rename = "static")]
    pub statics: Vec<StaticLease>,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            enabled: true,
            range_start: Ipv4Addr::new(192, 168, 30, 10),
            range_end: Ipv4Addr::new(192, 168, 30, 200),
            mask: Ipv4Addr::new(255, 255, 255, 0),
            lease: Duration::from_secs(2 * 3600),
            gateway: Some(Ipv4Addr::new(192, 168, 30, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 30, 1)],
            domain: host_domain(),
            routes: Vec::new(),
            statics: Vec::new(),
        }
    }
}

/// The virtual NAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    /// Whether the NAT carries traffic at start-up (it can be toggled at run time).
    pub enabled: bool,
    /// The segment's MTU: the largest IP datagram in one Ethernet frame.
    pub mtu: u32,
    /// How long an idle TCP session lives.
    #[serde(with = "duration_text")]
    pub tcp_timeout: Duration,
    /// How long an idle UDP session lives.
    #[serde(with = "duration_text")]
    pub udp_timeout: Duration,
    /// Whether clients may reach the host's own loopback addresses (127.0.0.0/8, ::1) through
    /// the NAT. Off by default: a client would otherwise reach services that listen only
    /// locally on the host.
    pub allow_host_loopback: bool,
    /// Destinations the NAT refuses, as networks (`"10.0.0.0/8"`, `"fd00::/8"`); empty: none.
    #[serde(with = "text_list")]
    pub deny: Vec<IpNet>,
    /// The most NAT sessions at once, over all clients.
    pub max_sessions: u32,
    /// The most NAT sessions one client may hold at once; at most `max_sessions`.
    pub max_sessions_per_client: u32,
    /// Each TCP session's receive and send buffer in the user-mode stack (bytes, or a size
    /// such as "1MiB"). It sets the TCP window towards the client: bigger is faster on fast
    /// segments, and costs up to twice this much memory per busy connection.
    #[serde(with = "size_required")]
    pub tcp_buffer: u64,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            enabled: true,
            mtu: 1500,
            tcp_timeout: Duration::from_secs(7200),
            udp_timeout: Duration::from_secs(600),
            allow_host_loopback: false,
            deny: Vec::new(),
            max_sessions: 16384,
            max_sessions_per_client: 4096,
            tcp_buffer: DEFAULT_TCP_BUFFER,
        }
    }
}

/// The DNS redirect: queries to the virtual host's port 53 go to these servers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Upstream servers, tried in order; each `"IP"`, `"IP:PORT"` or `"[IPv6]:PORT"`, port 53
    /// when left out. Default: the nameservers of `/etc/resolv.conf` (none if it is missing).
    #[serde(with = "text_list")]
    pub upstream: Vec<SocketAddr>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            upstream: read_resolv_conf().nameservers,
        }
    }
}

/// Which frame backend carries the segment, and its settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// The backend in use.
    pub kind: BackendKind,
    /// Settings of the TAP backend.
    pub tap: TapConfig,
    /// Settings of the raw backend.
    pub raw: RawConfig,
    /// Settings of the hub socket backend.
    pub hub: HubConfig,
}

/// A frame backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A Linux TAP device (needs CAP_NET_ADMIN to create it).
    #[default]
    Tap,
    /// An existing interface, through an AF_PACKET socket (needs CAP_NET_RAW).
    Raw,
    /// A hub socket: peers on Unix or TCP stream sockets in QEMU's `-netdev stream` framing.
    Hub,
    /// An in-memory segment, for embedding and tests.
    Memory,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Tap => "tap",
            BackendKind::Raw => "raw",
            BackendKind::Hub => "hub",
            BackendKind::Memory => "memory",
        })
    }
}

/// The TAP backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TapConfig {
    /// The device name: 1 to 15 bytes, no '/', ':' or white space.
    pub name: String,
    /// The device's MTU; `None`: `nat.mtu` (see [`Config::tap_mtu`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl Default for TapConfig {
    fn default() -> Self {
        TapConfig {
            name: "hubnat0".into(),
            mtu: None,
        }
    }
}

/// The raw backend: an existing interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// The interface to attach to (a bridge, a VPN's TAP device, a veth); required when
    /// `backend.kind = "raw"`.
    pub interface: String,
}

/// The hub socket backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where peers connect: `"unix:/path"` or `"tcp:IP:PORT"`, one or several.
    #[serde(with = "text_list")]
    pub listen: Vec<Endpoint>,
    /// A listening hub to connect to as one more peer; `None` (`""`): none.
    #[serde(with = "opt_text")]
    pub connect: Option<Endpoint>,
    /// Permissions of the Unix socket files created for `listen`, e.g. `"0600"`.
    pub socket_mode: SocketMode,
    /// The most peers connected at once.
    pub max_peers: u32,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            listen: Vec::new(),
            connect: None,
            socket_mode: SocketMode(hubnat_hub::DEFAULT_SOCKET_MODE),
            max_peers: hubnat_hub::DEFAULT_MAX_PEERS as u32,
        }
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

/// Packet capture: every frame the backend passes, both ways, to a pcap file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The capture file; `None` (`""`): no capture.
    #[serde(with = "opt_text")]
    pub path: Option<PathBuf>,
    /// Bytes kept of each frame.
    pub snaplen: u32,
    /// Rotate the file when it would grow past this many bytes; `None` (`""`): never.
    #[serde(with = "size_text")]
    pub max_size: Option<u64>,
    /// Files kept when rotating, the current one included (`PATH`, `PATH.1`, …).
    pub max_files: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            path: None,
            snaplen: hubnat_backend::capture::DEFAULT_SNAPLEN,
            max_size: None,
            max_files: hubnat_backend::capture::DEFAULT_MAX_FILES,
        }
    }
}

/// Persistent state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Where leases and the generated MAC are kept. Default: `/var/lib/hubnat` for root,
    /// else `$XDG_STATE_HOME/hubnat`, else `$HOME/.local/state/hubnat`, else `./hubnat-state`.
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        StateConfig {
            dir: default_state_dir(
                euid,
                std::env::var_os("XDG_STATE_HOME"),
                std::env::var_os("HOME"),
            ),
        }
    }
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `"info"` or `"hubnat=debug,info"`.
    pub level: String,
    /// The format of the diagnostic log on standard error.
    pub format: LogFormat,
    /// The security log file; `None`: `<state.dir>/security.log` (see
    /// [`Config::security_log_path`]).
    #[serde(with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub security_log: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            security_log: None,
        }
    }
}

/// The format of the diagnostic log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The TAP device's MTU: `backend.tap.mtu`, else `nat.mtu`.
    pub fn tap_mtu(&self) -> u32 {
        self.backend.tap.mtu.unwrap_or(self.nat.mtu)
    }

    /// The capture settings as the backend contract's [`CaptureOptions`]
    /// (`hubnat_backend::capture`), or `None` when `capture.path` is not set.
    ///
    /// [`CaptureOptions`]: hubnat_backend::capture::CaptureOptions
    pub fn capture_options(&self) -> Option<hubnat_backend::capture::CaptureOptions> {
        let c = &self.capture;
        c.path
            .as_ref()
            .map(|path| hubnat_backend::capture::CaptureOptions {
                path: path.clone(),
                snaplen: c.snaplen,
                max_size: c.max_size,
                max_files: c.max_files,
            })
    }

    /// The hub socket settings as the hub crate's [`hubnat_hub::HubSocketConfig`].
    pub fn hub_socket_config(&self) -> hubnat_hub::HubSocketConfig {
        let h = &self.backend.hub;
        hubnat_hub::HubSocketConfig {
            listen: h.listen.clone(),
            connect: h.connect.clone(),
            socket_mode: h.socket_mode.0,
            max_peers: h.max_peers as usize,
            ..hubnat_hub::HubSocketConfig::new(self.nat.mtu, Vec::new())
        }
    }

    /// The security log file: `log.security_log`, else `<state.dir>/security.log`.
    pub fn security_log_path(&self) -> PathBuf {
        self.log
            .security_log
            .clone()
            .unwrap_or_else(|| self.state.dir.join("security.log"))
    }
}

// ---------------------------------------------------------------------------------------------
// Sources and layering
// ---------------------------------------------------------------------------------------------

/// Where the configuration comes from. `Sources::default()` is the built-in defaults alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// The TOML file given with `--config`; it must exist.
    pub file: Option<PathBuf>,
    /// Whether to read `HUBNAT_…` environment variables (true in the binary).
    pub env: bool,
    /// Command-line overrides, applied in order (a later one wins).
    pub overrides: Vec<Override>,
}

/// One command-line setting: `--set dhcp.lease=1h`, or a dedicated flag turned into one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    /// The dotted key, e.g. `dhcp.lease`.
    pub key: String,
    /// The value as typed: a TOML value if it parses as one, else a plain string.
    pub value: String,
}

impl Override {
    /// An override of `key` with `value` (read like the VALUE of `--set KEY=VALUE`).
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Override {
            key: key.into(),
            value: value.into(),
        }
    }

    /// The value as figment will see it.
    fn parsed_value(&self) -> Value {
        let raw = self.value.trim();
        // One line can hold only one key/value pair, so nothing else can be injected.
        if !raw.contains(['\n', '\r']) {
            let doc = format!("v = {raw}");
            if let Ok(value) = Figment::from(Toml::string(&doc)).find_value("v") {
                return value;
            }
        }
        match raw.parse::<Value>() {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }
}

impl FromStr for Override {
    type Err = ConfigError;

    /// Parses `KEY=VALUE`; KEY is dotted lowercase words (`dhcp.range_start`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ConfigError::Override {
            arg: s.into(),
            reason: reason.into(),
        };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key = key.trim();
        let well_formed = key.split('.').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        if !well_formed {
            return Err(bad(
                "KEY must be dotted lowercase words like dhcp.range_start (see config/hubnat.toml)",
            ));
        }
        Ok(Override::new(key, value))
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// The built-in defaults as a figment provider.
struct DefaultsLayer(Config);

impl Provider for DefaultsLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ORIGIN_DEFAULTS)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.0).data()
    }
}

/// `HUBNAT_…` environment variables, with metadata that names each variable exactly.
struct EnvLayer;

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ORIGIN_ENV).interpolater(|_: &Profile, keys: &[&str]| env_var_name(keys))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Env::prefixed(ENV_PREFIX)
            .split(ENV_SEPARATOR)
            .ignore(&["config"])
            .data()
    }
}

/// The environment variable that sets the key made of `keys`.
fn env_var_name(keys: &[&str]) -> String {
    let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", upper.join(ENV_SEPARATOR))
}

/// One command-line override as a figment provider.
struct OverrideLayer(Override);

impl Provider for OverrideLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ORIGIN_CLI)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let key = &self.0.key;
        let dict = figment::util::nest(key, self.0.parsed_value())
            .into_dict()
            .ok_or_else(|| figment::Error::from(format!("invalid command-line key {key:?}")))?;
        Ok(Profile::Default.collect(dict))
    }
}

impl Config {
    /// Reads, merges, extracts and validates the configuration from `sources`.
    ///
    /// Errors: the file is missing or unreadable ([`ConfigError::File`]), not TOML
    /// ([`ConfigError::Syntax`]), or a value is wrong ([`ConfigError::Invalid`], several at
    /// once as [`ConfigError::Several`]).
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        if let Some(path) = &sources.file {
            if let Err(e) = std::fs::read(path) {
                let reason = match e.kind() {
                    std::io::ErrorKind::NotFound => "does not exist".to_string(),
                    _ => format!("cannot be read: {e}"),
                };
                return Err(ConfigError::File {
                    path: path.clone(),
                    reason,
                });
            }
        }
        let figment = Self::figment(sources);
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(e, &figment))?;
        config.validate(&figment)?;
        Ok(config)
    }

    /// The layers of `sources` as a figment, lowest first: defaults, file, environment,
    /// overrides. The file and the environment are read now; their errors (a missing file,
    /// bad TOML) surface when the figment is extracted.
    pub fn figment(sources: &Sources) -> Figment {
        let mut figment = Figment::from(DefaultsLayer(Config::default()));
        if let Some(path) = &sources.file {
            figment = figment.merge(Toml::file_exact(path));
        }
        if sources.env {
            figment = figment.merge(EnvLayer);
        }
        for o in &sources.overrides {
            figment = figment.merge(OverrideLayer(o.clone()));
        }
        figment
    }

    /// Checks every value against the others and the bounds in the module documentation.
    /// `figment` is where the values came from; it is used only to name each value's source.
    /// Reports every problem found.
    pub fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let mut c = Checker {
            figment,
            errors: Vec::new(),
        };

        // host
        let host_ip = self.host.ip;
        if !is_unicast_v4(host_ip) {
            c.fail("host.ip", host_ip, NOT_UNICAST);
        }
        let subnet = match prefix_len(self.host.mask) {
            None => {
                c.fail("host.mask", self.host.mask, NOT_CONTIGUOUS);
                None
            }
            Some(p) if p > 30 => {
                let reason = format!(
                    "/{p} leaves no room for the virtual host and a client; use /30 or \
                     shorter, e.g. 255.255.255.0"
                );
                c.fail("host.mask", self.host.mask, reason);
                None
            }
            Some(p) => Some(Subnet::of(host_ip, p)),
        };
        if let Some(s) = subnet {
            if let Some(what) = s.special(host_ip) {
                let (first, last) = (s.first_host(), s.last_host());
                let reason = format!(
                    "is the {what} address of its subnet {s}; choose an address between {first} \
                     and {last}"
                );
                c.fail("host.ip", host_ip, reason);
            }
        }
        if let Some(mac) = self.host.mac {
            c.check_unicast_mac("host.mac", mac);
        }

        // dhcp
        let dhcp = &self.dhcp;
        if prefix_len(dhcp.mask).is_none() {
            c.fail("dhcp.mask", dhcp.mask, NOT_CONTIGUOUS);
        }
        let (start, end) = (dhcp.range_start, dhcp.range_end);
        if start > end {
            let reason = format!(
                "comes after dhcp.range_end = {end} ({}); the range must run from low to high",
                c.origin("dhcp.range_end")
            );
            c.fail("dhcp.range_start", start, reason);
        }
        if let Some(s) = subnet {
            let start_ok = c.check_in_subnet("dhcp.range_start", start, start, s);
            let end_ok = c.check_in_subnet("dhcp.range_end", end, end, s);
            if start_ok && end_ok && start <= end {
                if (start..=end).contains(&host_ip) {
                    let reason = format!(
                        "the range {start}-{end} contains host.ip = {host_ip} ({}); the virtual \
                         host's own address cannot be leased, so move the range or host.ip",
                        c.origin("host.ip")
                    );
                    c.fail("dhcp.range_start", start, reason);
                }
                let size = u64::from(u32::from(end) - u32::from(start)) + 1;
                if size > MAX_RANGE_SIZE {
                    let reason = format!(
                        "the range {start}-{end} holds {size} addresses; at most \
                         {MAX_RANGE_SIZE} are allowed"
                    );
                    c.fail("dhcp.range_end", end, reason);
                }
            }
        }
        c.check_duration("dhcp.lease", dhcp.lease, MIN_LEASE, MAX_LEASE);
        if let (Some(gw), Some(s)) = (dhcp.gateway, subnet) {
            c.check_in_subnet("dhcp.gateway", gw, gw, s);
        }
        for (i, &ip) in dhcp.dns.iter().enumerate() {
            if !is_unicast_v4(ip) {
                c.fail(&format!("dhcp.dns[{i}]"), ip, NOT_UNICAST);
            }
        }
        if let Some(domain) = &dhcp.domain {
            if let Err(why) = check_dns_name(domain) {
                let reason = format!("not a valid domain name: {why}");
                c.fail("dhcp.domain", format!("{domain:?}"), reason);
            }
        }
        if let Some(s) = subnet {
            for (i, route) in dhcp.routes.iter().enumerate() {
                c.check_in_subnet(&format!("dhcp.routes[{i}]"), route, route.gateway, s);
            }
        }
        let mut macs: HashMap<MacAddr, usize> = HashMap::new();
        let mut ips: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (i, lease) in dhcp.statics.iter().enumerate() {
            let mac_key = format!("dhcp.static[{i}].mac");
            let ip_key = format!("dhcp.static[{i}].ip");
            c.check_unicast_mac(&mac_key, lease.mac);
            if let Some(s) = subnet {
                c.check_in_subnet(&ip_key, lease.ip, lease.ip, s);
            }
            if lease.ip == host_ip {
                let reason = "is host.ip, the virtual host's own address; give the client another";
                c.fail(&ip_key, lease.ip, reason);
            }
            if let Some(&first) = macs.get(&lease.mac) {
                let reason = format!(
                    "dhcp.static[{first}] already has this MAC; a client can have only one \
                     static lease"
                );
                c.fail(&mac_key, lease.mac, reason);
            }
            if let Some(&first) = ips.get(&lease.ip) {
                let reason = format!("dhcp.static[{first}] already has this address");
                c.fail(&ip_key, lease.ip, reason);
            }
            macs.entry(lease.mac).or_insert(i);
            ips.entry(lease.ip).or_insert(i);
            if let Some(name) = &lease.hostname {
                if let Err(why) = check_dns_name(name) {
                    let reason = format!("not a valid host name: {why}");
                    c.fail(
                        &format!("dhcp.static[{i}].hostname"),
                        format!("{name:?}"),
                        reason,
                    );
                }
            }
        }

        // nat
        let nat = &self.nat;
        c.check_mtu("nat.mtu", nat.mtu);
        c.check_duration(
            "nat.tcp_timeout",
            nat.tcp_timeout,
            MIN_NAT_TIMEOUT,
            MAX_NAT_TIMEOUT,
        );
        c.check_duration(
            "nat.udp_timeout",
            nat.udp_timeout,
            MIN_NAT_TIMEOUT,
            MAX_NAT_TIMEOUT,
        );
        for (i, net) in nat.deny.iter().enumerate() {
            if net.trunc() != *net {
                let reason = format!("has host bits set (did you mean {}?)", net.trunc());
                c.fail(
                    &format!("nat.deny[{i}]"),
                    format!("{:?}", net.to_string()),
                    reason,
                );
            }
        }
        if !(1..=MAX_NAT_SESSIONS).contains(&nat.max_sessions) {
            c.fail(
                "nat.max_sessions",
                nat.max_sessions,
                format!("must be from 1 to {MAX_NAT_SESSIONS}"),
            );
        }
        if nat.max_sessions_per_client == 0 {
            c.fail("nat.max_sessions_per_client", 0, "must be at least 1");
        } else if nat.max_sessions_per_client > nat.max_sessions {
            let reason = format!(
                "is more than nat.max_sessions = {} ({}); one client cannot hold more sessions \
                 than the whole table",
                nat.max_sessions,
                c.origin("nat.max_sessions")
            );
            c.fail(
                "nat.max_sessions_per_client",
                nat.max_sessions_per_client,
                reason,
            );
        }

        if !(MIN_TCP_BUFFER..=MAX_TCP_BUFFER).contains(&nat.tcp_buffer) {
            c.fail(
                "nat.tcp_buffer",
                format!("{:?}", size_text::words(nat.tcp_buffer)),
                format!(
                    "must be from {} to {}",
                    size_text::words(MIN_TCP_BUFFER),
                    size_text::words(MAX_TCP_BUFFER)
                ),
            );
        }

        // dns
        for (i, &server) in self.dns.upstream.iter().enumerate() {
            let key = format!("dns.upstream[{i}]");
            let text = format!("{:?}", upstream_text(server));
            let ip = server.ip();
            if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
                c.fail(&key, text, "must be the unicast address of a DNS server");
            } else if server.port() == 0 {
                c.fail(
                    &key,
                    text,
                    "port 0 is not a valid port; leave the port out for 53",
                );
            }
        }

        // backend
        let tap = &self.backend.tap;
        if let Err(why) = check_interface_name(&tap.name) {
            c.fail("backend.tap.name", format!("{:?}", tap.name), why);
        }
        if let Some(mtu) = tap.mtu {
            c.check_mtu("backend.tap.mtu", mtu);
        }
        let raw = &self.backend.raw;
        if !raw.interface.is_empty() {
            if let Err(why) = check_interface_name(&raw.interface) {
                c.fail("backend.raw.interface", format!("{:?}", raw.interface), why);
            }
        } else if self.backend.kind == BackendKind::Raw {
            c.fail(
                "backend.kind",
                "\"raw\"",
                "needs backend.raw.interface, the name of the interface to attach to (e.g. \"br0\")",
            );
        }
        let hub = &self.backend.hub;
        if self.backend.kind == BackendKind::Hub && hub.listen.is_empty() && hub.connect.is_none() {
            c.fail(
                "backend.kind",
                "\"hub\"",
                "needs backend.hub.listen, where peers connect (e.g. \
                 \"unix:/run/hubnat/hub.sock\"), or backend.hub.connect, a hub to connect to",
            );
        }
        let mut seen: HashMap<&Endpoint, usize> = HashMap::new();
        for (i, endpoint) in hub.listen.iter().enumerate() {
            if let Some(first) = seen.insert(endpoint, i) {
                let reason = format!("backend.hub.listen[{first}] is the same address");
                c.fail(
                    &format!("backend.hub.listen[{i}]"),
                    format!("{:?}", endpoint.to_string()),
                    reason,
                );
            }
        }
        if let Some(endpoint @ Endpoint::Tcp(addr)) = &hub.connect {
            if addr.port() == 0 || addr.ip().is_unspecified() {
                c.fail(
                    "backend.hub.connect",
                    format!("{:?}", endpoint.to_string()),
                    "must name a reachable address and a port other than 0",
                );
            }
        }
        if let Some(endpoint) = &hub.connect {
            if hub.listen.contains(endpoint) {
                c.fail(
                    "backend.hub.connect",
                    format!("{:?}", endpoint.to_string()),
                    "is one of backend.hub.listen: hubnat would connect to itself",
                );
            }
        }
        if hub.socket_mode.0 > 0o777 {
            c.fail(
                "backend.hub.socket_mode",
                format!("\"{}\"", hub.socket_mode),
                "only permission bits (at most 0777) may be given; write it as an octal string \
                 such as \"0600\"",
            );
        }
        if !(1..=MAX_HUB_PEERS).contains(&hub.max_peers) {
            c.fail(
                "backend.hub.max_peers",
                hub.max_peers,
                format!("must be from 1 to {MAX_HUB_PEERS}"),
            );
        }

        // capture
        let capture = &self.capture;
        if capture.path.as_ref().is_some_and(|p| {
            p.as_os_str().is_empty() || p.as_os_str().as_encoded_bytes().ends_with(b"/")
        }) {
            let path = capture
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            c.fail(
                "capture.path",
                format!("{path:?}"),
                "must name a file, not a directory",
            );
        }
        if !(MIN_SNAPLEN..=MAX_SNAPLEN).contains(&capture.snaplen) {
            c.fail(
                "capture.snaplen",
                capture.snaplen,
                format!("must be from {MIN_SNAPLEN} (an Ethernet header) to {MAX_SNAPLEN}"),
            );
        }
        if let Some(size) = capture.max_size {
            if size < MIN_CAPTURE_SIZE {
                c.fail(
                    "capture.max_size",
                    format!("{:?}", size_text::words(size)),
                    format!("must be at least {}", size_text::words(MIN_CAPTURE_SIZE)),
                );
            }
        }
        if !(1..=MAX_CAPTURE_FILES).contains(&capture.max_files) {
            c.fail(
                "capture.max_files",
                capture.max_files,
                format!("must be from 1 to {MAX_CAPTURE_FILES}"),
            );
        }

        // state
        if self.state.dir.as_os_str().is_empty() {
            c.fail("state.dir", "\"\"", "must name a directory");
        }

        // log
        let level = &self.log.level;
        if level.trim().is_empty() {
            c.fail(
                "log.level",
                format!("{level:?}"),
                "must not be empty; use e.g. \"info\"",
            );
        } else if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            let reason = format!(
                "not a valid log filter ({e}); use a level such as \"info\" or \"debug\", or \
                 directives such as \"hubnat=debug,info\""
            );
            c.fail("log.level", format!("{level:?}"), reason);
        }
        if self
            .log
            .security_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            c.fail("log.security_log", "\"\"", "must name a file");
        }

        c.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------------------------

const NOT_UNICAST: &str =
    "must be a unicast address (not 0.0.0.0, loopback, multicast or broadcast)";

const NOT_CONTIGUOUS: &str =
    "not a contiguous netmask (its one bits must all come first, e.g. 255.255.255.0)";

/// Collects validation failures, naming the source of each value.
struct Checker<'a> {
    figment: &'a Figment,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn fail(&mut self, key: &str, value: impl fmt::Display, reason: impl Into<String>) {
        self.errors.push(ConfigError::Invalid {
            key: key.into(),
            value: Some(value.to_string()),
            origin: self.origin(key),
            reason: reason.into(),
        });
    }

    /// "from …" for `key` (which may hold `[i]` indices).
    fn origin(&self, key: &str) -> String {
        format!("from {}", origin_of(self.figment, &key_segments(key)))
    }

    /// Fails unless `ip` is a usable host address of `subnet`; `value` is what is shown.
    fn check_in_subnet(
        &mut self,
        key: &str,
        value: impl fmt::Display,
        ip: Ipv4Addr,
        subnet: Subnet,
    ) -> bool {
        let addr = if value.to_string() == ip.to_string() {
            String::new()
        } else {
            format!("{ip} ")
        };
        if !subnet.contains(ip) {
            self.fail(
                key,
                value,
                format!("{addr}outside the subnet {subnet} given by host.ip and host.mask"),
            );
            false
        } else if let Some(what) = subnet.special(ip) {
            self.fail(
                key,
                value,
                format!(
                "{addr}is the {what} address of the subnet {subnet} given by host.ip and host.mask"
            ),
            );
            false
        } else {
            true
        }
    }

    fn check_unicast_mac(&mut self, key: &str, mac: MacAddr) {
        if mac == MacAddr([0; 6]) {
            self.fail(key, mac, "the all-zero address is not a station address");
        } else if !mac.is_unicast() {
            self.fail(
                key,
                mac,
                "is a multicast or broadcast address (the low bit of the first \
                                 octet is set); use a unicast one such as 00:ac:12:34:56:78",
            );
        }
    }

    fn check_mtu(&mut self, key: &str, mtu: u32) {
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            self.fail(key, mtu, format!("must be from {MIN_MTU} to {MAX_MTU}"));
        }
    }

    fn check_duration(&mut self, key: &str, value: Duration, min: Duration, max: Duration) {
        if !(min..=max).contains(&value) {
            self.fail(
                key,
                format!("{:?}", duration_text::words(value)),
                format!(
                    "must be from {} to {}",
                    duration_text::words(min),
                    duration_text::words(max)
                ),
            );
        }
    }

    fn finish(mut self) -> Result<(), ConfigError> {
        match self.errors.len() {
            0 => Ok(()),
            1 => Err(self.errors.remove(0)),
            _ => Err(ConfigError::Several(self.errors)),
        }
    }
}

/// An IPv4 subnet: a network address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Subnet {
    network: u32,
    prefix: u8,
}

impl Subnet {
    fn of(ip: Ipv4Addr, prefix: u8) -> Subnet {
        Subnet {
            network: u32::from(ip) & prefix_mask(prefix),
            prefix,
        }
    }

    fn broadcast(&self) -> u32 {
        self.network | !prefix_mask(self.prefix)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & prefix_mask(self.prefix) == self.network
    }

    /// "network" or "broadcast" if `ip` is that address of this subnet.
    fn special(&self, ip: Ipv4Addr) -> Option<&'static str> {
        let ip = u32::from(ip);
        if ip == self.network {
            Some("network")
        } else if ip == self.broadcast() {
            Some("broadcast")
        } else {
            None
        }
    }

    fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    fn last_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.broadcast() - 1)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// The netmask of a prefix length (0..=32).
fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// The prefix length of a contiguous netmask; `None` if its one bits have gaps.
fn prefix_len(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (ones + m.trailing_zeros() == 32).then_some(ones as u8)
}

/// True for an address one host may own on a segment.
fn is_unicast_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}

/// Checks a DNS name of letters, digits and hyphens (a host name, or a domain such as
/// `example.lan`); the error says what is wrong.
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > 253 {
        return Err(format!(
            "it is {} bytes long; at most 253 are allowed",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(
                "it has an empty label (two dots in a row, or a leading or trailing dot)".into(),
            );
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 bytes"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("{c:?} is not allowed; use letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Checks a Linux network interface name; the error says what is wrong.
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("must not be empty".into())
    } else if name.len() > MAX_TAP_NAME_LEN {
        Err(format!(
            "is {} bytes long; Linux allows at most {MAX_TAP_NAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Err("is reserved: \".\" and \"..\" cannot name an interface".into())
    } else if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        Err(format!(
            "{c:?} is not allowed in an interface name (no '/', ':' or white space)"
        ))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Where a value came from
// ---------------------------------------------------------------------------------------------

/// Splits `dhcp.static[1].ip` into `["dhcp", "static", "1", "ip"]`.
fn key_segments(key: &str) -> Vec<String> {
    key.split(['.', '[', ']'])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// True for a path segment that indexes a list.
fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

/// Joins `["dhcp", "static", "1", "ip"]` into `dhcp.static[1].ip`.
fn display_key(segments: &[String]) -> String {
    let mut key = String::new();
    for seg in segments {
        if is_index(seg) {
            key.push_str(&format!("[{seg}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(seg);
        }
    }
    key
}

/// The value at `segments` in the merged figment; numeric segments index arrays.
fn lookup(figment: &Figment, segments: &[String]) -> Option<Value> {
    let (first, rest) = segments.split_first()?;
    let mut value = figment.find_value(first).ok()?;
    for seg in rest {
        value = match value {
            Value::Dict(_, mut dict) => dict.remove(seg.as_str())?,
            Value::Array(_, mut array) => {
                let i: usize = seg.parse().ok()?;
                (i < array.len()).then(|| array.swap_remove(i))?
            }
            _ => return None,
        };
    }
    Some(value)
}

/// Which layer gave the value at `segments`: "file x.toml", "environment variable
/// HUBNAT_NAT__MTU", "the command line" or "the built-in defaults".
fn origin_of(figment: &Figment, segments: &[String]) -> String {
    // A key absent from the figment (the figment may not be the one the config came from)
    // is attributed to its nearest present ancestor.
    (1..=segments.len())
        .rev()
        .find_map(|n| {
            let value = lookup(figment, &segments[..n])?;
            let metadata = figment.get_metadata(value.tag())?;
            Some(describe_origin(metadata, figment.profile(), segments))
        })
        .unwrap_or_else(|| ORIGIN_DEFAULTS.to_string())
}

/// Names a layer for a user: its file, its environment variable, or its name.
fn describe_origin(metadata: &Metadata, profile: &Profile, segments: &[String]) -> String {
    if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
        return format!("file {}", path.display());
    }
    if metadata.name == ORIGIN_ENV {
        // An environment variable sets a whole list, so stop at the first index.
        let keys: Vec<&str> = segments
            .iter()
            .take_while(|s| !is_index(s))
            .map(String::as_str)
            .collect();
        return format!("{ORIGIN_ENV} {}", metadata.interpolate(profile, &keys));
    }
    metadata.name.to_string()
}

/// A figment value written the way TOML would show it.
fn render_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{:?}", c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(..) => value
            .to_i128()
            .map(|n| n.to_string())
            .or_else(|| value.to_u128().map(|n| n.to_string()))
            .or_else(|| value.to_f64().map(|n| n.to_string()))
            .unwrap_or_else(|| "?".into()),
        Value::Empty(..) => "(nothing)".into(),
        Value::Dict(_, dict) => {
            let items: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{k} = {}", render_value(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Array(_, items) => {
            let items: Vec<String> = items.iter().map(render_value).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// "a string", "an integer", … for a serde `Unexpected` value.
fn actual_kind(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean".into(),
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer".into(),
        Actual::Float(_) => "a float".into(),
        Actual::Char(_) | Actual::Str(_) => "a string".into(),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        Actual::Unit | Actual::Option => "nothing".into(),
        other => other.to_string(),
    }
}

/// The value inside a serde `Unexpected`, if it carries one.
fn actual_value(actual: &figment::error::Actual) -> Option<String> {
    use figment::error::Actual;
    match actual {
        Actual::Bool(b) => Some(b.to_string()),
        Actual::Unsigned(n) => Some(n.to_string()),
        Actual::Signed(n) => Some(n.to_string()),
        Actual::Float(n) => Some(n.to_string()),
        Actual::Char(c) => Some(format!("{:?}", c.to_string())),
        Actual::Str(s) => Some(format!("{s:?}")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a configuration cannot be used. Every message names the key (or file), the value, where
/// it came from and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("configuration file {} {reason}", path.display())]
    File {
        /// The path given with `--config`.
        path: PathBuf,
        /// "does not exist", or the I/O error.
        reason: String,
    },
    /// The configuration file is not valid TOML.
    #[error("configuration file {} is not valid TOML: {reason}", path.display())]
    Syntax {
        /// The path given with `--config`.
        path: PathBuf,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A command-line `KEY=VALUE` is malformed.
    #[error("command line setting {arg:?}: {reason}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is wrong.
    #[error("config key {key}{} ({origin}): {reason}", value_suffix(.value))]
    Invalid {
        /// The dotted key, with `[i]` for list items (`dhcp.static[1].ip`).
        key: String,
        /// The offending value as TOML would show it, when known.
        value: Option<String>,
        /// Where the value came from: "from file x.toml", "from environment variable
        /// HUBNAT_NAT__MTU", "from the command line", "from the built-in defaults".
        origin: String,
        /// What is wrong, and how to put it right.
        reason: String,
    },
    /// More than one of the above, in the order found.
    #[error("{}", join_lines(.0))]
    Several(Vec<ConfigError>),
}

fn value_suffix(value: &Option<String>) -> String {
    value
        .as_ref()
        .map(|v| format!(" = {v}"))
        .unwrap_or_default()
}

fn join_lines(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    /// The individual errors: itself, or the members of [`ConfigError::Several`].
    pub fn errors(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().flat_map(|e| e.errors()).collect(),
            one => vec![one],
        }
    }

    /// Converts figment's error(s) from extracting `figment`, looking values and their
    /// sources up in it.
    pub fn from_figment(error: figment::Error, figment: &Figment) -> ConfigError {
        let mut all: Vec<ConfigError> = error
            .into_iter()
            .map(|e| Self::from_one_figment_error(e, figment))
            .collect();
        match all.len() {
            1 => all.remove(0),
            _ => ConfigError::Several(all),
        }
    }

    fn from_one_figment_error(e: figment::Error, figment: &Figment) -> ConfigError {
        use figment::error::Kind;

        let file = e
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref())
            .and_then(|s| s.file_path());
        if let (Some(path), true, Kind::Message(msg)) = (file, e.path.is_empty(), &e.kind) {
            // The provider itself failed: the file could not be read or parsed.
            let reason = msg.trim_end().to_string();
            return if msg.starts_with("TOML parse error") {
                ConfigError::Syntax {
                    path: path.to_path_buf(),
                    reason,
                }
            } else {
                ConfigError::File {
                    path: path.to_path_buf(),
                    reason: format!("cannot be read: {reason}"),
                }
            };
        }

        let mut segments = e.path.clone();
        let (value_from_kind, reason) = match &e.kind {
            Kind::UnknownField(field, expected) => {
                // figment's path already ends with the unknown key.
                if segments.last() != Some(field) {
                    segments.push(field.clone());
                }
                let table = match &segments[..segments.len() - 1] {
                    [] => "the top level".to_string(),
                    [path @ .., index] if is_index(index) => {
                        format!("a [[{}]] entry", path.join("."))
                    }
                    path => format!("[{}]", path.join(".")),
                };
                (
                    None,
                    format!("unknown key; {table} accepts: {}", expected.join(", ")),
                )
            }
            Kind::MissingField(field) => {
                if segments.last().map(String::as_str) != Some(field.as_ref()) {
                    segments.push(field.to_string());
                }
                (None, "this key is required here".to_string())
            }
            Kind::UnknownVariant(found, expected) => (
                Some(format!("{found:?}")),
                format!("unknown value; valid values are: {}", expected.join(", ")),
            ),
            Kind::InvalidType(actual, expected) => (
                actual_value(actual),
                format!("expected {expected}, found {}", actual_kind(actual)),
            ),
            Kind::InvalidValue(actual, expected) => (
                actual_value(actual),
                format!("invalid value, expected {expected}"),
            ),
            Kind::Message(msg) => (None, msg.trim_end().to_string()),
            other => (None, other.to_string()),
        };

        let found = lookup(figment, &segments);
        let value = found.as_ref().map(render_value).or(value_from_kind);
        // The erroring value's own tag names its source; for an unknown key the tag is the
        // table's, so prefer the unknown value's own.
        let metadata = found
            .as_ref()
            .and_then(|v| figment.get_metadata(v.tag()))
            .or(e.metadata.as_ref());
        let origin = match metadata {
            Some(md) => describe_origin(
                md,
                e.profile.as_ref().unwrap_or(figment.profile()),
                &segments,
            ),
            None => ORIGIN_DEFAULTS.to_string(),
        };
        ConfigError::Invalid {
            key: if segments.is_empty() {
                "(top level)".into()
            } else {
                display_key(&segments)
            },
            value,
            origin: format!("from {origin}"),
            reason,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text forms for serde
// ---------------------------------------------------------------------------------------------

/// A value written as one string in the configuration.
trait Text: Sized {
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

/// A network, `ADDRESS/PREFIX`.
impl Text for IpNet {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|_| {
            format!(
                "invalid network {s:?}: write it as ADDRESS/PREFIX, like \"10.0.0.0/8\" or \
                 \"fd00::/8\""
            )
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

fn upstream_text(server: SocketAddr) -> String {
    match server.port() {
        53 => server.ip().to_string(),
        _ => server.to_string(),
    }
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
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
mod opt_text {
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
mod text_list {
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
mod duration_text {
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

/// An optional byte size: `""` (none), a number of bytes, or a string with a unit: `B`,
/// `kB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024), case-insensitive.
/// A size that must be given (`size_text` allows "" for none).
mod size_required {
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

mod size_text {
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

// ---------------------------------------------------------------------------------------------
// Host-derived defaults
// ---------------------------------------------------------------------------------------------

/// What `/etc/resolv.conf` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ResolvConf {
    /// `nameserver` lines that parse (scoped IPv6 addresses such as `fe80::1%eth0` do not).
    nameservers: Vec<SocketAddr>,
    /// The last `domain` line's name, or the first name of the last `search` line.
    domain: Option<String>,
}

fn read_resolv_conf() -> ResolvConf {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) {
                    conf.nameservers.push(SocketAddr::new(ip, 53));
                }
            }
            // As in glibc, `domain` and `search` replace each other; the last one wins.
            Some("domain") | Some("search") => conf.domain = words.next().map(String::from),
            _ => {}
        }
    }
    conf
}

/// The host's domain: from `/etc/resolv.conf`, else from the FQDN host name; `None` if
/// neither gives a valid domain name.
fn host_domain() -> Option<String> {
    let from_resolv = read_resolv_conf().domain;
    from_resolv
        .into_iter()
        .chain(hostname().as_deref().and_then(domain_of_hostname))
        .map(|d| d.trim_end_matches('.').to_string())
        .find(|d| check_dns_name(d).is_ok())
}

/// The part of a fully qualified host name after its first dot.
fn domain_of_hostname(hostname: &str) -> Option<String> {
    hostname
        .split_once('.')
        .map(|(_, domain)| domain.to_string())
        .filter(|d| !d.is_empty())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname NUL-terminates
    // within it or truncates, and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..len].to_vec()).ok()
}

/// The default state directory for a user; see [`StateConfig::dir`].
fn default_state_dir(
    euid: u32,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/hubnat");
    }
    // The XDG spec says to ignore a relative XDG_STATE_HOME.
    if let Some(xdg) = xdg_state_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return xdg.join("hubnat");
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => Path::new(&home).join(".local/state/hubnat"),
        None => PathBuf::from("hubnat-state"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result
mod tests {
    use super::*;
    use figment::Jail;

    const FILE: &str = "(from file x.toml)";

    fn file_sources() -> Sources {
        Sources {
            file: Some("x.toml".into()),
            env: false,
            overrides: Vec::new(),
        }
    }

    /// Writes `toml` to `x.toml` in the jail and loads it (no environment, no overrides).
    fn load_toml(jail: &Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("x.toml", toml).expect("write x.toml");
        Config::load(&file_sources())
    }

    /// Loading `toml` must fail with a message naming the file and holding every needle.
    #[track_caller]
    fn assert_rejects(toml: &str, needles: &[&str]) {
        Jail::expect_with(|jail| {
            let err = load_toml(jail, toml).expect_err("the config should be rejected");
            let text = err.to_string();
            for needle in needles.iter().chain(&[FILE]) {
                assert!(
                    text.contains(needle),
                    "error {text:?} does not mention {needle:?}"
                );
            }
            Ok(())
        });
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().expect("test MAC")
    }

    // --- defaults and layering --------------------------------------------------------------

    #[test]
    fn defaults_are_the_reference_behaviour() {
        let c = Config::default();
        assert_eq!(
            c.host,
            HostConfig {
                mac: None,
                ip: ip("192.168.30.1"),
                mask: ip("255.255.255.0")
            }
        );
        assert!(c.dhcp.enabled);
        assert_eq!(c.dhcp.range_start, ip("192.168.30.10"));
        assert_eq!(c.dhcp.range_end, ip("192.168.30.200"));
        assert_eq!(c.dhcp.mask, ip("255.255.255.0"));
        assert_eq!(c.dhcp.lease, Duration::from_secs(7200));
        assert_eq!(c.dhcp.gateway, Some(ip("192.168.30.1")));
        assert_eq!(c.dhcp.dns, vec![ip("192.168.30.1")]);
        assert!(c.dhcp.routes.is_empty() && c.dhcp.statics.is_empty());
        assert_eq!(
            c.nat,
            NatConfig {
                enabled: true,
                mtu: 1500,
                tcp_timeout: Duration::from_secs(7200),
                udp_timeout: Duration::from_secs(600),
                allow_host_loopback: false,
                deny: Vec::new(),
                max_sessions: 16384,
                max_sessions_per_client: 4096,
                tcp_buffer: DEFAULT_TCP_BUFFER,
            }
        );
        assert_eq!(c.backend.kind, BackendKind::Tap);
        assert_eq!(c.backend.raw.interface, "");
        assert_eq!(
            c.backend.hub,
            HubConfig {
                listen: Vec::new(),
                connect: None,
                socket_mode: SocketMode(0o600),
                max_peers: 64,
            }
        );
        assert_eq!(
            c.capture,
            CaptureConfig {
                path: None,
                snaplen: 65535,
                max_size: None,
                max_files: 2,
            }
        );
        assert_eq!(c.capture_options(), None);
        assert_eq!(
            c.backend.tap,
            TapConfig {
                name: "hubnat0".into(),
                mtu: None
            }
        );
        assert_eq!(
            c.log,
            LogConfig {
                level: "info".into(),
                format: LogFormat::Text,
                security_log: None
            }
        );
        assert_eq!(c.tap_mtu(), 1500);
        assert_eq!(c.security_log_path(), c.state.dir.join("security.log"));
        assert_eq!(c.dns.upstream, read_resolv_conf().nameservers);
    }

    #[test]
    fn defaults_alone_load_and_validate() {
        Jail::expect_with(|_| {
            let c = Config::load(&Sources::default()).expect("the defaults are valid");
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn tap_mtu_and_security_log_path_follow_their_settings() {
        let mut c = Config::default();
        c.nat.mtu = 9000;
        assert_eq!(c.tap_mtu(), 9000);
        c.backend.tap.mtu = Some(1400);
        assert_eq!(c.tap_mtu(), 1400);
        c.state.dir = "/srv/hubnat".into();
        assert_eq!(
            c.security_log_path(),
            PathBuf::from("/srv/hubnat/security.log")
        );
        c.log.security_log = Some("/var/log/hubnat-security.log".into());
        assert_eq!(
            c.security_log_path(),
            PathBuf::from("/var/log/hubnat-security.log")
        );
    }

    #[test]
    fn layers_apply_defaults_then_file_then_env_then_command_line() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "x.toml",
                r#"
                [dhcp]
                lease = "1h"
                range_start = "192.168.30.20"
                [nat]
                mtu = 1400
                udp_timeout = "5m"
            "#,
            )?;
            jail.set_env("HUBNAT_DHCP__LEASE", "30m");
            jail.set_env("HUBNAT_NAT__MTU", "1300");
            let sources = Sources {
                file: Some("x.toml".into()),
                env: true,
                overrides: vec![
                    "dhcp.lease=5m".parse().expect("override"),
                    Override::new("nat.enabled", "false"),
                ],
            };
            let c = Config::load(&sources).expect("valid");
            assert_eq!(c.dhcp.lease, Duration::from_secs(300)); // command line over env and file
            assert_eq!(c.nat.mtu, 1300); // env over file
            assert_eq!(c.dhcp.range_start, ip("192.168.30.20")); // file over defaults
            assert_eq!(c.nat.udp_timeout, Duration::from_secs(300));
            assert_eq!(c.dhcp.range_end, ip("192.168.30.200")); // defaults
            assert!(!c.nat.enabled);

            let figment = Config::figment(&sources);
            let origin = |key: &str| origin_of(&figment, &key_segments(key));
            assert_eq!(origin("dhcp.lease"), "the command line");
            assert_eq!(origin("nat.mtu"), "environment variable HUBNAT_NAT__MTU");
            assert_eq!(origin("dhcp.range_start"), "file x.toml");
            assert_eq!(origin("dhcp.range_end"), "the built-in defaults");

            // Without `env`, the environment is not read.
            let c = Config::load(&Sources {
                env: false,
                ..sources
            })
            .expect("valid");
            assert_eq!(c.nat.mtu, 1400);
            Ok(())
        });
    }

    #[test]
    fn env_double_underscore_nests_and_values_parse() {
        Jail::expect_with(|jail| {
            jail.set_env("HUBNAT_DHCP__RANGE_START", "192.168.30.50");
            jail.set_env("HUBNAT_BACKEND__TAP__NAME", "tap7");
            jail.set_env("HUBNAT_BACKEND__KIND", "memory");
            jail.set_env("HUBNAT_DNS__UPSTREAM", "[1.1.1.1, 9.9.9.9:5353]");
            jail.set_env("HUBNAT_DHCP__GATEWAY", "");
            jail.set_env("HUBNAT_DHCP__DNS", "192.168.30.2");
            jail.set_env("HUBNAT_LOG__FORMAT", "json");
            // Reserved for the CLI's --config, not a key.
            jail.set_env("HUBNAT_CONFIG", "/nonexistent.toml");
            let c = Config::load(&Sources {
                env: true,
                ..Sources::default()
            })
            .expect("valid");
            assert_eq!(c.dhcp.range_start, ip("192.168.30.50"));
            assert_eq!(c.backend.tap.name, "tap7");
            assert_eq!(c.backend.kind, BackendKind::Memory);
            assert_eq!(
                c.dns.upstream,
                vec![
                    "1.1.1.1:53".parse::<SocketAddr>().expect("addr"),
                    "9.9.9.9:5353".parse().expect("addr"),
                ]
            );
            assert_eq!(c.dhcp.gateway, None);
            assert_eq!(c.dhcp.dns, vec![ip("192.168.30.2")]);
            assert_eq!(c.log.format, LogFormat::Json);

            jail.set_env("HUBNAT_DHCP__DNS", "");
            let c = Config::load(&Sources {
                env: true,
                ..Sources::default()
            })
            .expect("valid");
            assert!(c.dhcp.dns.is_empty());
            Ok(())
        });
    }

    #[test]
    fn env_errors_name_the_variable() {
        Jail::expect_with(|jail| {
            let env = Sources {
                env: true,
                ..Sources::default()
            };
            jail.set_env("HUBNAT_NAT__MTU", "big");
            let text = Config::load(&env).expect_err("type error").to_string();
            assert!(
                text.contains("nat.mtu = \"big\" (from environment variable HUBNAT_NAT__MTU)"),
                "{text}"
            );
            assert!(text.contains("expected u32"), "{text}");

            jail.set_env("HUBNAT_NAT__MTU", "100");
            let text = Config::load(&env).expect_err("semantic error").to_string();
            assert_eq!(text, "config key nat.mtu = 100 (from environment variable HUBNAT_NAT__MTU): must be from 576 to 65520");

            jail.set_env("HUBNAT_NAT__MTU", "1500");
            jail.set_env("HUBNAT_DNS__UPSTREAM", "[1.1.1.1, 0.0.0.0]");
            let text = Config::load(&env).expect_err("semantic error").to_string();
            assert!(text.contains("dns.upstream[1] = \"0.0.0.0\" (from environment variable HUBNAT_DNS__UPSTREAM)"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn command_line_errors_say_command_line() {
        Jail::expect_with(|_| {
            let cli = |o: &str| Sources {
                overrides: vec![o.parse().expect("override")],
                ..Sources::default()
            };
            let text = Config::load(&cli("nat.mtu=100"))
                .expect_err("too small")
                .to_string();
            assert_eq!(
                text,
                "config key nat.mtu = 100 (from the command line): must be from 576 to 65520"
            );
            let text = Config::load(&cli("dhcp.lease=soon"))
                .expect_err("bad duration")
                .to_string();
            assert!(
                text.starts_with(
                    "config key dhcp.lease = \"soon\" (from the command line): invalid duration"
                ),
                "{text}"
            );
            Ok(())
        });
    }

    // --- overrides ----------------------------------------------------------------------------

    #[test]
    fn override_from_str_splits_at_the_first_equals_sign() {
        let o: Override = "log.level=hubnat=debug,info".parse().expect("valid");
        assert_eq!(o, Override::new("log.level", "hubnat=debug,info"));
        assert_eq!(o.to_string(), "log.level=hubnat=debug,info");
        let o: Override = "dhcp.gateway=".parse().expect("valid");
        assert_eq!(o.value, "");
        for bad in [
            "no-equals-sign",
            "=1",
            "Dhcp.Lease=1h",
            "dhcp..lease=1h",
            "dhcp lease=1h",
            ".x=1",
        ] {
            let err = bad.parse::<Override>().expect_err(bad);
            assert!(
                matches!(err, ConfigError::Override { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn override_values_are_toml_then_plain_strings() {
        let parsed = |v: &str| Override::new("k", v).parsed_value();
        assert_eq!(parsed("1400").to_i128(), Some(1400));
        assert_eq!(parsed("true").to_bool(), Some(true));
        assert_eq!(
            parsed("\"two words\"").into_string().as_deref(),
            Some("two words")
        );
        assert_eq!(parsed("info").into_string().as_deref(), Some("info"));
        assert_eq!(
            parsed("192.168.30.5").into_string().as_deref(),
            Some("192.168.30.5")
        );
        assert_eq!(
            parsed("00:ac:00:00:00:01").into_string().as_deref(),
            Some("00:ac:00:00:00:01")
        );
        assert_eq!(
            parsed("hubnat=debug,info").into_string().as_deref(),
            Some("hubnat=debug,info")
        );
        assert_eq!(parsed("").into_string().as_deref(), Some(""));
        let list = |v: &str| -> Vec<String> {
            parsed(v)
                .into_array()
                .expect("array")
                .into_iter()
                .filter_map(|v| v.into_string())
                .collect()
        };
        assert_eq!(list("[\"1.1.1.1\", \"9.9.9.9\"]"), ["1.1.1.1", "9.9.9.9"]);
        assert_eq!(list("[1.1.1.1, 9.9.9.9]"), ["1.1.1.1", "9.9.9.9"]);
        // A second line cannot smuggle in another key.
        assert!(parsed("1\nnat.mtu = 9000").into_string().is_some());
    }

    #[test]
    fn overrides_set_every_kind_of_value() {
        Jail::expect_with(|_| {
            let overrides = [
                "dns.upstream=[1.1.1.1, \"[::1]:5353\"]",
                "dhcp.lease=1h",
                "backend.kind=memory",
                "host.mac=00:ac:01:02:03:04",
                "log.level=hubnat=debug,info",
                "dhcp.gateway=",
                "dhcp.routes=[\"10.0.0.0/8 via 192.168.30.254\"]",
                "dhcp.static=[{ mac = \"00:ac:00:00:00:09\", ip = \"192.168.30.9\", hostname = \"nas\" }]",
                "nat.mtu=9000",
                "backend.tap.mtu=1500",
            ];
            let sources = Sources {
                overrides: overrides
                    .iter()
                    .map(|o| o.parse().expect("override"))
                    .collect(),
                ..Sources::default()
            };
            let c = Config::load(&sources).expect("valid");
            assert_eq!(
                c.dns.upstream,
                vec![
                    "1.1.1.1:53".parse::<SocketAddr>().expect("addr"),
                    "[::1]:5353".parse().expect("addr"),
                ]
            );
            assert_eq!(c.dhcp.lease, Duration::from_secs(3600));
            assert_eq!(c.backend.kind, BackendKind::Memory);
            assert_eq!(c.host.mac, Some(mac("00:ac:01:02:03:04")));
            assert_eq!(c.log.level, "hubnat=debug,info");
            assert_eq!(c.dhcp.gateway, None);
            assert_eq!(
                c.dhcp.routes,
                vec!["10.0.0.0/8 via 192.168.30.254"
                    .parse::<Route>()
                    .expect("route")]
            );
            assert_eq!(
                c.dhcp.statics,
                vec![StaticLease {
                    mac: mac("00:ac:00:00:00:09"),
                    ip: ip("192.168.30.9"),
                    hostname: Some("nas".into()),
                }]
            );
            assert_eq!((c.nat.mtu, c.tap_mtu()), (9000, 1500));
            Ok(())
        });
    }

    // --- value forms --------------------------------------------------------------------------

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
    fn config_round_trips_through_figment_and_json() {
        let mut c = Config::default();
        c.host.mac = Some(mac("00:ac:12:34:56:78"));
        c.dhcp.gateway = None;
        c.dhcp.domain = Some("example.lan".into());
        c.dhcp.routes = vec!["10.0.0.0/8 via 192.168.30.254".parse().expect("route")];
        c.dhcp.statics = vec![
            StaticLease {
                mac: mac("00:ac:00:00:00:01"),
                ip: ip("192.168.30.5"),
                hostname: None,
            },
            StaticLease {
                mac: mac("00:ac:00:00:00:02"),
                ip: ip("192.168.30.6"),
                hostname: Some("nas".into()),
            },
        ];
        c.dns.upstream = vec![
            "[::1]:5353".parse().expect("addr"),
            "1.1.1.1:53".parse().expect("addr"),
        ];
        c.backend.tap.mtu = Some(9000);
        c.log.security_log = Some("/tmp/sec.log".into());
        c.dhcp.lease = Duration::from_secs(400 * 86400 + 1);
        c.nat.deny = vec![
            "10.0.0.0/8".parse().expect("net"),
            "fd00::/8".parse().expect("net"),
        ];
        c.nat.allow_host_loopback = true;
        c.backend.kind = BackendKind::Hub;
        c.backend.raw.interface = "br0".into();
        c.backend.hub.listen = vec![
            "unix:/run/h.sock".parse().expect("endpoint"),
            "tcp:[::1]:5555".parse().expect("endpoint"),
        ];
        c.backend.hub.connect = Some("tcp:127.0.0.1:6000".parse().expect("endpoint"));
        c.backend.hub.socket_mode = SocketMode(0o660);
        c.capture.path = Some("/tmp/x.pcap".into());
        c.capture.max_size = Some(3 * 1024 * 1024 + 1);
        let back: Config = Figment::from(Serialized::defaults(&c))
            .extract()
            .expect("round trip");
        assert_eq!(back, c);
        let back: Config =
            serde_json::from_value(serde_json::to_value(&c).expect("ser")).expect("de");
        assert_eq!(back, c);
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

    // --- files ---------------------------------------------------------------------------------

    #[test]
    fn missing_file_names_the_path() {
        Jail::expect_with(|_| {
            let err = Config::load(&file_sources()).expect_err("missing");
            assert!(matches!(err, ConfigError::File { .. }), "{err:?}");
            assert_eq!(err.to_string(), "configuration file x.toml does not exist");
            Ok(())
        });
    }

    #[test]
    fn invalid_toml_names_the_path_and_line() {
        Jail::expect_with(|jail| {
            let err = load_toml(jail, "[dhcp]\nlease = = \"2h\"\n").expect_err("bad TOML");
            assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with("configuration file x.toml is not valid TOML"),
                "{text}"
            );
            assert!(text.contains("line 2"), "{text}");
            Ok(())
        });
    }

    // --- unknown keys and type errors ----------------------------------------------------------

    #[test]
    fn unknown_keys_are_rejected_in_every_table() {
        let lease = "mac = \"00:ac:00:00:00:01\"\nip = \"192.168.30.50\"\n";
        for (toml, key) in [
            ("bogus = 1".to_string(), "bogus"),
            ("[host]\nbogus = 1".into(), "host.bogus"),
            ("[dhcp]\nbogus = 1".into(), "dhcp.bogus"),
            (
                format!("[[dhcp.static]]\n{lease}bogus = 1"),
                "dhcp.static[0].bogus",
            ),
            ("[nat]\nbogus = 1".into(), "nat.bogus"),
            ("[dns]\nbogus = 1".into(), "dns.bogus"),
            ("[backend]\nbogus = 1".into(), "backend.bogus"),
            ("[backend.tap]\nbogus = 1".into(), "backend.tap.bogus"),
            ("[backend.raw]\nbogus = 1".into(), "backend.raw.bogus"),
            ("[backend.hub]\nbogus = 1".into(), "backend.hub.bogus"),
            ("[capture]\nbogus = 1".into(), "capture.bogus"),
            ("[state]\nbogus = 1".into(), "state.bogus"),
            ("[log]\nbogus = 1".into(), "log.bogus"),
        ] {
            assert_rejects(
                &toml,
                &[&format!(
                    "config key {key} = 1 (from file x.toml): unknown key"
                )],
            );
        }
        assert_rejects(
            "[dhcp]\nrange_begin = \"192.168.30.10\"",
            &["dhcp.range_begin", "[dhcp] accepts: enabled, range_start"],
        );
        assert_rejects(
            &format!("[[dhcp.static]]\n{lease}name = \"x\""),
            &["a [[dhcp.static]] entry accepts: mac, ip, hostname"],
        );
        Jail::expect_with(|jail| {
            jail.set_env("HUBNAT_NAT__BOGUS", "1");
            let text = Config::load(&Sources {
                env: true,
                ..Sources::default()
            })
            .expect_err("unknown")
            .to_string();
            assert!(text.contains("config key nat.bogus = 1 (from environment variable HUBNAT_NAT__BOGUS): unknown key"), "{text}");
            let cli = Sources {
                overrides: vec![Override::new("bogus.key", "x")],
                ..Sources::default()
            };
            let text = Config::load(&cli).expect_err("unknown").to_string();
            assert!(
                text.contains(
                    "config key bogus = { key = \"x\" } (from the command line): unknown key"
                ),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn type_errors_name_key_value_and_expectation() {
        assert_rejects(
            "[nat]\nmtu = \"big\"",
            &["config key nat.mtu = \"big\" (from file x.toml): expected u32, found a string"],
        );
        assert_rejects(
            "[dhcp]\nenabled = \"yes\"",
            &["dhcp.enabled = \"yes\"", "expected a boolean"],
        );
        assert_rejects(
            "[dhcp]\nrange_start = \"192.168.30\"",
            &["dhcp.range_start = \"192.168.30\"", "invalid IPv4 address"],
        );
        assert_rejects("[backend]\nkind = \"vde\"", &["config key backend.kind = \"vde\" (from file x.toml): unknown value; valid values are: tap, raw, hub, memory"]);
        assert_rejects(
            "[log]\nformat = \"xml\"",
            &["log.format = \"xml\"", "text, json"],
        );
        assert_rejects(
            "[[dhcp.static]]\nip = \"192.168.30.50\"",
            &["config key dhcp.static[0].mac (from file x.toml): this key is required here"],
        );
        assert_rejects(
            "[host]\nmac = \"00:ac:12:34:56\"",
            &["host.mac = \"00:ac:12:34:56\"", "invalid MAC address"],
        );
        assert_rejects(
            "dhcp = 5",
            &["config key dhcp = 5", "expected struct DhcpConfig"],
        );
    }

    // --- semantic validation, one test per rule -------------------------------------------------

    #[test]
    fn netmasks_must_be_contiguous() {
        assert_rejects(
            "[host]\nmask = \"255.0.255.0\"",
            &["config key host.mask = 255.0.255.0 (from file x.toml): not a contiguous netmask"],
        );
        assert_rejects(
            "[dhcp]\nmask = \"255.255.0.255\"",
            &["config key dhcp.mask = 255.255.0.255 (from file x.toml): not a contiguous netmask"],
        );
        assert_rejects(
            "[host]\nmask = \"255.255.255.254\"",
            &["host.mask = 255.255.255.254", "/31 leaves no room"],
        );
        assert_eq!(prefix_len(ip("255.255.255.0")), Some(24));
        assert_eq!(prefix_len(ip("0.0.0.0")), Some(0));
        assert_eq!(prefix_len(ip("255.255.255.255")), Some(32));
        assert_eq!(prefix_len(ip("255.255.128.128")), None);
    }

    #[test]
    fn host_mac_must_be_unicast() {
        assert_rejects(
            "[host]\nmac = \"01:00:5e:00:00:01\"",
            &["config key host.mac = 01:00:5e:00:00:01 (from file x.toml): is a multicast"],
        );
        assert_rejects(
            "[host]\nmac = \"ff:ff:ff:ff:ff:ff\"",
            &["host.mac = ff:ff:ff:ff:ff:ff", "broadcast"],
        );
        assert_rejects(
            "[host]\nmac = \"00:00:00:00:00:00\"",
            &["host.mac = 00:00:00:00:00:00", "all-zero"],
        );
    }

    #[test]
    fn host_ip_must_be_a_host_address_of_its_subnet() {
        assert_rejects("[host]\nip = \"192.168.30.0\"", &["config key host.ip = 192.168.30.0 (from file x.toml): is the network address of its subnet 192.168.30.0/24; choose an address between 192.168.30.1 and 192.168.30.254"]);
        assert_rejects(
            "[host]\nip = \"192.168.30.255\"",
            &["host.ip = 192.168.30.255", "broadcast address"],
        );
        assert_rejects(
            "[host]\nip = \"127.0.0.1\"",
            &["host.ip = 127.0.0.1", "unicast"],
        );
    }

    #[test]
    fn dhcp_range_must_run_low_to_high() {
        assert_rejects("[dhcp]\nrange_start = \"192.168.30.150\"\nrange_end = \"192.168.30.100\"",
            &["config key dhcp.range_start = 192.168.30.150 (from file x.toml): comes after dhcp.range_end = 192.168.30.100 (from file x.toml)"]);
    }

    #[test]
    fn dhcp_range_must_lie_inside_the_host_subnet() {
        assert_rejects("[dhcp]\nrange_end = \"192.168.31.5\"",
            &["config key dhcp.range_end = 192.168.31.5 (from file x.toml): outside the subnet 192.168.30.0/24 given by host.ip and host.mask"]);
        assert_rejects(
            "[dhcp]\nrange_start = \"10.0.0.10\"",
            &["dhcp.range_start = 10.0.0.10", "outside the subnet"],
        );
        assert_rejects(
            "[dhcp]\nrange_end = \"192.168.30.255\"",
            &[
                "dhcp.range_end = 192.168.30.255",
                "is the broadcast address of the subnet 192.168.30.0/24",
            ],
        );
    }

    #[test]
    fn dhcp_range_must_not_contain_the_host() {
        assert_rejects("[dhcp]\nrange_start = \"192.168.30.1\"",
            &["config key dhcp.range_start = 192.168.30.1 (from file x.toml): the range 192.168.30.1-192.168.30.200 contains host.ip = 192.168.30.1 (from the built-in defaults)"]);
    }

    #[test]
    fn dhcp_range_is_bounded() {
        assert_rejects(r#"
            host = { ip = "10.0.0.1", mask = "255.0.0.0" }
            dhcp = { range_start = "10.0.0.2", range_end = "10.2.0.0", gateway = "10.0.0.1", dns = ["10.0.0.1"] }
        "#, &["config key dhcp.range_end = 10.2.0.0 (from file x.toml): the range 10.0.0.2-10.2.0.0 holds 131071 addresses; at most 65536"]);
        Jail::expect_with(|jail| {
            load_toml(
                jail,
                r#"
                host = { ip = "10.0.0.1", mask = "255.0.0.0" }
                dhcp = { range_start = "10.0.0.2", range_end = "10.1.0.1", gateway = "", dns = [] }
            "#,
            )
            .expect("65536 addresses are allowed");
            Ok(())
        });
    }

    #[test]
    fn dhcp_lease_is_bounded() {
        assert_rejects(
            "[dhcp]\nlease = \"5s\"",
            &["config key dhcp.lease = \"5s\" (from file x.toml): must be from 10s to 365days"],
        );
        assert_rejects(
            "[dhcp]\nlease = \"400days\"",
            &["dhcp.lease = \"400days\"", "must be from 10s to 365days"],
        );
        Jail::expect_with(|jail| {
            assert_eq!(
                load_toml(jail, "dhcp.lease = \"10s\"")
                    .expect("minimum")
                    .dhcp
                    .lease,
                MIN_LEASE
            );
            assert_eq!(
                load_toml(jail, "dhcp.lease = \"365days\"")
                    .expect("maximum")
                    .dhcp
                    .lease,
                MAX_LEASE
            );
            Ok(())
        });
    }

    #[test]
    fn dhcp_gateway_must_be_in_the_subnet() {
        assert_rejects("[dhcp]\ngateway = \"10.0.0.1\"", &["config key dhcp.gateway = 10.0.0.1 (from file x.toml): outside the subnet 192.168.30.0/24"]);
    }

    #[test]
    fn dhcp_dns_servers_must_be_unicast() {
        assert_rejects(
            "[dhcp]\ndns = [\"192.168.30.1\", \"0.0.0.0\"]",
            &["config key dhcp.dns[1] = 0.0.0.0 (from file x.toml): must be a unicast address"],
        );
    }

    #[test]
    fn dhcp_domain_must_be_a_dns_name() {
        assert_rejects("[dhcp]\ndomain = \"bad..lan\"", &["config key dhcp.domain = \"bad..lan\" (from file x.toml): not a valid domain name: it has an empty label"]);
        assert_rejects(
            "[dhcp]\ndomain = \"my_lan\"",
            &["dhcp.domain = \"my_lan\"", "'_' is not allowed"],
        );
        assert_rejects(
            "[dhcp]\ndomain = \"-lan\"",
            &["dhcp.domain", "starts or ends with '-'"],
        );
        assert!(check_dns_name("example.lan").is_ok());
        assert!(check_dns_name(&"a".repeat(64)).is_err());
        assert!(check_dns_name(&["abc"; 70].join(".")).is_err());
    }

    #[test]
    fn static_leases_are_checked() {
        let entry =
            |mac: &str, ip: &str| format!("[[dhcp.static]]\nmac = \"{mac}\"\nip = \"{ip}\"\n");
        assert_rejects(&entry("00:ac:00:00:00:01", "10.0.0.5"),
            &["config key dhcp.static[0].ip = 10.0.0.5 (from file x.toml): outside the subnet 192.168.30.0/24"]);
        assert_rejects(
            &entry("00:ac:00:00:00:01", "192.168.30.1"),
            &["dhcp.static[0].ip = 192.168.30.1", "is host.ip"],
        );
        assert_rejects(
            &entry("00:ac:00:00:00:01", "192.168.30.255"),
            &["dhcp.static[0].ip = 192.168.30.255", "broadcast address"],
        );
        assert_rejects(
            &entry("01:ac:00:00:00:01", "192.168.30.5"),
            &["dhcp.static[0].mac = 01:ac:00:00:00:01", "multicast"],
        );
        assert_rejects(&(entry("00:ac:00:00:00:01", "192.168.30.5") + &entry("00:ac:00:00:00:01", "192.168.30.6")),
            &["config key dhcp.static[1].mac = 00:ac:00:00:00:01 (from file x.toml): dhcp.static[0] already has this MAC"]);
        assert_rejects(&(entry("00:ac:00:00:00:01", "192.168.30.5") + &entry("00:ac:00:00:00:02", "192.168.30.5")),
            &["config key dhcp.static[1].ip = 192.168.30.5 (from file x.toml): dhcp.static[0] already has this address"]);
        assert_rejects(&(entry("00:ac:00:00:00:01", "192.168.30.5") + "hostname = \"bad_name\""),
            &["config key dhcp.static[0].hostname = \"bad_name\" (from file x.toml): not a valid host name"]);
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                &(entry("00:ac:00:00:00:01", "192.168.30.5")
                    + "hostname = \"printer.lan\"\n"
                    + &entry("00:ac:00:00:00:02", "192.168.30.250")),
            )
            .expect("valid");
            assert_eq!(c.dhcp.statics[0].hostname.as_deref(), Some("printer.lan"));
            assert_eq!(c.dhcp.statics[1].hostname, None);
            Ok(())
        });
    }

    #[test]
    fn mtus_are_bounded() {
        assert_rejects(
            "[nat]\nmtu = 500",
            &["config key nat.mtu = 500 (from file x.toml): must be from 576 to 65520"],
        );
        assert_rejects("[nat]\nmtu = 70000", &["nat.mtu = 70000", "576 to 65520"]);
        assert_rejects(
            "[backend.tap]\nmtu = 100",
            &["config key backend.tap.mtu = 100 (from file x.toml): must be from 576 to 65520"],
        );
        Jail::expect_with(|jail| {
            let c = load_toml(jail, "nat.mtu = 65520\nbackend.tap.mtu = 576")
                .expect("bounds are inclusive");
            assert_eq!((c.nat.mtu, c.tap_mtu()), (65520, 576));
            Ok(())
        });
    }

    #[test]
    fn tap_names_follow_linux_rules() {
        for (name, why) in [
            ("", "must not be empty"),
            (
                "sixteen-bytes-xx",
                "is 16 bytes long; Linux allows at most 15",
            ),
            ("tap/0", "'/' is not allowed"),
            ("tap 0", "' ' is not allowed"),
            ("tap:0", "':' is not allowed"),
            ("..", "is reserved"),
        ] {
            assert_rejects(
                &format!("[backend.tap]\nname = {name:?}"),
                &[&format!(
                    "config key backend.tap.name = {name:?} (from file x.toml): {why}"
                )],
            );
        }
        assert!(check_interface_name("fifteen-bytes-x").is_ok());
        assert!(check_interface_name("tap%d").is_ok());
    }

    #[test]
    fn nat_timeouts_are_bounded() {
        assert_rejects(
            "[nat]\ntcp_timeout = \"0s\"",
            &["config key nat.tcp_timeout = \"0s\" (from file x.toml): must be from 1s to 365days"],
        );
        assert_rejects(
            "[nat]\nudp_timeout = \"500ms\"",
            &["nat.udp_timeout = \"500ms\"", "must be from 1s"],
        );
        assert_rejects(
            "[nat]\nudp_timeout = \"1000days\"",
            &["nat.udp_timeout = \"1000days\"", "to 365days"],
        );
    }

    #[test]
    fn log_level_must_be_a_filter() {
        assert_rejects(
            "[log]\nlevel = \"hubnat=loud\"",
            &["config key log.level = \"hubnat=loud\" (from file x.toml): not a valid log filter"],
        );
        assert_rejects(
            "[log]\nlevel = \" \"",
            &["log.level = \" \"", "must not be empty"],
        );
        Jail::expect_with(|jail| {
            load_toml(jail, "log.level = \"hubnat=trace,warn\"").expect("valid directives");
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        Jail::expect_with(|jail| {
            let err = load_toml(
                jail,
                "nat.mtu = 1\nbackend.tap.name = \"\"\ndhcp.lease = \"1s\"",
            )
            .expect_err("three problems");
            let keys: Vec<&str> = err
                .errors()
                .iter()
                .filter_map(|e| match e {
                    ConfigError::Invalid { key, .. } => Some(key.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(keys, ["dhcp.lease", "nat.mtu", "backend.tap.name"]);
            assert_eq!(err.to_string().lines().count(), 3);
            Ok(())
        });
    }

    // --- backends, capture and NAT limits ---------------------------------------------------

    #[test]
    fn raw_backend_needs_a_valid_interface() {
        assert_rejects(
            "[backend]\nkind = \"raw\"",
            &["config key backend.kind = \"raw\" (from file x.toml): needs backend.raw.interface, the name of the interface"],
        );
        assert_rejects(
            "[backend.raw]\ninterface = \"br 0\"",
            &["config key backend.raw.interface = \"br 0\" (from file x.toml): ' ' is not allowed"],
        );
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                "backend = { kind = \"raw\", raw = { interface = \"br0\" } }",
            )
            .expect("valid");
            assert_eq!(
                (c.backend.kind, c.backend.raw.interface.as_str()),
                (BackendKind::Raw, "br0")
            );
            Ok(())
        });
    }

    #[test]
    fn hub_backend_settings_parse_and_are_checked() {
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                r#"
                [backend]
                kind = "hub"
                [backend.hub]
                listen = ["unix:/run/hubnat/hub.sock", "tcp:127.0.0.1:5555"]
                connect = "unix:/run/vpn/hub.sock"
                socket_mode = "0660"
                max_peers = 8
            "#,
            )
            .expect("valid");
            let hub = &c.backend.hub;
            assert_eq!(
                hub.listen,
                vec![
                    Endpoint::Unix("/run/hubnat/hub.sock".into()),
                    Endpoint::Tcp("127.0.0.1:5555".parse().expect("addr")),
                ]
            );
            assert_eq!(
                hub.connect,
                Some(Endpoint::Unix("/run/vpn/hub.sock".into()))
            );
            assert_eq!(hub.socket_mode, SocketMode(0o660));
            let socket = c.hub_socket_config();
            assert_eq!(
                (socket.socket_mode, socket.max_peers, socket.mtu),
                (0o660, 8, 1500)
            );
            // One string is a list of one; a TOML octal integer is the mode itself.
            let c = load_toml(
                jail,
                "backend.kind = \"hub\"\nbackend.hub.listen = \"unix:/tmp/h.sock\"\nbackend.hub.socket_mode = 0o600",
            )
            .expect("valid");
            assert_eq!(c.backend.hub.listen.len(), 1);
            assert_eq!(c.backend.hub.socket_mode, SocketMode(0o600));
            let json = serde_json::to_value(&c).expect("serialize");
            assert_eq!(json["backend"]["hub"]["socket_mode"], "0600");
            assert_eq!(json["backend"]["hub"]["connect"], "");
            Ok(())
        });
        assert_rejects(
            "[backend]\nkind = \"hub\"",
            &["config key backend.kind = \"hub\" (from file x.toml): needs backend.hub.listen, where peers connect"],
        );
        assert_rejects(
            "[backend.hub]\nlisten = [\"/run/x.sock\"]",
            &[
                "backend.hub.listen",
                "must start with \"unix:\" or \"tcp:\"",
            ],
        );
        assert_rejects(
            "[backend.hub]\nlisten = [\"unix:/a.sock\", \"unix:/a.sock\"]",
            &["config key backend.hub.listen[1] = \"unix:/a.sock\" (from file x.toml): backend.hub.listen[0] is the same address"],
        );
        assert_rejects(
            "[backend.hub]\nconnect = \"tcp:127.0.0.1:0\"",
            &["config key backend.hub.connect = \"tcp:127.0.0.1:0\" (from file x.toml): must name a reachable address"],
        );
        assert_rejects(
            "[backend.hub]\nlisten = \"unix:/a.sock\"\nconnect = \"unix:/a.sock\"",
            &[
                "backend.hub.connect = \"unix:/a.sock\"",
                "connect to itself",
            ],
        );
        assert_rejects(
            "[backend.hub]\nsocket_mode = \"0689\"",
            &["backend.hub.socket_mode = \"0689\"", "invalid file mode"],
        );
        assert_rejects(
            "[backend.hub]\nsocket_mode = 600",
            &["config key backend.hub.socket_mode = \"1130\" (from file x.toml): only permission bits"],
        );
        assert_rejects(
            "[backend.hub]\nmax_peers = 0",
            &["config key backend.hub.max_peers = 0 (from file x.toml): must be from 1 to 4096"],
        );
        assert_eq!(
            "0o755".parse::<SocketMode>().expect("0o prefix"),
            SocketMode(0o755)
        );
        assert_eq!(SocketMode(0o600).to_string(), "0600");
    }

    #[test]
    fn capture_settings_parse_sizes_and_are_bounded() {
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                "[capture]\npath = \"/tmp/seg.pcap\"\nsnaplen = 128\nmax_size = \"10MiB\"\nmax_files = 5",
            )
            .expect("valid");
            let o = c.capture_options().expect("capturing");
            assert_eq!(o.path, PathBuf::from("/tmp/seg.pcap"));
            assert_eq!(
                (o.snaplen, o.max_size, o.max_files),
                (128, Some(10 << 20), 5)
            );
            let json = serde_json::to_value(&c).expect("serialize");
            assert_eq!(json["capture"]["max_size"], "10MiB");
            assert_eq!(
                load_toml(jail, "capture.max_size = 5000")
                    .expect("bytes")
                    .capture
                    .max_size,
                Some(5000)
            );
            assert_eq!(
                load_toml(jail, "capture.max_size = \"2 MB\"")
                    .expect("MB")
                    .capture
                    .max_size,
                Some(2_000_000)
            );
            assert_eq!(
                load_toml(jail, "capture.max_size = \"\"")
                    .expect("none")
                    .capture
                    .max_size,
                None
            );
            Ok(())
        });
        assert_eq!(size_text::parse("64KiB"), Ok(65536));
        assert_eq!(size_text::parse("1gb"), Ok(1_000_000_000));
        assert_eq!(size_text::words(3 << 30), "3GiB");
        assert_eq!(size_text::words(1500), "1500B");
        assert_eq!(size_text::words(5_000_000), "5MB");
        assert_rejects(
            "[capture]\nmax_size = \"10 parsecs\"",
            &["capture.max_size = \"10 parsecs\"", "invalid size"],
        );
        assert_rejects(
            "[capture]\nmax_size = 100",
            &["config key capture.max_size = \"100B\" (from file x.toml): must be at least 4KiB"],
        );
        assert_rejects(
            "[capture]\nsnaplen = 10",
            &["config key capture.snaplen = 10 (from file x.toml): must be from 14"],
        );
        assert_rejects(
            "[capture]\nmax_files = 0",
            &["config key capture.max_files = 0 (from file x.toml): must be from 1 to 1000"],
        );
        assert_rejects(
            "[capture]\npath = \"/tmp/\"",
            &["config key capture.path = \"/tmp/\" (from file x.toml): must name a file"],
        );
    }

    #[test]
    fn nat_limits_and_deny_list_are_checked() {
        Jail::expect_with(|jail| {
            let c = load_toml(
                jail,
                "[nat]\nallow_host_loopback = true\ndeny = [\"10.0.0.0/8\", \"fd00::/8\"]\nmax_sessions = 100\nmax_sessions_per_client = 100",
            )
            .expect("valid");
            assert!(c.nat.allow_host_loopback);
            assert_eq!(
                c.nat.deny,
                vec![
                    "10.0.0.0/8".parse::<IpNet>().expect("net"),
                    "fd00::/8".parse().expect("net")
                ]
            );
            assert_eq!(
                (c.nat.max_sessions, c.nat.max_sessions_per_client),
                (100, 100)
            );
            Ok(())
        });
        assert_rejects(
            "[nat]\ndeny = [\"10.0.0.1/8\"]",
            &["config key nat.deny[0] = \"10.0.0.1/8\" (from file x.toml): has host bits set (did you mean 10.0.0.0/8?)"],
        );
        assert_rejects(
            "[nat]\ndeny = [\"10.0.0.0\"]",
            &["nat.deny", "invalid network \"10.0.0.0\""],
        );
        assert_rejects(
            "[nat]\nmax_sessions = 0",
            &["config key nat.max_sessions = 0 (from file x.toml): must be from 1 to 1000000"],
        );
        assert_rejects(
            "[nat]\nmax_sessions = 2000000",
            &["nat.max_sessions = 2000000", "must be from 1 to 1000000"],
        );
        assert_rejects(
            "[nat]\nmax_sessions = 100\nmax_sessions_per_client = 101",
            &["config key nat.max_sessions_per_client = 101 (from file x.toml): is more than nat.max_sessions = 100 (from file x.toml)"],
        );
        assert_rejects(
            "[nat]\nmax_sessions_per_client = 0",
            &["config key nat.max_sessions_per_client = 0 (from file x.toml): must be at least 1"],
        );
        assert_rejects(
            "[nat]\ntcp_buffer = \"1KiB\"",
            &["config key nat.tcp_buffer = \"1KiB\" (from file x.toml): must be from 16KiB to 64MiB"],
        );
        assert_rejects(
            "[nat]\ntcp_buffer = \"lots\"",
            &["nat.tcp_buffer", "invalid size \"lots\""],
        );
        assert_rejects(
            "[nat]\ntcp_buffer = \"\"",
            &["nat.tcp_buffer", "a size is needed here"],
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

    // --- host-derived defaults -----------------------------------------------------------------

    #[test]
    fn resolv_conf_gives_nameservers_and_domain() {
        let conf = parse_resolv_conf(
            "# generated\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n\
             search first.example second.example\n; comment\noptions edns0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::53]:53".parse().expect("addr"),
            ]
        );
        assert_eq!(conf.domain.as_deref(), Some("first.example"));
        assert_eq!(
            parse_resolv_conf("search a.example\ndomain b.example\n")
                .domain
                .as_deref(),
            Some("b.example")
        );
        assert_eq!(parse_resolv_conf(""), ResolvConf::default());
    }

    #[test]
    fn hostname_domain_is_after_the_first_dot() {
        assert_eq!(
            domain_of_hostname("box.example.lan").as_deref(),
            Some("example.lan")
        );
        assert_eq!(domain_of_hostname("box"), None);
        assert_eq!(domain_of_hostname("box."), None);
        if let Some(domain) = host_domain() {
            assert!(check_dns_name(&domain).is_ok(), "{domain}");
        }
    }

    #[test]
    fn state_dir_depends_on_the_user() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            default_state_dir(0, os("/x"), os("/root")),
            PathBuf::from("/var/lib/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, os("/x/state"), os("/home/u")),
            PathBuf::from("/x/state/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, os("relative"), os("/home/u")),
            PathBuf::from("/home/u/.local/state/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, None, os("/home/u")),
            PathBuf::from("/home/u/.local/state/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, None, None),
            PathBuf::from("hubnat-state")
        );
    }
}
