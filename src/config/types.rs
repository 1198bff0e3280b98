//! The configuration's structure: [`Config`], one struct per table, and their defaults.
//!
//! # Theory of operation
//!
//! Each TOML table is one struct with `#[serde(deny_unknown_fields, default)]`: every key may
//! be left out (its default is SecureNAT's reference behaviour), and a key the struct does
//! not know is an error that names it. The field names are the keys; the value forms are in
//! [`values`](super::values). A section struct is plain data: it checks nothing itself
//! (validation is [`validate`](super::validate)'s) and derived values such as
//! [`Config::tap_mtu`] are computed on demand, never stored.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hubnat_hub::Endpoint;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::host::default_state_dir;
use super::values::{duration_text, opt_text, size_required, size_text, text_list};
use super::{MacAddr, MacPrefix, Route, SocketMode};

/// `nat.memory_limit` by default: 1 GiB.
pub const DEFAULT_MEMORY_LIMIT: u64 = 1 << 30;

/// `nat.tcp_buffer` by default: 1 MiB, window scale 4 (the receive buffer is the largest
/// `65535 << k` that fits, and smoltcp offers `k`).
pub const DEFAULT_TCP_BUFFER: u64 = 1 << 20;

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

/// The whole configuration of one hubnat instance. `Default` is the reference behaviour; it
/// reads nothing from the host but the default `state.dir` (the DNS servers and the domain
/// the host would give come from the loader's host layer, see [`HostDefaults`]).
///
/// [`HostDefaults`]: super::HostDefaults
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
    /// The control API (Unix socket) and the metrics endpoint.
    pub control: ControlConfig,
    /// Who the process runs as once its backend is open.
    pub process: ProcessConfig,
    /// WASM policy modules, `[[policy]]` tables, run in this order. Changing them is a reload
    /// (SIGHUP), not a live setting.
    pub policy: Vec<PolicyConfig>,
}

/// The virtual host's MAC and IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The whole function (SecureNAT's enable/disable): `false` takes the virtual host off the
    /// segment (no ARP, no DHCP, no NAT) while the process keeps its leases and settings.
    pub enabled: bool,
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
            enabled: true,
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
    /// Default: none; the loader's host layer gives the host's domain.
    #[serde(with = "opt_text")]
    pub domain: Option<String>,
    /// Classless static routes (option 121), each `"CIDR via GATEWAY"`.
    #[serde(with = "text_list")]
    pub routes: Vec<Route>,
    /// The most addresses one MAC may hold (offered or bound) at once: clients behind one MAC
    /// that send different client identifiers (option 61) each count. A DISCOVER beyond it gets
    /// no offer, so one client cannot take the pool by changing its identifier.
    pub max_leases_per_mac: u32,
    /// Fixed addresses for known clients.
    #[serde(rename = "static")]
    pub statics: Vec<StaticLease>,
    /// Serve only clients whose MAC matches one of these (addresses or prefixes); empty:
    /// every client. For a hub shared with hosts that have their own addressing.
    #[serde(with = "text_list")]
    pub serve_macs: Vec<MacPrefix>,
    /// Never serve clients whose MAC matches one of these; wins over `serve_macs`.
    #[serde(with = "text_list")]
    pub ignore_macs: Vec<MacPrefix>,
    /// Answer even while another DHCP server answers on the segment. Off: hubnat looks for
    /// other servers (a probe at start and every minute) and stays quiet while one answers.
    pub authoritative: bool,
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
            domain: None,
            routes: Vec::new(),
            max_leases_per_mac: 4,
            statics: Vec::new(),
            serve_macs: Vec::new(),
            ignore_macs: Vec::new(),
            authoritative: false,
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
    /// How long a TCP client has, from hubnat's SYN-ACK, to complete the three-way handshake;
    /// a half-open session (a client that never ACKs, or a spoofed SYN) ends then.
    #[serde(with = "duration_text")]
    pub tcp_handshake_timeout: Duration,
    /// How long an idle UDP session lives.
    #[serde(with = "duration_text")]
    pub udp_timeout: Duration,
    /// Whether clients may reach the host's own loopback addresses (127.0.0.0/8, ::1) through
    /// the NAT. Off by default: a client would otherwise reach services that listen only
    /// locally on the host.
    pub allow_host_loopback: bool,
    /// Whether clients may reach link-local addresses (169.254.0.0/16) through the NAT. Off by
    /// default: cloud metadata services answer at 169.254.169.254, with the host's
    /// credentials.
    pub allow_link_local: bool,
    /// Whether clients may reach the host's own addresses (those of its interfaces other than
    /// the loopback) through the NAT. Off by default: a client would otherwise reach every
    /// service that listens on the host.
    pub allow_host_addresses: bool,
    /// Destinations the NAT refuses, as IPv4 networks (`"10.0.0.0/8"`); empty: none. An IPv6
    /// network is refused by validation: the NAT carries IPv4 only, so it would match nothing.
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
    /// New sessions are refused while the process's resident memory is at or above this
    /// (bytes, or a size such as "1GiB"); `None` (`""`): no limit. Sessions already open keep
    /// theirs: their buffers fill as data waits (a client that does not read holds up to
    /// twice `tcp_buffer`).
    #[serde(with = "size_text")]
    pub memory_limit: Option<u64>,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            enabled: true,
            mtu: 1500,
            tcp_timeout: Duration::from_secs(7200),
            tcp_handshake_timeout: Duration::from_secs(20),
            udp_timeout: Duration::from_secs(600),
            allow_host_loopback: false,
            allow_link_local: false,
            allow_host_addresses: false,
            deny: Vec::new(),
            max_sessions: 16384,
            max_sessions_per_client: 4096,
            tcp_buffer: DEFAULT_TCP_BUFFER,
            memory_limit: Some(DEFAULT_MEMORY_LIMIT),
        }
    }
}

/// The DNS redirect: queries to the virtual host's port 53 go to these servers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Upstream servers, tried in order; each `"IP"`, `"IP:PORT"` or `"[IPv6]:PORT"`, port 53
    /// when left out. Default: none; the loader's host layer gives the nameservers of
    /// `/etc/resolv.conf`.
    #[serde(with = "text_list")]
    pub upstream: Vec<SocketAddr>,
}

/// Which frame backend carries the segment, and its settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// The backend in use.
    pub kind: BackendKind,
    /// How long the gateway's thread polls for frames and socket events before it sleeps,
    /// while its traffic is light (zero: it sleeps at once).
    #[serde(with = "duration_text")]
    pub busy_poll: Duration,
    /// Settings of the TAP backend.
    pub tap: TapConfig,
    /// Settings of the raw backend.
    pub raw: RawConfig,
    /// Settings of the hub socket backend.
    pub hub: HubConfig,
}

/// The default `backend.busy_poll`: a little longer than a request/response round trip through
/// the kernel's loopback and a TAP device, so that the answer is usually caught.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::default(),
            busy_poll: DEFAULT_BUSY_POLL,
            tap: TapConfig::default(),
            raw: RawConfig::default(),
            hub: HubConfig::default(),
        }
    }
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
    /// Checksum and TCP segmentation offload (`IFF_VNET_HDR`, `TUNSETOFFLOAD`): the kernel and
    /// hubnat pass TCP segments of up to 64 KiB, which the kernel cuts to the MTU where a wire
    /// needs it.
    pub offload: bool,
}

impl Default for TapConfig {
    fn default() -> Self {
        TapConfig {
            name: "hubnat0".into(),
            mtu: None,
            offload: true,
        }
    }
}

/// The raw backend: an existing interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// The interface to attach to (a bridge, a VPN's TAP device, a veth); required when
    /// `backend.kind = "raw"`.
    pub interface: String,
    /// TCP segmentation offload on the packet socket (`PACKET_VNET_HDR`): local senders' TCP
    /// super-frames reach the core whole, and the core's long segments leave with a GSO header
    /// for the kernel to cut where a wire needs it. `false`: super-frames are cut by hubnat and
    /// every frame sent fits the MTU.
    pub offload: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            interface: String::new(),
            offload: true,
        }
    }
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

/// Packet capture: every frame the backend passes, both ways, to a pcap file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The capture file; `None` (`""`): no capture.
    #[serde(with = "opt_text")]
    pub path: Option<PathBuf>,
    /// Bytes kept of each frame.
    pub snaplen: u32,
    /// Rotate the file when it would grow past this many bytes (100 MiB by default);
    /// `None` (`""`): never.
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
            max_size: Some(hubnat_backend::capture::DEFAULT_MAX_SIZE),
            max_files: hubnat_backend::capture::DEFAULT_MAX_FILES,
        }
    }
}

/// One WASM policy module, a `[[policy]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy's name, unique among the policies: it names the policy in logs and in the
    /// security log's verdicts.
    pub name: String,
    /// The WebAssembly component (`.wasm`) to load; it must be given.
    pub path: PathBuf,
    /// What a trap, a timeout or running out of memory means.
    pub on_error: OnError,
    /// How long one call may run.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// The most linear memory the module may have (bytes, or a size such as "16MiB").
    #[serde(with = "size_required")]
    pub memory: u64,
    /// The `[policy.config]` table: what the module reads with the host's `config` function.
    pub config: BTreeMap<String, String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            name: String::new(),
            path: PathBuf::new(),
            on_error: OnError::Allow,
            timeout: Duration::from_millis(5),
            memory: 16 << 20,
            config: BTreeMap::new(),
        }
    }
}

/// What a failing policy call (a trap, a timeout, running out of memory) means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail open: the session is allowed, the DHCP reply goes out unchanged.
    #[default]
    Allow,
    /// Fail closed: the session is rejected, the DHCP reply is not sent.
    Deny,
}

impl fmt::Display for OnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnError::Allow => "allow",
            OnError::Deny => "deny",
        })
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
    /// Rotate the security log when it would grow past this many bytes; `None` (`""`): never.
    #[serde(with = "size_text")]
    pub security_max_size: Option<u64>,
    /// Security log files kept when rotating, the current one included (`PATH`, `PATH.1`, …).
    pub security_max_files: u32,
}

/// The default size at which the security log rotates (`log.security_max_size`).
pub const DEFAULT_SECURITY_MAX_SIZE: u64 = 10 << 20;
/// The default number of security log files kept (`log.security_max_files`).
pub const DEFAULT_SECURITY_MAX_FILES: u32 = 5;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            security_log: None,
            security_max_size: Some(DEFAULT_SECURITY_MAX_SIZE),
            security_max_files: DEFAULT_SECURITY_MAX_FILES,
        }
    }
}

/// The control API: HTTP/1.1 with JSON bodies on a Unix socket, and Prometheus metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The control socket; `None` (`""`): `<state.dir>/control.sock` (see
    /// [`Config::control_socket_path`]).
    #[serde(with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// A TCP address that serves `/metrics` only, for scrapers; `None` (`""`): none.
    #[serde(with = "opt_text")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Who the process runs as: `hubnat run` started as root opens what needs root (the TAP
/// device, the raw socket, the listening sockets), then becomes `user` (and `group`) for good.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// The user to become, by name or number; `None` (`""`): stay who started it.
    #[serde(with = "opt_text")]
    pub user: Option<String>,
    /// The group to become, by name or number; `None` (`""`): the user's primary group.
    #[serde(with = "opt_text")]
    pub group: Option<String>,
    /// The seccomp filter `hubnat run` installs once its start-up is done (`crate::seccomp`).
    pub seccomp: SeccompMode,
}

/// What `hubnat run`'s seccomp filter does with a system call hubnat is not known to make
/// (`process.seccomp`); the list of those it makes is `crate::seccomp`'s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Kill the process (`SECCOMP_RET_KILL_PROCESS`, seen as SIGSYS): a violation is loud.
    #[default]
    Enforce,
    /// Let the call through and have the kernel log it (`SECCOMP_RET_LOG`): to find what the
    /// list lacks.
    Log,
    /// No filter.
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

impl LogConfig {
    /// Whether the diagnostic log should carry ANSI colour codes: only in the text format, only
    /// when standard error is a terminal, and never when the `NO_COLOR` environment variable is
    /// set to something non-empty (<https://no-color.org>). Pure: the caller says what it found.
    pub fn ansi(&self, stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
        self.format == LogFormat::Text
            && stderr_is_terminal
            && no_color.is_none_or(|value| value.is_empty())
    }

    /// The diagnostic log's filter from `level`: tracing's directives, with field values
    /// matched as text, never compiled as regular expressions (a field value such as
    /// `{=.g...........................}` makes a DFA that takes minutes and gigabytes to build).
    pub fn filter(
        &self,
    ) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
        tracing_subscriber::EnvFilter::builder()
            .with_regex(false)
            .parse(&self.level)
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

    /// The control socket: `control.socket`, else `<state.dir>/control.sock`.
    pub fn control_socket_path(&self) -> PathBuf {
        self.control
            .socket
            .clone()
            .unwrap_or_else(|| self.state.dir.join("control.sock"))
    }

    /// The security log's rotation: `log.security_max_size` and `log.security_max_files`.
    pub fn security_rotation(&self) -> crate::seclog::Rotation {
        crate::seclog::Rotation {
            max_size: self.log.security_max_size,
            max_files: self.log.security_max_files,
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use figment::providers::Serialized;
    use figment::Figment;

    use crate::config::testing::*;
    use crate::config::*;

    use super::*;

    #[test]
    fn defaults_are_the_reference_behaviour() {
        let c = Config::default();
        assert_eq!(
            c.host,
            HostConfig {
                enabled: true,
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
                tcp_handshake_timeout: Duration::from_secs(20),
                udp_timeout: Duration::from_secs(600),
                allow_host_loopback: false,
                allow_link_local: false,
                allow_host_addresses: false,
                deny: Vec::new(),
                max_sessions: 16384,
                max_sessions_per_client: 4096,
                tcp_buffer: DEFAULT_TCP_BUFFER,
                memory_limit: Some(1024 * 1024 * 1024),
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
                max_size: Some(100 * 1024 * 1024),
                max_files: 2,
            }
        );
        assert_eq!(c.capture_options(), None);
        assert_eq!(
            c.backend.tap,
            TapConfig {
                name: "hubnat0".into(),
                mtu: None,
                offload: true,
            }
        );
        assert_eq!(
            c.log,
            LogConfig {
                level: "info".into(),
                format: LogFormat::Text,
                security_log: None,
                security_max_size: Some(DEFAULT_SECURITY_MAX_SIZE),
                security_max_files: DEFAULT_SECURITY_MAX_FILES,
            }
        );
        assert_eq!(c.tap_mtu(), 1500);
        assert_eq!(c.security_log_path(), c.state.dir.join("security.log"));
        // Nothing from the host: the loader's host layer supplies these.
        assert_eq!(
            (c.dns.upstream.clone(), c.dhcp.domain.clone()),
            (Vec::new(), None)
        );
    }

    #[test]
    fn log_colours_only_on_a_terminal_and_never_with_no_color() {
        let text = LogConfig::default();
        let json = LogConfig {
            format: LogFormat::Json,
            ..LogConfig::default()
        };
        let set = |v: &str| Some(OsStr::new(v).to_os_string());
        for (log, terminal, no_color, ansi) in [
            (&text, true, None, true),
            (&text, true, set(""), true), // NO_COLOR="" does not count
            (&text, true, set("1"), false),
            (&text, false, None, false), // a pipe or a file
            (&text, false, set("1"), false),
            (&json, true, None, false),
        ] {
            assert_eq!(
                log.ansi(terminal, no_color.as_deref()),
                ansi,
                "{:?} terminal={terminal} NO_COLOR={no_color:?}",
                log.format
            );
        }
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
}
