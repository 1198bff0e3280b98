//! The virtual NAT: clients' TCP, UDP and ICMP echo to the outside, carried over host sockets
//! that the driver opens on the core's request.
//!
//! # Theory of operation
//!
//! The core decides, the driver does. For each flow from a client the core checks the safety
//! rules ([`NatSettings::check_outbound`]) and the limits ([`SessionTable`]), records a
//! session, and asks the driver for a host socket with a [`HostOp`]. What the driver learns
//! comes back through `nat_*` methods of [`VirtualHost`]: a connect succeeded or failed, a
//! datagram or an echo reply arrived, bytes can move on a TCP connection ([`TcpRelay`]).
//!
//! | flow                         | host side                 | ends                               |
//! |------------------------------|---------------------------|------------------------------------|
//! | TCP SYN to an outside address | `TcpConnect`, then a relay task | both FINs, a RST, or `nat.tcp_timeout` idle (RST both ways) |
//! | TCP SYN to our port 53       | `TcpConnect` to the DNS upstreams in turn | as TCP          |
//! | UDP to an outside address    | `UdpOpen` + `UdpSend`     | `nat.udp_timeout` idle             |
//! | UDP to our port 53           | the [DNS forwarder](crate::core::dns) | answer, failover, SERVFAIL |
//! | ICMP echo to an outside address | `IcmpOpen` + `IcmpSend` (or a synthesized reply) | [`ICMP_TIMEOUT`] idle |
//!
//! Never NATed: the virtual subnet itself, broadcast, multicast, 0.0.0.0/8 and 240.0.0.0/4;
//! 127.0.0.0/8 unless `nat.allow_host_loopback`; anything in `nat.deny`. A refused TCP SYN gets
//! a RST, a refused datagram or echo an ICMP "administratively prohibited".
//!
//! Fragments from clients are reassembled first ([`frag`]), so every path sees whole datagrams.

pub mod frag;
pub mod table;
pub mod tcp;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp as stcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpAddress,
    IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr, ETHERNET_HEADER_LEN,
};
use tracing::{debug, warn};

pub use table::{FlowKey, LimitError, Protocol, Session, SessionId, SessionState, SessionTable};
pub use tcp::TcpRelay;

use super::dns::{DnsAction, DnsForwarder};
use super::{frame, Event, HostSettings, VirtualHost};

/// Idle time after which an ICMP echo session (and its ping socket) goes.
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often, at most, refused flows are written to the security log (the rest are counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How echo requests to outside hosts are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The NAT's settings, from the configuration (and the driver's ICMP probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSettings {
    /// Whether the NAT (and the DNS redirect) carries anything.
    pub enabled: bool,
    /// The segment's MTU (largest IP packet).
    pub mtu: usize,
    /// Idle timeout of TCP sessions.
    pub tcp_timeout: Duration,
    /// Idle timeout of UDP sessions.
    pub udp_timeout: Duration,
    /// Whether 127.0.0.0/8 may be reached.
    pub allow_host_loopback: bool,
    /// Networks never to reach: (address, prefix length).
    pub deny: Vec<(Ipv4Addr, u8)>,
    /// Sessions at most.
    pub max_sessions: usize,
    /// Sessions per client address at most.
    pub max_sessions_per_client: usize,
    /// Each TCP connection's receive and send buffer in smoltcp, bytes.
    pub tcp_buffer: usize,
    /// DNS resolvers for the redirect.
    pub dns_upstreams: Vec<SocketAddr>,
    /// How echo to outside hosts works.
    pub icmp_mode: IcmpMode,
}

impl NatSettings {
    /// Whether `dst` may be reached from the segment of `host`; `Err` says why not.
    pub fn check_outbound(&self, dst: Ipv4Addr, host: &HostSettings) -> Result<(), &'static str> {
        let d = u32::from(dst);
        if host.on_segment(dst) {
            return Err("destination is on the virtual segment itself");
        }
        if dst.is_broadcast() || dst.is_multicast() || d >> 28 == 0xf {
            return Err("destination is a broadcast, multicast or reserved address");
        }
        if d >> 24 == 0 {
            return Err("destination is in 0.0.0.0/8");
        }
        if dst.is_loopback() && !self.allow_host_loopback {
            return Err("destination is the host's loopback (nat.allow_host_loopback = false)");
        }
        for &(net, len) in &self.deny {
            let nm = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            if d & nm == u32::from(net) & nm {
                return Err("destination is in nat.deny");
            }
        }
        Ok(())
    }
}

/// Why an outbound TCP connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The remote refused (RST): the client gets a RST.
    Refused,
    /// No route, host unreachable: the client gets ICMP host unreachable.
    Unreachable,
    /// No answer in time: the client gets ICMP host unreachable.
    TimedOut,
    /// A local resource ran out (EMFILE, ENFILE, ENOBUFS) or another error: RST.
    Local,
}

impl ConnectFailure {
    /// Classifies an I/O error.
    pub fn from_io(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectFailure::Refused,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                ConnectFailure::Unreachable
            }
            Some(libc::ETIMEDOUT) => ConnectFailure::TimedOut,
            _ if e.kind() == io::ErrorKind::TimedOut => ConnectFailure::TimedOut,
            _ => ConnectFailure::Local,
        }
    }

    /// The word the logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::TimedOut => "timed out",
            ConnectFailure::Local => "local error",
        }
    }
}

/// A request from the core to the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum HostOp<'a> {
    /// Connect a TCP socket to `target`; report with `nat_tcp_connected` or
    /// `nat_tcp_connect_failed`, then relay with `nat_tcp_relay`.
    TcpConnect {
        /// The session.
        id: SessionId,
        /// Where to connect.
        target: SocketAddr,
    },
    /// Open a UDP socket connected to `target`; report failure with `nat_socket_failed`, pass
    /// datagrams back with `nat_udp_receive`.
    UdpOpen {
        /// The session.
        id: SessionId,
        /// The remote.
        target: SocketAddr,
    },
    /// Send one datagram on the session's UDP socket (drop it if the socket is not writable).
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
    /// The session is gone: close its host socket (`abort`: with a RST).
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
    },
    /// The outbound TCP connection is up.
    Connected {
        /// The session.
        id: SessionId,
        /// Its flow.
        key: FlowKey,
    },
    /// The outbound connection failed.
    Failed {
        /// The session.
        id: SessionId,
        /// Its flow.
        key: FlowKey,
        /// Why.
        reason: String,
    },
    /// A session ended.
    Deleted {
        /// The session as it ended.
        session: Box<Session>,
        /// Why.
        reason: &'static str,
        /// When (for the duration).
        at: Instant,
    },
    /// A flow was refused (rules or limits). Rate-limited; `suppressed` counts the refusals
    /// not logged since the previous one.
    Refused {
        /// The flow.
        key: FlowKey,
        /// Why.
        reason: String,
        /// Refusals not logged before this one.
        suppressed: u64,
    },
}

/// Counters of the NAT.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NatCounters {
    /// Packets from clients handed to the NAT.
    pub packets: u64,
    /// Packets dropped because the NAT is disabled.
    pub disabled: u64,
    /// Flows refused by the safety rules or `nat.deny`.
    pub refused_rules: u64,
    /// Flows refused by the session limits.
    pub refused_limits: u64,
    /// Datagrams the host side could not send (socket busy or gone).
    pub host_send_dropped: u64,
    /// Frames dropped because the transmit queue was full.
    pub tx_dropped: u64,
    /// Echo requests answered by hubnat itself (synthesized mode).
    pub echo_synthesized: u64,
    /// Packets of protocols the NAT does not carry.
    pub unsupported: u64,
    /// Fragments reassembled into datagrams.
    pub reassembled: u64,
}

/// The NAT's state, owned by the [`VirtualHost`].
pub struct NatState {
    pub(super) settings: NatSettings,
    pub(super) table: SessionTable,
    stack: tcp::TcpStack,
    /// The SYN (its whole IPv4 packet) of each TCP session whose outbound connect is under
    /// way; retransmissions are dropped. A connected session has its socket set in `stack`.
    pending_syns: HashMap<SessionId, Vec<u8>>,
    frag: frag::Reassembler,
    pub(super) dns: DnsForwarder,
    ops: VecDeque<OpRecord>,
    op_buf: Vec<u8>,
    pub(super) counters: NatCounters,
    scratch: Vec<u8>,
    reassembled: Vec<u8>,
    last_refusal_log: Option<Instant>,
    suppressed_refusals: u64,
    pub(super) events: VecDeque<NatEvent>,
    /// When the next session may have gone idle: a sweep of the table is due then. Never
    /// later than the truth (activity only pushes sessions' times out), so a sweep may find
    /// nothing and set the next one.
    idle_deadline: Option<Instant>,
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
    /// A NAT for the host at `host_ip`/`mask`, with `seed` for smoltcp's initial sequence
    /// numbers (take it from a real random source).
    pub fn new(
        settings: NatSettings,
        host_ip: Ipv4Addr,
        mask: Ipv4Addr,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut scratch = Vec::new();
        let mut tx = hubnat_backend::FrameBatch::new(1, 64);
        let neighbours = super::Neighbours::default();
        let mut dropped = 0;
        let mut device = tcp::PollDevice {
            rx: None,
            tx: &mut tx,
            neighbours: &neighbours,
            our_mac: EthernetAddress([0; 6]),
            mtu: settings.mtu,
            scratch: &mut scratch,
            dropped: &mut dropped,
        };
        let mut iface = Interface::new(config, &mut device, now);
        iface.set_any_ip(true);
        let prefix = u32::from(mask).count_ones() as u8;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(host_ip), prefix));
        });
        let dns = DnsForwarder::new(settings.dns_upstreams.clone(), (seed >> 16) as u16);
        NatState {
            table: SessionTable::new(settings.max_sessions, settings.max_sessions_per_client),
            settings,
            stack: tcp::TcpStack::new(iface),
            pending_syns: HashMap::new(),
            frag: frag::Reassembler::default(),
            dns,
            ops: VecDeque::new(),
            op_buf: Vec::new(),
            counters: NatCounters::default(),
            scratch,
            reassembled: Vec::new(),
            last_refusal_log: None,
            suppressed_refusals: 0,
            events: VecDeque::new(),
            idle_deadline: None,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &NatSettings {
        &self.settings
    }

    /// The session table.
    pub fn table(&self) -> &SessionTable {
        &self.table
    }

    /// The counters.
    pub fn counters(&self) -> &NatCounters {
        &self.counters
    }

    fn push_op(&mut self, op: OpRecord) {
        self.ops.push_back(op);
    }

    fn stash(&mut self, bytes: &[u8]) -> std::ops::Range<usize> {
        let start = self.op_buf.len();
        self.op_buf.extend_from_slice(bytes);
        start..self.op_buf.len()
    }

    /// Records a new session's remote name (from the DNS cache) and tells the security log.
    /// The idle timeout of a session, or `None` while it is not to be timed out: a TCP session
    /// still connecting (the connect has its own timeout), or one whose connection is already
    /// over (its relay task is finishing it).
    fn idle_timeout(&self, s: &Session) -> Option<Duration> {
        match s.key.protocol {
            Protocol::Tcp if s.state == SessionState::Connecting => None,
            Protocol::Tcp => {
                let (set, handle) = self.stack.sets.get(&s.id)?;
                let open = !matches!(
                    set.get::<stcp::Socket>(*handle).state(),
                    stcp::State::Closed | stcp::State::TimeWait
                );
                open.then_some(self.settings.tcp_timeout)
            }
            Protocol::Udp => Some(self.settings.udp_timeout),
            Protocol::Icmp => Some(ICMP_TIMEOUT),
        }
    }

    /// Session `id` became subject to its idle timeout at `now`: the next sweep is no later.
    fn schedule_idle(&mut self, id: SessionId, now: Instant) {
        let Some(t) = self.table.get(id).and_then(|s| self.idle_timeout(s)) else {
            return;
        };
        let at = now + t;
        self.idle_deadline = Some(self.idle_deadline.map_or(at, |d| d.min(at)));
    }

    fn created(&mut self, id: SessionId, key: FlowKey, target: SocketAddr) {
        let name = self.dns.names.lookup(*key.remote.ip()).map(str::to_owned);
        if let Some(s) = self.table.get_mut(id) {
            s.remote_name = name.clone();
        }
        self.events.push_back(NatEvent::Created {
            id,
            key,
            target,
            remote_name: name,
        });
    }

    /// The session of a UDP or ICMP flow: found, or created (asking the driver for its socket
    /// with the op `open` makes); `None` when a limit refuses it.
    fn datagram_flow(
        &mut self,
        key: FlowKey,
        now: Instant,
        open: impl FnOnce(SessionId, SocketAddr) -> OpRecord,
    ) -> Option<SessionId> {
        if let Some(id) = self.table.find(&key) {
            return Some(id);
        }
        let target = SocketAddr::V4(key.remote);
        match self.table.insert(key, target, now) {
            Ok(id) => {
                self.push_op(open(id, target));
                self.created(id, key, target);
                if let Some(s) = self.table.get_mut(id) {
                    s.state = SessionState::Established;
                }
                self.schedule_idle(id, now);
                Some(id)
            }
            Err(e) => {
                self.counters.refused_limits += 1;
                self.refuse(key, e.to_string(), now);
                None
            }
        }
    }

    fn refuse(&mut self, key: FlowKey, reason: String, now: Instant) {
        let due = self
            .last_refusal_log
            .is_none_or(|t| now >= t + REFUSAL_LOG_INTERVAL);
        if due {
            warn!(client = %key.client, remote = %key.remote, protocol = key.protocol.as_str(), "nat: flow refused: {reason}");
            self.last_refusal_log = Some(now);
            let suppressed = std::mem::take(&mut self.suppressed_refusals);
            self.events.push_back(NatEvent::Refused {
                key,
                reason,
                suppressed,
            });
        } else {
            self.suppressed_refusals += 1;
        }
    }
}

impl VirtualHost {
    /// The NAT (settings, session table, counters).
    pub fn nat(&self) -> &NatState {
        &self.nat
    }

    /// Turns the NAT on or off at run time. Turning it off resets every TCP connection and
    /// closes every session.
    pub fn set_nat_enabled(&mut self, enabled: bool, now: Instant) {
        self.nat.settings.enabled = enabled;
        if !enabled {
            let ids: Vec<SessionId> = self.nat.table.iter().map(|s| s.id).collect();
            for id in ids {
                self.end_session(id, "nat disabled", true, now);
            }
        }
    }

    /// Hands an IPv4 packet (trimmed to its total length) from a client to the NAT.
    pub(super) fn nat_ipv4(
        &mut self,
        now: Instant,
        packet: &[u8],
    ) -> Result<(), smoltcp::wire::Error> {
        self.nat.counters.packets += 1;
        if !self.nat.settings.enabled {
            self.nat.counters.disabled += 1;
            return Ok(());
        }
        let p = Ipv4Packet::new_checked(packet)?;
        if p.more_frags() || p.frag_offset() != 0 {
            let mut out = std::mem::take(&mut self.nat.reassembled);
            let done = self.nat.frag.add(&p, now, &mut out);
            let result = if done {
                self.nat.counters.reassembled += 1;
                self.nat_whole(now, &out)
            } else {
                Ok(())
            };
            self.nat.reassembled = out;
            return result;
        }
        self.nat_whole(now, packet)
    }

    fn nat_whole(&mut self, now: Instant, packet: &[u8]) -> Result<(), smoltcp::wire::Error> {
        let p = Ipv4Packet::new_checked(packet)?;
        match p.next_header() {
            IpProtocol::Tcp => self.nat_tcp_in(now, &p),
            IpProtocol::Udp => self.nat_udp_in(now, &p),
            IpProtocol::Icmp => self.nat_icmp_in(now, &p),
            _ => {
                self.nat.counters.unsupported += 1;
                Ok(())
            }
        }
    }

    fn nat_tcp_in(
        &mut self,
        now: Instant,
        p: &Ipv4Packet<&[u8]>,
    ) -> Result<(), smoltcp::wire::Error> {
        let seg = TcpPacket::new_checked(p.payload())?;
        let key = FlowKey {
            protocol: Protocol::Tcp,
            client: SocketAddrV4::new(p.src_addr(), seg.src_port()),
            remote: SocketAddrV4::new(p.dst_addr(), seg.dst_port()),
        };
        if let Some(id) = self.nat.table.find(&key) {
            if let Some(s) = self.nat.table.get_mut(id) {
                s.last_activity = now;
            }
            if self.nat.stack.sets.contains_key(&id) {
                self.stack_ingress(now, p.as_ref(), Some(id));
            } else if seg.rst() {
                // The client gave up while we connect: forget the flow.
                self.nat.push_op(OpRecord::Close(id, true));
                self.nat_tcp_finished(id, now);
            }
            // Otherwise a retransmitted SYN while we connect: the SYN-ACK comes when the
            // connect does.
            return Ok(());
        }
        if seg.syn() && !seg.ack() && !seg.rst() {
            let target = if p.dst_addr() == self.host.ip {
                // TCP to us: only port 53 is served (by the DNS upstreams); smoltcp resets the rest.
                (seg.dst_port() == 53)
                    .then(|| self.nat.settings.dns_upstreams.first().copied())
                    .flatten()
            } else {
                (!self.refused_outbound(key, p, now, false)).then_some(SocketAddr::V4(key.remote))
            };
            if let Some(target) = target {
                match self.nat.table.insert(key, target, now) {
                    Ok(id) => {
                        // SYN deferral: the SYN waits until the outbound connect succeeds.
                        self.nat.pending_syns.insert(id, p.as_ref().to_vec());
                        self.nat.push_op(OpRecord::TcpConnect(id, target));
                        self.nat.created(id, key, target);
                        return Ok(());
                    }
                    Err(e) => {
                        self.nat.counters.refused_limits += 1;
                        self.nat.refuse(key, e.to_string(), now);
                    }
                }
            }
        }
        // A segment nobody owns (or a refused SYN): smoltcp answers it with a RST.
        self.stack_ingress(now, p.as_ref(), None);
        Ok(())
    }

    /// Feeds one segment to connection `id`'s socket set, or to the empty set (which answers
    /// with a RST) when no connection owns it.
    fn stack_ingress(&mut self, now: Instant, packet: &[u8], id: Option<SessionId>) {
        let VirtualHost {
            nat,
            tx,
            neighbours,
            host,
            ..
        } = self;
        let mut device = tcp::PollDevice {
            rx: Some(packet),
            tx,
            neighbours,
            our_mac: host.mac,
            mtu: nat.settings.mtu,
            scratch: &mut nat.scratch,
            dropped: &mut nat.counters.tx_dropped,
        };
        let stack = &mut nat.stack;
        match id.and_then(|id| stack.sets.get_mut(&id).map(|(set, _)| (id, set))) {
            Some((id, set)) => {
                let _ = stack.iface.poll_ingress_single(now, &mut device, set);
                stack.dirty.insert(id);
            }
            None => {
                let _ = stack
                    .iface
                    .poll_ingress_single(now, &mut device, &mut stack.empty);
            }
        }
    }

    /// Runs smoltcp's egress (ACKs, data, retransmissions) for the connections that have
    /// something to send or a timer due, and frees finished ones. Call after every batch of
    /// inputs, before [`take_transmit`](VirtualHost::take_transmit). When the transmit batch
    /// fills up, the rest waits for the next call ([`wants_poll`](VirtualHost::wants_poll)).
    pub fn poll(&mut self, now: Instant) {
        self.now = now;
        let VirtualHost {
            nat,
            tx,
            neighbours,
            host,
            ..
        } = self;
        let stack = &mut nat.stack;
        if stack.dirty.is_empty()
            && stack.graveyard.is_empty()
            && stack.next_deadline().is_none_or(|t| t > now)
        {
            return;
        }
        let mut ids: Vec<SessionId> = stack.dirty.drain().collect();
        stack.take_due(now, &mut ids);
        ids.extend(stack.graveyard.iter().copied());
        ids.sort_unstable();
        ids.dedup();
        for (i, &id) in ids.iter().enumerate() {
            if tx.is_full() {
                // Back-pressure: the rest goes out after the driver has sent this batch.
                stack.dirty.extend(ids[i..].iter().copied());
                break;
            }
            let Some((set, _)) = stack.sets.get_mut(&id) else {
                continue;
            };
            let mut device = tcp::PollDevice {
                rx: None,
                tx,
                neighbours,
                our_mac: host.mac,
                mtu: nat.settings.mtu,
                scratch: &mut nat.scratch,
                dropped: &mut nat.counters.tx_dropped,
            };
            // Each egress pass sends at most one segment per socket: go on while it sends.
            while stack.iface.poll_egress(now, &mut device, set)
                == smoltcp::iface::PollResult::SocketStateChanged
            {}
            let at = stack.iface.poll_at(now, set);
            stack.set_deadline(id, at);
        }
        let graveyard = std::mem::take(&mut stack.graveyard);
        for id in graveyard {
            if stack.dirty.contains(&id) {
                stack.graveyard.push(id);
            } else {
                stack.sets.remove(&id);
                stack.set_deadline(id, None);
            }
        }
    }

    fn nat_udp_in(
        &mut self,
        now: Instant,
        p: &Ipv4Packet<&[u8]>,
    ) -> Result<(), smoltcp::wire::Error> {
        let udp = UdpPacket::new_checked(p.payload())?;
        let (src, dst) = (p.src_addr(), p.dst_addr());
        UdpRepr::parse(
            &udp,
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &ChecksumCapabilities::default(),
        )?;
        let client = SocketAddrV4::new(src, udp.src_port());
        if dst == self.host.ip {
            if udp.dst_port() == 53 {
                self.dns_query(now, client, udp.payload());
            } else {
                self.nat.counters.unsupported += 1;
            }
            return Ok(());
        }
        let key = FlowKey {
            protocol: Protocol::Udp,
            client,
            remote: SocketAddrV4::new(dst, udp.dst_port()),
        };
        if self.refused_outbound(key, p, now, true) {
            return Ok(());
        }
        let Some(id) = self.nat.datagram_flow(key, now, OpRecord::UdpOpen) else {
            return Ok(());
        };
        let payload = udp.payload();
        if let Some(s) = self.nat.table.get_mut(id) {
            s.count_out(payload.len(), now);
        }
        let range = self.nat.stash(payload);
        self.nat.push_op(OpRecord::UdpSend(id, range));
        Ok(())
    }

    fn nat_icmp_in(
        &mut self,
        now: Instant,
        p: &Ipv4Packet<&[u8]>,
    ) -> Result<(), smoltcp::wire::Error> {
        let packet = Icmpv4Packet::new_checked(p.payload())?;
        let repr = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default())?;
        let Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        } = repr
        else {
            self.nat.counters.unsupported += 1;
            return Ok(());
        };
        let (src, dst) = (p.src_addr(), p.dst_addr());
        let key = FlowKey {
            protocol: Protocol::Icmp,
            client: SocketAddrV4::new(src, ident),
            remote: SocketAddrV4::new(dst, 0),
        };
        if self.refused_outbound(key, p, now, true) {
            return Ok(());
        }
        if self.nat.settings.icmp_mode == IcmpMode::Synthesized {
            self.nat.counters.echo_synthesized += 1;
            let reply = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            self.push_to_client(dst, src, &reply);
            return Ok(());
        }
        let open = |id, target: SocketAddr| match target {
            SocketAddr::V4(v4) => OpRecord::IcmpOpen(id, *v4.ip()),
            SocketAddr::V6(_) => unreachable!("invariant: the NAT's remotes are IPv4"),
        };
        let Some(id) = self.nat.datagram_flow(key, now, open) else {
            return Ok(());
        };
        if let Some(s) = self.nat.table.get_mut(id) {
            s.count_out(data.len(), now);
        }
        let range = self.nat.stash(data);
        self.nat.push_op(OpRecord::IcmpSend(id, seq_no, range));
        Ok(())
    }

    /// Applies the safety rules to a new flow from packet `p`. A refused flow is counted and
    /// logged; with `answer`, the client also gets ICMP "administratively prohibited" (TCP
    /// gets smoltcp's RST instead). Returns true when the flow is refused.
    fn refused_outbound(
        &mut self,
        key: FlowKey,
        p: &Ipv4Packet<&[u8]>,
        now: Instant,
        answer: bool,
    ) -> bool {
        let dst = p.dst_addr();
        let Err(reason) = self.nat.settings.check_outbound(dst, &self.host) else {
            return false;
        };
        self.nat.counters.refused_rules += 1;
        self.nat.refuse(key, reason.to_owned(), now);
        if answer && !(dst.is_broadcast() || dst.is_multicast()) {
            self.push_unreachable(p, Icmpv4DstUnreachable::CommProhibited);
        }
        true
    }

    fn push_to_client(&mut self, from: Ipv4Addr, to: Ipv4Addr, icmp: &Icmpv4Repr<'_>) {
        let Some(mac) = self.neighbours.lookup(to) else {
            self.nat.counters.tx_dropped += 1;
            return;
        };
        if !frame::push_icmp(&mut self.tx, self.host.mac, mac, from, to, icmp) {
            self.nat.counters.tx_dropped += 1;
        }
    }

    /// ICMP destination unreachable about `original` (a packet a client sent), from us.
    fn push_unreachable(&mut self, original: &Ipv4Packet<&[u8]>, reason: Icmpv4DstUnreachable) {
        let Ok(header) = Ipv4Repr::parse(original, &ChecksumCapabilities::ignored()) else {
            return;
        };
        let payload = original.payload();
        let data = &payload[..payload.len().min(8)];
        let icmp = Icmpv4Repr::DstUnreachable {
            reason,
            header,
            data,
        };
        self.push_to_client(self.host.ip, original.src_addr(), &icmp);
    }

    fn dns_query(&mut self, now: Instant, client: SocketAddrV4, payload: &[u8]) {
        if let Some(action) = self.nat.dns.query(client, payload, now) {
            let action = own_action(action);
            self.apply_dns(action);
        }
    }

    fn apply_dns(&mut self, action: OwnedDnsAction) {
        match action {
            OwnedDnsAction::Send(upstream, bytes) => {
                let range = self.nat.stash(&bytes);
                self.nat.push_op(OpRecord::DnsSend(upstream, range));
            }
            OwnedDnsAction::Answer(client, bytes) => self.push_udp_to_client(
                SocketAddrV4::new(self.host.ip, 53),
                client,
                bytes.len(),
                |buf| buf.copy_from_slice(&bytes),
            ),
        }
    }

    /// A UDP datagram to a client, fragmented if it does not fit the MTU.
    fn push_udp_to_client(
        &mut self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let Some(mac) = self.neighbours.lookup(*to.ip()) else {
            self.nat.counters.tx_dropped += 1;
            return;
        };
        let fits = 20 + 8 + len <= self.nat.settings.mtu;
        if fits {
            if !frame::push_udp(
                &mut self.tx,
                self.host.mac,
                mac,
                (*from.ip(), from.port()),
                (*to.ip(), to.port()),
                len,
                fill,
            ) {
                self.nat.counters.tx_dropped += 1;
            }
            return;
        }
        // Build the whole datagram in scratch, then cut it into fragments.
        let mut datagram = std::mem::take(&mut self.nat.scratch);
        datagram.clear();
        datagram.resize(8 + len, 0);
        {
            let mut udp = UdpPacket::new_unchecked(&mut datagram[..]);
            UdpRepr {
                src_port: from.port(),
                dst_port: to.port(),
            }
            .emit(
                &mut udp,
                &IpAddress::Ipv4(*from.ip()),
                &IpAddress::Ipv4(*to.ip()),
                len,
                fill,
                &ChecksumCapabilities::default(),
            );
        }
        let ident = self.next_ident();
        let chunk = (self.nat.settings.mtu - 20) & !7;
        let mut offset = 0;
        while offset < datagram.len() {
            let end = (offset + chunk).min(datagram.len());
            let more = end < datagram.len();
            let part = &datagram[offset..end];
            let ok = self
                .tx
                .push_built(ETHERNET_HEADER_LEN + 20 + part.len(), |buf| {
                    let eth = smoltcp::wire::EthernetRepr {
                        src_addr: self.host.mac,
                        dst_addr: mac,
                        ethertype: smoltcp::wire::EthernetProtocol::Ipv4,
                    };
                    eth.emit(&mut smoltcp::wire::EthernetFrame::new_unchecked(
                        &mut buf[..],
                    ));
                    let repr = Ipv4Repr {
                        src_addr: *from.ip(),
                        dst_addr: *to.ip(),
                        next_header: IpProtocol::Udp,
                        payload_len: part.len(),
                        hop_limit: frame::HOP_LIMIT,
                    };
                    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETHERNET_HEADER_LEN..]);
                    repr.emit(&mut ip, &ChecksumCapabilities::ignored());
                    ip.set_ident(ident);
                    ip.set_dont_frag(false);
                    ip.set_more_frags(more);
                    ip.set_frag_offset(offset as u16);
                    ip.payload_mut()[..part.len()].copy_from_slice(part);
                    ip.fill_checksum();
                });
            if !ok {
                self.nat.counters.tx_dropped += 1;
            }
            offset = end;
        }
        self.nat.scratch = datagram;
    }

    fn next_ident(&mut self) -> u16 {
        self.ident = self.ident.wrapping_add(1);
        self.ident
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

    /// The outbound TCP connection of `id` is up: the client gets its SYN-ACK. Returns false
    /// when the session is gone (the client gave up): close the host socket.
    pub fn nat_tcp_connected(&mut self, id: SessionId, now: Instant) -> bool {
        self.now = now;
        let Some(syn) = self.nat.pending_syns.remove(&id) else {
            return false;
        };
        let Ok(p) = Ipv4Packet::new_checked(&syn[..]) else {
            return false;
        };
        let Ok(seg) = TcpPacket::new_checked(p.payload()) else {
            return false;
        };
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(tcp::listener(
            p.dst_addr(),
            seg.dst_port(),
            self.nat.settings.tcp_buffer,
        ));
        self.nat.stack.sets.insert(id, (set, handle));
        // Now the SYN goes in, and the SYN-ACK out with the next poll.
        self.stack_ingress(now, &syn, Some(id));
        if let Some(s) = self.nat.table.get_mut(id) {
            s.state = SessionState::Established;
            s.last_activity = now;
            let key = s.key;
            self.nat.events.push_back(NatEvent::Connected { id, key });
        }
        self.nat.schedule_idle(id, now);
        true
    }

    /// The outbound TCP connection of `id` failed. For the DNS redirect the next upstream is
    /// tried (a new `TcpConnect` op); otherwise the client gets a RST (refused, local error)
    /// or an ICMP host unreachable (unreachable, timed out) and the session ends.
    pub fn nat_tcp_connect_failed(&mut self, id: SessionId, failure: ConnectFailure, now: Instant) {
        self.now = now;
        let Some(session) = self.nat.table.get(id).cloned() else {
            return;
        };
        if session.key.remote.port() == 53 && *session.key.remote.ip() == self.host.ip {
            let ups = &self.nat.settings.dns_upstreams;
            if let Some(pos) = ups.iter().position(|u| *u == session.target) {
                if let Some(&next) = ups.get(pos + 1) {
                    if let Some(s) = self.nat.table.get_mut(id) {
                        s.target = next;
                    }
                    debug!(%next, "dns over tcp: upstream failed, trying the next");
                    self.nat.push_op(OpRecord::TcpConnect(id, next));
                    return;
                }
            }
        }
        self.nat.events.push_back(NatEvent::Failed {
            id,
            key: session.key,
            reason: failure.as_str().to_owned(),
        });
        let Some(syn) = self.nat.pending_syns.remove(&id) else {
            return;
        };
        if let Ok(p) = Ipv4Packet::new_checked(&syn[..]) {
            match failure {
                ConnectFailure::Refused | ConnectFailure::Local => self.push_rst_for_syn(&p),
                ConnectFailure::Unreachable | ConnectFailure::TimedOut => {
                    self.push_unreachable(&p, Icmpv4DstUnreachable::HostUnreachable)
                }
            }
        }
        if let Some(s) = self.nat.table.remove(id) {
            self.nat.events.push_back(NatEvent::Deleted {
                session: Box::new(s),
                reason: "connect failed",
                at: now,
            });
        }
    }

    /// A RST answering the client's SYN in `p`, from the address it dialled.
    fn push_rst_for_syn(&mut self, p: &Ipv4Packet<&[u8]>) {
        let Ok(seg) = TcpPacket::new_checked(p.payload()) else {
            return;
        };
        let Some(mac) = self.neighbours.lookup(p.src_addr()) else {
            return;
        };
        let rst = TcpRepr {
            src_port: seg.dst_port(),
            dst_port: seg.src_port(),
            control: TcpControl::Rst,
            seq_number: TcpSeqNumber(0),
            ack_number: Some(seg.seq_number() + 1),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let (src, dst) = (p.dst_addr(), p.src_addr());
        let ok = frame::push_ip(
            &mut self.tx,
            self.host.mac,
            mac,
            src,
            dst,
            IpProtocol::Tcp,
            rst.buffer_len(),
            |buf| {
                rst.emit(
                    &mut TcpPacket::new_unchecked(buf),
                    &IpAddress::Ipv4(src),
                    &IpAddress::Ipv4(dst),
                    &ChecksumCapabilities::default(),
                )
            },
        );
        if !ok {
            self.nat.counters.tx_dropped += 1;
        }
    }

    /// The relay of TCP session `id`, for one synchronous step; `None` when the session is
    /// gone (end the relay task).
    pub fn nat_tcp_relay(&mut self, id: SessionId, now: Instant) -> Option<TcpRelay<'_>> {
        let session = self.nat.table.get_mut(id)?;
        let stack = &mut self.nat.stack;
        let (set, handle) = stack.sets.get_mut(&id)?;
        let socket = set.get_mut::<stcp::Socket>(*handle);
        Some(TcpRelay {
            socket,
            session,
            now,
            dirty: &mut stack.dirty,
        })
    }

    /// The relay task of TCP session `id` is done (the connection closed or was reset, or the
    /// host side failed): the session ends. Its socket leaves after the next egress, so a
    /// pending RST or ACK still goes out.
    pub fn nat_tcp_finished(&mut self, id: SessionId, now: Instant) {
        self.nat.pending_syns.remove(&id);
        // Only a live session's socket is aborted and buried (once: the session goes below).
        if self.nat.table.get(id).is_some() {
            let stack = &mut self.nat.stack;
            if let Some((set, handle)) = stack.sets.get_mut(&id) {
                let socket = set.get_mut::<stcp::Socket>(*handle);
                if !matches!(socket.state(), stcp::State::Closed | stcp::State::TimeWait) {
                    socket.abort();
                }
                stack.graveyard.push(id);
                stack.dirty.insert(id);
            }
        }
        if let Some(s) = self.nat.table.remove(id) {
            let reason = match s.state {
                SessionState::Connecting => "client gave up",
                SessionState::Closing => "closed",
                _ => "reset",
            };
            self.nat.events.push_back(NatEvent::Deleted {
                session: Box::new(s),
                reason,
                at: now,
            });
        }
    }

    /// A datagram for UDP session `id`: `fill` reads it (from the host socket) straight into
    /// the frame for the client. Returns what `fill` returned.
    pub fn nat_udp_receive(
        &mut self,
        id: SessionId,
        now: Instant,
        fill: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.now = now;
        let Some(s) = self.nat.table.get(id) else {
            // Drain the datagram anyway.
            let mut sink = [0u8; 1];
            return fill(&mut sink);
        };
        let key = s.key;
        let mut buf = std::mem::take(&mut self.nat.reassembled);
        buf.resize(65536, 0);
        let result = fill(&mut buf);
        if let Ok(n) = result {
            let n = n.min(65507);
            if let Some(s) = self.nat.table.get_mut(id) {
                s.count_in(n, now);
            }
            let data = &buf[..n];
            self.push_udp_to_client(key.remote, key.client, n, |out| out.copy_from_slice(data));
        }
        self.nat.reassembled = buf;
        result
    }

    /// An ICMP message from the ping socket of session `id` (the whole ICMP message as the
    /// kernel delivers it). Echo replies go to the client with its own identifier.
    pub fn nat_icmp_receive(&mut self, id: SessionId, now: Instant, message: &[u8]) {
        self.now = now;
        let Some(s) = self.nat.table.get_mut(id) else {
            return;
        };
        let key = s.key;
        let Ok(packet) = Icmpv4Packet::new_checked(message) else {
            return;
        };
        // Ping sockets rewrite the identifier; the checksum is the kernel's business here.
        let Ok(Icmpv4Repr::EchoReply { seq_no, data, .. }) =
            Icmpv4Repr::parse(&packet, &ChecksumCapabilities::ignored())
        else {
            return;
        };
        s.count_in(data.len(), now);
        let reply = Icmpv4Repr::EchoReply {
            ident: key.client.port(),
            seq_no,
            data,
        };
        self.push_to_client(*key.remote.ip(), *key.client.ip(), &reply);
    }

    /// The host socket of UDP or ICMP session `id` could not be opened (or failed for good):
    /// the session ends.
    pub fn nat_socket_failed(&mut self, id: SessionId, error: &io::Error, now: Instant) {
        self.now = now;
        if let Some(s) = self.nat.table.get(id) {
            let key = s.key;
            self.nat.events.push_back(NatEvent::Failed {
                id,
                key,
                reason: error.to_string(),
            });
        }
        self.end_session(id, "host socket failed", false, now);
    }

    /// A DNS answer from `from` (an upstream).
    pub fn nat_dns_answer(&mut self, from: SocketAddr, payload: &[u8], now: Instant) {
        self.now = now;
        if let Some(action) = self.nat.dns.answer(from, payload) {
            let action = own_action(action);
            self.apply_dns(action);
        }
    }

    /// Ends a session: TCP sockets are aborted (the relay task sees it and finishes), UDP and
    /// ICMP sessions are removed and their sockets closed.
    fn end_session(&mut self, id: SessionId, reason: &'static str, abort: bool, now: Instant) {
        let stack = &mut self.nat.stack;
        if let Some((set, handle)) = stack.sets.get_mut(&id) {
            // The relay task sees the abort and finishes the session.
            set.get_mut::<stcp::Socket>(*handle).abort();
            stack.dirty.insert(id);
            return;
        }
        if self.nat.pending_syns.contains_key(&id) {
            // Still connecting: no relay task yet; the connect task finds the session gone.
            self.nat.push_op(OpRecord::Close(id, true));
            self.nat_tcp_finished(id, now);
            return;
        }
        if let Some(s) = self.nat.table.remove(id) {
            self.nat.push_op(OpRecord::Close(id, abort));
            self.nat.events.push_back(NatEvent::Deleted {
                session: Box::new(s),
                reason,
                at: now,
            });
        }
    }

    /// NAT timers: idle sessions, DNS failover, fragment expiry.
    pub(super) fn nat_timeout(&mut self, now: Instant) {
        if self.nat.idle_deadline.is_some_and(|t| t <= now) {
            let nat = &self.nat;
            let (idle, next) = nat.table.sweep(now, |s| nat.idle_timeout(s));
            self.nat.idle_deadline = next;
            for id in idle {
                let abort = self
                    .nat
                    .table
                    .get(id)
                    .is_some_and(|s| s.key.protocol == Protocol::Tcp);
                self.end_session(id, "idle timeout", abort, now);
            }
        }
        let mut actions = Vec::new();
        self.nat
            .dns
            .handle_timeout(now, |a| actions.push(own_action(a)));
        for a in actions {
            self.apply_dns(a);
        }
        self.nat.frag.expire(now);
    }

    /// Whether smoltcp has something to send right now (for instance what did not fit the
    /// last transmit batch): the driver should poll again as soon as it has sent the batch.
    pub fn wants_poll(&self) -> bool {
        let stack = &self.nat.stack;
        !stack.dirty.is_empty()
            || !stack.graveyard.is_empty()
            || stack.next_deadline().is_some_and(|t| t <= self.now)
    }

    /// When the NAT next needs [`handle_timeout`](VirtualHost::handle_timeout).
    pub(super) fn nat_deadline(&self) -> Option<Instant> {
        let nat = &self.nat;
        [
            nat.stack.next_deadline(),
            nat.idle_deadline,
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
}

enum OwnedDnsAction {
    Send(SocketAddr, Vec<u8>),
    Answer(SocketAddrV4, Vec<u8>),
}

fn own_action(a: DnsAction<'_>) -> OwnedDnsAction {
    match a {
        DnsAction::Send { upstream, payload } => OwnedDnsAction::Send(upstream, payload.to_vec()),
        DnsAction::Answer { client, payload } => OwnedDnsAction::Answer(client, payload.to_vec()),
    }
}
