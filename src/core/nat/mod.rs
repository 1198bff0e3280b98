//! The virtual NAT: clients' TCP, UDP and ICMP echo to the outside, carried over host sockets
//! that the driver opens on the core's request.
//!
//! # Theory of operation
//!
//! The core decides, the driver does. Every new flow from a client passes one admission point
//! ([`admit`]): the built-in safety rules, then the session policy (a [`SessionPolicy`], which
//! may answer later), then the session limits. Only an admitted flow becomes a session and
//! costs a host socket: the core asks the driver for one with a [`HostOp`]. What the driver
//! learns comes back as a [`HostEvent`] ([`VirtualHost::nat_host_event`]) or as data
//! ([`VirtualHost::nat_tcp_relay`], [`VirtualHost::nat_udp_receive`],
//! [`VirtualHost::nat_icmp_receive`], [`VirtualHost::nat_dns_answer`]).
//!
//! The core owns each session's state and decides when and why it ends ([`EndReason`]); the
//! driver never ends a session by itself. When a session ends the core emits
//! [`HostOp::Close`] (with `abort` when the remote must get a RST) and the driver drops the
//! session's socket and task, a connect still under way included.
//!
//! | flow                          | file     | host side                        | ends |
//! |-------------------------------|----------|----------------------------------|------|
//! | TCP SYN to an outside address | [`tcp`]  | `TcpConnect`, then a relay task  | both FINs, a RST either way, `nat.tcp_timeout` idle, `nat.tcp_handshake_timeout` without the client's ACK |
//! | TCP SYN to our port 53        | [`tcp`]  | `TcpConnect` to the DNS upstreams in turn | as TCP |
//! | UDP to an outside address     | [`udp`]  | `UdpOpen` + `UdpSend`            | `nat.udp_timeout` idle |
//! | UDP to our port 53            | [`udp`]  | the [DNS forwarder](crate::core::dns) | [`DNS_SESSION_TIMEOUT`] idle |
//! | ICMP echo to an outside address | [`icmp`] | `IcmpOpen` + `IcmpSend` (or a synthesized reply) | [`ICMP_TIMEOUT`] idle |
//!
//! Never NATed: the virtual subnet itself, broadcast, multicast, 0.0.0.0/8 and 240.0.0.0/4;
//! 127.0.0.0/8 unless `nat.allow_host_loopback`; 169.254.0.0/16 unless `nat.allow_link_local`;
//! the host's own addresses unless `nat.allow_host_addresses`; anything in `nat.deny`. A
//! refused TCP SYN gets a RST, a refused datagram or echo an ICMP "administratively
//! prohibited".
//!
//! The protocols share the [`Link`](super::link::Link) (neighbours and transmit queue) and read
//! the live [`NatSettings`] from the core's one [`Settings`](super::Settings) value; nothing
//! here keeps a copy of a setting. Fragments from clients are reassembled first ([`frag`]), so
//! every path sees whole datagrams.

pub mod admit;
pub mod frag;
pub mod icmp;
mod pages;
pub mod table;
pub mod tcp;
pub mod udp;

#[cfg(test)]
mod admission_tests;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpCidr, IpProtocol, Ipv4Packet};

pub use admit::{Decision, FlowInfo, FlowTicket, PolicyAnswer, SessionPolicy, Verdict};
pub use table::{
    FlowKey, LimitError, Limits, Protocol, Session, SessionId, SessionState, SessionTable,
};
pub use tcp::TcpRelay;

use super::dns::DnsForwarder;
use super::subnet::Subnet;
use super::{Event, HostSettings, VirtualHost};

/// Idle time after which an ICMP echo session (and its ping socket) goes.
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle time after which a DNS session (a client endpoint asking the virtual host) goes.
pub const DNS_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, refused flows are written to the security log (the rest are counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How echo requests to outside hosts are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IcmpMode {
    /// Through an unprivileged ICMP socket: a real echo from the real host.
    Real,
    /// The OS does not let this user send pings: hubnat answers in the remote's name.
    Synthesized,
}

impl IcmpMode {
    /// The name shown in logs and the status.
    pub fn as_str(self) -> &'static str {
        match self {
            IcmpMode::Real => "real",
            IcmpMode::Synthesized => "synthesized",
        }
    }
}

/// The NAT's settings: part of the core's live [`Settings`](super::Settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSettings {
    /// Whether the NAT (and the DNS redirect) carries anything.
    pub enabled: bool,
    /// Idle timeout of TCP sessions.
    pub tcp_timeout: Duration,
    /// How long a TCP client has, from the SYN-ACK, to complete the three-way handshake.
    pub tcp_handshake_timeout: Duration,
    /// Idle timeout of UDP sessions.
    pub udp_timeout: Duration,
    /// Whether 127.0.0.0/8 may be reached.
    pub allow_host_loopback: bool,
    /// Whether link-local addresses (169.254.0.0/16, where cloud metadata services answer;
    /// fe80::/10 for a redirect) may be reached.
    pub allow_link_local: bool,
    /// Whether the host's own addresses ([`host_addresses`](Self::host_addresses)) may be
    /// reached.
    pub allow_host_addresses: bool,
    /// The host's own addresses, loopback excluded (the loopback has its own rule): not a
    /// configuration key but what the driver finds on the host's interfaces, at start and on
    /// every change of the settings.
    pub host_addresses: Vec<IpAddr>,
    /// Networks never to reach.
    pub deny: Vec<Subnet>,
    /// Sessions at most.
    pub max_sessions: usize,
    /// Sessions per client address, and per client MAC, at most.
    pub max_sessions_per_client: usize,
    /// Each TCP connection's receive and send buffer in smoltcp, bytes (new connections).
    pub tcp_buffer: usize,
    /// New sessions are refused while the process's memory (as the driver last reported it
    /// with [`VirtualHost::set_memory_use`]) is at or above this many bytes.
    pub memory_limit: Option<u64>,
    /// DNS resolvers for the redirect.
    pub dns_upstreams: Vec<SocketAddr>,
}

impl NatSettings {
    /// The session limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_sessions: self.max_sessions,
            max_per_client: self.max_sessions_per_client,
        }
    }
}

/// What went wrong on a host socket, classified from the OS error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// The remote refused (TCP RST to a SYN; ICMP port unreachable for UDP).
    Refused,
    /// No route to the host, or the host is down (ICMP host unreachable).
    HostUnreachable,
    /// No route to the network, or the network is down (ICMP network unreachable).
    NetUnreachable,
    /// The host's routes or firewall forbid it (a `prohibit` route: EACCES; a firewall: EPERM)
    /// (ICMP communication administratively prohibited).
    Prohibited,
    /// No answer in time.
    TimedOut,
    /// The remote reset the connection.
    Reset,
    /// A local resource ran out: open files, buffers, memory.
    Resources,
    /// Anything else.
    Other,
}

impl HostError {
    /// Classifies an I/O error.
    pub fn from_io(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => HostError::Refused,
            Some(libc::EHOSTUNREACH | libc::EHOSTDOWN) => HostError::HostUnreachable,
            Some(libc::ENETUNREACH | libc::ENETDOWN) => HostError::NetUnreachable,
            Some(libc::EACCES | libc::EPERM) => HostError::Prohibited,
            Some(libc::ETIMEDOUT) => HostError::TimedOut,
            Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => HostError::Reset,
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                HostError::Resources
            }
            _ if e.kind() == io::ErrorKind::TimedOut => HostError::TimedOut,
            _ => HostError::Other,
        }
    }

    /// The words the logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            HostError::Refused => "refused",
            HostError::HostUnreachable => "host unreachable",
            HostError::NetUnreachable => "network unreachable",
            HostError::Prohibited => "prohibited",
            HostError::TimedOut => "timed out",
            HostError::Reset => "reset",
            HostError::Resources => "out of host resources",
            HostError::Other => "host socket error",
        }
    }
}

/// Why a session ended, or why a flow never became one. Exactly one per session, decided by
/// the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// TCP: the client sent the first FIN, then both sides closed.
    ClosedByClient,
    /// TCP: the remote sent the first FIN, then both sides closed.
    ClosedByRemote,
    /// TCP: the client sent a RST (or gave up while the connect was under way).
    ResetByClient,
    /// TCP: the remote reset the connection.
    ResetByRemote,
    /// Nothing moved for the protocol's idle timeout.
    IdleTimeout,
    /// TCP: the client did not complete the three-way handshake (no ACK of the SYN-ACK)
    /// within `nat.tcp_handshake_timeout`: a half-open connection, or a spoofed SYN.
    HandshakeTimeout,
    /// The remote refused the connection.
    Refused,
    /// The remote could not be reached (no route, host down, no answer to the connect).
    Unreachable,
    /// The safety rules or `nat.deny` refused the flow.
    DeniedByRule,
    /// A session policy rejected or dropped the flow.
    DeniedByPolicy,
    /// A session limit (or a host resource such as open files) refused the flow.
    Limit,
    /// The NAT (or the whole function) was disabled.
    NatDisabled,
    /// An operator ended the session.
    EndedByOperator,
}

impl EndReason {
    /// Every reason, in the order of [`index`](Self::index).
    pub const ALL: [EndReason; 13] = [
        EndReason::ClosedByClient,
        EndReason::ClosedByRemote,
        EndReason::ResetByClient,
        EndReason::ResetByRemote,
        EndReason::IdleTimeout,
        EndReason::HandshakeTimeout,
        EndReason::Refused,
        EndReason::Unreachable,
        EndReason::DeniedByRule,
        EndReason::DeniedByPolicy,
        EndReason::Limit,
        EndReason::NatDisabled,
        EndReason::EndedByOperator,
    ];

    /// A dense index for per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The words the security log uses.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClosedByClient => "closed by client",
            EndReason::ClosedByRemote => "closed by remote",
            EndReason::ResetByClient => "reset by client",
            EndReason::ResetByRemote => "reset by remote",
            EndReason::IdleTimeout => "idle timeout",
            EndReason::HandshakeTimeout => "handshake timeout",
            EndReason::Refused => "refused",
            EndReason::Unreachable => "unreachable",
            EndReason::DeniedByRule => "denied by rule",
            EndReason::DeniedByPolicy => "denied by policy",
            EndReason::Limit => "limit",
            EndReason::NatDisabled => "nat disabled",
            EndReason::EndedByOperator => "ended by operator",
        }
    }

    /// Whether the remote should get a RST rather than a FIN when the host socket closes.
    fn aborts_host(self) -> bool {
        !matches!(self, EndReason::ClosedByClient | EndReason::ClosedByRemote)
    }
}

/// A request from the core to the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum HostOp<'a> {
    /// Connect a TCP socket to `target`; report with [`HostEvent::Connected`] or
    /// [`HostEvent::ConnectFailed`], then relay with `nat_tcp_relay`.
    TcpConnect {
        /// The session.
        id: SessionId,
        /// Where to connect.
        target: SocketAddr,
    },
    /// Open a UDP socket connected to `target`; report failure with [`HostEvent::OpenFailed`],
    /// pass datagrams back with `nat_udp_receive` and socket errors with [`HostEvent::Error`].
    UdpOpen {
        /// The session.
        id: SessionId,
        /// The remote.
        target: SocketAddr,
    },
    /// Send one datagram on the session's UDP socket; report a failure with
    /// [`HostEvent::SendFailed`].
    UdpSend {
        /// The session.
        id: SessionId,
        /// The payload.
        payload: &'a [u8],
    },
    /// Open a ping socket towards `target`; replies go to `nat_icmp_receive`.
    IcmpOpen {
        /// The session.
        id: SessionId,
        /// The remote.
        target: Ipv4Addr,
    },
    /// Send an echo request with this sequence number and data on the session's ping socket.
    IcmpSend {
        /// The session.
        id: SessionId,
        /// Sequence number.
        seq: u16,
        /// Echo data.
        payload: &'a [u8],
    },
    /// Send a DNS query to an upstream; answers go to `nat_dns_answer`.
    DnsSend {
        /// The resolver.
        upstream: SocketAddr,
        /// The query.
        payload: &'a [u8],
    },
    /// The session is over: drop its host socket and task, a connect under way included
    /// (`abort`: close with a RST).
    Close {
        /// The session.
        id: SessionId,
        /// Reset rather than close cleanly.
        abort: bool,
    },
}

#[derive(Debug)]
enum OpRecord {
    TcpConnect(SessionId, SocketAddr),
    UdpOpen(SessionId, SocketAddr),
    UdpSend(SessionId, std::ops::Range<usize>),
    IcmpOpen(SessionId, Ipv4Addr),
    IcmpSend(SessionId, u16, std::ops::Range<usize>),
    DnsSend(SocketAddr, std::ops::Range<usize>),
    Close(SessionId, bool),
}

/// What the driver reports about a session's host socket.
#[derive(Debug)]
pub enum HostEvent<'a> {
    /// The outbound TCP connection is up.
    Connected,
    /// The outbound TCP connection failed.
    ConnectFailed(&'a io::Error),
    /// The UDP or ping socket could not be opened.
    OpenFailed(&'a io::Error),
    /// TCP: the remote finished sending (read returned 0).
    EndOfStream,
    /// TCP: the host socket's write side was shut down, carrying the client's FIN.
    WriteShut,
    /// TCP: the remote reset the connection.
    Reset,
    /// The socket reported an error (UDP: an ICMP error for an earlier datagram).
    Error(&'a io::Error),
    /// A datagram could not be sent.
    SendFailed(&'a io::Error),
}

/// What the security log hears from the NAT.
#[derive(Debug, Clone)]
pub enum NatEvent {
    /// A session was created.
    Created {
        /// The session.
        id: SessionId,
        /// Its flow.
        key: FlowKey,
        /// Where the host socket goes.
        target: SocketAddr,
        /// The name the client looked up for the remote, if known.
        remote_name: Option<String>,
        /// The policy that redirected it, if one did.
        redirected_by: Option<String>,
    },
    /// The outbound TCP connection is up.
    Connected {
        /// The session.
        id: SessionId,
        /// Its flow.
        key: FlowKey,
    },
    /// The outbound connection (or the host socket) failed.
    Failed {
        /// The session.
        id: SessionId,
        /// Its flow.
        key: FlowKey,
        /// Why, in the OS's words.
        reason: String,
    },
    /// A session ended.
    Ended {
        /// The session as it ended.
        session: Box<Session>,
        /// Why.
        reason: EndReason,
        /// When (for the duration).
        at: Instant,
    },
    /// A flow was refused before it became a session. Rate-limited; `suppressed` counts the
    /// refusals not logged since the previous one.
    Refused {
        /// The flow.
        key: FlowKey,
        /// Which kind of refusal.
        reason: EndReason,
        /// The details (which rule, which policy, which limit).
        detail: String,
        /// Refusals not logged before this one.
        suppressed: u64,
    },
}

/// Counters of the NAT. Every packet a client sends to the NAT is in `packets`; every flow
/// refused is in exactly one `refused_*`; every session created is in `created` and, once
/// over, in `ended`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NatCounters {
    /// Packets from clients handed to the NAT.
    pub packets: u64,
    /// Packets dropped because the NAT is disabled.
    pub disabled: u64,
    /// Packets of protocols the NAT does not carry (and ICMP other than echo).
    pub unsupported: u64,
    /// Fragments reassembled into datagrams.
    pub reassembled: u64,
    /// Sessions created, by protocol ([`Protocol::index`]).
    pub created: [u64; 3],
    /// Sessions ended, by reason ([`EndReason::index`]).
    pub ended: [u64; 13],
    /// Flows refused by the safety rules or `nat.deny`.
    pub refused_rules: u64,
    /// Flows a session policy rejected or dropped.
    pub refused_policy: u64,
    /// Flows refused by the session limits (or the pending-verdict bound).
    pub refused_limits: u64,
    /// Datagrams dropped while their flow waited for a verdict (the queue was full).
    pub pending_dropped: u64,
    /// Datagrams the host side could not send (socket buffer full).
    pub host_send_dropped: u64,
    /// ICMP errors from the host side passed to clients (port, host, network unreachable).
    pub icmp_errors: u64,
    /// Echo requests answered by hubnat itself (synthesized mode).
    pub echo_synthesized: u64,
    /// Payload bytes from clients to remotes, in sessions that have ended.
    pub ended_bytes_to_remote: u64,
    /// Payload bytes from remotes to clients, in sessions that have ended.
    pub ended_bytes_to_client: u64,
    /// Bytes of TCP buffer memory given back to the system by connections gone quiet.
    pub buffer_bytes_released: u64,
}

/// The NAT's state, owned by the [`VirtualHost`].
pub struct NatState {
    pub(super) table: SessionTable,
    stack: tcp::TcpStack,
    /// The SYN (its whole IPv4 packet) of each TCP session whose outbound connect is under
    /// way; retransmissions are dropped. A connected session has its socket set in `stack`.
    pending_syns: table::IdMap<Vec<u8>>,
    admission: admit::Admission,
    frag: frag::Reassembler,
    pub(super) dns: DnsForwarder,
    icmp_mode: IcmpMode,
    ops: VecDeque<OpRecord>,
    op_buf: Vec<u8>,
    pub(super) counters: NatCounters,
    scratch: Vec<u8>,
    reassembled: Vec<u8>,
    pub(super) events: VecDeque<NatEvent>,
    /// When the next session may have gone idle: a sweep of the table is due then. Never
    /// later than the truth (activity only pushes sessions' times out), so a sweep may find
    /// nothing and set the next one.
    idle_deadline: Option<Instant>,
    /// The process's resident memory, bytes, as the driver last measured it.
    memory_use: u64,
}

impl std::fmt::Debug for NatState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatState")
            .field("sessions", &self.table.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl NatState {
    /// A NAT for `host`, with `seed` for smoltcp's initial sequence numbers (take it from a
    /// real random source).
    pub fn new(host: &HostSettings, seed: u64, now: Instant) -> Self {
        NatState {
            table: SessionTable::new(),
            stack: tcp::TcpStack::new(seed, host.mtu, host.ip, host.mask, now),
            pending_syns: table::IdMap::default(),
            admission: admit::Admission::default(),
            frag: frag::Reassembler::default(),
            dns: DnsForwarder::new(seed),
            icmp_mode: IcmpMode::Synthesized,
            ops: VecDeque::new(),
            op_buf: Vec::new(),
            counters: NatCounters::default(),
            scratch: Vec::new(),
            reassembled: Vec::new(),
            events: VecDeque::new(),
            idle_deadline: None,
            memory_use: 0,
        }
    }

    /// The session table.
    pub fn table(&self) -> &SessionTable {
        &self.table
    }

    /// The counters.
    pub fn counters(&self) -> &NatCounters {
        &self.counters
    }

    /// How echo to outside hosts is answered.
    pub fn icmp_mode(&self) -> IcmpMode {
        self.icmp_mode
    }

    /// Flows waiting for a policy's verdict.
    pub fn pending_verdicts(&self) -> usize {
        self.admission.len()
    }

    /// Payload bytes (to remotes, to clients) of every session, live and ended.
    pub fn bytes(&self) -> (u64, u64) {
        self.table.iter().fold(
            (
                self.counters.ended_bytes_to_remote,
                self.counters.ended_bytes_to_client,
            ),
            |(out, inn), s| (out + s.bytes_out, inn + s.bytes_in),
        )
    }

    fn push_op(&mut self, op: OpRecord) {
        self.ops.push_back(op);
    }

    fn stash(&mut self, bytes: &[u8]) -> std::ops::Range<usize> {
        let start = self.op_buf.len();
        self.op_buf.extend_from_slice(bytes);
        start..self.op_buf.len()
    }

    /// When a session's time is up, and why, or `None` while it is not to be timed out: a
    /// TCP session still connecting (the connect has its own timeout), or one whose connection
    /// is already over. A TCP connection whose client has not completed the handshake has
    /// `nat.tcp_handshake_timeout` from the SYN-ACK (retransmitted SYNs do not extend it);
    /// every other session its idle timeout from its last activity.
    fn deadline(
        &self,
        s: &Session,
        settings: &NatSettings,
        host_ip: Ipv4Addr,
    ) -> Option<(Instant, EndReason)> {
        use smoltcp::socket::tcp::State;
        let idle = |t: Duration| Some((s.last_activity + t, EndReason::IdleTimeout));
        match s.key.protocol {
            Protocol::Tcp if s.state == SessionState::Connecting => None,
            Protocol::Tcp => match self.stack.state(s.id)? {
                // Listen: smoltcp did not take the client's SYN (say, one with FIN set): the
                // client has the handshake timeout to send one it takes.
                State::SynReceived | State::Listen => s.synack_at.map(|t| {
                    (
                        t + settings.tcp_handshake_timeout,
                        EndReason::HandshakeTimeout,
                    )
                }),
                State::Closed | State::TimeWait => None,
                _ => idle(settings.tcp_timeout),
            },
            Protocol::Udp if *s.key.remote.ip() == host_ip => idle(DNS_SESSION_TIMEOUT),
            Protocol::Udp => idle(settings.udp_timeout),
            Protocol::Icmp => idle(ICMP_TIMEOUT),
        }
    }

    /// A session became subject to its idle timeout at `now`: the next sweep is no later.
    fn schedule_idle(&mut self, at: Instant) {
        self.idle_deadline = Some(self.idle_deadline.map_or(at, |d| d.min(at)));
    }
}

impl VirtualHost {
    /// The NAT (session table, counters).
    pub fn nat(&self) -> &NatState {
        &self.nat
    }

    /// Sets how echo to outside hosts is answered (the driver probes what the OS allows).
    pub fn set_icmp_mode(&mut self, mode: IcmpMode) {
        self.nat.icmp_mode = mode;
    }

    /// Whether the backend passes TCP segments longer than the MTU both ways (TAP segmentation
    /// offload, `Backend::tcp_offload`): smoltcp then takes a client's super-frame as one
    /// segment and sends segments of up to 64 KiB, which the backend marks for the kernel to
    /// cut to the client's MSS.
    pub fn set_tcp_offload(&mut self, on: bool) {
        let host = self.settings.host;
        self.nat
            .stack
            .set_offload(on, host.mtu, host.ip, host.mask, self.now);
    }

    /// The process's resident memory in bytes, measured by the driver (the core reads no
    /// process state): new sessions are refused while it is at or above `nat.memory_limit`.
    pub fn set_memory_use(&mut self, bytes: u64) {
        self.nat.memory_use = bytes;
    }

    /// Installs the session policy consulted for every new flow (after the safety rules,
    /// before the limits); `None` allows everything.
    pub fn set_session_policy(&mut self, policy: Option<Box<dyn SessionPolicy>>) {
        self.nat.admission.policy = policy;
    }

    /// Hands an IPv4 packet (trimmed to its total length) from a client to the NAT.
    pub(super) fn nat_ipv4(
        &mut self,
        now: Instant,
        src_mac: [u8; 6],
        packet: &[u8],
    ) -> Result<(), smoltcp::wire::Error> {
        self.nat.counters.packets += 1;
        if !self.settings.nat.enabled {
            self.nat.counters.disabled += 1;
            return Ok(());
        }
        let p = Ipv4Packet::new_checked(packet)?;
        if p.more_frags() || p.frag_offset() != 0 {
            let mut out = std::mem::take(&mut self.nat.reassembled);
            let done = self.nat.frag.add(&p, now, &mut out);
            let result = if done {
                self.nat.counters.reassembled += 1;
                self.nat_whole(now, src_mac, &out)
            } else {
                Ok(())
            };
            self.nat.reassembled = out;
            return result;
        }
        self.nat_whole(now, src_mac, packet)
    }

    fn nat_whole(
        &mut self,
        now: Instant,
        src_mac: [u8; 6],
        packet: &[u8],
    ) -> Result<(), smoltcp::wire::Error> {
        let p = Ipv4Packet::new_checked(packet)?;
        match p.next_header() {
            IpProtocol::Tcp => self.nat_tcp_in(now, src_mac, &p),
            IpProtocol::Udp => self.nat_udp_in(now, src_mac, &p),
            IpProtocol::Icmp => self.nat_icmp_in(now, src_mac, &p),
            _ => {
                self.nat.counters.unsupported += 1;
                Ok(())
            }
        }
    }

    /// Hands every pending host request to `f`, oldest first.
    pub fn drain_host_ops(&mut self, mut f: impl FnMut(HostOp<'_>)) {
        let nat = &mut self.nat;
        while let Some(op) = nat.ops.pop_front() {
            let buf = &nat.op_buf;
            match op {
                OpRecord::TcpConnect(id, target) => f(HostOp::TcpConnect { id, target }),
                OpRecord::UdpOpen(id, target) => f(HostOp::UdpOpen { id, target }),
                OpRecord::UdpSend(id, r) => f(HostOp::UdpSend {
                    id,
                    payload: &buf[r],
                }),
                OpRecord::IcmpOpen(id, target) => f(HostOp::IcmpOpen { id, target }),
                OpRecord::IcmpSend(id, seq, r) => f(HostOp::IcmpSend {
                    id,
                    seq,
                    payload: &buf[r],
                }),
                OpRecord::DnsSend(upstream, r) => f(HostOp::DnsSend {
                    upstream,
                    payload: &buf[r],
                }),
                OpRecord::Close(id, abort) => f(HostOp::Close { id, abort }),
            }
        }
        nat.op_buf.clear();
    }

    /// What the driver learnt about session `id`'s host socket. An event for a session that
    /// is gone is ignored (its socket was closed with [`HostOp::Close`]).
    pub fn nat_host_event(&mut self, id: SessionId, event: HostEvent<'_>, now: Instant) {
        self.now = now;
        let Some(protocol) = self.nat.table.get(id).map(|s| s.key.protocol) else {
            return;
        };
        match protocol {
            Protocol::Tcp => self.tcp_host_event(id, event, now),
            Protocol::Udp => self.udp_host_event(id, event, now),
            Protocol::Icmp => self.icmp_host_event(id, event, now),
        }
    }

    /// Ends session `id` at an operator's request. Returns false when there is no such
    /// session.
    pub fn end_session_by_operator(&mut self, id: SessionId, now: Instant) -> bool {
        self.now = now;
        if self.nat.table.get(id).is_none() {
            return false;
        }
        self.end_session(id, EndReason::EndedByOperator, now);
        true
    }

    /// Ends every session (the NAT or the whole function was disabled).
    pub(super) fn end_all_sessions(&mut self, reason: EndReason, now: Instant) {
        let ids: Vec<SessionId> = self.nat.table.iter().map(|s| s.id).collect();
        for id in ids {
            self.end_session(id, reason, now);
        }
        self.drop_pending_verdicts();
    }

    /// Ends a session for `reason`: the client's TCP connection is reset unless it closed
    /// cleanly, the session leaves the table, and the driver is told to close its socket.
    fn end_session(&mut self, id: SessionId, reason: EndReason, now: Instant) {
        let Some(s) = self.nat.table.remove(id) else {
            return;
        };
        if s.key.protocol == Protocol::Tcp {
            if let Some(syn) = self.nat.pending_syns.remove(&id) {
                // Still connecting: the client's SYN gets its answer now.
                if reason != EndReason::ResetByClient {
                    if let Ok(p) = Ipv4Packet::new_checked(&syn[..]) {
                        self.link.push_rst_for_syn(&self.settings.host, &p);
                    }
                }
            }
            self.nat.stack.bury(id, reason.aborts_host());
        }
        self.nat.push_op(OpRecord::Close(id, reason.aborts_host()));
        let c = &mut self.nat.counters;
        c.ended[reason.index()] += 1;
        c.ended_bytes_to_remote += s.bytes_out;
        c.ended_bytes_to_client += s.bytes_in;
        self.nat.events.push_back(NatEvent::Ended {
            session: Box::new(s),
            reason,
            at: now,
        });
    }

    /// Counts and logs a flow that never became a session.
    fn refuse(&mut self, key: FlowKey, reason: EndReason, detail: String, now: Instant) {
        let c = &mut self.nat.counters;
        match reason {
            EndReason::DeniedByRule => c.refused_rules += 1,
            EndReason::DeniedByPolicy => c.refused_policy += 1,
            _ => c.refused_limits += 1,
        }
        if let Some(suppressed) = self.nat.admission.log_due(now) {
            tracing::warn!(client = %key.client, remote = %key.remote, protocol = key.protocol.as_str(), "nat: flow refused ({}): {detail}", reason.as_str());
            self.nat.events.push_back(NatEvent::Refused {
                key,
                reason,
                detail,
                suppressed,
            });
        }
    }

    /// NAT timers: idle sessions, verdicts that did not come, DNS failover, fragment expiry.
    pub(super) fn nat_timeout(&mut self, now: Instant) {
        if self.nat.idle_deadline.is_some_and(|t| t <= now) {
            let nat = &self.nat;
            let (settings, ip) = (&self.settings.nat, self.settings.host.ip);
            let deadline = |s: &Session| nat.deadline(s, settings, ip).map(|(at, _)| at);
            let (due, next) = nat.table.sweep(now, deadline);
            let due: Vec<(SessionId, EndReason)> = due
                .into_iter()
                .filter_map(|id| {
                    let s = nat.table.get(id)?;
                    Some((id, nat.deadline(s, settings, ip)?.1))
                })
                .collect();
            self.nat.idle_deadline = next;
            for (id, reason) in due {
                self.end_session(id, reason, now);
            }
        }
        self.expire_verdicts(now);
        let mut actions = Vec::new();
        self.nat
            .dns
            .handle_timeout(now, |a| actions.push(udp::own_action(a)));
        for a in actions {
            self.apply_dns(a);
        }
        self.nat.frag.expire(now);
    }

    /// The NAT's timeouts changed: sweep at once, so the new ones apply to every session.
    pub(super) fn nat_timeouts_changed(&mut self, now: Instant) {
        self.nat.idle_deadline = Some(now);
    }

    /// The virtual host's address or the MTU changed: smoltcp answers from the new address and
    /// cuts segments to the new MTU.
    pub(super) fn nat_link_changed(&mut self, now: Instant) {
        let host = self.settings.host;
        self.nat.stack.rebuild(host.mtu, host.ip, host.mask, now);
    }

    /// Whether smoltcp has something to send right now (for instance what did not fit the
    /// last transmit batch): the driver should poll again as soon as it has sent the batch.
    pub fn wants_poll(&self) -> bool {
        self.nat.stack.wants_poll(self.now)
    }

    /// When the NAT next needs [`handle_timeout`](VirtualHost::handle_timeout).
    pub(super) fn nat_deadline(&self) -> Option<Instant> {
        let nat = &self.nat;
        [
            nat.stack.next_deadline(),
            nat.idle_deadline,
            nat.admission.next_deadline(),
            nat.dns.next_deadline(),
            nat.frag.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves the NAT's events to the core's queue.
    pub(super) fn flush_nat_events(&mut self) {
        while let Some(e) = self.nat.events.pop_front() {
            self.events.push_back(Event::Nat(e));
        }
    }

    /// Records a new session: its remote name (from the DNS cache), its idle timer, and the
    /// security log's line.
    fn session_created(&mut self, id: SessionId, redirected_by: Option<String>) {
        let nat = &mut self.nat;
        let Some(s) = nat.table.get_mut(id) else {
            return;
        };
        let name = nat.dns.names.lookup(*s.key.remote.ip()).map(str::to_owned);
        s.remote_name = name.clone();
        let (key, target) = (s.key, s.target);
        nat.counters.created[key.protocol.index()] += 1;
        nat.events.push_back(NatEvent::Created {
            id,
            key,
            target,
            remote_name: name,
            redirected_by,
        });
        self.schedule_session_idle(id);
    }

    /// Session `id` may have a deadline now (it was created, or connected): the next sweep is
    /// no later than it.
    fn schedule_session_idle(&mut self, id: SessionId) {
        let nat = &self.nat;
        let Some((at, _)) = nat
            .table
            .get(id)
            .and_then(|s| nat.deadline(s, &self.settings.nat, self.settings.host.ip))
        else {
            return;
        };
        self.nat.schedule_idle(at);
    }
}

/// The virtual host's address and mask as smoltcp's CIDR (a mask with gaps, which the
/// configuration refuses, counts as /32).
fn cidr(ip: Ipv4Addr, mask: Ipv4Addr) -> IpCidr {
    IpCidr::new(
        IpAddress::Ipv4(ip),
        super::subnet::prefix_len(mask).unwrap_or(32),
    )
}
