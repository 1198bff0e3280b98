//! ICMP echo through the NAT: each (client, identifier, remote) is a session with a host ping
//! socket (`SOCK_DGRAM`/`IPPROTO_ICMP`, which needs no privilege where
//! `net.ipv4.ping_group_range` allows it), or, where the OS does not allow that, answered by
//! hubnat itself in the remote's name ([`IcmpMode::Synthesized`]). Either way a new echo flow
//! passes the [admission point](super::admit) first. Ping sockets rewrite the identifier; the
//! reply goes back with the client's own. Sessions go after
//! [`ICMP_TIMEOUT`](super::ICMP_TIMEOUT) idle.

use std::net::{SocketAddr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};

use super::table::{FlowKey, Protocol, SessionId, SessionState};
use super::{EndReason, HostError, HostEvent, IcmpMode, OpRecord};
use crate::core::VirtualHost;

impl VirtualHost {
    pub(super) fn nat_icmp_in(
        &mut self,
        now: Instant,
        mac: [u8; 6],
        p: &Ipv4Packet<&[u8]>,
    ) -> Result<(), smoltcp::wire::Error> {
        let packet = Icmpv4Packet::new_checked(p.payload())?;
        let repr = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default())?;
        let Icmpv4Repr::EchoRequest { ident, .. } = repr else {
            self.nat.counters.unsupported += 1;
            return Ok(());
        };
        let key = FlowKey {
            protocol: Protocol::Icmp,
            client: SocketAddrV4::new(p.src_addr(), ident),
            remote: SocketAddrV4::new(p.dst_addr(), 0),
        };
        match self.nat.table.find(&key) {
            Some(id) => self.icmp_forward(id, p, now),
            None => self.admit(now, key, mac, p),
        }
        Ok(())
    }

    /// An admitted echo flow: its ping socket (real mode), then the requests that waited.
    pub(super) fn icmp_start(&mut self, id: SessionId, packets: &[&[u8]], now: Instant) {
        let Some(s) = self.nat.table.get_mut(id) else {
            return;
        };
        s.state = SessionState::Established;
        if self.nat.icmp_mode == IcmpMode::Real {
            match s.target {
                SocketAddr::V4(v4) => self.nat.push_op(OpRecord::IcmpOpen(id, *v4.ip())),
                SocketAddr::V6(_) => {
                    // Echo is carried over IPv4 only: a redirect to IPv6 cannot be honoured.
                    self.end_session(id, EndReason::Unreachable, now);
                    return;
                }
            }
        }
        for packet in packets {
            if let Ok(p) = Ipv4Packet::new_checked(*packet) {
                self.icmp_forward(id, &p, now);
            }
        }
    }

    fn icmp_forward(&mut self, id: SessionId, p: &Ipv4Packet<&[u8]>, now: Instant) {
        let Ok(packet) = Icmpv4Packet::new_checked(p.payload()) else {
            return;
        };
        let Ok(Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }) = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::ignored())
        else {
            return;
        };
        let Some(s) = self.nat.table.get_mut(id) else {
            return;
        };
        s.count_out(data.len(), now);
        if self.nat.icmp_mode == IcmpMode::Synthesized {
            s.count_in(data.len(), now);
            self.nat.counters.echo_synthesized += 1;
            let reply = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            let host = self.settings.host;
            self.link
                .push_icmp(&host, p.dst_addr(), p.src_addr(), &reply);
            return;
        }
        let range = self.nat.stash(data);
        self.nat.push_op(OpRecord::IcmpSend(id, seq_no, range));
    }

    pub(super) fn icmp_host_event(&mut self, id: SessionId, event: HostEvent<'_>, now: Instant) {
        match event {
            HostEvent::OpenFailed(e) => self.socket_failed(id, e, HostError::from_io(e), now),
            HostEvent::SendFailed(_) => self.nat.counters.host_send_dropped += 1,
            _ => {}
        }
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
        let host = self.settings.host;
        self.link
            .push_icmp(&host, *key.remote.ip(), *key.client.ip(), &reply);
    }
}
