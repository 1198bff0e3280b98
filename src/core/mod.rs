//! The virtual host core: sans-IO.
//!
//! # Theory of operation
//!
//! [`VirtualHost`] is one host on the virtual segment. It owns no socket, no file and no
//! clock; the driver feeds it and drains it:
//!
//! - **in:** [`handle_frame`](VirtualHost::handle_frame) for each frame from the segment,
//!   [`handle_timeout`](VirtualHost::handle_timeout) when [`poll_timeout`](VirtualHost::poll_timeout)
//!   comes due, [`nat_host_event`](VirtualHost::nat_host_event) and the other `nat_*` methods
//!   for what the host sockets did, [`handle_verdict`](VirtualHost::handle_verdict) for a
//!   policy's late answer, [`apply_settings`](VirtualHost::apply_settings) for a change of the
//!   live settings;
//! - **out:** [`take_transmit`](VirtualHost::take_transmit) for the frames to send (call it after
//!   every batch of inputs), [`drain_host_ops`](VirtualHost::drain_host_ops) for the host
//!   sockets to open, use and close, [`poll_event`](VirtualHost::poll_event) for what the
//!   security log and the lease store need to know, until it returns `None`.
//!
//! Time is an [`Instant`] from a monotonic clock that the driver passes in. The driver's
//! clock starts at the Unix time of the process start, so the seconds the DHCP server stores
//! read as Unix times, but a step of the wall clock (NTP, suspend) never reaches the core: no
//! timer expires or stalls because of one. Wall time is used only where a lease's times are
//! saved or shown, by the driver.
//!
//! The core has one settings value, [`Settings`], and one way to change it,
//! [`apply_settings`](VirtualHost::apply_settings); no subsystem keeps a copy.
//!
//! What the host does with a frame:
//!
//! | frame                                   | handled by                      |
//! |-----------------------------------------|---------------------------------|
//! | ARP request for our address             | [`arp`]: reply                  |
//! | ICMP echo request to our address        | [`icmp`]: reply                 |
//! | UDP to port 67 (broadcast or ours)      | [`dhcp`]: the DHCP server       |
//! | TCP/UDP to our port 53                  | [`nat`]: the DNS redirect       |
//! | IPv4 to an outside address              | [`nat`]: the virtual NAT        |
//! | anything else                           | dropped and counted             |
//!
//! A frame that does not parse is dropped and counted in [`Counters::malformed`]; nothing a
//! client sends can make the core panic. Frames for other MAC addresses (the segment is a hub)
//! are counted in [`Counters::not_for_us`] and ignored; frames from the virtual host's own MAC
//! (a peer claiming it) in [`Counters::own_mac`], and ARP claiming its address from another
//! MAC in [`Counters::arp_spoofed`], both dropped and reported once per MAC
//! ([`Event::Link`]). Every frame in is in `frames_in`;
//! every frame that leaves is in `frames_out` (counted when the driver takes it); every frame
//! the core could not send is in [`LinkCounters`].

pub mod arp;
pub mod dhcp;
pub mod dns;
mod frame;
pub mod icmp;
pub mod link;
pub mod nat;
pub mod rng;
pub mod subnet;
#[doc(hidden)]
pub mod testkit;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use dhcproto::{Decodable, Decoder, Encodable};
use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, UdpPacket,
    UdpRepr,
};
use tracing::{debug, trace, warn};

pub use smoltcp::time::Instant;

use dhcp::{DhcpEvent, DhcpServer, DhcpSettings, Lease};
use link::Link;
pub use link::{LinkCounters, LinkEvent, Neighbours, TX_QUEUE_FRAMES};
use nat::{EndReason, NatEvent, NatSettings, NatState};

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

/// Every setting of the virtual host that can change while it runs: one value, changed only
/// through [`VirtualHost::apply_settings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The whole function (SecureNAT's enable/disable): when off, the virtual host is not on
    /// the segment at all (no ARP, no DHCP, no NAT).
    pub enabled: bool,
    /// The virtual host's identity.
    pub host: HostSettings,
    /// The DHCP server.
    pub dhcp: DhcpSettings,
    /// The NAT and the DNS redirect.
    pub nat: NatSettings,
}

/// Which lease an operator means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTarget {
    /// The lease of this client MAC address.
    Mac([u8; 6]),
    /// The lease of this address.
    Ip(Ipv4Addr),
}

/// What the driver must act on.
#[derive(Debug, Clone)]
pub enum Event {
    /// Something happened in the DHCP server (lease created, renewed, …).
    Dhcp(DhcpEvent),
    /// Something happened in the NAT (session created, connected, deleted, refused).
    Nat(NatEvent),
    /// Something on the segment itself: a peer claims the virtual host's MAC or address.
    Link(LinkEvent),
    /// The lease table changed and should be saved.
    LeasesChanged,
}

/// Counters of the core; every frame in is in `frames_in`, and every dropped one in exactly
/// one other counter (or, for frames the NAT takes, in [`nat::NatCounters`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Frames handed to the core.
    pub frames_in: u64,
    /// Frames the core produced and the driver took to send.
    pub frames_out: u64,
    /// Frames that failed to parse (bad lengths, checksums, versions; undecodable DHCP).
    pub malformed: u64,
    /// Frames addressed to another host on the segment.
    pub not_for_us: u64,
    /// Frames for us that nothing handles: other protocols, ports.
    pub unhandled: u64,
    /// Frames dropped because the whole function is disabled.
    pub disabled: u64,
    /// IPv4 fragments addressed to the virtual host or beyond (handed to the NAT).
    pub fragments: u64,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// ICMP echo requests answered.
    pub echo_replies: u64,
    /// DHCP messages that arrived while the DHCP server was disabled.
    pub dhcp_disabled: u64,
    /// Frames whose source is the virtual host's own MAC (a peer claims it): dropped.
    pub own_mac: u64,
    /// ARP packets claiming the virtual host's address from another MAC: dropped.
    pub arp_spoofed: u64,
}

/// The virtual host. See the module documentation.
#[derive(Debug)]
pub struct VirtualHost {
    settings: Settings,
    link: Link,
    dhcp: DhcpServer,
    nat: NatState,
    events: VecDeque<Event>,
    dhcp_events: VecDeque<DhcpEvent>,
    counters: Counters,
    dhcp_buf: Vec<u8>,
    /// The DHCP policy and the replies waiting for its decision.
    dhcp_hook: dhcp::hook::HookState,
    /// The latest time passed in.
    now: Instant,
    /// Set while the frame being handled came with its TCP checksum vouched for by the
    /// backend ([`handle_verified_frame`](Self::handle_verified_frame)).
    rx_checksum_verified: bool,
}

impl VirtualHost {
    /// A host with the given settings and the leases saved earlier. `seed` seeds smoltcp's
    /// initial sequence numbers and DNS ids: take it from a real random source.
    pub fn new(settings: Settings, leases: Vec<Lease>, seed: u64, now: Instant) -> Self {
        let host = settings.host;
        let mut server = DhcpServer::new(&settings.dhcp, host.ip, host.mask);
        let skipped = server.restore(leases);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "dhcp: saved leases outside the configured range or reservations were dropped"
            );
        }
        VirtualHost {
            link: Link::new(host.mtu, seed as u16),
            dhcp: server,
            nat: NatState::new(&host, seed, now),
            events: VecDeque::new(),
            dhcp_events: VecDeque::new(),
            counters: Counters::default(),
            dhcp_buf: Vec::with_capacity(1024),
            dhcp_hook: dhcp::hook::HookState::default(),
            now,
            rx_checksum_verified: false,
            settings,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The host's identity.
    pub fn host(&self) -> &HostSettings {
        &self.settings.host
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Frames the link could not send.
    pub fn link_counters(&self) -> &LinkCounters {
        &self.link.counters
    }

    /// The DHCP server (lease table, counters).
    pub fn dhcp(&self) -> &DhcpServer {
        &self.dhcp
    }

    /// The neighbour table.
    pub fn neighbours(&self) -> &Neighbours {
        &self.link.neighbours
    }

    /// Replaces the settings (the caller validated them: see `Config::with_changes`). Each
    /// change takes effect as a user expects:
    ///
    /// - the whole function or the NAT turned off: every session ends ("nat disabled") and
    ///   flows waiting for a verdict are dropped; turned on: new flows are carried;
    /// - the host's address or mask: smoltcp and the DHCP server answer from the new one;
    /// - `dhcp.*`: a new range, lease time or reservation applies to new leases and renewals;
    ///   leases are kept;
    /// - `nat.*` timeouts: every session, at once; limits, `nat.deny`, the `nat.allow_*`
    ///   rules (and the host's addresses), the TCP buffer and the DNS upstreams: new flows;
    ///   the MTU: new segments and datagrams.
    pub fn apply_settings(&mut self, new: Settings, now: Instant) {
        self.now = now;
        let old = std::mem::replace(&mut self.settings, new);
        let (was_on, is_on) = (
            old.enabled && old.nat.enabled,
            self.settings.enabled && self.settings.nat.enabled,
        );
        if was_on && !is_on {
            self.end_all_sessions(EndReason::NatDisabled, now);
        }
        let host = self.settings.host;
        if old.host.ip != host.ip || old.host.mask != host.mask || old.host.mtu != host.mtu {
            self.nat_link_changed(now);
        }
        if old.dhcp != self.settings.dhcp || old.host.ip != host.ip || old.host.mask != host.mask {
            // Leases and counters stay; a record the new settings no longer allow is dropped
            // (and the table saved).
            if self
                .dhcp
                .reconfigure(&self.settings.dhcp, host.ip, host.mask)
            {
                self.events.push_back(Event::LeasesChanged);
            }
        }
        let nat = &self.settings.nat;
        if old.nat.tcp_timeout != nat.tcp_timeout || old.nat.udp_timeout != nat.udp_timeout {
            self.nat_timeouts_changed(now);
        }
        self.flush_nat_events();
    }

    /// Releases the lease of `mac` (or, with `ip`, of that address) at an operator's request,
    /// as if the client had sent a RELEASE. Returns the lease released, if there was one.
    pub fn release_lease(&mut self, target: LeaseTarget, now: Instant) -> Option<Lease> {
        self.now = now;
        let lease = match target {
            LeaseTarget::Mac(mac) => {
                self.dhcp
                    .release_by_mac(mac, secs(now), &mut self.dhcp_events)
            }
            LeaseTarget::Ip(ip) => self
                .dhcp
                .release_by_ip(ip, secs(now), &mut self.dhcp_events),
        };
        if lease.is_some() {
            self.events.push_back(Event::LeasesChanged);
        }
        self.flush_dhcp_events();
        lease
    }

    /// Swaps the queued outgoing frames into `spare` (which must be empty): no copy. Send them,
    /// clear the batch, and pass it back next time.
    pub fn take_transmit(&mut self, spare: &mut FrameBatch) {
        debug_assert!(spare.is_empty(), "take_transmit wants an empty batch");
        spare.clear();
        std::mem::swap(&mut self.link.tx, spare);
        self.counters.frames_out += spare.len() as u64;
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
        let probe = self
            .dhcp
            .probe_deadline(&self.settings.dhcp)
            .filter(|_| self.settings.enabled)
            .map(|secs| Instant::from_secs(secs as i64));
        [
            dhcp,
            probe,
            self.dhcp_hook.next_deadline(),
            self.nat_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does what is due at `now`: lease expiry, offer timeouts, quarantine ends, NAT idle
    /// timeouts, DNS failover, TCP retransmissions.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.dhcp.handle_timeout(secs(now), &mut self.dhcp_events) {
            self.events.push_back(Event::LeasesChanged);
        }
        self.flush_dhcp_events();
        self.send_dhcp_probe(now);
        self.expire_dhcp_decisions(now);
        self.nat_timeout(now);
        self.poll(now);
        self.flush_nat_events();
    }

    /// Handles one frame from the segment.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        self.handle(now, frame, false);
    }

    /// Handles one frame whose TCP checksum the backend vouched for: the local kernel handed it
    /// over with a partial checksum, which nothing needs to verify
    /// ([`FrameBatch::set_last_checksum_verified`](hubnat_backend::FrameBatch::set_last_checksum_verified)).
    /// Any other check is made as for [`handle_frame`](Self::handle_frame).
    pub fn handle_verified_frame(&mut self, now: Instant, frame: &[u8]) {
        self.handle(now, frame, true);
    }

    fn handle(&mut self, now: Instant, frame: &[u8], checksum_verified: bool) {
        self.rx_checksum_verified = checksum_verified;
        self.receive(now, frame);
        self.rx_checksum_verified = false;
    }

    fn receive(&mut self, now: Instant, frame: &[u8]) {
        self.now = now;
        self.counters.frames_in += 1;
        if !self.settings.enabled {
            self.counters.disabled += 1;
            return;
        }
        if self.dispatch(now, frame).is_err() {
            self.counters.malformed += 1;
            trace!(len = frame.len(), "dropped malformed frame");
        }
    }

    fn dispatch(&mut self, now: Instant, frame: &[u8]) -> Result<(), smoltcp::wire::Error> {
        let eth = EthernetFrame::new_checked(frame)?;
        let dst = eth.dst_addr();
        let src = eth.src_addr();
        if !src.is_unicast() {
            return Err(smoltcp::wire::Error);
        }
        let host = self.settings.host;
        if src == host.mac {
            // We never hear our own frames (the backends see to it): a peer claims our MAC.
            self.counters.own_mac += 1;
            if self.link.first_report(src.0) {
                let ip = claimed_ip(&eth);
                warn!(%ip, "a peer on the segment sends from the virtual host's own MAC; its frames are dropped");
                self.events
                    .push_back(Event::Link(LinkEvent::OwnMacClaimed { ip }));
            }
            return Ok(());
        }
        if dst != host.mac && !dst.is_broadcast() && !dst.is_multicast() {
            self.counters.not_for_us += 1;
            return Ok(());
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let (outcome, learn) =
                    arp::handle(eth.payload(), host.mac, host.ip, &mut self.link.tx)?;
                if let Some((ip, mac)) = learn {
                    if self.is_client_address(ip) {
                        self.link.neighbours.learn(ip, mac, now);
                    }
                }
                match outcome {
                    arp::ArpOutcome::Answered => self.counters.arp_replies += 1,
                    arp::ArpOutcome::QueueFull => {
                        self.link.pushed(false);
                    }
                    arp::ArpOutcome::NotForUs => {}
                    arp::ArpOutcome::Spoofed(mac) => {
                        self.counters.arp_spoofed += 1;
                        if self.link.first_report(mac.0) {
                            warn!(%mac, ip = %host.ip, "ARP from another MAC claims the virtual host's address; dropped");
                            self.events.push_back(Event::Link(LinkEvent::ArpSpoofed {
                                mac: mac.0,
                                ip: host.ip,
                            }));
                        }
                    }
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
        self.settings.host.on_segment(ip)
    }

    /// Whether `ip` is a client address of the segment: in its subnet, not ours, not the
    /// subnet's network or broadcast address. Only these are learnt into the neighbour table
    /// (anything else would only let a client fill it, and evict real clients, with addresses
    /// nobody sends to) and only these may open NAT sessions.
    fn is_client_address(&self, ip: Ipv4Addr) -> bool {
        let host = &self.settings.host;
        ip != host.ip
            && subnet::Subnet::from_mask(host.ip, host.mask)
                .is_ok_and(|s| s.contains(ip) && ip != s.network() && ip != s.broadcast())
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
        let host = self.settings.host;
        if self.is_client_address(src) {
            self.link.neighbours.learn(src, src_mac, now);
        }
        let to_us = dst == host.ip;
        let broadcast = dst.is_broadcast() || dst == self.subnet_broadcast();
        let fragment = packet.more_frags() || packet.frag_offset() != 0;
        if fragment {
            if to_us || !self.in_subnet(dst) && !broadcast {
                self.counters.fragments += 1;
                return self.nat_ipv4(now, src_mac.0, payload);
            }
            self.counters.unhandled += 1;
            return Ok(());
        }
        match packet.next_header() {
            // Another DHCP server's reply (ours never come back to us).
            IpProtocol::Udp if is_dhcp_reply(packet.payload()) => {
                self.dhcp_reply_seen(now, src_mac, src, packet.payload());
                Ok(())
            }
            IpProtocol::Icmp if to_us => {
                match icmp::handle_echo(packet.payload(), &host, src_mac, src, &mut self.link.tx)? {
                    Some(true) => self.counters.echo_replies += 1,
                    Some(false) => {
                        self.link.pushed(false);
                    }
                    None => self.counters.unhandled += 1,
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
                    self.nat_ipv4(now, src_mac.0, payload)
                } else {
                    self.counters.unhandled += 1;
                    Ok(())
                }
            }
            // TCP to us: port 53 is the DNS redirect; smoltcp answers the rest with RST.
            IpProtocol::Tcp if to_us => self.nat_ipv4(now, src_mac.0, payload),
            _ if to_us || broadcast || dst.is_multicast() || self.in_subnet(dst) => {
                self.counters.unhandled += 1;
                Ok(())
            }
            _ => self.nat_ipv4(now, src_mac.0, payload),
        }
    }

    /// The segment's broadcast address; 255.255.255.255 for a mask with gaps.
    fn subnet_broadcast(&self) -> Ipv4Addr {
        let host = &self.settings.host;
        subnet::Subnet::from_mask(host.ip, host.mask).map_or(Ipv4Addr::BROADCAST, |s| s.broadcast())
    }

    fn handle_dhcp(&mut self, now: Instant, src_mac: EthernetAddress, payload: &[u8]) {
        if !self.settings.dhcp.enabled {
            self.counters.dhcp_disabled += 1;
            return;
        }
        if let Err(why) = dhcp::guard::check_option_lengths(payload) {
            self.counters.malformed += 1;
            debug!(%why, "dhcp: malformed message dropped");
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
        let reply = self.dhcp.handle_from(
            &self.settings.dhcp,
            &msg,
            src_mac.0,
            secs(now),
            &mut self.dhcp_events,
        );
        if let Some(reply) = reply {
            self.dhcp_reply(&msg, src_mac.0, reply, now);
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

    /// Sends the probe for other DHCP servers when one is due (see *Other servers* in
    /// [`dhcp::server`]).
    fn send_dhcp_probe(&mut self, now: Instant) {
        if !self.settings.enabled {
            return;
        }
        let host = self.settings.host;
        let xid = 0x6875_6200 ^ (self.dhcp.counters().probes as u32);
        let Some(probe) = self
            .dhcp
            .take_probe(&self.settings.dhcp, host.mac.0, xid, secs(now))
        else {
            return;
        };
        self.dhcp_buf.clear();
        let mut enc = dhcproto::Encoder::new(&mut self.dhcp_buf);
        if probe.encode(&mut enc).is_err() {
            return;
        }
        let body = &self.dhcp_buf;
        let pushed = frame::push_udp(
            &mut self.link.tx,
            host.mac,
            EthernetAddress::BROADCAST,
            (Ipv4Addr::UNSPECIFIED, dhcp::server::CLIENT_PORT),
            (Ipv4Addr::BROADCAST, dhcp::server::SERVER_PORT),
            body.len(),
            |buf| buf.copy_from_slice(body),
        );
        self.link.pushed(pushed);
    }

    /// A DHCP server's reply seen on the segment (UDP 67 → 68): another server's, unless it
    /// names us.
    fn dhcp_reply_seen(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        src: Ipv4Addr,
        udp: &[u8],
    ) {
        let Ok(udp) = UdpPacket::new_checked(udp) else {
            self.counters.malformed += 1;
            return;
        };
        let Ok(msg) = dhcproto::v4::Message::decode(&mut Decoder::new(udp.payload())) else {
            self.counters.malformed += 1;
            return;
        };
        if msg.opcode() != dhcproto::v4::Opcode::BootReply {
            self.counters.unhandled += 1;
            return;
        }
        let server = match msg.opts().get(dhcproto::v4::OptionCode::ServerIdentifier) {
            Some(dhcproto::v4::DhcpOption::ServerIdentifier(ip)) => *ip,
            _ => src,
        };
        if server == self.settings.host.ip && src_mac == self.settings.host.mac {
            return;
        }
        self.dhcp.saw_reply(
            &self.settings.dhcp,
            server,
            src_mac.0,
            secs(now),
            &mut self.dhcp_events,
        );
        self.flush_dhcp_events();
    }

    /// Encodes `reply` and queues it for the client.
    fn send_dhcp_reply(&mut self, reply: &dhcp::Reply, now: Instant) {
        {
            self.dhcp_buf.clear();
            let mut enc = dhcproto::Encoder::new(&mut self.dhcp_buf);
            if let Err(e) = reply.msg.encode(&mut enc) {
                debug!(error = %e, "dhcp: reply could not be encoded");
                return;
            }
            let body = &self.dhcp_buf;
            let host = self.settings.host;
            let pushed = frame::push_udp(
                &mut self.link.tx,
                host.mac,
                EthernetAddress(reply.to.mac),
                (host.ip, dhcp::server::SERVER_PORT),
                (reply.to.ip, reply.to.port),
                body.len(),
                |buf| buf.copy_from_slice(body),
            );
            self.link.pushed(pushed);
            if self.is_client_address(reply.to.ip) {
                self.link
                    .neighbours
                    .learn(reply.to.ip, EthernetAddress(reply.to.mac), now);
            }
        }
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

/// Whether a UDP datagram goes from the DHCP server port to the client port.
fn is_dhcp_reply(udp: &[u8]) -> bool {
    UdpPacket::new_checked(udp).is_ok_and(|u| {
        u.src_port() == dhcp::server::SERVER_PORT && u.dst_port() == dhcp::server::CLIENT_PORT
    })
}

/// The IPv4 source of an IPv4 frame or the sender of an ARP packet; 0.0.0.0 for anything
/// else.
fn claimed_ip(eth: &EthernetFrame<&[u8]>) -> Ipv4Addr {
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => Ipv4Packet::new_checked(eth.payload())
            .map(|p| p.src_addr())
            .unwrap_or(Ipv4Addr::UNSPECIFIED),
        EthernetProtocol::Arp => smoltcp::wire::ArpPacket::new_checked(eth.payload())
            .ok()
            .and_then(|p| smoltcp::wire::ArpRepr::parse(&p).ok())
            .map(|r| match r {
                smoltcp::wire::ArpRepr::EthernetIpv4 {
                    source_protocol_addr,
                    ..
                } => source_protocol_addr,
                _ => Ipv4Addr::UNSPECIFIED,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// The whole seconds of a core timestamp: what the DHCP server keeps its times in. (The
/// driver's clock makes them read as Unix times; see the module documentation.)
pub fn secs(t: Instant) -> u64 {
    u64::try_from(t.secs()).unwrap_or(0)
}
