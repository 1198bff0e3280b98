//! The driver: the async loop that joins a frame backend, the clock, the host sockets, the
//! state directory and the control handle to the sans-IO [core](crate::core).
//!
//! # Theory of operation
//!
//! One loop on one thread owns the [`VirtualHost`]. Each turn it waits for the first of: a batch
//! of frames from the backend, the core's next timeout, a kick from a session task, a command
//! from a [`GatewayHandle`], or the shutdown signal. It then feeds the core (every frame of the
//! batch, then the timeout check, all with one timestamp), carries out the core's host
//! requests ([`HostOp`]), writes the security log lines of the core's events and saves the
//! lease table when it changed, and then sends the frames the core produced as one batch (so
//! a lease is on disk before its ACK leaves). On shutdown the lease table is saved once more.
//! No locks: nothing else touches the core.
//!
//! Host sockets: each session's socket and the task that serves it live in one map, keyed by
//! session. The tasks report what happened ([`HostEvent`]) and never end a session themselves;
//! when the core ends one it says [`HostOp::Close`], and the driver drops the socket and the
//! task — a connect still under way is cancelled at once.
//!
//! Time: [`Clock`] is monotonic. It starts at the wall time of the process start (so the DHCP
//! server's seconds read as Unix times) and then follows `std::time::Instant` only; the wall
//! clock is read only to convert times a person or a file reads: a lease's start and expiry
//! (lease file, security log, tables) and a session's times (tables). Saved leases are converted
//! back to core seconds when they are loaded.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_executor::{LocalExecutor, Task};
use async_io::{Async, Timer};
use futures_lite::FutureExt;
use hubnat_backend::{Backend, FrameBatch};
use serde::Serialize;
use smoltcp::wire::EthernetAddress;
use tracing::{error, info};

use crate::config::{Change, Config, MacAddr, Override, LIVE_SECTIONS};
use crate::core::dhcp::{
    server::fmt_mac, DhcpCounters, DhcpSettings, Lease, Reservation, StaticRoute,
};
use crate::core::nat::{
    HostError, HostEvent, HostOp, IcmpMode, NatCounters, NatSettings, Protocol, SessionId,
};
use crate::core::subnet::Subnet;
use crate::core::{
    Counters, Event, HostSettings, Instant, LeaseTarget, LinkCounters, Settings, VirtualHost,
};
use crate::host;
use crate::seclog::SecurityLog;
use crate::state::{StateDir, StateError};

/// Frames read from the backend per wake-up, at most.
pub const RX_BATCH_FRAMES: usize = 64;

/// Why the gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The security log could not be opened.
    #[error("cannot open the security log {path}: {source}")]
    SecurityLog {
        /// Its path.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The backend failed (device removed, hub closed).
    #[error("backend {backend} failed: {source}")]
    Backend {
        /// The backend's description.
        backend: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The virtual host's identity from the configuration and its MAC.
pub fn host_settings(config: &Config, mac: MacAddr) -> HostSettings {
    HostSettings {
        mac: EthernetAddress(mac.0),
        ip: config.host.ip,
        mask: config.host.mask,
        mtu: config.nat.mtu as usize,
    }
}

/// The DHCP server's settings from the configuration.
pub fn dhcp_settings(config: &Config) -> DhcpSettings {
    let d = &config.dhcp;
    DhcpSettings {
        enabled: d.enabled,
        range_start: d.range_start,
        range_end: d.range_end,
        mask: d.mask,
        lease: d.lease,
        gateway: d.gateway,
        dns: d.dns.clone(),
        domain: d.domain.clone(),
        routes: d
            .routes
            .iter()
            .map(|r| StaticRoute {
                dest: r.dest,
                prefix_len: r.prefix_len,
                gateway: r.gateway,
            })
            .collect(),
        statics: d
            .statics
            .iter()
            .map(|s| Reservation {
                mac: s.mac.0,
                ip: s.ip,
                hostname: s.hostname.clone(),
            })
            .collect(),
    }
}

/// The NAT's settings from the configuration.
pub fn nat_settings(config: &Config) -> NatSettings {
    let n = &config.nat;
    NatSettings {
        enabled: n.enabled,
        tcp_timeout: n.tcp_timeout.into(),
        udp_timeout: n.udp_timeout.into(),
        allow_host_loopback: n.allow_host_loopback,
        // Validation refuses IPv6 entries (the NAT carries IPv4 only) and host bits.
        deny: n
            .deny
            .iter()
            .filter_map(|net| match net {
                ipnet::IpNet::V4(v4) => Subnet::new(v4.network(), v4.prefix_len()).ok(),
                ipnet::IpNet::V6(_) => None,
            })
            .collect(),
        max_sessions: n.max_sessions as usize,
        max_sessions_per_client: n.max_sessions_per_client as usize,
        tcp_buffer: n.tcp_buffer as usize,
        dns_upstreams: config.dns.upstream.clone(),
    }
}

/// The core's live settings from the configuration.
pub fn settings(config: &Config, mac: MacAddr) -> Settings {
    Settings {
        enabled: config.host.enabled,
        host: host_settings(config, mac),
        dhcp: dhcp_settings(config),
        nat: nat_settings(config),
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No random source: the clock still differs between runs.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

/// Where the wall time comes from (the system clock, or a test's).
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The core's clock: monotonic, starting at the wall time of its creation. See the module
/// documentation.
#[derive(Clone)]
pub struct Clock {
    start: std::time::Instant,
    start_micros: i64,
    wall: WallClock,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("start_micros", &self.start_micros)
            .finish_non_exhaustive()
    }
}

impl Clock {
    /// A clock whose wall time is the system's.
    pub fn system() -> Clock {
        Clock::with_wall(Arc::new(SystemTime::now))
    }

    /// A clock whose wall time comes from `wall` (read at start, and for conversions).
    pub fn with_wall(wall: WallClock) -> Clock {
        let start_micros = wall()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Clock {
            start: std::time::Instant::now(),
            start_micros,
            wall,
        }
    }

    /// Now, for the core.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start_micros + self.start.elapsed().as_micros() as i64)
    }

    /// Now, on the wall clock.
    pub fn wall_now(&self) -> SystemTime {
        (self.wall)()
    }

    /// The wall time of core time `t` (what a person or a file reads).
    pub fn to_wall(&self, t: Instant) -> SystemTime {
        let delta = t.total_micros() - self.now().total_micros();
        let wall = self.wall_now();
        if delta >= 0 {
            wall + Duration::from_micros(delta as u64)
        } else {
            wall.checked_sub(Duration::from_micros(delta.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        }
    }

    /// Core seconds (as the DHCP server keeps them) to Unix seconds on the wall clock.
    pub fn wall_secs(&self, core_secs: u64) -> u64 {
        let wall = self.to_wall(Instant::from_secs(core_secs as i64));
        wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    /// Unix seconds on the wall clock to core seconds.
    pub fn core_secs(&self, wall_secs: u64) -> u64 {
        let wall_now = self
            .wall_now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let core_now = self.now().secs();
        (wall_secs as i64 - wall_now + core_now).max(0) as u64
    }

    /// A lease with its times (start and expiry) moved from core seconds to the wall clock's.
    fn lease_to_wall(&self, lease: &Lease) -> Lease {
        let mut l = lease.clone();
        l.start = self.wall_secs(l.start);
        l.expires = self.wall_secs(l.expires);
        l
    }

    /// A saved lease with its times moved from the wall clock's seconds to core seconds.
    fn lease_to_core(&self, mut lease: Lease) -> Lease {
        lease.start = self.core_secs(lease.start);
        lease.expires = self.core_secs(lease.expires);
        lease
    }
}

/// Sessions by protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SessionCounts {
    /// TCP sessions.
    pub tcp: usize,
    /// UDP sessions (DNS clients of the virtual host included).
    pub udp: usize,
    /// ICMP echo sessions.
    pub icmp: usize,
}

/// What a running gateway reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The whole function.
    pub enabled: bool,
    /// The NAT.
    pub nat_enabled: bool,
    /// The DHCP server.
    pub dhcp_enabled: bool,
    /// How echo to outside hosts is answered.
    pub icmp_mode: IcmpMode,
    /// The backend.
    pub backend: String,
    /// The virtual host's MAC address.
    pub mac: String,
    /// The virtual host's address.
    pub ip: Ipv4Addr,
    /// The segment's mask.
    pub mask: Ipv4Addr,
    /// Seconds since the gateway started.
    pub uptime_secs: u64,
    /// Sessions by protocol.
    pub sessions: SessionCounts,
    /// Flows waiting for a policy's verdict.
    pub pending_verdicts: usize,
    /// Leases bound to a client now.
    pub leases: usize,
    /// Addresses the DHCP server manages (the range).
    pub pool_size: usize,
    /// Payload bytes from clients to remotes, all sessions so far.
    pub bytes_to_remote: u64,
    /// Payload bytes from remotes to clients, all sessions so far.
    pub bytes_to_client: u64,
    /// The core's frame counters.
    pub counters: Counters,
    /// Frames the core could not send.
    pub link: LinkCounters,
    /// The NAT's counters.
    pub nat: NatCounters,
    /// The DHCP server's counters.
    pub dhcp: DhcpCounters,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

/// One row of the NAT session table.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    /// The session's id (for `end_session`).
    pub id: SessionId,
    /// Transport.
    pub protocol: Protocol,
    /// The client's MAC address.
    pub client_mac: String,
    /// The client's endpoint (ICMP: address and echo identifier).
    pub client: SocketAddrV4,
    /// The endpoint the client sent to.
    pub remote: SocketAddrV4,
    /// Where the host socket goes (differs for the DNS redirect and policy redirects).
    pub target: SocketAddr,
    /// The name the client looked up for the remote, when known.
    pub remote_name: Option<String>,
    /// Life stage.
    pub state: crate::core::nat::SessionState,
    /// When it was created.
    #[serde(serialize_with = "rfc3339")]
    pub created: SystemTime,
    /// When something last moved.
    #[serde(serialize_with = "rfc3339")]
    pub last_activity: SystemTime,
    /// Payload bytes from the client to the remote.
    pub bytes_to_remote: u64,
    /// Payload bytes from the remote to the client.
    pub bytes_to_client: u64,
}

/// One row of the DHCP lease table.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseRow {
    /// The lease's id.
    pub id: u32,
    /// The client's MAC address.
    pub mac: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// The client's host name, if it sent one.
    pub hostname: Option<String>,
    /// Offered, bound, released, expired, declined.
    pub state: String,
    /// When the current binding started.
    #[serde(serialize_with = "rfc3339")]
    pub start: SystemTime,
    /// When it expires (or expired).
    #[serde(serialize_with = "rfc3339")]
    pub expires: SystemTime,
}

/// Why a command to a running gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The gateway is not running (it stopped, or never started).
    #[error("the gateway is not running")]
    Stopped,
    /// The settings change was refused; nothing changed.
    #[error("{0}")]
    Invalid(String),
}

type Reply<T> = async_channel::Sender<T>;

enum Command {
    Status(Reply<Status>),
    Sessions(Reply<Vec<SessionRow>>),
    Leases(Reply<Vec<LeaseRow>>),
    Set {
        changes: Vec<Override>,
        source: String,
        reply: Reply<Result<Vec<Change>, HandleError>>,
    },
    EndSession(SessionId, Reply<bool>),
    ReleaseLease(LeaseTarget, Reply<Option<LeaseRow>>),
}

/// A cloneable handle to a running gateway: each call sends a command into the gateway's loop
/// and waits for the answer. Usable from any thread (the control API's, an embedder's).
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    commands: async_channel::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl GatewayHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, HandleError> {
        let (tx, rx) = async_channel::bounded(1);
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.recv().await.map_err(|_| HandleError::Stopped)
    }

    /// The status with every counter.
    pub async fn status(&self) -> Result<Status, HandleError> {
        self.ask(Command::Status).await
    }

    /// The NAT session table.
    pub async fn sessions(&self) -> Result<Vec<SessionRow>, HandleError> {
        self.ask(Command::Sessions).await
    }

    /// The DHCP lease table.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, HandleError> {
        self.ask(Command::Leases).await
    }

    /// Changes live settings: `KEY=VALUE` changes as in the configuration file
    /// (`dhcp.range_end`, `nat.tcp_timeout=1h`, `host.enabled=false`), checked as a whole
    /// against the running configuration ([`Config::with_changes`]). Either every change
    /// applies at once and the keys whose values changed come back, or nothing changes and the
    /// error names the key, the value, `source` ("from the control API") and why. `source` is
    /// also written to the security log.
    pub async fn set(
        &self,
        changes: Vec<Override>,
        source: &str,
    ) -> Result<Vec<Change>, HandleError> {
        let source = source.to_owned();
        self.ask(|reply| Command::Set {
            changes,
            source,
            reply,
        })
        .await?
    }

    /// Changes live settings to those of `config`: every key of its live sections
    /// ([`LIVE_SECTIONS`]) is applied with [`set`](Self::set); the other sections are not
    /// read (they need a restart).
    pub async fn apply_config(
        &self,
        config: Config,
        source: &str,
    ) -> Result<Vec<Change>, HandleError> {
        let changes = LIVE_SECTIONS
            .iter()
            .filter_map(|section| config.section_settings(section))
            .flatten()
            .map(|s| Override::new(s.key, s.value))
            .collect();
        self.set(changes, source).await
    }

    /// Ends session `id` (TCP: a RST both ways). False when there is no such session.
    pub async fn end_session(&self, id: SessionId) -> Result<bool, HandleError> {
        self.ask(|r| Command::EndSession(id, r)).await
    }

    /// Releases the lease of a MAC address or of an address, as a client's RELEASE would.
    /// Returns the lease released, or `None` when there was none.
    pub async fn release_lease(
        &self,
        target: LeaseTarget,
    ) -> Result<Option<LeaseRow>, HandleError> {
        self.ask(|r| Command::ReleaseLease(target, r)).await
    }
}

/// A configured gateway, ready to run on a backend.
pub struct Gateway {
    config: Config,
    state: StateDir,
    seclog: SecurityLog,
    mac: MacAddr,
    clock: Clock,
    commands: async_channel::Receiver<Command>,
    handle: GatewayHandle,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("mac", &self.mac)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Opens the state directory (taking its lock), settles the MAC address and opens the
    /// security log.
    pub fn new(config: Config) -> Result<Gateway, GatewayError> {
        let state = StateDir::open(&config.state.dir)?;
        let mac = state.mac(config.host.mac)?;
        let path = config.security_log_path();
        let seclog = SecurityLog::open(&path)
            .map_err(|source| GatewayError::SecurityLog { path, source })?;
        let (tx, rx) = async_channel::bounded(64);
        Ok(Gateway {
            config,
            state,
            seclog,
            mac,
            clock: Clock::system(),
            commands: rx,
            handle: GatewayHandle { commands: tx },
        })
    }

    /// Uses `wall` for the wall time (tests step it to show that nothing depends on it).
    pub fn with_wall_clock(mut self, wall: WallClock) -> Gateway {
        self.clock = Clock::with_wall(wall);
        self
    }

    /// A handle to send commands to the gateway once it runs.
    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// The virtual host's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `shutdown` completes or the backend fails. Leases are saved on every change
    /// and once more on the way out.
    pub async fn run<B: Backend>(
        mut self,
        mut backend: B,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        let clock = self.clock.clone();
        let leases: Vec<Lease> = self
            .state
            .load_leases()?
            .into_iter()
            .map(|l| clock.lease_to_core(l))
            .collect();
        let restored = leases.len();
        let (icmp_mode, icmp_err) = host::probe_icmp_mode();
        let seed = random_seed();
        let mut core =
            VirtualHost::new(settings(&self.config, self.mac), leases, seed, clock.now());
        core.set_icmp_mode(icmp_mode);
        match host::raise_fd_limit() {
            Ok(n) => tracing::debug!(open_files = n, "file descriptor limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
        let d = &self.config.dhcp;
        match &icmp_err {
            None => info!(
                "icmp: echo to outside hosts goes through unprivileged ICMP sockets (real replies)"
            ),
            Some(e) => info!(
                error = %e,
                "icmp: this process may not open ICMP sockets (see net.ipv4.ping_group_range); \
                 echo to outside hosts is answered by hubnat itself (synthesized replies)"
            ),
        }
        info!(
            backend = %backend.describe(),
            mac = %self.mac,
            ip = %self.config.host.ip,
            dhcp = d.enabled,
            nat = self.config.nat.enabled,
            icmp = icmp_mode.as_str(),
            leases = restored,
            "hubnat started"
        );
        self.seclog.write(
            "GATEWAY",
            "started",
            &format!(
                "backend={:?} mac={} ip={} mask={} dhcp={} range={}-{} nat={} icmp={} leases_restored={}",
                backend.describe(),
                self.mac,
                self.config.host.ip,
                self.config.host.mask,
                if d.enabled { "on" } else { "off" },
                d.range_start,
                d.range_end,
                if self.config.nat.enabled { "on" } else { "off" },
                icmp_mode.as_str(),
                restored
            ),
        );
        let (kick, kicked) = async_channel::bounded(1);
        let shared = Rc::new(Shared {
            core: RefCell::new(core),
            clock,
            kick,
            sockets: RefCell::new(HashMap::new()),
            dns: RefCell::new([None, None]),
            last_open_warning: Cell::new(None),
            unwarned_open_failures: Cell::new(0),
        });
        let ex = Rc::new(LocalExecutor::new());
        let result = ex
            .run(self.main_loop(&shared, &ex, &mut backend, kicked, shutdown))
            .await;
        // Sessions end with the process: their tasks and sockets go with the executor.
        shared.sockets.borrow_mut().clear();
        drop(ex);
        self.drain_events(&shared);
        let core = shared.core.borrow();
        self.save(&shared.clock, &core);
        let c = core.counters();
        info!(
            frames_in = c.frames_in,
            frames_out = c.frames_out,
            malformed = c.malformed,
            "hubnat stopped"
        );
        self.seclog.write(
            "GATEWAY",
            "stopped",
            &match &result {
                Ok(()) => "reason=shutdown".to_owned(),
                Err(e) => format!("reason={:?}", e.to_string()),
            },
        );
        result
    }

    async fn main_loop<B: Backend>(
        &mut self,
        shared: &Rc<Shared>,
        ex: &Rc<LocalExecutor<'static>>,
        backend: &mut B,
        kicked: async_channel::Receiver<()>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        let max_frame = backend.max_frame_len();
        let mut rx = FrameBatch::new(RX_BATCH_FRAMES, max_frame);
        let mut tx = FrameBatch::new(crate::core::TX_QUEUE_FRAMES, max_frame);
        let mut shutdown = pin!(shutdown);
        let started = std::time::Instant::now();
        let commands = self.commands.clone();

        enum Wake {
            Frames(std::io::Result<()>),
            Kick,
            Timer,
            Command(Command),
            Stop,
        }

        loop {
            let (deadline, again) = {
                let core = shared.core.borrow();
                (core.poll_timeout(), core.wants_poll())
            };
            if again {
                // More to send right away (the last batch was full): let the session tasks run,
                // then go round without waiting.
                futures_lite::future::yield_now().await;
            }
            rx.clear();
            let wake = {
                let recv = async { Wake::Frames(backend.recv_batch(&mut rx).await) };
                let kick = async {
                    let _ = kicked.recv().await;
                    Wake::Kick
                };
                let command = async {
                    match commands.recv().await {
                        Ok(c) => Wake::Command(c),
                        // Every handle is gone (the gateway keeps one): never.
                        Err(_) => std::future::pending().await,
                    }
                };
                let timer = async {
                    match deadline {
                        Some(at) => {
                            let delay = Duration::from_micros(
                                u64::try_from(
                                    at.total_micros() - shared.clock.now().total_micros(),
                                )
                                .unwrap_or(0),
                            );
                            Timer::after(delay).await;
                            Wake::Timer
                        }
                        None => std::future::pending().await,
                    }
                };
                let stop = async {
                    shutdown.as_mut().await;
                    Wake::Stop
                };
                stop.or(recv).or(command).or(kick).or(timer).await
            };
            let now = shared.clock.now();
            let mut command = None;
            {
                let mut core = shared.core.borrow_mut();
                match wake {
                    Wake::Frames(Ok(())) => {
                        for frame in rx.iter() {
                            core.handle_frame(now, frame);
                        }
                    }
                    Wake::Frames(Err(source)) => {
                        return Err(GatewayError::Backend {
                            backend: backend.describe(),
                            source,
                        });
                    }
                    Wake::Command(c) => command = Some(c),
                    Wake::Kick | Wake::Timer => {}
                    Wake::Stop => return Ok(()),
                }
            }
            if let Some(c) = command {
                self.command(shared, c, &backend.describe(), max_frame, started);
            }
            {
                let mut core = shared.core.borrow_mut();
                if core.poll_timeout().is_some_and(|t| t <= now) {
                    core.handle_timeout(now);
                }
                core.poll(now);
                core.take_transmit(&mut tx);
            }
            Shared::run_host_ops(shared, ex);
            // Events first: a lease is on disk before the ACK that grants it leaves, so a crash
            // right after the ACK cannot lose it.
            self.drain_events(shared);
            if !tx.is_empty() {
                if let Err(source) = backend.send_batch(&tx).await {
                    return Err(GatewayError::Backend {
                        backend: backend.describe(),
                        source,
                    });
                }
                tx.clear();
            }
        }
    }

    /// Answers a command from a [`GatewayHandle`].
    fn command(
        &mut self,
        shared: &Shared,
        command: Command,
        backend: &str,
        max_frame: usize,
        started: std::time::Instant,
    ) {
        let clock = &shared.clock;
        let now = clock.now();
        match command {
            Command::Status(reply) => {
                let core = shared.core.borrow();
                let _ = reply.try_send(self.status(&core, backend, started));
            }
            Command::Sessions(reply) => {
                let core = shared.core.borrow();
                let rows = core
                    .nat()
                    .table()
                    .iter()
                    .map(|s| SessionRow {
                        id: s.id,
                        protocol: s.key.protocol,
                        client_mac: fmt_mac(&s.client_mac),
                        client: s.key.client,
                        remote: s.key.remote,
                        target: s.target,
                        remote_name: s.remote_name.clone(),
                        state: s.state,
                        created: clock.to_wall(s.created),
                        last_activity: clock.to_wall(s.last_activity),
                        bytes_to_remote: s.bytes_out,
                        bytes_to_client: s.bytes_in,
                    })
                    .collect();
                let _ = reply.try_send(rows);
            }
            Command::Leases(reply) => {
                let core = shared.core.borrow();
                let rows = core.dhcp().leases().map(|l| lease_row(clock, l)).collect();
                let _ = reply.try_send(rows);
            }
            Command::ReleaseLease(target, reply) => {
                let lease = shared.core.borrow_mut().release_lease(target, now);
                let _ = reply.try_send(lease.as_ref().map(|l| lease_row(clock, l)));
            }
            Command::Set {
                changes,
                source,
                reply,
            } => {
                let result = self.set(shared, &changes, &source, max_frame, now);
                let _ = reply.try_send(result);
            }
            Command::EndSession(id, reply) => {
                // The security log's line is the core's: "session deleted … reason="ended by
                // operator"".
                let ended = shared.core.borrow_mut().end_session_by_operator(id, now);
                let _ = reply.try_send(ended);
            }
        }
    }

    /// Applies live changes: validated as a whole, then handed to the core; each changed key
    /// is a security log line.
    fn set(
        &mut self,
        shared: &Shared,
        changes: &[Override],
        source: &str,
        max_frame: usize,
        now: Instant,
    ) -> Result<Vec<Change>, HandleError> {
        let (config, changed) = self
            .config
            .with_changes(changes, source)
            .map_err(|e| HandleError::Invalid(e.to_string()))?;
        let mtu = config.nat.mtu as usize;
        if mtu + 14 > max_frame {
            return Err(HandleError::Invalid(format!(
                "config key nat.mtu = {mtu} (from {source}): larger than the backend's frames \
                 allow (MTU {} at most); restart hubnat to use a larger MTU",
                max_frame.saturating_sub(14)
            )));
        }
        if let Some(mac) = config.host.mac {
            self.mac = mac;
        }
        shared
            .core
            .borrow_mut()
            .apply_settings(settings(&config, self.mac), now);
        self.config = config;
        for c in &changed {
            self.seclog.write(
                "GATEWAY",
                "setting changed",
                &format!("key={} old={} new={} by={source:?}", c.key, c.old, c.new),
            );
        }
        Ok(changed)
    }

    fn status(&self, core: &VirtualHost, backend: &str, started: std::time::Instant) -> Status {
        let s = core.settings();
        let nat = core.nat();
        let by = nat.table().count_by_protocol();
        let (bytes_to_remote, bytes_to_client) = nat.bytes();
        let pool = core.dhcp().pool();
        Status {
            enabled: s.enabled,
            nat_enabled: s.nat.enabled,
            dhcp_enabled: s.dhcp.enabled,
            icmp_mode: nat.icmp_mode(),
            backend: backend.to_owned(),
            mac: self.mac.to_string(),
            ip: s.host.ip,
            mask: s.host.mask,
            uptime_secs: started.elapsed().as_secs(),
            sessions: SessionCounts {
                tcp: by[Protocol::Tcp.index()],
                udp: by[Protocol::Udp.index()],
                icmp: by[Protocol::Icmp.index()],
            },
            pending_verdicts: nat.pending_verdicts(),
            leases: pool
                .iter()
                .filter(|l| l.state == crate::core::dhcp::LeaseState::Bound)
                .count(),
            pool_size: (u32::from(s.dhcp.range_end) - u32::from(s.dhcp.range_start) + 1) as usize,
            bytes_to_remote,
            bytes_to_client,
            counters: *core.counters(),
            link: *core.link_counters(),
            nat: *nat.counters(),
            dhcp: core.dhcp().counters(),
        }
    }

    fn drain_events(&mut self, shared: &Shared) {
        let mut core = shared.core.borrow_mut();
        let mut changed = false;
        while let Some(event) = core.poll_event() {
            match event {
                Event::Dhcp(e) => self.seclog.dhcp(&e, |l| shared.clock.lease_to_wall(l)),
                Event::Nat(e) => self.seclog.nat(&e),
                Event::LeasesChanged => changed = true,
            }
        }
        if changed {
            self.save(&shared.clock, &core);
        }
    }

    fn save(&self, clock: &Clock, core: &VirtualHost) {
        let leases: Vec<Lease> = core
            .leases_to_save()
            .iter()
            .map(|l| clock.lease_to_wall(l))
            .collect();
        if let Err(e) = self.state.save_leases(&leases) {
            error!(error = %e, "cannot save the lease table; leases given out since the last save would be lost on restart");
        }
    }
}

fn lease_row(clock: &Clock, l: &Lease) -> LeaseRow {
    LeaseRow {
        id: l.id.0,
        mac: fmt_mac(&l.mac),
        ip: l.ip,
        hostname: l.hostname.clone(),
        state: format!("{:?}", l.state).to_lowercase(),
        start: UNIX_EPOCH + Duration::from_secs(clock.wall_secs(l.start)),
        expires: UNIX_EPOCH + Duration::from_secs(clock.wall_secs(l.expires)),
    }
}

/// What the main loop and the session tasks share, on one thread.
struct Shared {
    core: RefCell<VirtualHost>,
    clock: Clock,
    /// Wakes the main loop to poll the core and send what it produced.
    kick: async_channel::Sender<()>,
    /// Each session's host socket and the task serving it.
    sockets: RefCell<HashMap<SessionId, HostSide>>,
    /// DNS query sockets (IPv4, IPv6), opened on first use, with their answer tasks.
    dns: RefCell<[Option<DnsSocket>; 2]>,
    /// When a host socket last failed to open for lack of resources (rate-limited warnings).
    last_open_warning: Cell<Option<std::time::Instant>>,
    /// Open failures not warned about since the last warning.
    unwarned_open_failures: Cell<u64>,
}

/// A DNS query socket and the task reading its answers.
type DnsSocket = (Rc<Async<UdpSocket>>, Task<()>);

/// A TCP session's stream, once connected (shared by its task and the map, so that an abort
/// can set SO_LINGER before the drop).
type StreamSlot = Rc<RefCell<Option<Rc<Async<TcpStream>>>>>;

/// The host side of one session; dropping it cancels the task and closes the socket. (The
/// tasks are only held, for that drop.)
#[allow(dead_code)]
enum HostSide {
    Tcp(StreamSlot, Task<()>),
    Udp(Rc<Async<UdpSocket>>, Task<()>),
    Icmp(Rc<Async<socket2::Socket>>, Task<()>),
}

impl Shared {
    fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    /// A host socket could not be opened for lack of resources: warn at most once a second,
    /// with the count of the failures in between (a flood must not flood the log too).
    fn warn_open_failure(&self, id: SessionId, e: &io::Error) {
        if HostError::from_io(e) != HostError::Resources {
            tracing::debug!(session = %id, error = %e, "nat: host socket failed");
            return;
        }
        let now = std::time::Instant::now();
        let due = self
            .last_open_warning
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            let more = self.unwarned_open_failures.replace(0);
            self.last_open_warning.set(Some(now));
            tracing::warn!(session = %id, error = %e, more, "nat: cannot open a host socket ({}); session refused", HostError::from_io(e).as_str());
        } else {
            self.unwarned_open_failures
                .set(self.unwarned_open_failures.get() + 1);
        }
    }

    /// Carries out the core's requests: opens sockets, sends datagrams, starts and ends tasks;
    /// then reports what failed.
    fn run_host_ops(shared: &Rc<Shared>, ex: &Rc<LocalExecutor<'static>>) {
        enum Failure {
            Open(SessionId, io::Error),
            Send(SessionId, io::Error),
        }
        let mut failed: Vec<Failure> = Vec::new();
        let mut icmp_buf = Vec::new();
        let mut closed = Vec::new();
        {
            let mut core = shared.core.borrow_mut();
            core.drain_host_ops(|op| match op {
                HostOp::TcpConnect { id, target } => {
                    let slot: StreamSlot = Rc::new(RefCell::new(None));
                    let task = ex.spawn(tcp_session(shared.clone(), id, target, slot.clone()));
                    shared.sockets.borrow_mut().insert(id, HostSide::Tcp(slot, task));
                }
                HostOp::UdpOpen { id, target } => match host::udp_connect(target) {
                    Ok(sock) => {
                        let sock = Rc::new(sock);
                        let task = ex.spawn(udp_replies(shared.clone(), id, sock.clone()));
                        shared.sockets.borrow_mut().insert(id, HostSide::Udp(sock, task));
                    }
                    Err(e) => failed.push(Failure::Open(id, e)),
                },
                HostOp::UdpSend { id, payload } => {
                    let sockets = shared.sockets.borrow();
                    if let Some(HostSide::Udp(s, _)) = sockets.get(&id) {
                        if let Err(e) = s.get_ref().send(payload) {
                            failed.push(Failure::Send(id, e));
                        }
                    }
                }
                HostOp::IcmpOpen { id, target } => match host::ping_socket(target) {
                    Ok(sock) => {
                        let sock = Rc::new(sock);
                        let task = ex.spawn(icmp_replies(shared.clone(), id, sock.clone()));
                        shared.sockets.borrow_mut().insert(id, HostSide::Icmp(sock, task));
                    }
                    Err(e) => failed.push(Failure::Open(id, e)),
                },
                HostOp::IcmpSend { id, seq, payload } => {
                    host::echo_request(&mut icmp_buf, seq, payload);
                    let sockets = shared.sockets.borrow();
                    if let Some(HostSide::Icmp(s, _)) = sockets.get(&id) {
                        if let Err(e) = s.get_ref().send(&icmp_buf) {
                            failed.push(Failure::Send(id, e));
                        }
                    }
                }
                HostOp::DnsSend { upstream, payload } => {
                    match Shared::dns_socket(shared, ex, upstream.is_ipv6()) {
                        Ok(sock) => {
                            if let Err(e) = sock.get_ref().send_to(payload, upstream) {
                                tracing::debug!(%upstream, error = %e, "dns: cannot send the query");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "dns: cannot open a socket for queries"),
                    }
                }
                HostOp::Close { id, abort } => {
                    let side = shared.sockets.borrow_mut().remove(&id);
                    if let Some(HostSide::Tcp(slot, _)) = &side {
                        if abort {
                            if let Some(stream) = slot.borrow().as_ref() {
                                host::set_reset_on_close(stream.get_ref());
                            }
                        }
                    }
                    // Dropped after the core is released: the task's destructor may not
                    // borrow it, but keep the order simple.
                    closed.push(side);
                }
            });
        }
        drop(closed);
        if !failed.is_empty() {
            let now = shared.now();
            let mut core = shared.core.borrow_mut();
            for f in &failed {
                match f {
                    Failure::Open(id, e) => {
                        shared.warn_open_failure(*id, e);
                        core.nat_host_event(*id, HostEvent::OpenFailed(e), now);
                    }
                    Failure::Send(id, e) => core.nat_host_event(*id, HostEvent::SendFailed(e), now),
                }
            }
            drop(core);
            shared.kick();
        }
    }

    fn dns_socket(
        shared: &Rc<Shared>,
        ex: &Rc<LocalExecutor<'static>>,
        v6: bool,
    ) -> io::Result<Rc<Async<UdpSocket>>> {
        let mut dns = shared.dns.borrow_mut();
        let slot = &mut dns[usize::from(v6)];
        if let Some((sock, _)) = slot {
            return Ok(sock.clone());
        }
        let sock = Rc::new(host::udp_any(v6)?);
        let task = ex.spawn(dns_answers(shared.clone(), sock.clone()));
        *slot = Some((sock.clone(), task));
        Ok(sock)
    }
}

/// One TCP session on the host side: connect, report, then relay until the core closes it
/// (the task is dropped on [`HostOp::Close`], which may come at any point, the connect
/// included).
async fn tcp_session(shared: Rc<Shared>, id: SessionId, target: SocketAddr, slot: StreamSlot) {
    let stream = match host::tcp_connect(target).await {
        Ok(s) => Rc::new(s),
        Err(e) => {
            shared.warn_open_failure(id, &e);
            tracing::debug!(session = %id, %target, error = %e, "nat: connect failed");
            let now = shared.now();
            shared
                .core
                .borrow_mut()
                .nat_host_event(id, HostEvent::ConnectFailed(&e), now);
            shared.kick();
            return;
        }
    };
    *slot.borrow_mut() = Some(stream.clone());
    let now = shared.now();
    shared
        .core
        .borrow_mut()
        .nat_host_event(id, HostEvent::Connected, now);
    shared.kick();
    relay(&shared, id, &stream).await;
}

/// What one relay step learnt about the host socket.
enum Learnt {
    WriteShut,
    EndOfStream,
    Failed(io::Error),
}

/// Moves bytes between the client's connection (in smoltcp) and the host stream, reporting
/// the host side's EOF, errors and write shutdown to the core, until the session is gone.
async fn relay(shared: &Shared, id: SessionId, stream: &Async<TcpStream>) {
    let mut learnt: Vec<Learnt> = Vec::new();
    std::future::poll_fn(|cx| {
        let now = shared.now();
        let mut core = shared.core.borrow_mut();
        let mut progress = false;
        {
            let Some(mut relay) = core.nat_tcp_relay(id, now) else {
                return Poll::Ready(());
            };
            relay.register_waker(cx.waker());
            // Client → host, straight from smoltcp's receive buffer.
            while relay.has_client_data() {
                match stream.poll_writable(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => {
                        learnt.push(Learnt::Failed(e));
                        break;
                    }
                    Poll::Ready(Ok(())) => {}
                }
                match relay.take_client_data(|data| (&mut stream.get_ref()).write(data)) {
                    Ok(0) => break,
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        learnt.push(Learnt::Failed(e));
                        break;
                    }
                }
            }
            if learnt.is_empty() && relay.client_finished() {
                let _ = stream.get_ref().shutdown(Shutdown::Write);
                learnt.push(Learnt::WriteShut);
            }
            // Host → client, straight into smoltcp's send buffer.
            while learnt.iter().all(|l| matches!(l, Learnt::WriteShut))
                && relay.may_send()
                && relay.has_room()
            {
                match stream.poll_readable(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => {
                        learnt.push(Learnt::Failed(e));
                        break;
                    }
                    Poll::Ready(Ok(())) => {}
                }
                let mut room = 0;
                let r = relay.fill_from_host(|buf| {
                    room = buf.len();
                    if room == 0 {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    (&mut stream.get_ref()).read(buf)
                });
                match r {
                    Ok(0) if room > 0 => {
                        learnt.push(Learnt::EndOfStream);
                        break;
                    }
                    Ok(0) => break,
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && room == 0 => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        learnt.push(Learnt::Failed(e));
                        break;
                    }
                }
            }
        }
        let any = !learnt.is_empty();
        for l in learnt.drain(..) {
            match l {
                Learnt::WriteShut => core.nat_host_event(id, HostEvent::WriteShut, now),
                Learnt::EndOfStream => core.nat_host_event(id, HostEvent::EndOfStream, now),
                Learnt::Failed(e) if HostError::from_io(&e) == HostError::Reset => {
                    core.nat_host_event(id, HostEvent::Reset, now)
                }
                Learnt::Failed(e) => core.nat_host_event(id, HostEvent::Error(&e), now),
            }
        }
        drop(core);
        if progress || any {
            shared.kick();
        }
        Poll::Pending
    })
    .await
}

/// Datagrams from a UDP session's host socket, back to the client; socket errors (ICMP errors
/// for earlier datagrams, one per entry of the socket's error queue) are reported to the core.
async fn udp_replies(shared: Rc<Shared>, id: SessionId, sock: Rc<Async<UdpSocket>>) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let mut any = false;
        // The last error `recv` returned: the socket's pending error, which is also the last
        // entry of its error queue (reported from there), unless the queue is empty.
        let mut pending = None;
        let now = shared.now();
        let mut core = shared.core.borrow_mut();
        loop {
            let r = core.nat_udp_receive(id, now, |buf| sock.get_ref().recv(buf));
            match r {
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The error is consumed by reading it; the socket carries on.
                Err(e) => pending = Some(e),
            }
        }
        // The error queue (IP_RECVERR), when `recv` failed or found nothing (an entry whose
        // pending error a send took already). It must be emptied: the socket stays readable
        // while it holds an entry.
        let mut queued = false;
        if pending.is_some() || !any {
            while let Some(e) = host::udp_take_error(sock.get_ref()) {
                core.nat_host_event(id, HostEvent::Error(&e), now);
                queued = true;
            }
        }
        if let Some(e) = pending.filter(|_| !queued) {
            core.nat_host_event(id, HostEvent::Error(&e), now);
            any = true;
        }
        drop(core);
        if any || queued {
            shared.kick();
        }
    }
}

/// Echo replies from an ICMP session's ping socket, back to the client.
async fn icmp_replies(shared: Rc<Shared>, id: SessionId, sock: Rc<Async<socket2::Socket>>) {
    let mut buf = vec![0u8; 65536];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let mut any = false;
        loop {
            match sock.get_ref().read(&mut buf) {
                Ok(n) => {
                    let now = shared.now();
                    shared
                        .core
                        .borrow_mut()
                        .nat_icmp_receive(id, now, &buf[..n]);
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if any {
            shared.kick();
        }
    }
}

/// Answers from the DNS upstreams.
async fn dns_answers(shared: Rc<Shared>, sock: Rc<Async<UdpSocket>>) {
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let now = shared.now();
                shared
                    .core
                    .borrow_mut()
                    .nat_dns_answer(from, &buf[..n], now);
                shared.kick();
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                tracing::warn!(error = %e, "dns: query socket failed");
                return;
            }
        }
    }
}
