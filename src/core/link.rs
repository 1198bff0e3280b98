//! The link state every part of the core shares: the neighbour table (where each address on the
//! segment is) and the transmit queue, with one way to put a frame on it.
//!
//! ARP, ICMP, DHCP and each protocol of the NAT borrow the [`Link`] for the time of one input;
//! none keeps its own queue or its own neighbour cache. A frame that cannot be sent (the queue
//! is full, or the client's MAC is unknown) is counted here, once, in [`LinkCounters`].

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr, ETHERNET_HEADER_LEN,
};

use super::{frame, HostSettings};

/// How many frames the core queues between two [`VirtualHost::take_transmit`] calls.
///
/// [`VirtualHost::take_transmit`]: super::VirtualHost::take_transmit
pub const TX_QUEUE_FRAMES: usize = 256;

/// How many MACs the link reports in [`LinkEvent`]s at most (each once); more are counted only.
pub const MAX_REPORTED: usize = 1024;

/// The neighbour table: where each address on the segment is. Learnt from ARP and from the
/// source of IPv4 frames. Bounded: the oldest entry goes when it is full.
#[derive(Debug, Default)]
pub struct Neighbours {
    map: HashMap<Ipv4Addr, (EthernetAddress, Instant)>,
}

impl Neighbours {
    /// At most this many entries.
    pub const CAPACITY: usize = 4096;

    pub(crate) fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) {
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

/// What the security log hears about the segment itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A frame came from the virtual host's own MAC: a peer on the segment claims it (to take
    /// the host's traffic on a learning switch, or to poison neighbour tables). Such frames
    /// are dropped; this is reported once. `ip` is the first one's IPv4 or ARP sender address
    /// (0.0.0.0 for other frames).
    OwnMacClaimed {
        /// The address the frame came from.
        ip: Ipv4Addr,
    },
    /// An ARP packet from `mac` claims the virtual host's address `ip` (ARP spoofing). Such
    /// packets are dropped; this is reported once per MAC.
    ArpSpoofed {
        /// The MAC that claims it.
        mac: [u8; 6],
        /// The virtual host's address.
        ip: Ipv4Addr,
    },
}

/// Frames the link could not send; every such frame is in exactly one of them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounters {
    /// Frames dropped because the transmit queue was full.
    pub tx_queue_full: u64,
    /// Frames to a client whose MAC address is not known (no ARP, no DHCP, no frame seen).
    pub no_neighbour: u64,
}

/// The neighbour table and the transmit queue. See the module documentation.
#[derive(Debug)]
pub struct Link {
    pub(crate) neighbours: Neighbours,
    pub(crate) tx: FrameBatch,
    pub(crate) counters: LinkCounters,
    /// The MACs already reported in a [`LinkEvent`] (bounded by [`MAX_REPORTED`]).
    reported: HashSet<[u8; 6]>,
    /// IPv4 identification of the fragmented datagrams the host originates.
    ident: u16,
}

impl Link {
    pub(crate) fn new(mtu: usize, seed: u16) -> Self {
        Link {
            neighbours: Neighbours::default(),
            tx: FrameBatch::new(TX_QUEUE_FRAMES, mtu + ETHERNET_HEADER_LEN),
            counters: LinkCounters::default(),
            reported: HashSet::new(),
            ident: seed,
        }
    }

    /// Whether `mac` is to be reported now: the first time it is seen misbehaving. After
    /// [`MAX_REPORTED`] MACs, new ones are only counted.
    pub(crate) fn first_report(&mut self, mac: [u8; 6]) -> bool {
        self.reported.len() < MAX_REPORTED && self.reported.insert(mac)
    }

    /// Counts a frame that did not fit the queue when `pushed` is false; returns `pushed`.
    pub(crate) fn pushed(&mut self, pushed: bool) -> bool {
        if !pushed {
            self.counters.tx_queue_full += 1;
        }
        pushed
    }

    fn mac_of(&mut self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        let mac = self.neighbours.lookup(ip);
        if mac.is_none() {
            self.counters.no_neighbour += 1;
        }
        mac
    }

    fn next_ident(&mut self) -> u16 {
        self.ident = self.ident.wrapping_add(1);
        self.ident
    }

    /// An ICMP message from `from` to the client at `to`.
    pub(crate) fn push_icmp(
        &mut self,
        host: &HostSettings,
        from: Ipv4Addr,
        to: Ipv4Addr,
        icmp: &Icmpv4Repr<'_>,
    ) {
        let Some(mac) = self.mac_of(to) else { return };
        let ok = frame::push_icmp(&mut self.tx, host.mac, mac, from, to, icmp);
        self.pushed(ok);
    }

    /// ICMP destination unreachable about `original` (a packet a client sent), from `from`
    /// (the virtual host for host and network unreachable, the remote for port unreachable).
    pub(crate) fn push_unreachable(
        &mut self,
        host: &HostSettings,
        from: Ipv4Addr,
        original: &Ipv4Packet<&[u8]>,
        reason: Icmpv4DstUnreachable,
    ) {
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
        self.push_icmp(host, from, original.src_addr(), &icmp);
    }

    /// ICMP destination unreachable quoting `quote` (the head of a packet a client sent: its
    /// IPv4 header and the first 8 bytes after it), from `from`.
    pub(crate) fn push_unreachable_quoted(
        &mut self,
        host: &HostSettings,
        from: Ipv4Addr,
        quote: &[u8],
        reason: Icmpv4DstUnreachable,
    ) {
        if quote.len() < 20 {
            return;
        }
        let p = Ipv4Packet::new_unchecked(quote);
        let header_len = usize::from(p.header_len());
        if header_len != 20 {
            return;
        }
        let header = Ipv4Repr {
            src_addr: p.src_addr(),
            dst_addr: p.dst_addr(),
            next_header: p.next_header(),
            payload_len: usize::from(p.total_len()).saturating_sub(header_len),
            hop_limit: p.hop_limit(),
        };
        let icmp = Icmpv4Repr::DstUnreachable {
            reason,
            header,
            data: &quote[header_len..],
        };
        self.push_icmp(host, from, header.src_addr, &icmp);
    }

    /// A RST answering the client's SYN in `p`, from the address it dialled.
    pub(crate) fn push_rst_for_syn(&mut self, host: &HostSettings, p: &Ipv4Packet<&[u8]>) {
        let Ok(seg) = TcpPacket::new_checked(p.payload()) else {
            return;
        };
        let Some(mac) = self.mac_of(p.src_addr()) else {
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
            host.mac,
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
        self.pushed(ok);
    }

    /// A UDP datagram of `len` bytes (written by `fill`) to a client, cut into fragments when
    /// it does not fit the MTU; `scratch` holds the whole datagram in that case.
    pub(crate) fn push_udp(
        &mut self,
        host: &HostSettings,
        from: SocketAddrV4,
        to: SocketAddrV4,
        len: usize,
        scratch: &mut Vec<u8>,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let Some(mac) = self.mac_of(*to.ip()) else {
            return;
        };
        if 20 + 8 + len <= host.mtu {
            let ok = frame::push_udp(
                &mut self.tx,
                host.mac,
                mac,
                (*from.ip(), from.port()),
                (*to.ip(), to.port()),
                len,
                fill,
            );
            self.pushed(ok);
            return;
        }
        // Build the whole datagram in scratch, then cut it into fragments.
        scratch.clear();
        scratch.resize(8 + len, 0);
        UdpRepr {
            src_port: from.port(),
            dst_port: to.port(),
        }
        .emit(
            &mut UdpPacket::new_unchecked(&mut scratch[..]),
            &IpAddress::Ipv4(*from.ip()),
            &IpAddress::Ipv4(*to.ip()),
            len,
            fill,
            &ChecksumCapabilities::default(),
        );
        let ident = self.next_ident();
        let chunk = (host.mtu - 20) & !7;
        let mut offset = 0;
        while offset < scratch.len() {
            let end = (offset + chunk).min(scratch.len());
            let more = end < scratch.len();
            let part = &scratch[offset..end];
            let ok = self
                .tx
                .push_built(ETHERNET_HEADER_LEN + 20 + part.len(), |buf| {
                    EthernetRepr {
                        src_addr: host.mac,
                        dst_addr: mac,
                        ethertype: EthernetProtocol::Ipv4,
                    }
                    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
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
            self.pushed(ok);
            offset = end;
        }
    }
}
