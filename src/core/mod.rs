//! The virtual host core: sans-IO.
//!
//! # Theory of operation
//!
//! [`VirtualHost`] is one host on the virtual segment. It owns no socket, no file and no
//! clock; the driver feeds it and drains it:
//!
//! - **in:** [`handle_frame`](VirtualHost::handle_frame) for each frame from the segment,
//!   [`handle_timeout`](VirtualHost::handle_timeout) when [`poll_timeout`](VirtualHost::poll_timeout)
//!   comes due;
//! - **out:** [`take_transmit`](VirtualHost::take_transmit) for the frames to send (call it after
//!   every batch of inputs), [`poll_event`](VirtualHost::poll_event) for what the security log
//!   and the lease store need to know, until it returns `None`.
//!
//! Time is a [`Instant`] counted from the Unix epoch (the driver passes wall-clock time), so
//! lease expiry times survive a restart.
//!
//! What the host does with a frame:
//!
//! | frame                                   | handled by                      |
//! |-----------------------------------------|---------------------------------|
//! | ARP request for our address             | [`arp`]: reply                  |
//! | ICMP echo request to our address        | [`icmp`]: reply                 |
//! | UDP to port 67 (broadcast or ours)      | [`dhcp`]: the DHCP server       |
//! | anything else                           | dropped and counted             |
//!
//! A frame that does not parse is dropped and counted in [`Counters::malformed`]; nothing a
//! client sends can make the core panic. Frames for other MAC addresses (the segment is a hub)
//! are counted in [`Counters::not_for_us`] and ignored.

pub mod arp;
pub mod dhcp;
pub mod dns;
mod frame;
pub mod icmp;
pub mod nat;
pub mod subnet;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use dhcproto::{Decodable, Decoder, Encodable};
use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, UdpPacket,
    UdpRepr,
};
use tracing::{debug, trace};

pub use smoltcp::time::Instant;

use dhcp::{DhcpEvent, DhcpServer, DhcpSettings, Lease};
use nat::{NatEvent, NatSettings, NatState};

/// The virtual host's own identity on the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSettings {
    /// Its MAC address.
    pub mac: EthernetAddress,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// The subnet mask of the segment.
    pub mask: Ipv4Addr,
    /// The largest IP packet on the segment (the link MTU).
    pub mtu: usize,
}

impl HostSettings {
    /// Whether `ip` is in the segment's subnet (`ip`/`mask`).
    /// A mask with gaps (which the configuration refuses) leaves the host alone on it.
    pub fn on_segment(&self, ip: Ipv4Addr) -> bool {
        subnet::Subnet::from_mask(self.ip, self.mask).map_or(ip == self.ip, |s| s.contains(ip))
    }
}

/// What the driver must act on.
#[derive(Debug, Clone)]
pub enum Event {
    /// Something happened in the DHCP server (lease created, renewed, …).
    Dhcp(DhcpEvent),
    /// Something happened in the NAT (session created, connected, deleted, refused).
    Nat(NatEvent),
    /// The lease table changed and should be saved.
    LeasesChanged,
}

/// Counters of the core; every dropped frame is in exactly one of them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Frames handed to the core.
    pub frames_in: u64,
    /// Frames the core produced.
    pub frames_out: u64,
    /// Frames that failed to parse (bad lengths, checksums, versions).
    pub malformed: u64,
    /// Frames addressed to another host on the segment.
    pub not_for_us: u64,
    /// Frames for us that nothing handles (yet): other protocols, ports.
    pub unhandled: u64,
    /// IPv4 fragments addressed to the virtual host (not reassembled for its own services).
    pub fragments: u64,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// ICMP echo requests answered.
    pub echo_replies: u64,
    /// DHCP messages that arrived while the DHCP server was disabled.
    pub dhcp_disabled: u64,
    /// Frames dropped because the transmit batch was full.
    pub tx_dropped: u64,
}

/// The neighbour table: where each address on the segment is. Learnt from ARP and from the
/// source of IPv4 frames. Bounded: the oldest entry goes when it is full.
#[derive(Debug, Default)]
pub struct Neighbours {
    map: HashMap<Ipv4Addr, (EthernetAddress, Instant)>,
}

impl Neighbours {
    /// At most this many entries.
    pub const CAPACITY: usize = 4096;

    fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) {
        if !mac.is_unicast() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return;
        }
        if self.map.len() >= Self::CAPACITY && !self.map.contains_key(&ip) {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(ip, _)| *ip)
            {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(ip, (mac, now));
    }

    /// The MAC of `ip`, if known.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        self.map.get(&ip).map(|(mac, _)| *mac)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The virtual host. See the module documentation.
#[derive(Debug)]
pub struct VirtualHost {
    host: HostSettings,
    dhcp: DhcpServer,
    neighbours: Neighbours,
    tx: FrameBatch,
    events: VecDeque<Event>,
    dhcp_events: VecDeque<DhcpEvent>,
    counters: Counters,
    dhcp_buf: Vec<u8>,
    nat: NatState,
    /// The latest time passed in.
    now: Instant,
    /// IPv4 identification of the fragmented datagrams we originate.
    ident: u16,
}

/// How many frames the core queues between two [`VirtualHost::take_transmit`] calls.
pub const TX_QUEUE_FRAMES: usize = 256;

impl VirtualHost {
    /// A host with the given identity, DHCP server and NAT settings, and the leases saved
    /// earlier. `seed` seeds smoltcp's initial sequence numbers and DNS ids: take it from a
    /// real random source.
    pub fn new(
        host: HostSettings,
        dhcp: DhcpSettings,
        leases: Vec<Lease>,
        nat: NatSettings,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut server = DhcpServer::new(dhcp, host.ip, host.mask);
        let skipped = server.restore(leases);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "dhcp: saved leases outside the configured range or reservations were dropped"
            );
        }
        VirtualHost {
            host,
            dhcp: server,
            neighbours: Neighbours::default(),
            tx: FrameBatch::new(TX_QUEUE_FRAMES, host.mtu + 14),
            events: VecDeque::new(),
            dhcp_events: VecDeque::new(),
            counters: Counters::default(),
            dhcp_buf: Vec::with_capacity(1024),
            nat: NatState::new(nat, host.ip, host.mask, seed, now),
            now,
            ident: seed as u16,
        }
    }

    /// The host's identity.
    pub fn host(&self) -> &HostSettings {
        &self.host
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The DHCP server (settings, lease table, counters).
    pub fn dhcp(&self) -> &DhcpServer {
        &self.dhcp
    }

    /// The neighbour table.
    pub fn neighbours(&self) -> &Neighbours {
        &self.neighbours
    }

    /// Turns the DHCP server on or off at run time; leases are kept either way.
    pub fn set_dhcp_enabled(&mut self, enabled: bool) {
        self.dhcp_settings_mut(|s| s.enabled = enabled);
    }

    fn dhcp_settings_mut(&mut self, f: impl FnOnce(&mut DhcpSettings)) {
        let mut settings = self.dhcp.settings().clone();
        f(&mut settings);
        let leases = self.dhcp.pool().iter().cloned().collect();
        let mut server = DhcpServer::new(settings, self.host.ip, self.host.mask);
        server.restore(leases);
        self.dhcp = server;
    }

    /// Swaps the queued outgoing frames into `spare` (which must be empty): no copy. Send them,
    /// clear the batch, and pass it back next time.
    pub fn take_transmit(&mut self, spare: &mut FrameBatch) {
        debug_assert!(spare.is_empty(), "take_transmit wants an empty batch");
        spare.clear();
        std::mem::swap(&mut self.tx, spare);
    }

    /// The next event, if any. Call until `None` after every batch of inputs.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.flush_nat_events();
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let dhcp = self
            .dhcp
            .next_deadline()
            .map(|secs| Instant::from_secs(secs as i64));
        [dhcp, self.nat_deadline()].into_iter().flatten().min()
    }

    /// Does what is due at `now`: lease expiry, offer timeouts, quarantine ends, NAT idle
    /// timeouts, DNS failover, TCP retransmissions.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self
            .dhcp
            .handle_timeout(unix_secs(now), &mut self.dhcp_events)
        {
            self.events.push_back(Event::LeasesChanged);
        }
        self.flush_dhcp_events();
        self.nat_timeout(now);
        self.poll(now);
        self.flush_nat_events();
    }

    /// Handles one frame from the segment.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        self.now = now;
        self.counters.frames_in += 1;
        let before = self.tx.len();
        if self.dispatch(now, frame).is_err() {
            self.counters.malformed += 1;
            trace!(len = frame.len(), "dropped malformed frame");
        }
        self.counters.frames_out += (self.tx.len() - before) as u64;
        if self.tx.is_full() {
            self.counters.tx_dropped += 1;
        }
    }

    fn dispatch(&mut self, now: Instant, frame: &[u8]) -> Result<(), smoltcp::wire::Error> {
        let eth = EthernetFrame::new_checked(frame)?;
        let dst = eth.dst_addr();
        let src = eth.src_addr();
        if !src.is_unicast() {
            return Err(smoltcp::wire::Error);
        }
        if dst != self.host.mac && !dst.is_broadcast() && !dst.is_multicast() {
            self.counters.not_for_us += 1;
            return Ok(());
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let (outcome, learn) =
                    arp::handle(eth.payload(), self.host.mac, self.host.ip, &mut self.tx)?;
                if let Some((ip, mac)) = learn {
                    if self.in_subnet(ip) {
                        self.neighbours.learn(ip, mac, now);
                    }
                }
                if outcome == arp::ArpOutcome::Answered {
                    self.counters.arp_replies += 1;
                }
                Ok(())
            }
            EthernetProtocol::Ipv4 => self.handle_ipv4(now, src, eth.payload()),
            _ => {
                self.counters.unhandled += 1;
                Ok(())
            }
        }
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        self.host.on_segment(ip)
    }

    fn handle_ipv4(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        payload: &[u8],
    ) -> Result<(), smoltcp::wire::Error> {
        let packet = Ipv4Packet::new_checked(payload)?;
        if packet.version() != 4 || !packet.verify_checksum() {
            return Err(smoltcp::wire::Error);
        }
        // Drop Ethernet padding: everything after the IPv4 total length.
        let payload = &payload[..usize::from(packet.total_len())];
        let packet = Ipv4Packet::new_checked(payload)?;
        let (src, dst) = (packet.src_addr(), packet.dst_addr());
        if self.in_subnet(src) && src != self.host.ip {
            self.neighbours.learn(src, src_mac, now);
        }
        let to_us = dst == self.host.ip;
        let broadcast = dst.is_broadcast() || dst == self.subnet_broadcast();
        let fragment = packet.more_frags() || packet.frag_offset() != 0;
        if fragment {
            if to_us || !self.in_subnet(dst) && !broadcast {
                self.counters.fragments += 1;
                return self.nat_ipv4(now, payload);
            }
            self.counters.unhandled += 1;
            return Ok(());
        }
        match packet.next_header() {
            IpProtocol::Icmp if to_us => {
                if icmp::handle_echo(packet.payload(), &self.host, src_mac, src, &mut self.tx)? {
                    self.counters.echo_replies += 1;
                } else {
                    self.counters.unhandled += 1;
                }
                Ok(())
            }
            IpProtocol::Udp if to_us || broadcast => {
                let udp = UdpPacket::new_checked(packet.payload())?;
                let udp_repr = UdpRepr::parse(
                    &udp,
                    &IpAddress::Ipv4(src),
                    &IpAddress::Ipv4(dst),
                    &ChecksumCapabilities::default(),
                )?;
                if udp_repr.dst_port == dhcp::server::SERVER_PORT {
                    self.handle_dhcp(now, src_mac, udp.payload());
                    Ok(())
                } else if to_us && udp_repr.dst_port == 53 {
                    self.nat_ipv4(now, payload)
                } else {
                    self.counters.unhandled += 1;
                    Ok(())
                }
            }
            // TCP to us: port 53 is the DNS redirect; smoltcp answers the rest with RST.
            IpProtocol::Tcp if to_us => self.nat_ipv4(now, payload),
            _ if to_us || broadcast || dst.is_multicast() || self.in_subnet(dst) => {
                self.counters.unhandled += 1;
                Ok(())
            }
            _ => self.nat_ipv4(now, payload),
        }
    }

    /// The segment's broadcast address; 255.255.255.255 for a mask with gaps.
    fn subnet_broadcast(&self) -> Ipv4Addr {
        subnet::Subnet::from_mask(self.host.ip, self.host.mask)
            .map_or(Ipv4Addr::BROADCAST, |s| s.broadcast())
    }

    fn handle_dhcp(&mut self, now: Instant, src_mac: EthernetAddress, payload: &[u8]) {
        if !self.dhcp.settings().enabled {
            self.counters.dhcp_disabled += 1;
            return;
        }
        let msg = match dhcproto::v4::Message::decode(&mut Decoder::new(payload)) {
            Ok(msg) => msg,
            Err(e) => {
                self.counters.malformed += 1;
                debug!(error = %e, "dhcp: undecodable message dropped");
                return;
            }
        };
        let reply = self
            .dhcp
            .handle_from(&msg, src_mac.0, unix_secs(now), &mut self.dhcp_events);
        if let Some(reply) = reply {
            self.dhcp_buf.clear();
            let mut enc = dhcproto::Encoder::new(&mut self.dhcp_buf);
            if let Err(e) = reply.msg.encode(&mut enc) {
                debug!(error = %e, "dhcp: reply could not be encoded");
                return;
            }
            let body = &self.dhcp_buf;
            let pushed = frame::push_udp(
                &mut self.tx,
                self.host.mac,
                EthernetAddress(reply.to.mac),
                (self.host.ip, dhcp::server::SERVER_PORT),
                (reply.to.ip, reply.to.port),
                body.len(),
                |buf| buf.copy_from_slice(body),
            );
            if !pushed {
                self.counters.tx_dropped += 1;
            }
            if !reply.to.ip.is_broadcast() {
                self.neighbours
                    .learn(reply.to.ip, EthernetAddress(reply.to.mac), now);
            }
        }
        if self
            .dhcp_events
            .iter()
            .any(|e| matches!(e, DhcpEvent::Lease { .. }))
        {
            self.events.push_back(Event::LeasesChanged);
        }
        self.flush_dhcp_events();
    }

    fn flush_dhcp_events(&mut self) {
        // LeasesChanged goes after the lease events of the same input, so a consumer that saves
        // on LeasesChanged has seen every change first.
        let changed = matches!(self.events.back(), Some(Event::LeasesChanged));
        if changed {
            self.events.pop_back();
        }
        self.events
            .extend(self.dhcp_events.drain(..).map(Event::Dhcp));
        if changed {
            self.events.push_back(Event::LeasesChanged);
        }
    }

    /// The lease records worth saving.
    pub fn leases_to_save(&self) -> Vec<Lease> {
        self.dhcp.pool().persistent()
    }
}

/// Seconds since the Unix epoch of a core timestamp.
pub fn unix_secs(t: Instant) -> u64 {
    u64::try_from(t.secs()).unwrap_or(0)
}
