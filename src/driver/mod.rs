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

mod clock;
mod handle;
mod policies;
mod sessions;

pub use clock::{Clock, WallClock};
pub use handle::{GatewayHandle, HandleError, LeaseRow, SessionCounts, SessionRow, Status};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_executor::LocalExecutor;
use futures_lite::FutureExt;
use hubnat_backend::rt::{Gate, Timer};
use hubnat_backend::{Backend, FrameBatch};
use smoltcp::wire::EthernetAddress;
use tracing::{error, info};

use crate::config::{Change, Config, MacAddr, Override};
use crate::core::dhcp::{server::fmt_mac, DhcpSettings, Lease, Reservation, StaticRoute};
use crate::core::nat::{NatSettings, Protocol};
use crate::core::subnet::Subnet;
use crate::core::{Event, HostSettings, Instant, Settings, VirtualHost};
use crate::host;
use crate::seclog::SecurityLog;
use crate::state::{StateDir, StateError};
use handle::{lease_row, Command};
use sessions::Shared;

/// Frames read from the backend per wake-up, at most.
pub const RX_BATCH_FRAMES: usize = 64;

/// Sessions that must have ended since the last peak before the loop gives the allocator's
/// free memory back to the system (checked with the memory, every [`MEMORY_CHECK_PERIOD`]).
const TRIM_AFTER_ENDED: usize = 512;

/// How often the loop measures the process's memory for `nat.memory_limit` (at most; only
/// while it runs).
const MEMORY_CHECK_PERIOD: Duration = Duration::from_millis(250);

/// Passes of the loop in a row that may find an input ready without waiting before it yields
/// to the session tasks: under a flood of frames the executor would otherwise never run them
/// (a future that is always ready never gives the executor a turn).
const BUSY_PASSES: u32 = 8;

/// A pass that moves this many bytes (frames in and out) is bulk traffic: no busy polling
/// ([`hubnat_backend::rt::set_busy_poll`]) for [`BULK_HOLD`] after it. Bulk traffic keeps the
/// gateway awake anyway, and polling would take the CPU its senders and receivers need.
const BULK_BYTES: usize = 16 * 1024;
const BULK_HOLD: Duration = Duration::from_millis(2);

/// Why the gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// A configured policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The policy thread could not be started.
    #[error("cannot start the policy thread: {0}")]
    PolicyThread(std::io::Error),
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
fn host_settings(config: &Config, mac: MacAddr) -> HostSettings {
    HostSettings {
        mac: EthernetAddress(mac.0),
        ip: config.host.ip,
        mask: config.host.mask,
        mtu: config.nat.mtu as usize,
    }
}

/// The DHCP server's settings from the configuration.
fn dhcp_settings(config: &Config) -> DhcpSettings {
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
        max_leases_per_mac: d.max_leases_per_mac as usize,
        serve_macs: d.serve_macs.iter().map(|p| p.0).collect(),
        ignore_macs: d.ignore_macs.iter().map(|p| p.0).collect(),
        authoritative: d.authoritative,
    }
}

/// The NAT's settings from the configuration, and the host's own addresses as they are now
/// (read again on every change of the settings).
fn nat_settings(config: &Config) -> NatSettings {
    let n = &config.nat;
    NatSettings {
        enabled: n.enabled,
        tcp_timeout: n.tcp_timeout.into(),
        tcp_handshake_timeout: n.tcp_handshake_timeout.into(),
        udp_timeout: n.udp_timeout.into(),
        allow_host_loopback: n.allow_host_loopback,
        allow_link_local: n.allow_link_local,
        allow_host_addresses: n.allow_host_addresses,
        host_addresses: host::own_addresses().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the host's addresses; the NAT cannot refuse them");
            Vec::new()
        }),
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
        memory_limit: n.memory_limit,
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
        let seclog = SecurityLog::open_with(&path, config.security_rotation())
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
    ///
    /// Drive it with [`crate::rt::block_on`] on the thread it runs on: its sockets and timers
    /// wait on that thread's reactor (another executor's `block_on` would never wake them, and
    /// they panic to say so). `shutdown` may wait on anything.
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
        core.set_tcp_offload(backend.tcp_offload());
        let policies = self.start_policies(&mut core)?;
        match host::raise_fd_limit() {
            Ok(n) => {
                tracing::debug!(open_files = n, "file descriptor limit");
                if let Some(warning) = fd_limit_warning(self.config.nat.max_sessions, n) {
                    tracing::warn!("{warning}");
                    self.seclog.write("GATEWAY", "warning", &warning);
                }
            }
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
            last_open_warning: Cell::new(None),
            unwarned_open_failures: Cell::new(0),
        });
        let ex = Rc::new(LocalExecutor::new());
        let result = ex
            .run(self.main_loop(&shared, &ex, &mut backend, kicked, policies, shutdown))
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
        self.seclog.flush_suppressed();
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
        mut policies: policies::Policies,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        let max_frame = backend.max_frame_len();
        let responses = policies.responses.clone();
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
            Policy(crate::policy::PolicyResponse),
            Stop,
        }

        // Passes in a row that found an input ready at once (a flood of frames, say).
        let mut busy = 0u32;
        // The shutdown is polled only when woken: a pass woken by something else makes no
        // system call for it (a signal stream reads its pipe on every poll).
        let stop_gate = Gate::new();
        // When the process's memory is next measured for nat.memory_limit.
        let mut next_memory_check = std::time::Instant::now();
        // The most host sessions open since the heap was last trimmed.
        let mut peak_sessions = 0usize;
        // backend.busy_poll, while the traffic is light: until when it counts as bulk.
        let busy_poll = self.config.backend.busy_poll;
        let mut bulk_until = shared.clock.now();
        loop {
            let (deadline, again) = {
                let core = shared.core.borrow();
                (core.poll_timeout(), core.wants_poll())
            };
            if again || busy >= BUSY_PASSES {
                // More to send right away (the last batch was full), or inputs have been
                // ready for a while: let the session tasks run, then go round without waiting.
                futures_lite::future::yield_now().await;
                busy = 0;
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
                let policy = async {
                    match responses.recv().await {
                        Ok(response) => Wake::Policy(response),
                        // The policy thread has stopped (it does not while the loop runs).
                        Err(_) => std::future::pending().await,
                    }
                };
                let stop = std::future::poll_fn(|cx| {
                    stop_gate.poll(cx, shutdown.as_mut()).map(|()| Wake::Stop)
                });
                let mut waited = false;
                let mut wake = pin!(stop.or(recv).or(command).or(policy).or(kick).or(timer));
                let wake = std::future::poll_fn(|cx| {
                    let poll = wake.as_mut().poll(cx);
                    waited |= poll.is_pending();
                    poll
                })
                .await;
                busy = if waited { 0 } else { busy + 1 };
                wake
            };
            let now = shared.clock.now();
            let mut command = None;
            let mut response = None;
            {
                let mut core = shared.core.borrow_mut();
                if std::time::Instant::now() >= next_memory_check {
                    // Many sessions ended since the peak: their memory goes back to the
                    // system, not only to the allocator.
                    let open = shared.sockets.borrow().len();
                    peak_sessions = peak_sessions.max(open);
                    if peak_sessions - open >= TRIM_AFTER_ENDED {
                        let mut sockets = shared.sockets.borrow_mut();
                        sockets.shrink_to(open * 2);
                        drop(sockets);
                        host::give_back_free_heap();
                        peak_sessions = open;
                    }
                    if let Ok(bytes) = host::resident_memory() {
                        core.set_memory_use(bytes);
                    }
                    next_memory_check = std::time::Instant::now() + MEMORY_CHECK_PERIOD;
                }
                match wake {
                    Wake::Frames(Ok(())) => {
                        for (frame, verified) in rx.iter_verified() {
                            if verified {
                                core.handle_verified_frame(now, frame);
                            } else {
                                core.handle_frame(now, frame);
                            }
                        }
                    }
                    Wake::Frames(Err(source)) => {
                        return Err(GatewayError::Backend {
                            backend: backend.describe(),
                            source,
                        });
                    }
                    Wake::Command(c) => command = Some(c),
                    Wake::Policy(r) => response = Some(r),
                    Wake::Kick | Wake::Timer => {}
                    Wake::Stop => return Ok(()),
                }
            }
            if let Some(c) = command {
                self.command(
                    shared,
                    c,
                    &backend.describe(),
                    max_frame,
                    started,
                    &mut policies,
                );
            }
            if let Some(r) = response {
                self.policy_response(shared, &mut policies, r, now);
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
            // right after the ACK cannot lose it; when it cannot be saved, the ACKs of this
            // pass do not leave at all (the client asks again).
            if !self.drain_events(shared) {
                withhold_dhcp_acks(&mut tx);
            }
            if !busy_poll.is_zero() {
                if rx.bytes() + tx.bytes() >= BULK_BYTES {
                    bulk_until = now + BULK_HOLD.into();
                }
                hubnat_backend::rt::set_busy_poll(if now >= bulk_until {
                    busy_poll
                } else {
                    Duration::ZERO
                });
            }
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

    /// Loads the configured policies (none is fine) and starts their thread; hooks it into
    /// the core, so that a reload can bring policies in later. While no policy in force has a
    /// session filter (or a DHCP customizer), the hooks answer at once.
    fn start_policies(
        &mut self,
        core: &mut VirtualHost,
    ) -> Result<policies::Policies, GatewayError> {
        let cache = self.config.state.dir.join("policy-cache");
        let set = crate::policy::PolicySet::load_cached(&self.config.policy, Some(cache))?;
        let (sessions, dhcp) = (set.has_session_filter(), set.has_dhcp_customizer());
        let names = set.names().join(",");
        let loaded = !set.is_empty();
        let (client, responses, thread) =
            crate::policy::PolicyThread::spawn(set).map_err(GatewayError::PolicyThread)?;
        let shown = policies::Shown::default();
        core.set_session_policy(Some(Box::new(client.clone())));
        core.set_dhcp_policy(Some(Box::new(policies::DhcpBridge {
            client: client.clone(),
            shown: shown.clone(),
        })));
        if loaded {
            info!(policies = %names, sessions, dhcp, "policies loaded");
            self.seclog.write(
                "POLICY",
                "loaded",
                &format!("policies={names:?} session_filter={sessions} dhcp_customizer={dhcp}"),
            );
        }
        Ok(policies::Policies {
            client,
            responses,
            shown,
            reloads: HashMap::new(),
            next_reload: 0,
            _thread: thread,
        })
    }

    /// An answer from the policy thread: a verdict, a DHCP outcome, a reload's report.
    fn policy_response(
        &mut self,
        shared: &Shared,
        p: &mut policies::Policies,
        response: crate::policy::PolicyResponse,
        now: Instant,
    ) {
        use crate::policy::{NoteKind, PolicyResponse};
        let notes = match &response {
            PolicyResponse::Verdict { notes, .. } | PolicyResponse::Dhcp { notes, .. } => {
                notes.as_slice()
            }
            PolicyResponse::Reloaded { .. } => &[],
        };
        // The policies that changed a DHCP reply, for its security log line.
        let changed_by: Vec<&str> = notes
            .iter()
            .filter(|n| n.kind == NoteKind::ChangedReply)
            .map(|n| n.policy.as_str())
            .collect();
        let changed_by = (!changed_by.is_empty()).then(|| changed_by.join(","));
        for note in notes {
            note.emit();
            if let NoteKind::Failed { failure, on_error } = &note.kind {
                self.seclog.write(
                    "POLICY",
                    "call failed",
                    &format!(
                        "policy={:?} failure={:?} on_error={on_error:?}",
                        note.policy,
                        failure.to_string()
                    ),
                );
            }
        }
        let mut core = shared.core.borrow_mut();
        match response {
            PolicyResponse::Verdict {
                ticket, decision, ..
            } => core.handle_verdict(ticket, decision, now),
            PolicyResponse::Dhcp { id, outcome, .. } => {
                let Some(shown) = p.shown.borrow_mut().remove(&id.0) else {
                    return;
                };
                let (decision, by) = policies::dhcp_decision(&shown, outcome);
                let by = by.or(changed_by);
                core.handle_dhcp_decision(crate::core::dhcp::DhcpTicket(id.0), decision, by, now);
            }
            PolicyResponse::Reloaded { id, report } => {
                drop(core);
                let Some((source, reply)) = p.reloads.remove(&id.0) else {
                    return;
                };
                let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
                if errors.is_empty() {
                    info!(in_force = ?report.in_force, by = %source, "policies reloaded");
                } else {
                    tracing::warn!(in_force = ?report.in_force, kept_previous = ?report.kept_previous, errors = ?errors, by = %source, "policies reloaded, not all of them");
                }
                self.seclog.write(
                    "POLICY",
                    "reloaded",
                    &format!(
                        "in_force={:?} kept_previous={:?} errors={errors:?} by={source:?}",
                        report.in_force, report.kept_previous,
                    ),
                );
                let _ = reply.try_send(Ok(report));
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
        policies: &mut policies::Policies,
    ) {
        let clock = &shared.clock;
        let now = clock.now();
        match command {
            Command::Status(reply) => {
                let core = shared.core.borrow();
                let _ = reply.try_send(self.status(&core, backend, started, policies));
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
            Command::ReleaseLease(target, source, reply) => {
                let lease = shared.core.borrow_mut().release_lease(target, now);
                if let Some(l) = &lease {
                    // Next to the DHCP server's own "lease released by operator" line: who.
                    self.seclog.write(
                        "CONTROL",
                        "lease released by operator",
                        &format!("mac={} ip={} by={source:?}", fmt_mac(&l.mac), l.ip),
                    );
                }
                let _ = reply.try_send(lease.as_ref().map(|l| lease_row(clock, l)));
            }
            Command::Policies(reply) => {
                let _ = reply.try_send(policies.client.policies());
            }
            Command::ReloadPolicies(configs, source, reply) => {
                // Compiled on a thread of its own; the report comes back as a policy response.
                policies.next_reload += 1;
                let id = crate::policy::ReloadId(policies.next_reload);
                match policies.client.reload_from(configs, id) {
                    Ok(()) => {
                        policies.reloads.insert(id.0, (source, reply));
                    }
                    Err(e) => {
                        let _ = reply.try_send(Err(HandleError::Invalid {
                            key: None,
                            message: format!("cannot start loading the policies: {e}"),
                        }));
                    }
                }
            }
            Command::Config(reply) => {
                let _ = reply.try_send(self.config.clone());
            }
            Command::Set {
                changes,
                source,
                reply,
            } => {
                let result = self.set(shared, &changes, &source, max_frame, now);
                let _ = reply.try_send(result);
            }
            Command::EndSession(id, source, reply) => {
                // Next to the core's "session deleted … reason="ended by operator"": who.
                let ended = shared.core.borrow_mut().end_session_by_operator(id, now);
                if ended {
                    self.seclog.write(
                        "CONTROL",
                        "session ended by operator",
                        &format!("id={id} by={source:?}"),
                    );
                }
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
        let (config, changed) =
            self.config
                .with_changes(changes, source)
                .map_err(|e| HandleError::Invalid {
                    key: e.errors().iter().find_map(|e| match e {
                        crate::config::ConfigError::Invalid { key, .. } => Some(key.clone()),
                        _ => None,
                    }),
                    message: e.to_string(),
                })?;
        let mtu = config.nat.mtu as usize;
        if mtu + 14 > max_frame {
            return Err(HandleError::Invalid {
                key: Some("nat.mtu".into()),
                message: format!(
                    "config key nat.mtu = {mtu} (from {source}): larger than the backend's \
                     frames allow (MTU {} at most); restart hubnat to use a larger MTU",
                    max_frame.saturating_sub(14)
                ),
            });
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

    fn status(
        &self,
        core: &VirtualHost,
        backend: &str,
        started: std::time::Instant,
        policies: &policies::Policies,
    ) -> Status {
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
            policies: policies.client.policies(),
        }
    }

    /// Logs the core's events and saves the leases if they changed; false when that save
    /// failed.
    fn drain_events(&mut self, shared: &Shared) -> bool {
        let mut core = shared.core.borrow_mut();
        let mut changed = false;
        while let Some(event) = core.poll_event() {
            match event {
                Event::Dhcp(e) => self.seclog.dhcp(&e, |l| shared.clock.lease_to_wall(l)),
                Event::Nat(e) => self.seclog.nat(&e),
                Event::Link(e) => self.seclog.link(&e),
                Event::LeasesChanged => changed = true,
            }
        }
        !changed || self.save(&shared.clock, &core)
    }

    /// Saves the lease table; false (and logged) when it could not.
    fn save(&self, clock: &Clock, core: &VirtualHost) -> bool {
        let leases: Vec<Lease> = core
            .leases_to_save()
            .iter()
            .map(|l| clock.lease_to_wall(l))
            .collect();
        match self.state.save_leases(&leases) {
            Ok(()) => true,
            Err(e) => {
                error!(error = %e, "cannot save the lease table: the DHCP ACKs of this moment are withheld (the clients ask again), and leases given out since the last save would be lost on restart");
                false
            }
        }
    }
}

/// Descriptors kept for everything but sessions: the backend, the control API, the state
/// directory, the policy threads, DNS, the log files.
const RESERVED_FDS: u64 = 64;

/// A warning when `max_sessions` sessions (one socket each) cannot all be open under the
/// open-file limit `limit`.
fn fd_limit_warning(max_sessions: u32, limit: u64) -> Option<String> {
    let room = limit.saturating_sub(RESERVED_FDS);
    (u64::from(max_sessions) > room).then(|| {
        format!(
            "nat.max_sessions = {max_sessions}, but the open-file limit is {limit}: only about \
             {room} sessions can be open at once, and new ones beyond that fail (logged as \
             session failed); raise the limit (ulimit -n, LimitNOFILE= in the unit) or lower \
             nat.max_sessions"
        )
    })
}

/// Whether `frame` is a DHCP ACK from the server (UDP from port 67, message type 5).
fn is_dhcp_ack(frame: &[u8]) -> bool {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket};
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    if ip.next_header() != IpProtocol::Udp {
        return false;
    }
    let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
        return false;
    };
    udp.src_port() == 67
        && <dhcproto::v4::Message as dhcproto::Decodable>::decode(&mut dhcproto::Decoder::new(
            udp.payload(),
        ))
        .is_ok_and(|m| m.opts().msg_type() == Some(dhcproto::v4::MessageType::Ack))
}

/// Takes the DHCP ACKs out of `tx` (the lease table they grant could not be saved).
fn withhold_dhcp_acks(tx: &mut FrameBatch) {
    if !tx.iter().any(is_dhcp_ack) {
        return;
    }
    let kept: Vec<Vec<u8>> = tx
        .iter()
        .filter(|f| !is_dhcp_ack(f))
        .map(<[u8]>::to_vec)
        .collect();
    let withheld = tx.len() - kept.len();
    tx.clear();
    for frame in &kept {
        tx.push(frame);
    }
    tracing::warn!(
        withheld,
        "DHCP ACKs withheld: the lease table could not be saved"
    );
}

#[cfg(test)]
mod fd_tests {
    use super::fd_limit_warning;

    #[test]
    fn max_sessions_is_checked_against_the_open_file_limit() {
        assert_eq!(fd_limit_warning(16384, 1 << 20), None);
        assert_eq!(fd_limit_warning(960, 1024), None);
        let w = fd_limit_warning(16384, 1024).expect("a warning");
        assert!(
            w.starts_with(
                "nat.max_sessions = 16384, but the open-file limit is 1024: only about 960"
            ),
            "{w}"
        );
    }
}
