//! Building the frames the virtual host sends: Ethernet + IPv4 + UDP/ICMP, written in place
//! into the transmit batch with `smoltcp::wire` (no intermediate buffers).

use std::net::Ipv4Addr;

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr, ETHERNET_HEADER_LEN,
};

/// TTL of the packets the virtual host originates.
pub const HOP_LIMIT: u8 = 64;

const IPV4_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;

/// Appends an Ethernet/IPv4/UDP frame carrying `payload_len` bytes written by `payload`.
/// Returns false when the batch is full (the frame is dropped).
#[allow(clippy::too_many_arguments)]
pub fn push_udp(
    tx: &mut FrameBatch,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload_len: usize,
    payload: impl FnOnce(&mut [u8]),
) -> bool {
    let ip_repr = Ipv4Repr {
        src_addr: src.0,
        dst_addr: dst.0,
        next_header: IpProtocol::Udp,
        payload_len: UDP_HEADER_LEN + payload_len,
        hop_limit: HOP_LIMIT,
    };
    let len = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + payload_len;
    tx.push_built(len, |buf| {
        let ip_buf = emit_headers(buf, src_mac, dst_mac, &ip_repr);
        let udp_repr = UdpRepr {
            src_port: src.1,
            dst_port: dst.1,
        };
        let mut udp = UdpPacket::new_unchecked(ip_buf);
        udp_repr.emit(
            &mut udp,
            &IpAddress::Ipv4(src.0),
            &IpAddress::Ipv4(dst.0),
            payload_len,
            payload,
            &ChecksumCapabilities::default(),
        );
    })
}

/// Appends an Ethernet/IPv4 frame whose `payload_len`-byte payload of `protocol` is written by
/// `payload`.
#[allow(clippy::too_many_arguments)]
pub fn push_ip(
    tx: &mut FrameBatch,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    payload: impl FnOnce(&mut [u8]),
) -> bool {
    let ip_repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: HOP_LIMIT,
    };
    tx.push_built(ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + payload_len, |buf| {
        let ip_buf = emit_headers(buf, src_mac, dst_mac, &ip_repr);
        payload(&mut ip_buf[..payload_len]);
    })
}

/// Appends an Ethernet/IPv4/ICMP frame.
pub fn push_icmp(
    tx: &mut FrameBatch,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp: &Icmpv4Repr<'_>,
) -> bool {
    let ip_repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let len = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + icmp.buffer_len();
    tx.push_built(len, |buf| {
        let ip_buf = emit_headers(buf, src_mac, dst_mac, &ip_repr);
        let mut pkt = Icmpv4Packet::new_unchecked(ip_buf);
        icmp.emit(&mut pkt, &ChecksumCapabilities::default());
    })
}

/// Writes the Ethernet and IPv4 headers into `buf`; returns the IPv4 payload.
fn emit_headers<'a>(
    buf: &'a mut [u8],
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    ip_repr: &Ipv4Repr,
) -> &'a mut [u8] {
    let eth_repr = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut eth = EthernetFrame::new_unchecked(&mut *buf);
    eth_repr.emit(&mut eth);
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETHERNET_HEADER_LEN..]);
    ip_repr.emit(&mut ip, &ChecksumCapabilities::default());
    &mut buf[ETHERNET_HEADER_LEN + IPV4_HEADER_LEN..]
}
