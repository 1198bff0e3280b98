//! The driver: the async loop that joins a frame backend, the clock and the state directory to
//! the sans-IO [core](crate::core).
//!
//! # Theory of operation
//!
//! One loop on one thread owns the [`VirtualHost`]. Each turn it waits for the first of: a batch
//! of frames from the backend, the core's next timeout, or the shutdown signal. It then feeds
//! the core (every frame of the batch, then the timeout check, all with one timestamp), writes
//! the security log lines of the core's events and saves the lease table when it changed, and
//! then sends the frames the core produced as one batch (so a lease is on disk before its ACK
//! leaves). On shutdown the lease table is saved once
//! more. No locks: nothing else touches the core.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use async_executor::{LocalExecutor, Task};
use async_io::{Async, Timer};
use futures_lite::FutureExt;
use hubnat_backend::{Backend, FrameBatch};
use smoltcp::wire::EthernetAddress;
use tracing::{error, info};

use crate::config::{Config, MacAddr};
use crate::core::dhcp::{DhcpSettings, Reservation, StaticRoute};
use crate::core::nat::{ConnectFailure, HostOp, IcmpMode, NatSettings, SessionId};
use crate::core::{Event, HostSettings, Instant, VirtualHost};
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
pub fn nat_settings(config: &Config, icmp_mode: IcmpMode) -> NatSettings {
    let n = &config.nat;
    NatSettings {
        enabled: n.enabled,
        mtu: n.mtu as usize,
        tcp_timeout: n.tcp_timeout.into(),
        udp_timeout: n.udp_timeout.into(),
        allow_host_loopback: n.allow_host_loopback,
        // The NAT carries IPv4; IPv6 entries of nat.deny have nothing to match here.
        deny: n
            .deny
            .iter()
            .filter_map(|net| match net {
                ipnet::IpNet::V4(v4) => Some((v4.network(), v4.prefix_len())),
                ipnet::IpNet::V6(_) => None,
            })
            .collect(),
        max_sessions: n.max_sessions as usize,
        max_sessions_per_client: n.max_sessions_per_client as usize,
        tcp_buffer: n.tcp_buffer as usize,
        dns_upstreams: config.dns.upstream.clone(),
        icmp_mode,
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No random source: the clock still differs between runs.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

/// The current time for the core.
pub fn now() -> Instant {
    Instant::from(SystemTime::now())
}

/// A configured gateway, ready to run on a backend.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    state: StateDir,
    seclog: SecurityLog,
    mac: MacAddr,
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
        Ok(Gateway {
            config,
            state,
            seclog,
            mac,
        })
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
        let leases = self.state.load_leases()?;
        let restored = leases.len();
        let (icmp_mode, icmp_err) = host::probe_icmp_mode();
        let nat = nat_settings(&self.config, icmp_mode);
        let seed = random_seed();
        let core = VirtualHost::new(
            host_settings(&self.config, self.mac),
            dhcp_settings(&self.config),
            leases,
            nat,
            seed,
            now(),
        );
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
            kick,
            sockets: RefCell::new(HashMap::new()),
            dns: RefCell::new([None, None]),
            send_dropped: Cell::new(0),
            last_open_warning: Cell::new(None),
            unwarned_open_failures: Cell::new(0),
        });
        let ex = Rc::new(LocalExecutor::new());
        let result = ex
            .run(self.main_loop(&shared, &ex, &mut backend, kicked, shutdown))
            .await;
        // Sessions end with the process: their tasks and sockets go with the executor.
        drop(ex);
        self.drain_events(&shared);
        let core = shared.core.borrow();
        self.save(&core);
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

        enum Wake {
            Frames(std::io::Result<()>),
            Kick,
            Timer,
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
                let timer = async {
                    match deadline {
                        Some(at) => {
                            let delay = Duration::from_micros(
                                u64::try_from(at.total_micros() - now().total_micros())
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
                stop.or(recv).or(kick).or(timer).await
            };
            let now = now();
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
                    Wake::Kick | Wake::Timer => {}
                    Wake::Stop => return Ok(()),
                }
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

    fn drain_events(&mut self, shared: &Shared) {
        let mut core = shared.core.borrow_mut();
        let mut changed = false;
        while let Some(event) = core.poll_event() {
            match event {
                Event::Dhcp(e) => self.seclog.dhcp(&e),
                Event::Nat(e) => self.seclog.nat(&e),
                Event::LeasesChanged => changed = true,
            }
        }
        if changed {
            self.save(&core);
        }
    }

    fn save(&self, core: &VirtualHost) {
        if let Err(e) = self.state.save_leases(&core.leases_to_save()) {
            error!(error = %e, "cannot save the lease table; leases given out since the last save would be lost on restart");
        }
    }
}

/// What the main loop and the session tasks share, on one thread.
struct Shared {
    core: RefCell<VirtualHost>,
    /// Wakes the main loop to poll the core and send what it produced.
    kick: async_channel::Sender<()>,
    /// UDP and ICMP sessions' host sockets and their reply tasks.
    sockets: RefCell<HashMap<SessionId, (HostSocket, Task<()>)>>,
    /// DNS query sockets (IPv4, IPv6), opened on first use, with their answer tasks.
    dns: RefCell<[Option<DnsSocket>; 2]>,
    /// Datagrams the host side could not send.
    send_dropped: Cell<u64>,
    /// When a host socket last failed to open (EMFILE and friends), for rate-limited warnings.
    last_open_warning: Cell<Option<std::time::Instant>>,
    /// Open failures not warned about since the last warning.
    unwarned_open_failures: Cell<u64>,
}

/// A DNS query socket and the task reading its answers.
type DnsSocket = (Rc<Async<UdpSocket>>, Task<()>);

#[derive(Clone)]
enum HostSocket {
    Udp(Rc<Async<UdpSocket>>),
    Icmp(Rc<Async<socket2::Socket>>),
}

impl Shared {
    fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// A host socket could not be opened: warn at most once a second, with the count of the
    /// failures in between (a flood must not flood the log too).
    fn warn_open_failure(&self, id: SessionId, e: &io::Error) {
        let now = std::time::Instant::now();
        let due = self
            .last_open_warning
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            let more = self.unwarned_open_failures.replace(0);
            self.last_open_warning.set(Some(now));
            tracing::warn!(session = %id, error = %e, more, "nat: cannot open a host socket (open-file limit?); session refused");
        } else {
            self.unwarned_open_failures
                .set(self.unwarned_open_failures.get() + 1);
        }
    }

    /// Carries out the core's requests: opens sockets, sends datagrams, starts tasks.
    fn run_host_ops(shared: &Rc<Shared>, ex: &Rc<LocalExecutor<'static>>) {
        let mut failed: Vec<(SessionId, io::Error)> = Vec::new();
        let mut icmp_buf = Vec::new();
        {
            let mut core = shared.core.borrow_mut();
            core.drain_host_ops(|op| match op {
                HostOp::TcpConnect { id, target } => {
                    ex.spawn(tcp_session(shared.clone(), id, target)).detach();
                }
                HostOp::UdpOpen { id, target } => match host::udp_connect(target) {
                    Ok(sock) => {
                        let sock = Rc::new(sock);
                        let task = ex.spawn(udp_replies(shared.clone(), id, sock.clone()));
                        shared.sockets.borrow_mut().insert(id, (HostSocket::Udp(sock), task));
                    }
                    Err(e) => failed.push((id, e)),
                },
                HostOp::UdpSend { id, payload } => {
                    let sockets = shared.sockets.borrow();
                    let sent = match sockets.get(&id) {
                        Some((HostSocket::Udp(s), _)) => s.get_ref().send(payload).is_ok(),
                        _ => false,
                    };
                    if !sent {
                        shared.send_dropped.set(shared.send_dropped.get() + 1);
                    }
                }
                HostOp::IcmpOpen { id, target } => match host::ping_socket(target) {
                    Ok(sock) => {
                        let sock = Rc::new(sock);
                        let task = ex.spawn(icmp_replies(shared.clone(), id, sock.clone()));
                        shared.sockets.borrow_mut().insert(id, (HostSocket::Icmp(sock), task));
                    }
                    Err(e) => failed.push((id, e)),
                },
                HostOp::IcmpSend { id, seq, payload } => {
                    host::echo_request(&mut icmp_buf, seq, payload);
                    let sockets = shared.sockets.borrow();
                    let sent = match sockets.get(&id) {
                        Some((HostSocket::Icmp(s), _)) => s.get_ref().send(&icmp_buf).is_ok(),
                        _ => false,
                    };
                    if !sent {
                        shared.send_dropped.set(shared.send_dropped.get() + 1);
                    }
                }
                HostOp::DnsSend { upstream, payload } => {
                    match Shared::dns_socket(shared, ex, upstream.is_ipv6()) {
                        Ok(sock) => {
                            if let Err(e) = sock.get_ref().send_to(payload, upstream) {
                                tracing::debug!(%upstream, error = %e, "dns: cannot send the query");
                                shared.send_dropped.set(shared.send_dropped.get() + 1);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "dns: cannot open a socket for queries"),
                    }
                }
                HostOp::Close { id, .. } => {
                    // Dropping the task cancels it; the socket closes with the last Rc.
                    shared.sockets.borrow_mut().remove(&id);
                }
            });
        }
        if !failed.is_empty() {
            let mut core = shared.core.borrow_mut();
            for (id, e) in failed {
                shared.warn_open_failure(id, &e);
                core.nat_socket_failed(id, &e, now());
            }
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

/// One TCP session on the host side: connect, report, then relay until either side ends.
async fn tcp_session(shared: Rc<Shared>, id: SessionId, target: SocketAddr) {
    let stream = match host::tcp_connect(target).await {
        Ok(s) => s,
        Err(e) => {
            let failure = ConnectFailure::from_io(&e);
            if failure == ConnectFailure::Local {
                shared.warn_open_failure(id, &e);
            }
            tracing::debug!(session = %id, %target, error = %e, "nat: connect failed");
            shared
                .core
                .borrow_mut()
                .nat_tcp_connect_failed(id, failure, now());
            shared.kick();
            return;
        }
    };
    if !shared.core.borrow_mut().nat_tcp_connected(id, now()) {
        shared.kick();
        return;
    }
    shared.kick();
    let reset = relay(&shared, id, &stream).await;
    if reset {
        host::set_reset_on_close(stream.get_ref());
    }
    shared.core.borrow_mut().nat_tcp_finished(id, now());
    shared.kick();
}

/// Moves bytes between the client's connection (in smoltcp) and the host stream until the
/// connection is over. Returns true when it ended with a reset (the host side gets one too).
async fn relay(shared: &Shared, id: SessionId, stream: &Async<TcpStream>) -> bool {
    let mut client_fin_done = false;
    let mut host_eof = false;
    std::future::poll_fn(|cx| {
        let now = now();
        let mut core = shared.core.borrow_mut();
        let Some(mut relay) = core.nat_tcp_relay(id, now) else {
            return Poll::Ready(true);
        };
        relay.register_waker(cx.waker());
        let mut progress = false;
        // Client → host, straight from smoltcp's receive buffer.
        while relay.has_client_data() {
            match stream.poll_writable(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => {
                    relay.host_reset();
                    return Poll::Ready(true);
                }
                Poll::Ready(Ok(())) => {}
            }
            match relay.take_client_data(|data| (&mut stream.get_ref()).write(data)) {
                Ok(0) => break,
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    relay.host_reset();
                    return Poll::Ready(true);
                }
            }
        }
        if !client_fin_done && relay.client_finished() {
            let _ = stream.get_ref().shutdown(Shutdown::Write);
            relay.client_finish_done();
            client_fin_done = true;
        }
        // Host → client, straight into smoltcp's send buffer.
        while !host_eof && relay.may_send() && relay.has_room() {
            match stream.poll_readable(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => {
                    relay.host_reset();
                    return Poll::Ready(true);
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
                    host_eof = true;
                    relay.host_finished();
                    progress = true;
                }
                Ok(0) => break,
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && room == 0 => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    relay.host_reset();
                    return Poll::Ready(true);
                }
            }
        }
        if relay.is_closed() {
            // Closed after both FINs is clean; closed any other way was a reset or a timeout.
            return Poll::Ready(!(client_fin_done && host_eof));
        }
        drop(core);
        if progress {
            shared.kick();
        }
        Poll::Pending
    })
    .await
}

/// Datagrams from a UDP session's host socket, back to the client.
async fn udp_replies(shared: Rc<Shared>, id: SessionId, sock: Rc<Async<UdpSocket>>) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let mut any = false;
        loop {
            let r = shared
                .core
                .borrow_mut()
                .nat_udp_receive(id, now(), |buf| sock.get_ref().recv(buf));
            match r {
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // An ICMP error for an earlier datagram (port unreachable): keep the flow.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(session = %id, error = %e, "nat: udp socket error");
                    break;
                }
            }
        }
        if any {
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
                    shared
                        .core
                        .borrow_mut()
                        .nat_icmp_receive(id, now(), &buf[..n]);
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
                shared
                    .core
                    .borrow_mut()
                    .nat_dns_answer(from, &buf[..n], now());
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
