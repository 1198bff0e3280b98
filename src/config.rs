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
        let (dest, prefix) =
            cidr.split_once('/').ok_or_else(|| bad(format!("{cidr:?} has no /PREFIX")))?;
        let dest: Ipv4Addr =
            dest.parse().map_err(|_| bad(format!("{dest:?} is not an IPv4 address")))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad(format!("prefix {prefix:?} is not a number from 0 to 32")))?;
        let gateway: Ipv4Addr =
            gateway.parse().map_err(|_| bad(format!("{gateway:?} is not an IPv4 address")))?;
        let network = Ipv4Addr::from(u32::from(dest) & prefix_mask(prefix_len));
        if network != dest {
            return Err(bad(format!(
                "{cidr} has host bits set (did you mean {network}/{prefix_len}?)"
            )));
        }
        Ok(Route { dest, prefix_len, gateway })
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
}

/// The virtual host's MAC and IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The virtual host's MAC. `None`: `00:ac` + 4 random bytes, generated once and kept in
    /// the state directory.
    #[serde(with = "opt_text")]
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
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            enabled: true,
            mtu: 1500,
            tcp_timeout: Duration::from_secs(7200),
            udp_timeout: Duration::from_secs(600),
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
        DnsConfig { upstream: read_resolv_conf().nameservers }
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
}

/// A frame backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A Linux TAP device (needs CAP_NET_ADMIN to create it).
    #[default]
    Tap,
    /// An in-memory segment, for embedding and tests.
    Memory,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Tap => "tap",
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
        TapConfig { name: "hubnat0".into(), mtu: None }
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
        LogConfig { level: "info".into(), format: LogFormat::Text, security_log: None }
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

    /// The security log file: `log.security_log`, else `<state.dir>/security.log`.
    pub fn security_log_path(&self) -> PathBuf {
        self.log.security_log.clone().unwrap_or_else(|| self.state.dir.join("security.log"))
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
        Override { key: key.into(), value: value.into() }
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
        let bad = |reason: &str| ConfigError::Override { arg: s.into(), reason: reason.into() };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key = key.trim();
        let well_formed = key.split('.').all(|word| {
            !word.is_empty()
                && word.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
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
        Env::prefixed(ENV_PREFIX).split(ENV_SEPARATOR).ignore(&["config"]).data()
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
        let dict = figment::util::nest(&self.0.key, self.0.parsed_value())
            .into_dict()
            .expect("invariant: nest() of a non-empty key yields a dict");
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
                return Err(ConfigError::File { path: path.clone(), reason });
            }
        }
        let figment = Self::figment(sources);
        let config: Config =
            figment.extract().map_err(|e| ConfigError::from_figment(e, &figment))?;
        config.validate(&figment)?;
        Ok(config)
    }

    /// The layers of `sources` as a figment, lowest first: defaults, file, environment,
    /// overrides. Nothing is read until it is extracted.
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
        let mut c = Checker { figment, errors: Vec::new() };

        // host
        let host_ip = self.host.ip;
        if !is_unicast_v4(host_ip) {
            c.fail("host.ip", host_ip, "must be a unicast address (not 0.0.0.0, loopback, multicast or broadcast)");
        }
        let subnet = match prefix_len(self.host.mask) {
            None => {
                c.fail("host.mask", self.host.mask, NOT_CONTIGUOUS);
                None
            }
            Some(p) if p > 30 => {
                c.fail("host.mask", self.host.mask, format!(
                    "/{p} leaves no room for the virtual host and a client; use /30 or shorter, e.g. 255.255.255.0"
                ));
                None
            }
            Some(p) => Some(Subnet::of(host_ip, p)),
        };
        if let Some(s) = subnet {
            if let Some(what) = s.special(host_ip) {
                c.fail("host.ip", host_ip, format!(
                    "is the {what} address of its subnet {s}; choose an address between {} and {}",
                    s.first_host(), s.last_host()
                ));
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
            c.fail("dhcp.range_start", start, format!(
                "comes after dhcp.range_end = {end} ({}); the range must run from low to high",
                c.origin("dhcp.range_end")
            ));
        }
        if let Some(s) = subnet {
            let start_ok = c.check_in_subnet("dhcp.range_start", start, start, s);
            let end_ok = c.check_in_subnet("dhcp.range_end", end, end, s);
            if start_ok && end_ok && start <= end {
                if (start..=end).contains(&host_ip) {
                    c.fail("dhcp.range_start", start, format!(
                        "the range {start}-{end} contains host.ip = {host_ip} ({}); the virtual \
                         host's own address cannot be leased, so move the range or host.ip",
                        c.origin("host.ip")
                    ));
                }
                let size = u64::from(u32::from(end) - u32::from(start)) + 1;
                if size > MAX_RANGE_SIZE {
                    c.fail("dhcp.range_end", end, format!(
                        "the range {start}-{end} holds {size} addresses; at most {MAX_RANGE_SIZE} are allowed"
                    ));
                }
            }
        }
        c.check_duration("dhcp.lease", dhcp.lease, MIN_LEASE, MAX_LEASE);
        if let (Some(gw), Some(s)) = (dhcp.gateway, subnet) {
            c.check_in_subnet("dhcp.gateway", gw, gw, s);
        }
        for (i, &ip) in dhcp.dns.iter().enumerate() {
            if !is_unicast_v4(ip) {
                c.fail(&format!("dhcp.dns[{i}]"), ip, "must be a unicast address a client can reach (not 0.0.0.0, loopback, multicast or broadcast)");
            }
        }
        if let Some(domain) = &dhcp.domain {
            if let Err(why) = check_dns_name(domain) {
                c.fail("dhcp.domain", format!("{domain:?}"), format!("not a valid domain name: {why}"));
            }
        }
        for (i, route) in dhcp.routes.iter().enumerate() {
            if let Some(s) = subnet {
                c.check_in_subnet(&format!("dhcp.routes[{i}]"), route, route.gateway, s);
            }
        }
        let mut macs: HashMap<MacAddr, usize> = HashMap::new();
        let mut ips: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (i, lease) in dhcp.statics.iter().enumerate() {
            let key = format!("dhcp.static[{i}]");
            c.check_unicast_mac(&format!("{key}.mac"), lease.mac);
            if let Some(s) = subnet {
                c.check_in_subnet(&format!("{key}.ip"), lease.ip, lease.ip, s);
            }
            if lease.ip == host_ip {
                c.fail(&format!("{key}.ip"), lease.ip, "is host.ip, the virtual host's own address; give the client another one");
            }
            if let Some(first) = macs.insert(lease.mac, i) {
                macs.insert(lease.mac, first);
                c.fail(&format!("{key}.mac"), lease.mac, format!("dhcp.static[{first}] already has this MAC; a client can have only one static lease"));
            }
            if let Some(first) = ips.insert(lease.ip, i) {
                ips.insert(lease.ip, first);
                c.fail(&format!("{key}.ip"), lease.ip, format!("dhcp.static[{first}] already has this address"));
            }
            if let Some(name) = &lease.hostname {
                if let Err(why) = check_dns_name(name) {
                    c.fail(&format!("{key}.hostname"), format!("{name:?}"), format!("not a valid host name: {why}"));
                }
            }
        }

        // nat
        c.check_mtu("nat.mtu", self.nat.mtu);
        c.check_duration("nat.tcp_timeout", self.nat.tcp_timeout, MIN_NAT_TIMEOUT, MAX_NAT_TIMEOUT);
        c.check_duration("nat.udp_timeout", self.nat.udp_timeout, MIN_NAT_TIMEOUT, MAX_NAT_TIMEOUT);

        // dns
        for (i, &server) in self.dns.upstream.iter().enumerate() {
            let key = format!("dns.upstream[{i}]");
            let text = format!("{:?}", upstream_text(server));
            let ip = server.ip();
            if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
                c.fail(&key, text, "must be the unicast address of a DNS server");
            } else if server.port() == 0 {
                c.fail(&key, text, "port 0 is not a valid port; leave the port out for 53");
            }
        }

        // backend
        let name = &self.backend.tap.name;
        if let Err(why) = check_interface_name(name) {
            c.fail("backend.tap.name", format!("{name:?}"), why);
        }
        if let Some(mtu) = self.backend.tap.mtu {
            c.check_mtu("backend.tap.mtu", mtu);
        }

        // state
        if self.state.dir.as_os_str().is_empty() {
            c.fail("state.dir", "\"\"", "must name a directory");
        }

        // log
        let level = &self.log.level;
        if level.trim().is_empty() {
            c.fail("log.level", format!("{level:?}"), "must not be empty; use e.g. \"info\"");
        } else if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            c.fail("log.level", format!("{level:?}"), format!(
                "not a valid log filter ({e}); use a level such as \"info\" or \"debug\", or \
                 directives such as \"hubnat=debug,info\""
            ));
        }
        if self.log.security_log.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            c.fail("log.security_log", "\"\"", "must name a file");
        }

        c.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------------------------

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
        let addr = if value.to_string() == ip.to_string() { String::new() } else { format!("{ip} ") };
        if !subnet.contains(ip) {
            self.fail(key, value, format!(
                "{addr}outside the subnet {subnet} given by host.ip and host.mask"
            ));
            false
        } else if let Some(what) = subnet.special(ip) {
            self.fail(key, value, format!(
                "{addr}is the {what} address of the subnet {subnet} given by host.ip and host.mask"
            ));
            false
        } else {
            true
        }
    }

    fn check_unicast_mac(&mut self, key: &str, mac: MacAddr) {
        if mac == MacAddr([0; 6]) {
            self.fail(key, mac, "the all-zero address is not a station address");
        } else if !mac.is_unicast() {
            self.fail(key, mac, "is a multicast or broadcast address (the low bit of the first \
                                 octet is set); use a unicast one such as 00:ac:12:34:56:78");
        }
    }

    fn check_mtu(&mut self, key: &str, mtu: u32) {
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            self.fail(key, mtu, format!("must be from {MIN_MTU} to {MAX_MTU}"));
        }
    }

    fn check_duration(&mut self, key: &str, value: Duration, min: Duration, max: Duration) {
        if !(min..=max).contains(&value) {
            self.fail(key, format!("{:?}", duration_text::words(value)), format!(
                "must be from {} to {}",
                duration_text::words(min),
                duration_text::words(max)
            ));
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
        Subnet { network: u32::from(ip) & prefix_mask(prefix), prefix }
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
        return Err(format!("it is {} bytes long; at most 253 are allowed", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (two dots in a row, or a leading or trailing dot)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 bytes"));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
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
        Err(format!("is {} bytes long; Linux allows at most {MAX_TAP_NAME_LEN}", name.len()))
    } else if name == "." || name == ".." {
        Err("\".\" and \"..\" are not interface names".into())
    } else if let Some(c) = name.chars().find(|c| *c == '/' || *c == ':' || c.is_whitespace()) {
        Err(format!("{c:?} is not allowed in an interface name (no '/', ':' or white space)"))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Where a value came from
// ---------------------------------------------------------------------------------------------

/// Splits `dhcp.static[1].ip` into `["dhcp", "static", "1", "ip"]`.
fn key_segments(key: &str) -> Vec<String> {
    key.split(['.', '[', ']']).filter(|s| !s.is_empty()).map(String::from).collect()
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
            .take_while(|s| !s.bytes().all(|b| b.is_ascii_digit()))
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
            let items: Vec<String> =
                dict.iter().map(|(k, v)| format!("{k} = {}", render_value(v))).collect();
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
    value.as_ref().map(|v| format!(" = {v}")).unwrap_or_default()
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
        let mut all: Vec<ConfigError> =
            error.into_iter().map(|e| Self::from_one_figment_error(e, figment)).collect();
        match all.len() {
            1 => all.remove(0),
            _ => ConfigError::Several(all),
        }
    }

    fn from_one_figment_error(e: figment::Error, figment: &Figment) -> ConfigError {
        use figment::error::Kind;

        let file = e.metadata.as_ref().and_then(|m| m.source.as_ref()).and_then(|s| s.file_path());
        if let (Some(path), true, Kind::Message(msg)) = (file, e.path.is_empty(), &e.kind) {
            // The provider itself failed: the file could not be read or parsed.
            let reason = msg.trim_end().to_string();
            return if msg.starts_with("TOML parse error") {
                ConfigError::Syntax { path: path.to_path_buf(), reason }
            } else {
                ConfigError::File { path: path.to_path_buf(), reason: format!("cannot be read: {reason}") }
            };
        }

        let mut segments = e.path.clone();
        let (value_from_kind, reason) = match &e.kind {
            Kind::UnknownField(field, expected) => {
                let table = match segments.as_slice() {
                    [] => "the top level".to_string(),
                    [.., last] if last == "static" => "a [[dhcp.static]] entry".to_string(),
                    path => format!("[{}]", path.join(".")),
                };
                segments.push(field.clone());
                (None, format!("unknown key; {table} accepts: {}", expected.join(", ")))
            }
            Kind::MissingField(field) => {
                segments.push(field.to_string());
                (Some("(missing)".to_string()), "this key is required here".to_string())
            }
            Kind::UnknownVariant(found, expected) => (
                Some(format!("{found:?}")),
                format!("unknown value; valid values are: {}", expected.join(", ")),
            ),
            Kind::InvalidType(actual, expected) => (
                actual_value(actual),
                format!("expected {expected}, found {}", actual_kind(actual)),
            ),
            Kind::InvalidValue(actual, expected) => {
                (actual_value(actual), format!("invalid value, expected {expected}"))
            }
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
            Some(md) => describe_origin(md, e.profile.as_ref().unwrap_or(figment.profile()), &segments),
            None => ORIGIN_DEFAULTS.to_string(),
        };
        ConfigError::Invalid {
            key: if segments.is_empty() { "(top level)".into() } else { segments.join(".") },
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
        s.trim().parse().map_err(|_| format!("invalid IPv4 address {s:?}"))
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
                Err(E::custom(format!(
                    "invalid duration {n}: write a positive number and a unit, such as \"90s\""
                )))
            }
        }

        d.deserialize_any(DurationVisitor)
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
    std::fs::read_to_string(RESOLV_CONF).map(|text| parse_resolv_conf(&text)).unwrap_or_default()
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
    hostname.split_once('.').map(|(_, domain)| domain.to_string()).filter(|d| !d.is_empty())
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
fn default_state_dir(euid: u32, xdg_state_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/hubnat");
    }
    // The XDG spec says to ignore a relative XDG_STATE_HOME.
    if let Some(xdg) = xdg_state_home.map(PathBuf::from).filter(|p| p.is_absolute()) {
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

