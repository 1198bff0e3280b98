//! The UDP half of the NAT: each flow (client endpoint, remote endpoint) gets a host UDP
//! socket connected to the remote; datagrams to the virtual host's port 53 go to the
//! [DNS forwarder](crate::core::dns).
//!
//! # Theory of operation
//!
//! - **New flow.** The first datagram goes through the [admission point](super::admit) and
//!   waits there for its verdict; an admitted flow gets a session, a `UdpOpen` op, and then its
//!   datagrams as `UdpSend` ops (copied once, into the op buffer).
//! - **Replies.** The driver reads each datagram from the host socket straight into the frame
//!   for the client ([`VirtualHost::nat_udp_receive`]); one that does not fit the MTU is
//!   fragmented.
//! - **Errors.** What the host socket reports — ECONNREFUSED (the remote answered ICMP port
//!   unreachable), EHOSTUNREACH, ENETUNREACH, EACCES/EPERM (a `prohibit` route, a firewall),
//!   at open, on send or on receive (the driver reads each ICMP error from the socket's error
//!   queue) — reaches the client as the matching ICMP error quoting its last datagram (port
//!   unreachable from the remote, the others from the virtual host), so `nc -u` and stub
//!   resolvers fail at once as they do without a NAT. The flow stays (a later datagram may get
//!   through), except when its socket could not be opened at all: then it ends as
//!   "unreachable" ("limit" only when the host ran out of sockets).
//! - **DNS.** A client endpoint asking the virtual host's port 53 is a session too (admitted
//!   once, [`DNS_SESSION_TIMEOUT`](super::DNS_SESSION_TIMEOUT) idle), without a socket of its
//!   own: its queries go to the forwarder, to the configured upstreams, or to the one endpoint
//!   a policy redirected it to.
//! - **End.** `nat.udp_timeout` idle (the driver closes the socket on [`HostOp::Close`]).
//!
//! [`HostOp::Close`]: super::HostOp::Close

use std::io;
use std::net::{SocketAddr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{Icmpv4DstUnreachable, IpAddress, Ipv4Packet, UdpPacket, UdpRepr};

use super::table::{FlowKey, Protocol, Quote, SessionId, SessionState};
use super::{EndReason, HostError, HostEvent, NatEvent, OpRecord};
use crate::core::dns::DnsAction;
use crate::core::VirtualHost;

/// A DNS forwarder action, owned (so the forwarder can be borrowed again to act on it).
pub(super) enum OwnedDnsAction {
    Send(SocketAddr, Vec<u8>),
    Answer(SocketAddrV4, Vec<u8>),
}

pub(super) fn own_action(a: DnsAction<'_>) -> OwnedDnsAction {
    match a {
        DnsAction::Send { upstream, payload } => OwnedDnsAction::Send(upstream, payload.to_vec()),
        DnsAction::Answer { client, payload } => OwnedDnsAction::Answer(client, payload.to_vec()),
    }
}

impl VirtualHost {
    pub(super) fn nat_udp_in(
        &mut self,
        now: Instant,
        mac: [u8; 6],
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
        if dst == self.settings.host.ip && udp.dst_port() != 53 {
            self.nat.counters.unsupported += 1;
            return Ok(());
        }
        let key = FlowKey {
            protocol: Protocol::Udp,
            client: SocketAddrV4::new(src, udp.src_port()),
            remote: SocketAddrV4::new(dst, udp.dst_port()),
        };
        match self.nat.table.find(&key) {
            Some(id) => self.udp_forward(id, p, now),
            None => self.admit(now, key, mac, p),
        }
        Ok(())
    }

    /// An admitted UDP flow: its socket, then the datagrams that waited for the verdict.
    pub(super) fn udp_start(&mut self, id: SessionId, packets: &[&[u8]], now: Instant) {
        let Some(s) = self.nat.table.get_mut(id) else {
            return;
        };
        s.state = SessionState::Established;
        let (key, target) = (s.key, s.target);
        if *key.remote.ip() != self.settings.host.ip {
            self.nat.push_op(OpRecord::UdpOpen(id, target));
        }
        for packet in packets {
            if let Ok(p) = Ipv4Packet::new_checked(*packet) {
                self.udp_forward(id, &p, now);
            }
        }
    }

    /// One datagram of session `id`: to its host socket, or to the DNS forwarder.
    fn udp_forward(&mut self, id: SessionId, p: &Ipv4Packet<&[u8]>, now: Instant) {
        let Ok(udp) = UdpPacket::new_checked(p.payload()) else {
            return;
        };
        let payload = udp.payload();
        let Some(s) = self.nat.table.get_mut(id) else {
            return;
        };
        s.count_out(payload.len(), now);
        let (key, target, mac) = (s.key, s.target, s.client_mac);
        if *key.remote.ip() == self.settings.host.ip {
            let ups = &self.settings.nat.dns_upstreams;
            let redirected = target != SocketAddr::V4(key.remote) && !ups.contains(&target);
            let upstreams = if redirected {
                std::slice::from_ref(&target)
            } else {
                &ups[..]
            };
            if let Some(action) = self.nat.dns.query(key.client, mac, payload, upstreams, now) {
                let action = own_action(action);
                self.apply_dns(action);
            }
            return;
        }
        s.quote = Some(Quote::of(p.as_ref()));
        let range = self.nat.stash(payload);
        self.nat.push_op(OpRecord::UdpSend(id, range));
    }

    pub(super) fn udp_host_event(&mut self, id: SessionId, event: HostEvent<'_>, now: Instant) {
        match event {
            HostEvent::OpenFailed(e) => {
                let kind = HostError::from_io(e);
                self.udp_icmp_error(id, kind);
                self.socket_failed(id, e, kind, now);
            }
            HostEvent::Error(e) | HostEvent::SendFailed(e) => {
                let kind = HostError::from_io(e);
                if !self.udp_icmp_error(id, kind) {
                    if matches!(event, HostEvent::SendFailed(_)) {
                        self.nat.counters.host_send_dropped += 1;
                    }
                    tracing::debug!(session = %id, error = %e, "nat: udp host socket error");
                }
            }
            _ => {}
        }
    }

    /// Passes an ICMP error of kind `kind` about session `id`'s last datagram to the client;
    /// false when `kind` has no ICMP counterpart.
    fn udp_icmp_error(&mut self, id: SessionId, kind: HostError) -> bool {
        let Some(s) = self.nat.table.get(id) else {
            return false;
        };
        let host = self.settings.host;
        let (code, from) = match kind {
            // Port unreachable comes from the remote itself; the others from a router, here us.
            HostError::Refused => (Icmpv4DstUnreachable::PortUnreachable, *s.key.remote.ip()),
            HostError::HostUnreachable => (Icmpv4DstUnreachable::HostUnreachable, host.ip),
            HostError::NetUnreachable => (Icmpv4DstUnreachable::NetUnreachable, host.ip),
            HostError::Prohibited => (Icmpv4DstUnreachable::CommProhibited, host.ip),
            _ => return false,
        };
        let Some(quote) = s.quote else {
            return false;
        };
        self.link
            .push_unreachable_quoted(&host, from, quote.as_slice(), code);
        self.nat.counters.icmp_errors += 1;
        true
    }

    /// The host socket of UDP or ICMP session `id` could not be opened: the session ends.
    pub(super) fn socket_failed(
        &mut self,
        id: SessionId,
        e: &io::Error,
        kind: HostError,
        now: Instant,
    ) {
        if let Some(s) = self.nat.table.get(id) {
            let key = s.key;
            self.nat.events.push_back(NatEvent::Failed {
                id,
                key,
                reason: format!("{}: {e}", kind.as_str()),
            });
        }
        // Only a lack of resources is a limit; any other error at open (a route that
        // forbids or drops, EACCES, EINVAL) means the remote cannot be reached from here.
        let reason = match kind {
            HostError::Refused => EndReason::Refused,
            HostError::Resources => EndReason::Limit,
            _ => EndReason::Unreachable,
        };
        self.end_session(id, reason, now);
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
            let host = self.settings.host;
            self.link.push_udp(
                &host,
                key.remote,
                key.client,
                n,
                &mut self.nat.scratch,
                |out| out.copy_from_slice(data),
            );
        }
        self.nat.reassembled = buf;
        result
    }

    /// A DNS answer from `from` (an upstream).
    pub fn nat_dns_answer(&mut self, from: SocketAddr, payload: &[u8], now: Instant) {
        self.now = now;
        if let Some(action) = self.nat.dns.answer(from, payload) {
            let action = own_action(action);
            self.apply_dns(action);
        }
    }

    pub(super) fn apply_dns(&mut self, action: OwnedDnsAction) {
        match action {
            OwnedDnsAction::Send(upstream, bytes) => {
                let range = self.nat.stash(&bytes);
                self.nat.push_op(OpRecord::DnsSend(upstream, range));
            }
            OwnedDnsAction::Answer(client, bytes) => {
                let host = self.settings.host;
                let from = SocketAddrV4::new(host.ip, 53);
                if let Some(id) = self.nat.table.find(&FlowKey {
                    protocol: Protocol::Udp,
                    client,
                    remote: from,
                }) {
                    if let Some(s) = self.nat.table.get_mut(id) {
                        s.count_in(bytes.len(), self.now);
                    }
                }
                self.link.push_udp(
                    &host,
                    from,
                    client,
                    bytes.len(),
                    &mut self.nat.scratch,
                    |buf| buf.copy_from_slice(&bytes),
                );
            }
        }
    }
}
