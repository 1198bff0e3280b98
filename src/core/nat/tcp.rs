//! The TCP half of the NAT: smoltcp terminates each client connection, and the driver relays
//! its bytes to a host `TcpStream` through [`TcpRelay`].
//!
//! # Theory of operation
//!
//! smoltcp runs with `Medium::Ip` behind the core's own Ethernet layer and with AnyIP, so a
//! socket can listen on any destination a client dials (with `Medium::Ethernet` smoltcp would
//! answer ARP for every address and steal other hosts' traffic). Only TCP
//! reaches it.
//!
//! - **SYN deferral.** The SYN of a new flow is kept aside (retransmissions are dropped) while
//!   the driver connects to the remote. On success a socket listening on exactly the SYN's
//!   destination is created and the SYN is fed to it: the SYN-ACK goes out. On failure the
//!   client gets a RST (refused) or, as the host's error says, an ICMP host or network
//!   unreachable or administratively prohibited quoting its SYN, and no socket or buffer was
//!   ever allocated — a SYN flood costs a table row per SYN, bounded by the session limits.
//!   (smoltcp's `pause_synack` would do the same with a socket per pending SYN, but a paused
//!   socket asks to be polled "now" forever.) Each segment is fed in on its own
//!   ([`Interface::poll_ingress_single`]) so that the socket created for a SYN is the one that
//!   takes it.
//! - **Relay.** [`TcpRelay`] lends the driver the socket's buffers: the bytes the client sent
//!   are written to the host socket straight from smoltcp's receive buffer, and the host
//!   socket is read straight into smoltcp's send buffer — one copy per direction.
//! - **Half-close.** The client's FIN is seen when the socket leaves ESTABLISHED for
//!   CLOSE-WAIT (or CLOSING, TIME-WAIT); once its bytes are drained the relay shuts down the host
//!   socket's write side and reports [`HostEvent::WriteShut`]. The remote's EOF
//!   ([`HostEvent::EndOfStream`]) becomes `close()`: a FIN to the client once the buffer is sent.
//! - **End.** The core, not the relay, decides that a connection is over, and why: both FINs
//!   carried (closed by whoever sent the first), a RST from the client (seen on ingress, never
//!   relayed as a FIN), a RST from the remote ([`HostEvent::Reset`]: the client gets a RST), an
//!   idle timeout or an operator (RST both ways). The socket's set then waits one egress poll
//!   in the graveyard, so that a RST or a last ACK still leaves.
//! - **Dispatch.** Each connection has a socket set of its own ([`TcpStack`]): a segment goes
//!   to its connection's set, and egress polls only the connections that have something to
//!   send (marked dirty) or a timer due.
//!
//! Buffers: `nat.tcp_buffer` bytes each way per connection (1 MiB by default; the receive
//! buffer is cut to the largest `65535 << k` that fits, see `rx_buffer_len`). Their size sets
//! the window towards the client: 1 MiB gives window scale 4, ~10 Gbit/s through a TAP device
//! at MTU 65520, where 256 KiB gives ~7.5 (`scripts/bench-nat.sh`). `benches/core_sessions.rs`
//! measures the memory it costs with many sessions.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Ipv4Packet, TcpPacket, ETHERNET_HEADER_LEN,
};

use super::pages::{page_size, Mapping, MappingPool, Pages};
use super::table::{FlowKey, IdMap, IdSet, Protocol, SessionId, SessionState};
use super::{EndReason, HostError, HostEvent, NatEvent, OpRecord};
use crate::core::link::Link;
use crate::core::VirtualHost;

/// A fresh socket listening on `(addr, port)`, created when the outbound connect succeeded,
/// just before the client's SYN is fed to it. `port` is not 0 (such segments are dropped as
/// malformed before they reach the NAT).
/// Also returns the whole pages inside its two buffers (receive, send), to give back when the
/// connection goes quiet ([`Pages`]).
fn listener(
    addr: Ipv4Addr,
    port: u16,
    buffer: usize,
    pool: &mut MappingPool,
) -> (tcp::Socket<'static>, Buffers) {
    // No memory is taken until bytes pass (see `pages`): a mapping of the connection's own
    // (a new one, or one an ended connection left in `pool`), or, when the system refuses
    // one, zeroed allocations (each with a resident first page).
    let (rx, tx, pages, mapping) = match pool.take(rx_buffer_len(buffer), buffer) {
        Some((mapping, rx, tx)) => {
            let pages = mapping.pages();
            (
                tcp::SocketBuffer::new(rx),
                tcp::SocketBuffer::new(tx),
                pages,
                Some(mapping),
            )
        }
        None => {
            let mut rx = vec![0u8; rx_buffer_len(buffer)];
            let mut tx = vec![0u8; buffer];
            let pages = [Pages::inside(&mut rx), Pages::inside(&mut tx)];
            // The Vecs move into the socket; their heap allocations stay where `pages` points.
            (
                tcp::SocketBuffer::new(rx),
                tcp::SocketBuffer::new(tx),
                pages,
                None,
            )
        }
    };
    let buffers = Buffers {
        pages,
        mapping,
        received: None,
        acked: None,
        syn_end: None,
        far: false,
    };
    let mut s = tcp::Socket::new(rx, tx);
    s.set_nagle_enabled(true);
    s.set_congestion_control(tcp::CongestionControl::Cubic);
    s.listen(smoltcp::wire::IpListenEndpoint {
        addr: Some(addr.into()),
        port,
    })
    .expect("invariant: a fresh socket with a non-zero port can listen");
    (s, buffers)
}

/// A connection's buffer memory: the mapping its socket's buffers live in (if they do), and
/// the whole pages inside each buffer. Kept in [`TcpStack`]'s `pages`, which is declared (so
/// dropped) after its `sets`: a socket goes before the memory it borrows.
#[derive(Debug)]
pub(super) struct Buffers {
    pages: BufferPages,
    mapping: Option<Mapping>,
    /// The end of the furthest segment the client sent (sequence number after it).
    received: Option<u32>,
    /// The acknowledgment number of the last segment the socket sent the client.
    acked: Option<u32>,
    /// The sequence number after the client's SYN: where its bytes start.
    syn_end: Option<u32>,
    /// Bytes went past the first page of a buffer (or may have): the mapping is not kept for
    /// another connection ([`MappingPool`]). smoltcp's rings put the byte at stream offset
    /// `k` at a position no higher than `k` (a ring starts at 0 and goes back to 0 when it
    /// empties; out-of-order bytes go where their offset says), so a connection whose client
    /// sent up to one page and that was given up to one page (the session's `bytes_in`)
    /// touched only the first pages.
    far: bool,
}

/// Whether sequence number `a` is after `b` (modulo 2^32).
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The acknowledgment number of the TCP segment in IPv4 `packet`, if it has the ACK flag.
fn segment_ack(packet: &[u8]) -> Option<u32> {
    if packet.get(9)? != &6 {
        return None;
    }
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let tcp = packet.get(ihl..)?;
    if tcp.get(13)? & 0x10 == 0 {
        return None;
    }
    Some(u32::from_be_bytes(tcp.get(8..12)?.try_into().ok()?))
}

/// The whole pages inside a connection's receive and send buffers.
type BufferPages = [Option<Pages>; 2];

/// How long a connection must carry nothing, with both buffers empty, before its buffers'
/// memory goes back to the system: between this and twice this. Short, because pages given
/// back cost only a page fault each when the connection speaks again, and an idle
/// connection should hold nothing.
pub const QUIET_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The receive buffer for a `nat.tcp_buffer` of `buffer` bytes: the largest `65535 << k` that
/// fits (or `buffer` itself below 64 KiB). smoltcp (0.14) offers window scale `k` (the bit
/// length of the size, less 16), sends the SYN-ACK's window unscaled (at most 65535), then
/// reads that value back as scaled: until it sends its next segment it takes `65535 << k`
/// bytes past the SYN as in the window. With any other size that is more than the buffer, and
/// a client's segment beyond the buffer was recorded as received but never stored: a
/// debug-build assertion, and in a release build a panic (`enqueue_unallocated`) once the
/// client filled the gap before it, i.e. any client could stop the gateway. Found by the
/// `frames` fuzz target.
fn rx_buffer_len(buffer: usize) -> usize {
    if buffer <= 65535 {
        return buffer;
    }
    let mut len = 65535;
    while len * 2 <= buffer {
        len *= 2;
    }
    len
}

/// The capabilities smoltcp sees (it copies them when the interface is built: a new MTU
/// means a new interface, see [`TcpStack::rebuild`]).
fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    // The core verified the IPv4 header checksum and the TCP checksum of every packet it hands
    // over (`nat_tcp_in`); smoltcp fills in both on the way out.
    caps.checksum.ipv4 = phy::Checksum::Tx;
    caps.checksum.tcp = phy::Checksum::Tx;
    caps.max_transmission_unit = mtu;
    caps.max_burst_size = None;
    caps
}

/// An interface for the virtual host at `ip`/`mask` with MTU `mtu`.
fn interface(seed: u64, mtu: usize, ip: Ipv4Addr, mask: Ipv4Addr, now: Instant) -> Interface {
    let mut config = smoltcp::iface::Config::new(smoltcp::wire::HardwareAddress::Ip);
    config.random_seed = seed;
    let mut iface = Interface::new(config, &mut NullDevice(mtu), now);
    iface.set_any_ip(true);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(super::cidr(ip, mask));
    });
    iface
}

/// A device with nothing to receive or send, to build the interface with.
struct NullDevice(usize);

impl Device for NullDevice {
    type RxToken<'b> = Rx<'b>;
    type TxToken<'b> = Tx<'b>;

    fn receive(&mut self, _t: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        None
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        None
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.0)
    }
}

/// The smoltcp device for one poll: at most one received IP packet, and the link's transmit
/// queue, where each IP packet smoltcp emits gets its Ethernet header from the neighbour
/// table.
struct PollDevice<'a> {
    rx: Option<&'a [u8]>,
    link: &'a mut Link,
    our_mac: EthernetAddress,
    mtu: usize,
    scratch: &'a mut Vec<u8>,
    /// The acknowledgment number of the last segment the connection's socket sent.
    acked: Option<&'a mut Option<u32>>,
}

pub struct Rx<'a>(&'a [u8]);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

pub struct Tx<'a> {
    link: &'a mut Link,
    our_mac: EthernetAddress,
    scratch: &'a mut Vec<u8>,
    acked: Option<&'a mut Option<u32>>,
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut result = None;
        let mut f = Some(f);
        let link = self.link;
        let neighbours = &link.neighbours;
        let our_mac = self.our_mac;
        let acked = self.acked;
        let pushed = link.tx.push_built(ETHERNET_HEADER_LEN + len, |buf| {
            let (head, packet) = buf.split_at_mut(ETHERNET_HEADER_LEN);
            result = Some((f.take().expect("invariant: called once"))(packet));
            if let Some(acked) = acked {
                if let Some(ack) = segment_ack(packet) {
                    *acked = Some(ack);
                }
            }
            let dst_ip = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let dst_mac = neighbours
                .lookup(dst_ip)
                .unwrap_or(EthernetAddress::BROADCAST);
            EthernetRepr {
                src_addr: our_mac,
                dst_addr: dst_mac,
                ethertype: EthernetProtocol::Ipv4,
            }
            .emit(&mut EthernetFrame::new_unchecked(head));
        });
        if link.pushed(pushed) {
            return result.expect("invariant: builder ran");
        }
        // The queue is full (an answer during ingress): build into scratch and drop it, as a
        // congested link would.
        self.scratch.resize(len, 0);
        (f.take().expect("invariant: not yet called"))(&mut self.scratch[..len])
    }
}

impl Device for PollDevice<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _t: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let packet = self.rx.take()?;
        Some((
            Rx(packet),
            Tx {
                link: self.link,
                our_mac: self.our_mac,
                scratch: self.scratch,
                acked: self.acked.as_deref_mut(),
            },
        ))
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        // A full queue says "not now": smoltcp keeps the segment and sends it on the next poll,
        // after the driver has flushed the queue. (Accepting and dropping it would make
        // smoltcp think it was sent, and recover with a retransmission and a smaller window.)
        if self.link.tx.is_full() {
            return None;
        }
        Some(Tx {
            link: self.link,
            our_mac: self.our_mac,
            scratch: self.scratch,
            acked: self.acked.as_deref_mut(),
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

/// The smoltcp side of the NAT: the interface, and one socket set per connection.
///
/// smoltcp looks through the whole socket set for every segment it takes in and on every
/// egress poll. With a set of one socket per connection, the core finds the set by flow (a
/// hash lookup) and smoltcp's own search is over a single socket: the cost per segment does
/// not grow with the number of connections (`benches/core_sessions.rs`).
///
/// Invariants kept here: a connection is *dirty* whenever its socket may have something to
/// send; each connection with a timer has exactly one entry in `deadlines`; a buried
/// connection's set leaves after one egress poll that finds it clean.
pub struct TcpStack {
    iface: Interface,
    /// The interface's random seed (initial sequence numbers), kept to rebuild it.
    seed: u64,
    /// Each connection's set and the handle of its socket in it.
    sets: IdMap<(SocketSet<'static>, SocketHandle)>,
    /// The set for segments no connection owns: smoltcp answers them with a RST.
    empty: SocketSet<'static>,
    /// Connections whose socket may have something to send.
    dirty: IdSet,
    /// Each connection's next timer (retransmission, delayed ACK), ordered.
    deadlines: BTreeSet<(Instant, SessionId)>,
    /// The timer of each connection that has one, to find it in `deadlines`.
    deadline_of: IdMap<Instant>,
    /// Connections whose set goes after its next egress (so a RST or last ACK still leaves).
    graveyard: Vec<SessionId>,
    /// Where a frame goes that smoltcp builds while the queue is full.
    scratch: Vec<u8>,
    /// Each connection's buffer memory and the whole pages inside its buffers. Declared after
    /// `sets`, so dropped after it: the sockets borrow this memory.
    pages: IdMap<Buffers>,
    /// The mappings of ended connections, for the next ones. Declared after `sets`.
    pool: MappingPool,
    /// Connections egress polled since the last quiet check (every segment in or out makes
    /// its connection dirty, hence polled), and those of the check before: one in `was_active`
    /// but not in `active`, and not dirty now, has been quiet for a whole period.
    active: IdSet,
    was_active: IdSet,
    /// The next quiet check, while there are connections to check.
    next_quiet_check: Option<Instant>,
    /// Bytes of buffer memory given back so far.
    released: u64,
    /// The backend passes TCP segments longer than the MTU (segmentation offload): smoltcp
    /// works with [`OFFLOAD_MTU`] and clients' SYNs announce the matching MSS to it.
    offload: bool,
}

/// smoltcp's MTU with segmentation offload: the largest IPv4 datagram.
pub const OFFLOAD_MTU: usize = 65535;

impl TcpStack {
    /// A stack for the virtual host at `ip`/`mask`, with `seed` for smoltcp's initial
    /// sequence numbers (take it from a real random source).
    pub fn new(seed: u64, mtu: usize, ip: Ipv4Addr, mask: Ipv4Addr, now: Instant) -> Self {
        TcpStack {
            iface: interface(seed, mtu, ip, mask, now),
            seed,
            sets: IdMap::default(),
            empty: SocketSet::new(Vec::new()),
            dirty: IdSet::default(),
            deadlines: BTreeSet::new(),
            deadline_of: IdMap::default(),
            graveyard: Vec::new(),
            scratch: Vec::new(),
            pages: IdMap::default(),
            pool: MappingPool::default(),
            active: IdSet::default(),
            was_active: IdSet::default(),
            next_quiet_check: None,
            released: 0,
            offload: false,
        }
    }

    /// A new interface for a new address or MTU. The connections live in their own socket
    /// sets and carry on; the new MTU bounds their segments from the next poll.
    pub fn rebuild(&mut self, mtu: usize, ip: Ipv4Addr, mask: Ipv4Addr, now: Instant) {
        let mtu = self.segment_mtu(mtu);
        self.iface = interface(self.seed.wrapping_add(1), mtu, ip, mask, now);
        self.seed = self.seed.wrapping_add(1);
    }

    /// Turns segmentation offload on or off (the backend's capability), rebuilding the
    /// interface with the MTU smoltcp then works with.
    pub fn set_offload(
        &mut self,
        on: bool,
        mtu: usize,
        ip: Ipv4Addr,
        mask: Ipv4Addr,
        now: Instant,
    ) {
        self.offload = on;
        self.rebuild(mtu, ip, mask, now);
    }

    /// The MTU smoltcp works with on a link of MTU `mtu`.
    fn segment_mtu(&self, mtu: usize) -> usize {
        if self.offload {
            OFFLOAD_MTU.max(mtu)
        } else {
            mtu
        }
    }

    /// The state of connection `id`'s socket.
    pub fn state(&self, id: SessionId) -> Option<tcp::State> {
        let (set, handle) = self.sets.get(&id)?;
        Some(set.get::<tcp::Socket>(*handle).state())
    }

    /// Whether connection `id` has a socket that is not closed yet.
    pub fn is_open(&self, id: SessionId) -> bool {
        self.state(id)
            .is_some_and(|s| !matches!(s, tcp::State::Closed | tcp::State::TimeWait))
    }

    /// Creates connection `id`'s socket, listening where the client's SYN went; the client's
    /// bytes start at sequence number `syn_end`.
    fn accept(&mut self, id: SessionId, addr: Ipv4Addr, port: u16, buffer: usize, syn_end: u32) {
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let (socket, mut buffers) = listener(addr, port, buffer, &mut self.pool);
        buffers.syn_end = Some(syn_end);
        let handle = set.add(socket);
        self.sets.insert(id, (set, handle));
        self.pages.insert(id, buffers);
    }

    /// Notes that the client has sent connection `id` everything before sequence number `end`
    /// (the end of the segment about to be fed to it).
    fn note_received(&mut self, id: SessionId, end: u32) {
        if let Some(b) = self.pages.get_mut(&id) {
            if b.received.is_none_or(|r| seq_after(end, r)) {
                b.received = Some(end);
            }
            // A segment ending past the receive buffer's first page, or before the client's
            // first byte (which cannot be told from 4 GiB later).
            if b.syn_end
                .is_none_or(|s| end.wrapping_sub(s) as usize > page_size())
            {
                b.far = true;
            }
        }
    }

    /// Feeds one segment to connection `id`'s set and returns the socket's state afterwards;
    /// `None`, with nothing fed, while `id` has no socket yet (its connect is under way).
    /// Without `id`, the segment goes to the empty set, which answers it with a RST.
    fn ingress(
        &mut self,
        now: Instant,
        link: &mut Link,
        our_mac: EthernetAddress,
        mtu: usize,
        packet: &[u8],
        id: Option<SessionId>,
    ) -> Option<tcp::State> {
        let mtu = self.segment_mtu(mtu);
        let mut device = PollDevice {
            rx: Some(packet),
            link,
            our_mac,
            mtu,
            scratch: &mut self.scratch,
            acked: id
                .and_then(|id| self.pages.get_mut(&id))
                .map(|b| &mut b.acked),
        };
        match id {
            Some(id) => {
                let (set, handle) = self.sets.get_mut(&id)?;
                let _ = self.iface.poll_ingress_single(now, &mut device, set);
                self.dirty.insert(id);
                Some(set.get::<tcp::Socket>(*handle).state())
            }
            None => {
                let _ = self
                    .iface
                    .poll_ingress_single(now, &mut device, &mut self.empty);
                None
            }
        }
    }

    /// Runs egress for the connections that are dirty or have a timer due, and frees buried
    /// ones. Returns the polled connections whose socket is now closed (or in TIME-WAIT): the
    /// only ones that may be over.
    fn egress(
        &mut self,
        now: Instant,
        link: &mut Link,
        our_mac: EthernetAddress,
        mtu: usize,
    ) -> Vec<SessionId> {
        let mut closed = Vec::new();
        if !self.wants_poll(now) {
            return closed;
        }
        let mtu = self.segment_mtu(mtu);
        if self.next_quiet_check.is_some_and(|t| t <= now) {
            self.release_quiet(now);
        }
        let mut ids: Vec<SessionId> = self.dirty.drain().collect();
        self.take_due(now, &mut ids);
        ids.extend(self.graveyard.iter().copied());
        ids.sort_unstable();
        ids.dedup();
        for (i, &id) in ids.iter().enumerate() {
            if link.tx.is_full() {
                // Back-pressure: the rest goes out after the driver has sent this batch.
                self.dirty.extend(ids[i..].iter().copied());
                break;
            }
            let Some((set, handle)) = self.sets.get_mut(&id) else {
                continue;
            };
            let mut device = PollDevice {
                rx: None,
                link,
                our_mac,
                mtu,
                scratch: &mut self.scratch,
                acked: self.pages.get_mut(&id).map(|b| &mut b.acked),
            };
            // Each egress pass sends at most one segment per socket: go on while it sends.
            while self.iface.poll_egress(now, &mut device, set)
                == smoltcp::iface::PollResult::SocketStateChanged
            {}
            let at = self.iface.poll_at(now, set);
            self.active.insert(id);
            if matches!(
                set.get::<tcp::Socket>(*handle).state(),
                tcp::State::Closed | tcp::State::TimeWait
            ) {
                closed.push(id);
            }
            self.set_deadline(id, at);
        }
        let graveyard = std::mem::take(&mut self.graveyard);
        for id in graveyard {
            if self.dirty.contains(&id) {
                self.graveyard.push(id);
            } else {
                self.sets.remove(&id);
                // The socket is gone: the mapping of a connection that touched only the first
                // page of each buffer serves the next one.
                if let Some(Buffers {
                    mapping: Some(mapping),
                    far: false,
                    ..
                }) = self.pages.remove(&id)
                {
                    self.pool.give(mapping);
                }
                self.set_deadline(id, None);
            }
        }
        if self.next_quiet_check.is_none() && !self.active.is_empty() {
            self.next_quiet_check = Some(now + QUIET_AFTER.into());
        }
        closed
    }

    /// The quiet check: a connection that was active in the period before the last and not
    /// in the last, with both buffers empty, gives its buffers' memory back.
    fn release_quiet(&mut self, now: Instant) {
        let was = std::mem::replace(&mut self.was_active, std::mem::take(&mut self.active));
        for id in was {
            if self.was_active.contains(&id) || self.dirty.contains(&id) {
                continue;
            }
            let (Some((set, handle)), Some(pages)) = (self.sets.get(&id), self.pages.get(&id))
            else {
                continue;
            };
            let socket = set.get::<tcp::Socket>(*handle);
            if socket.recv_queue() != 0 || socket.send_queue() != 0 {
                // Bytes wait (a client's closed window, a host that does not read): they stay,
                // and so does the memory; the next segment makes it active again.
                continue;
            }
            // The receive buffer also holds what came out of order, past a gap (smoltcp's
            // assembler, which it does not show): while the client has sent more than was
            // acknowledged, those bytes are still needed and the buffer's pages stay.
            let gap = match (pages.received, pages.acked) {
                (Some(received), Some(acked)) => seq_after(received, acked),
                (Some(_), None) => true,
                (None, _) => false,
            };
            let keep = usize::from(gap);
            for p in pages.pages.iter().skip(keep).flatten() {
                // SAFETY: the buffers belong to the socket in `sets`, which lives, and nothing
                // borrows them now (the `socket` reference above is no longer used); both are
                // empty, so smoltcp reads none of their bytes before writing them again.
                self.released += unsafe { p.release() } as u64;
            }
        }
        self.next_quiet_check = (!self.was_active.is_empty()).then(|| now + QUIET_AFTER.into());
    }

    /// The whole pages inside connection `id`'s receive and send buffers.
    #[cfg(test)]
    pub(super) fn buffer_pages(&self, id: SessionId) -> BufferPages {
        self.pages.get(&id).map(|b| b.pages).unwrap_or_default()
    }

    /// How many mappings of ended connections wait for new ones.
    #[cfg(test)]
    pub(super) fn pooled_mappings(&self) -> usize {
        self.pool.kept()
    }

    /// Bytes of buffer memory given back to the system so far (pages that were in memory).
    pub fn released_bytes(&self) -> u64 {
        self.released
    }

    /// Connection `id` is over: its socket is aborted (a RST to the client) when `abort` and
    /// still open, and its set goes after the next egress.
    pub(super) fn bury(&mut self, id: SessionId, abort: bool) {
        let Some((set, handle)) = self.sets.get_mut(&id) else {
            return;
        };
        let socket = set.get_mut::<tcp::Socket>(*handle);
        if abort && !matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
            socket.abort();
        }
        if !self.graveyard.contains(&id) {
            self.graveyard.push(id);
        }
        self.dirty.insert(id);
    }

    /// Whether egress has work at `now`.
    pub fn wants_poll(&self, now: Instant) -> bool {
        !self.dirty.is_empty()
            || !self.graveyard.is_empty()
            || self.next_deadline().is_some_and(|t| t <= now)
    }

    /// The earliest timer of any connection, or the next quiet check.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timer = self.deadlines.first().map(|(t, _)| *t);
        match (timer, self.next_quiet_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn set_deadline(&mut self, id: SessionId, at: Option<Instant>) {
        if let Some(old) = self.deadline_of.remove(&id) {
            self.deadlines.remove(&(old, id));
        }
        if let Some(at) = at {
            self.deadlines.insert((at, id));
            self.deadline_of.insert(id, at);
        }
    }

    fn take_due(&mut self, now: Instant, out: &mut Vec<SessionId>) {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            self.deadline_of.remove(&id);
            out.push(id);
        }
    }

    fn socket_mut(&mut self, id: SessionId) -> Option<&mut tcp::Socket<'static>> {
        let (set, handle) = self.sets.get_mut(&id)?;
        Some(set.get_mut::<tcp::Socket>(*handle))
    }
}

impl std::fmt::Debug for TcpStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStack")
            .field("connections", &self.sets.len())
            .field("graveyard", &self.graveyard.len())
            .finish_non_exhaustive()
    }
}

impl VirtualHost {
    pub(super) fn nat_tcp_in(
        &mut self,
        now: Instant,
        mac: [u8; 6],
        p: &Ipv4Packet<&[u8]>,
    ) -> Result<(), smoltcp::wire::Error> {
        let seg = TcpPacket::new_checked(p.payload())?;
        if seg.src_port() == 0 || seg.dst_port() == 0 {
            // Port 0 is not a port (smoltcp cannot even listen on it): malformed.
            return Err(smoltcp::wire::Error);
        }
        // Checked here, before the segment opens, feeds or ends anything (smoltcp checks none):
        // a frame whose checksum the backend vouched for needs no check.
        if !self.rx_checksum_verified
            && !seg.verify_checksum(&p.src_addr().into(), &p.dst_addr().into())
        {
            return Err(smoltcp::wire::Error);
        }
        let key = FlowKey {
            protocol: Protocol::Tcp,
            client: SocketAddrV4::new(p.src_addr(), seg.src_port()),
            remote: SocketAddrV4::new(p.dst_addr(), seg.dst_port()),
        };
        if let Some(id) = self.nat.table.find(&key) {
            if let Some(s) = self.nat.table.get_mut(id) {
                s.last_activity = now;
            }
            let end = (seg.seq_number().0 as u32).wrapping_add(seg.segment_len() as u32);
            self.nat.stack.note_received(id, end);
            match self.stack_ingress(now, p.as_ref(), Some(id)) {
                Some(state) => self.tcp_after_ingress(id, seg.rst(), state, now),
                // The client gave up while we connect: the connect is cancelled.
                None if seg.rst() => self.end_session(id, EndReason::ResetByClient, now),
                // A retransmitted SYN while we connect: the SYN-ACK comes when the connect
                // does.
                None => {}
            }
            return Ok(());
        }
        let to_us = p.dst_addr() == self.settings.host.ip;
        // A SYN with FIN (a scanner's probe, never a real client's) opens nothing.
        if seg.syn() && !seg.ack() && !seg.rst() && !seg.fin() && (!to_us || seg.dst_port() == 53) {
            self.admit(now, key, mac, p);
            return Ok(());
        }
        // A segment nobody owns (or TCP to one of our ports we do not serve): smoltcp answers
        // it with a RST.
        self.stack_ingress(now, p.as_ref(), None);
        Ok(())
    }

    /// An admitted TCP flow: the SYN waits until the outbound connect succeeds.
    pub(super) fn tcp_start(&mut self, id: SessionId, syn: &[u8], target: SocketAddr) {
        self.nat.pending_syns.insert(id, syn.to_vec());
        self.nat.push_op(OpRecord::TcpConnect(id, target));
    }

    fn stack_ingress(
        &mut self,
        now: Instant,
        packet: &[u8],
        id: Option<SessionId>,
    ) -> Option<tcp::State> {
        let host = self.settings.host;
        self.nat
            .stack
            .ingress(now, &mut self.link, host.mac, host.mtu, packet, id)
    }

    /// Notes what a segment from the client did to connection `id` (now in `state`): its
    /// FIN, its RST.
    fn tcp_after_ingress(&mut self, id: SessionId, rst: bool, state: tcp::State, now: Instant) {
        use tcp::State::*;
        if !rst && matches!(state, Established | SynReceived | FinWait1 | FinWait2) {
            // The common case, every data segment: nothing closed.
            return;
        }
        let Some(s) = self.nat.table.get_mut(id) else {
            return;
        };
        if rst && state == Closed {
            s.tcp.client_reset = true;
        } else if matches!(state, CloseWait | LastAck | Closing | TimeWait) && !s.tcp.client_fin {
            s.tcp.client_fin = true;
            if !s.tcp.host_eof {
                s.tcp.client_closed_first = true;
            }
        }
        self.tcp_check_end(id, now);
    }

    /// Ends connection `id` if it is over, with the reason it is over.
    fn tcp_check_end(&mut self, id: SessionId, now: Instant) {
        let Some(state) = self.nat.stack.state(id) else {
            return;
        };
        if !matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
            return;
        }
        let Some(s) = self.nat.table.get(id) else {
            return;
        };
        let t = s.tcp;
        let reason = if t.client_reset {
            EndReason::ResetByClient
        } else if t.host_eof && t.write_shut {
            if t.client_closed_first {
                EndReason::ClosedByClient
            } else {
                EndReason::ClosedByRemote
            }
        } else if t.client_fin && !t.write_shut {
            // Closed, but the relay still has the client's last bytes and FIN to carry.
            return;
        } else {
            // Closed with neither a FIN carried nor a RST seen: smoltcp gave up on the client.
            EndReason::ResetByClient
        };
        self.end_session(id, reason, now);
    }

    pub(super) fn tcp_host_event(&mut self, id: SessionId, event: HostEvent<'_>, now: Instant) {
        match event {
            HostEvent::Connected => self.tcp_connected(id, now),
            HostEvent::ConnectFailed(e) => self.tcp_connect_failed(id, e, now),
            HostEvent::EndOfStream => {
                if let Some(socket) = self.nat.stack.socket_mut(id) {
                    socket.close();
                }
                if let Some(s) = self.nat.table.get_mut(id) {
                    s.tcp.host_eof = true;
                    s.state = if s.tcp.write_shut {
                        SessionState::Closing
                    } else {
                        SessionState::HostClosed
                    };
                }
                self.nat.stack.dirty.insert(id);
                self.tcp_check_end(id, now);
            }
            HostEvent::WriteShut => {
                if let Some(s) = self.nat.table.get_mut(id) {
                    s.tcp.write_shut = true;
                    s.state = if s.tcp.host_eof {
                        SessionState::Closing
                    } else {
                        SessionState::ClientClosed
                    };
                }
                self.tcp_check_end(id, now);
            }
            HostEvent::Reset => self.end_session(id, EndReason::ResetByRemote, now),
            HostEvent::Error(e) => {
                let reason = match HostError::from_io(e) {
                    HostError::TimedOut
                    | HostError::HostUnreachable
                    | HostError::NetUnreachable => EndReason::Unreachable,
                    _ => EndReason::ResetByRemote,
                };
                tracing::debug!(session = %id, error = %e, "nat: tcp host socket error");
                self.end_session(id, reason, now);
            }
            HostEvent::OpenFailed(_) | HostEvent::SendFailed(_) => {}
        }
    }

    /// The outbound connection of `id` is up: the client gets its SYN-ACK.
    fn tcp_connected(&mut self, id: SessionId, now: Instant) {
        let Some(mut syn) = self.nat.pending_syns.remove(&id) else {
            return;
        };
        if self.nat.stack.offload {
            // The client's MSS is that of its link; the backend cuts our segments to it.
            raise_mss(&mut syn, (OFFLOAD_MTU - 40) as u16);
        }
        let Ok(p) = Ipv4Packet::new_checked(&syn[..]) else {
            return;
        };
        let Ok(seg) = TcpPacket::new_checked(p.payload()) else {
            return;
        };
        let buffer = self.settings.nat.tcp_buffer;
        // The client's first byte (any bytes riding on the SYN count as after it).
        let syn_end = (seg.seq_number().0 as u32).wrapping_add(1);
        self.nat
            .stack
            .accept(id, p.dst_addr(), seg.dst_port(), buffer, syn_end);
        let end = syn_end.wrapping_add(seg.payload().len() as u32);
        self.nat.stack.note_received(id, end);
        // Now the SYN goes in, and the SYN-ACK out with the next poll.
        self.stack_ingress(now, &syn, Some(id));
        if let Some(s) = self.nat.table.get_mut(id) {
            s.state = SessionState::Established;
            s.last_activity = now;
            s.synack_at = Some(now);
            let key = s.key;
            self.nat.events.push_back(NatEvent::Connected { id, key });
        }
        self.schedule_session_idle(id);
    }

    /// The outbound connection of `id` failed. For the DNS redirect the next upstream is tried
    /// (a new `TcpConnect` op); otherwise the client gets a RST (refused, local error) or an
    /// ICMP unreachable (host or network unreachable, timed out, prohibited) and the session
    /// ends.
    fn tcp_connect_failed(&mut self, id: SessionId, error: &std::io::Error, now: Instant) {
        let Some(session) = self.nat.table.get(id) else {
            return;
        };
        let (key, target) = (session.key, session.target);
        if key.remote.port() == 53 && *key.remote.ip() == self.settings.host.ip {
            let ups = &self.settings.nat.dns_upstreams;
            if let Some(pos) = ups.iter().position(|u| *u == target) {
                if let Some(&next) = ups.get(pos + 1) {
                    if let Some(s) = self.nat.table.get_mut(id) {
                        s.target = next;
                    }
                    tracing::debug!(%next, "dns over tcp: upstream failed, trying the next");
                    self.nat.push_op(OpRecord::TcpConnect(id, next));
                    return;
                }
            }
        }
        let kind = HostError::from_io(error);
        let reason = match kind {
            HostError::Refused => kind.as_str().to_owned(),
            _ => format!("{}: {error}", kind.as_str()),
        };
        self.nat
            .events
            .push_back(NatEvent::Failed { id, key, reason });
        let (answer, end) = match kind {
            HostError::HostUnreachable | HostError::TimedOut => (
                Some(Icmpv4DstUnreachable::HostUnreachable),
                EndReason::Unreachable,
            ),
            HostError::NetUnreachable => (
                Some(Icmpv4DstUnreachable::NetUnreachable),
                EndReason::Unreachable,
            ),
            HostError::Prohibited => (
                Some(Icmpv4DstUnreachable::CommProhibited),
                EndReason::Unreachable,
            ),
            HostError::Resources => (None, EndReason::Limit),
            HostError::Refused | HostError::Reset | HostError::Other => (None, EndReason::Refused),
        };
        if let Some(syn) = self.nat.pending_syns.remove(&id) {
            if let Ok(p) = Ipv4Packet::new_checked(&syn[..]) {
                let host = self.settings.host;
                match answer {
                    Some(code) => self.link.push_unreachable(&host, host.ip, &p, code),
                    None => self.link.push_rst_for_syn(&host, &p),
                }
            }
        }
        self.end_session(id, end, now);
    }

    /// The relay of TCP session `id`, for one synchronous step; `None` when the session is
    /// gone (end the relay task).
    pub fn nat_tcp_relay(&mut self, id: SessionId, now: Instant) -> Option<TcpRelay<'_>> {
        let session = self.nat.table.get_mut(id)?;
        let stack = &mut self.nat.stack;
        let (set, handle) = stack.sets.get_mut(&id)?;
        let socket = set.get_mut::<tcp::Socket>(*handle);
        Some(TcpRelay {
            socket,
            session,
            buffers: stack.pages.get_mut(&id),
            now,
            dirty: &mut stack.dirty,
        })
    }

    /// Runs smoltcp's egress (ACKs, data, retransmissions) for the connections that have
    /// something to send or a timer due, frees finished ones, and ends the connections that
    /// are over. Call after every batch of inputs, before
    /// [`take_transmit`](VirtualHost::take_transmit). When the transmit queue fills up, the
    /// rest waits for the next call ([`wants_poll`](VirtualHost::wants_poll)).
    pub fn poll(&mut self, now: Instant) {
        self.now = now;
        let host = self.settings.host;
        let closed = self
            .nat
            .stack
            .egress(now, &mut self.link, host.mac, host.mtu);
        self.nat.counters.buffer_bytes_released = self.nat.stack.released_bytes();
        for id in closed {
            if self.nat.table.get(id).is_some() {
                self.tcp_check_end(id, now);
            }
        }
    }
}

/// Sets the MSS option of the SYN `packet` (an IPv4 packet) to `mss` if it has one, and fixes
/// the TCP checksum.
fn raise_mss(packet: &mut [u8], mss: u16) {
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut packet[..]) else {
        return;
    };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let Ok(mut seg) = TcpPacket::new_checked(ip.payload_mut()) else {
        return;
    };
    let opts = seg.options_mut();
    let mut i = 0;
    let mut changed = false;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else { break };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    break;
                }
                if kind == 2 && len == 4 {
                    opts[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    changed = true;
                }
                i += len;
            }
        }
    }
    if changed {
        seg.fill_checksum(&src.into(), &dst.into());
    }
}

/// What the driver's relay task can do with one connection. Borrowed from the core for one
/// synchronous step; never held across an `.await`. What the relay learns about the host
/// socket (EOF, reset, write side shut) goes back as a [`HostEvent`].
pub struct TcpRelay<'a> {
    socket: &'a mut tcp::Socket<'static>,
    session: &'a mut super::table::Session,
    buffers: Option<&'a mut Buffers>,
    now: Instant,
    dirty: &'a mut IdSet,
}

impl TcpRelay<'_> {
    /// Bytes from the client are waiting to go to the host.
    pub fn has_client_data(&self) -> bool {
        self.socket.can_recv()
    }

    /// The client has sent its FIN and every byte before it was taken: shut down the host
    /// socket's write side and report [`HostEvent::WriteShut`]. Never true after a RST.
    pub fn client_finished(&self) -> bool {
        let t = self.session.tcp;
        t.client_fin && !t.write_shut && !t.client_reset && !self.socket.can_recv()
    }

    /// There is room for bytes from the host.
    pub fn has_room(&self) -> bool {
        self.socket.can_send()
    }

    /// The connection can still carry bytes to the client.
    pub fn may_send(&self) -> bool {
        self.socket.may_send() && !self.session.tcp.host_eof
    }

    /// Hands the client's bytes to `write` (which returns how many it took). The taken bytes
    /// leave smoltcp's buffer, opening the window.
    pub fn take_client_data(
        &mut self,
        write: impl FnOnce(&[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let r = self
            .socket
            .recv(|data| match write(data) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            })
            .unwrap_or(Ok(0))?;
        if r > 0 {
            self.session.count_out(r, self.now);
            self.dirty.insert(self.session.id);
        }
        Ok(r)
    }

    /// Lets `read` fill smoltcp's send buffer from the host; `Ok(0)` from `read` is the host's
    /// EOF (report [`HostEvent::EndOfStream`]).
    pub fn fill_from_host(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let r = self
            .socket
            .send(|buf| match read(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            })
            .unwrap_or(Ok(0))?;
        if r > 0 {
            self.session.count_in(r, self.now);
            self.dirty.insert(self.session.id);
            if self.session.bytes_in > page_size() as u64 {
                if let Some(b) = self.buffers.as_deref_mut() {
                    b.far = true;
                }
            }
        }
        Ok(r)
    }

    /// Every byte given to the connection has been acknowledged by the client.
    pub fn all_sent(&self) -> bool {
        self.socket.send_queue() == 0
    }

    /// Registers `waker` for any change of the connection (data, room, FIN, RST).
    pub fn register_waker(&mut self, waker: &std::task::Waker) {
        self.socket.register_recv_waker(waker);
        self.socket.register_send_waker(waker);
    }
}
