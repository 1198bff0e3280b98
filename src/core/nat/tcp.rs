//! The TCP half of the NAT: smoltcp terminates each client connection, and the driver relays
//! its bytes to a host `TcpStream` through [`TcpRelay`].
//!
//! # Theory of operation
//!
//! smoltcp runs with `Medium::Ip` behind the core's own Ethernet layer and with AnyIP, so a
//! socket can listen on any destination a client dials (DESIGN.md, "Known pitfalls"). Only TCP
//! reaches it.
//!
//! - **SYN deferral.** The SYN of a new flow is kept aside (retransmissions are dropped) while
//!   the driver connects to the remote. On success a socket listening on exactly the SYN's
//!   destination is created and the SYN is fed to it: the SYN-ACK goes out. On failure the
//!   client gets a RST (refused) or an ICMP host unreachable quoting its SYN (unreachable,
//!   timed out), and no socket or buffer was ever allocated — a SYN flood costs a table row
//!   per SYN, bounded by the session limits. (smoltcp's `pause_synack` would do the same with
//!   a socket per pending SYN, but a paused socket asks to be polled "now" forever.) Each
//!   segment is fed in on its own ([`Interface::poll_ingress_single`]) so that the socket
//!   created for a SYN is the one that takes it.
//! - **Relay.** [`TcpRelay`] lends the driver the socket's buffers: the bytes the client sent
//!   are written to the host socket straight from smoltcp's receive buffer, and the host
//!   socket is read straight into smoltcp's send buffer — one copy per direction.
//! - **Half-close.** The client's FIN shows as `!may_recv()` once the buffer is drained: the
//!   driver shuts down the host socket's write side. The host's EOF becomes `close()`: a FIN to
//!   the client once the buffer is sent.
//! - **End.** A socket that is closed (both FINs, a RST, or an abort) ends the session; its
//!   set waits one egress poll in the graveyard so that an abort's RST is still sent.
//! - **Dispatch.** Each connection has a socket set of its own ([`TcpStack`]): a segment goes
//!   to its connection's set, and egress polls only the connections that have something to
//!   send (marked dirty) or a timer due.
//!
//! Buffers: `nat.tcp_buffer` bytes each way per connection (1 MiB by default). Their size sets
//! the window towards the client: 1 MiB gives window scale 5, ~10 Gbit/s through a TAP device
//! at MTU 65520, where 256 KiB gives ~7.5 (`scripts/bench-nat.sh`). `benches/core_sessions.rs`
//! measures the memory it costs with many sessions.

use std::collections::{BTreeSet, HashMap, HashSet};

use hubnat_backend::FrameBatch;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, ETHERNET_HEADER_LEN,
};

use super::super::Neighbours;
use super::table::SessionId;

/// A fresh socket listening on `(addr, port)`, created when the outbound connect succeeded,
/// just before the client's SYN is fed to it.
pub fn listener(addr: std::net::Ipv4Addr, port: u16, buffer: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    s.set_nagle_enabled(true);
    s.set_congestion_control(tcp::CongestionControl::Cubic);
    s.listen(smoltcp::wire::IpListenEndpoint {
        addr: Some(addr.into()),
        port,
    })
    .expect("invariant: a fresh socket with a non-zero port can listen");
    s
}

/// The smoltcp device for one poll: at most one received IP packet, and the core's transmit
/// batch, where each IP packet smoltcp emits gets its Ethernet header from the neighbour table.
pub struct PollDevice<'a> {
    pub rx: Option<&'a [u8]>,
    pub tx: &'a mut FrameBatch,
    pub neighbours: &'a Neighbours,
    pub our_mac: EthernetAddress,
    pub mtu: usize,
    pub scratch: &'a mut Vec<u8>,
    pub dropped: &'a mut u64,
}

pub struct Rx<'a>(&'a [u8]);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

pub struct Tx<'a> {
    tx: &'a mut FrameBatch,
    neighbours: &'a Neighbours,
    our_mac: EthernetAddress,
    scratch: &'a mut Vec<u8>,
    dropped: &'a mut u64,
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut result = None;
        let mut f = Some(f);
        let pushed = self.tx.push_built(ETHERNET_HEADER_LEN + len, |buf| {
            let (head, packet) = buf.split_at_mut(ETHERNET_HEADER_LEN);
            result = Some((f.take().expect("invariant: called once"))(packet));
            let dst_ip = std::net::Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let dst_mac = self
                .neighbours
                .lookup(dst_ip)
                .unwrap_or(EthernetAddress::BROADCAST);
            let eth = EthernetRepr {
                src_addr: self.our_mac,
                dst_addr: dst_mac,
                ethertype: EthernetProtocol::Ipv4,
            };
            eth.emit(&mut EthernetFrame::new_unchecked(head));
        });
        if pushed {
            return result.expect("invariant: builder ran");
        }
        // The batch is full: build into scratch and drop (a congested link drops too).
        *self.dropped += 1;
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
                tx: self.tx,
                neighbours: self.neighbours,
                our_mac: self.our_mac,
                scratch: self.scratch,
                dropped: self.dropped,
            },
        ))
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        // A full batch says "not now": smoltcp keeps the segment and sends it on the next poll,
        // after the driver has flushed the batch. (Accepting and dropping it would make smoltcp
        // think it was sent, and recover with a retransmission and a smaller window.)
        if self.tx.is_full() {
            return None;
        }
        Some(Tx {
            tx: self.tx,
            neighbours: self.neighbours,
            our_mac: self.our_mac,
            scratch: self.scratch,
            dropped: self.dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        // The core verified the IPv4 header checksum of every packet it hands over; smoltcp
        // still checks TCP checksums, and fills in both on the way out.
        caps.checksum.ipv4 = phy::Checksum::Tx;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = None;
        caps
    }
}

/// The smoltcp side of the NAT: the interface, and one socket set per connection.
///
/// smoltcp looks through the whole socket set for every segment it takes in and on every
/// egress poll. With a set of one socket per connection, the core finds the set by flow (a
/// hash lookup) and smoltcp's own search is over a single socket: the cost per segment no
/// longer grows with the number of connections (`benches/core_sessions.rs`).
pub struct TcpStack {
    pub iface: Interface,
    /// Each connection's set and the handle of its socket in it.
    pub sets: HashMap<SessionId, (SocketSet<'static>, SocketHandle)>,
    /// The set for segments no connection owns: smoltcp answers them with a RST.
    pub empty: SocketSet<'static>,
    /// Connections whose socket may have something to send.
    pub dirty: HashSet<SessionId>,
    /// Each connection's next timer (retransmission, delayed ACK), ordered.
    pub deadlines: BTreeSet<(Instant, SessionId)>,
    /// The timer of each connection that has one, to find it in `deadlines`.
    pub deadline_of: HashMap<SessionId, Instant>,
    /// Connections whose set goes after its next egress (so a RST or last ACK still leaves).
    pub graveyard: Vec<SessionId>,
}

impl TcpStack {
    /// A stack around `iface`.
    pub fn new(iface: Interface) -> Self {
        TcpStack {
            iface,
            sets: HashMap::new(),
            empty: SocketSet::new(Vec::new()),
            dirty: HashSet::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            graveyard: Vec::new(),
        }
    }

    /// The earliest timer of any connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Records connection `id`'s next timer after a poll.
    pub fn set_deadline(&mut self, id: SessionId, at: Option<Instant>) {
        if let Some(old) = self.deadline_of.remove(&id) {
            self.deadlines.remove(&(old, id));
        }
        if let Some(at) = at {
            self.deadlines.insert((at, id));
            self.deadline_of.insert(id, at);
        }
    }

    /// Connections with a timer due at `now` (their timers are taken off).
    pub fn take_due(&mut self, now: Instant, out: &mut Vec<SessionId>) {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            self.deadline_of.remove(&id);
            out.push(id);
        }
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

/// What the driver's relay task can do with one connection. Borrowed from the core for one
/// synchronous step; never held across an `.await`.
pub struct TcpRelay<'a> {
    pub(super) socket: &'a mut tcp::Socket<'static>,
    pub(super) session: &'a mut super::table::Session,
    pub(super) now: Instant,
    pub(super) dirty: &'a mut HashSet<SessionId>,
}

impl TcpRelay<'_> {
    /// Bytes from the client are waiting to go to the host.
    pub fn has_client_data(&self) -> bool {
        self.socket.can_recv()
    }

    /// The client has sent its FIN and every byte before it was taken: shut down the host
    /// socket's write side.
    pub fn client_finished(&self) -> bool {
        !self.socket.may_recv()
            && !self.socket.can_recv()
            && self.socket.state() != tcp::State::SynReceived
    }

    /// There is room for bytes from the host.
    pub fn has_room(&self) -> bool {
        self.socket.can_send()
    }

    /// The connection can still carry bytes to the client.
    pub fn may_send(&self) -> bool {
        self.socket.may_send()
    }

    /// The connection is over (closed, reset, timed out): end the relay.
    pub fn is_closed(&self) -> bool {
        matches!(
            self.socket.state(),
            tcp::State::Closed | tcp::State::TimeWait
        )
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
    /// EOF (call [`host_finished`](Self::host_finished)).
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
        }
        Ok(r)
    }

    /// The host sent EOF: FIN to the client after the buffered bytes.
    pub fn host_finished(&mut self) {
        self.socket.close();
        if self.session.state == super::table::SessionState::ClientClosed {
            self.session.state = super::table::SessionState::Closing;
        } else {
            self.session.state = super::table::SessionState::HostClosed;
        }
        self.dirty.insert(self.session.id);
    }

    /// The client's FIN was carried to the host.
    pub fn client_finish_done(&mut self) {
        if self.session.state == super::table::SessionState::HostClosed {
            self.session.state = super::table::SessionState::Closing;
        } else if self.session.state == super::table::SessionState::Established {
            self.session.state = super::table::SessionState::ClientClosed;
        }
    }

    /// The host reset the connection: RST to the client.
    pub fn host_reset(&mut self) {
        self.socket.abort();
        self.session.state = super::table::SessionState::Closing;
        self.dirty.insert(self.session.id);
    }

    /// Registers `waker` for any change of the connection (data, room, FIN, RST).
    pub fn register_waker(&mut self, waker: &std::task::Waker) {
        self.socket.register_recv_waker(waker);
        self.socket.register_send_waker(waker);
    }
}
