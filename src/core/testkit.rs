//! The shared in-memory fixture: a virtual host on a virtual clock, and the frames a test
//! client sends. Used by the core's unit tests and by `benches/` (hence public, but hidden from
//! the documentation: it is not part of the embedding API).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration as StdDuration;

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber,
};

use super::dhcp::DhcpSettings;
use super::nat::{IcmpMode, NatSettings};
use super::{HostSettings, Settings, VirtualHost};

/// The virtual host's MAC.
pub const OUR_MAC: EthernetAddress = EthernetAddress([0x00, 0xac, 1, 2, 3, 4]);
/// The virtual host's address.
pub const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
/// The test client's MAC.
pub const CLIENT_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 1]);
/// The test client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);
/// An outside address.
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The reference settings: 192.168.30.1/24, DHCP on, NAT on with one DNS upstream.
pub fn settings() -> Settings {
    Settings {
        enabled: true,
        host: HostSettings {
            mac: OUR_MAC,
            ip: OUR_IP,
            mask: Ipv4Addr::new(255, 255, 255, 0),
            mtu: 1500,
        },
        dhcp: DhcpSettings {
            enabled: true,
            range_start: Ipv4Addr::new(192, 168, 30, 10),
            range_end: Ipv4Addr::new(192, 168, 30, 200),
            mask: Ipv4Addr::new(255, 255, 255, 0),
            lease: StdDuration::from_secs(7200),
            gateway: Some(OUR_IP),
            dns: vec![OUR_IP],
            domain: None,
            routes: vec![],
            statics: vec![],
            max_leases_per_mac: 4,
            serve_macs: vec![],
            ignore_macs: vec![],
            // The core's other tests send no probe frames: see the other-servers tests.
            authoritative: true,
        },
        nat: NatSettings {
            enabled: true,
            tcp_timeout: Duration::from_secs(7200),
            tcp_handshake_timeout: Duration::from_secs(20),
            udp_timeout: Duration::from_secs(600),
            allow_host_loopback: false,
            allow_link_local: false,
            allow_host_addresses: false,
            host_addresses: vec![],
            deny: vec![],
            max_sessions: 100,
            max_sessions_per_client: 10,
            tcp_buffer: 1 << 20,
            memory_limit: None,
            dns_upstreams: vec!["10.77.0.53:53".parse().expect("literal")],
        },
    }
}

/// A virtual host with `settings` at [`t`]`(0)`, echo through (fake) ping sockets.
pub fn host(settings: Settings) -> VirtualHost {
    let mut h = VirtualHost::new(settings, Vec::new(), 42, t(0));
    h.set_icmp_mode(IcmpMode::Real);
    h
}

/// The virtual clock: `ms` milliseconds after the fixture's epoch.
pub fn t(ms: i64) -> Instant {
    Instant::from_millis(1_700_000_000_000i64 + ms)
}

/// An Ethernet frame carrying an IPv4 packet from the client.
pub fn ip_frame(
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: CLIENT_IP,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + 20 + payload_len];
    EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: OUR_MAC,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut frame[14..]),
        &ChecksumCapabilities::default(),
    );
    emit(&mut frame[34..]);
    frame
}

/// A TCP segment from the client (no window scaling offered).
pub fn tcp_frame(
    dst: SocketAddrV4,
    sport: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    tcp_segment(dst, sport, control, seq, ack, None, payload)
}

/// A TCP segment from the client; a SYN offers `window_scale` and an MSS of 1460.
pub fn tcp_segment(
    dst: SocketAddrV4,
    sport: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    window_scale: Option<u8>,
    payload: &[u8],
) -> Vec<u8> {
    let syn = control == TcpControl::Syn;
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: if window_scale.is_some() { 65535 } else { 64000 },
        window_scale: window_scale.filter(|_| syn),
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload,
    };
    ip_frame(*dst.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
        repr.emit(
            &mut TcpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(CLIENT_IP),
            &IpAddress::Ipv4(*dst.ip()),
            &ChecksumCapabilities::default(),
        )
    })
}

/// A SYN from `src` (an address the test picks, spoofed or not) at `mac` to `dst`.
pub fn tcp_syn_from(mac: EthernetAddress, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut frame = tcp_frame(dst, src.port(), TcpControl::Syn, 1, None, &[]);
    EthernetFrame::new_unchecked(&mut frame[..]).set_src_addr(mac);
    let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
    ip.set_src_addr(*src.ip());
    ip.fill_checksum();
    let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
    tcp.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    frame
}

/// A broadcast ARP request from the client (as `sender_ip`) for `target_ip`.
pub fn arp_request(sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    arp_from(ArpOperation::Request, CLIENT_MAC, sender_ip, target_ip)
}

/// A broadcast ARP packet of `operation` from `mac` (as `sender_ip`) about `target_ip`.
pub fn arp_from(
    operation: ArpOperation,
    mac: EthernetAddress,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: mac,
        source_protocol_addr: sender_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target_ip,
    };
    let mut frame = vec![0u8; 14 + repr.buffer_len()];
    EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    repr.emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
    frame
}

/// Frames the core sent, after a poll.
pub fn sent(h: &mut VirtualHost, now: Instant) -> Vec<Vec<u8>> {
    h.poll(now);
    let mut batch = FrameBatch::new(64, 1514);
    h.take_transmit(&mut batch);
    batch.iter().map(<[u8]>::to_vec).collect()
}

/// The TCP segments among `frames`: (src, dst, control, seq, ack, payload length).
pub fn tcp_segments(
    frames: &[Vec<u8>],
) -> Vec<(
    SocketAddrV4,
    SocketAddrV4,
    TcpControl,
    u32,
    Option<u32>,
    usize,
)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            assert_eq!(eth.dst_addr(), CLIENT_MAC, "frames go to the client's MAC");
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            let repr = TcpRepr::parse(
                &tcp,
                &IpAddress::Ipv4(ip.src_addr()),
                &IpAddress::Ipv4(ip.dst_addr()),
                &ChecksumCapabilities::default(),
            )
            .ok()?;
            Some((
                SocketAddrV4::new(ip.src_addr(), repr.src_port),
                SocketAddrV4::new(ip.dst_addr(), repr.dst_port),
                repr.control,
                repr.seq_number.0 as u32,
                repr.ack_number.map(|a| a.0 as u32),
                repr.payload.len(),
            ))
        })
        .collect()
}

pub fn ops(h: &mut VirtualHost) -> Vec<String> {
    let mut out = Vec::new();
    h.drain_host_ops(|op| out.push(format!("{op:?}")));
    out
}

/// A broadcast DHCP message of `kind` from the client; with `request`, options 50 (requested
/// address) and 54 (server identifier).
pub fn dhcp_frame(
    kind: dhcproto::v4::MessageType,
    request: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Vec<u8> {
    use dhcproto::v4::{DhcpOption, Message};
    use dhcproto::{Encodable, Encoder};
    let mut msg = Message::new_with_id(
        9,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &CLIENT_MAC.0,
    );
    msg.opts_mut().insert(DhcpOption::MessageType(kind));
    if let Some((ip, server)) = request {
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    }
    let mut body = Vec::new();
    msg.encode(&mut Encoder::new(&mut body))
        .expect("invariant: a small message encodes");
    dhcp_payload_frame(&body)
}

/// A frame from the client (0.0.0.0:68 to 255.255.255.255:67) carrying `body`, a DHCP message
/// as bytes (any bytes).
pub fn dhcp_payload_frame(body: &[u8]) -> Vec<u8> {
    udp_frame(
        (CLIENT_MAC, Ipv4Addr::UNSPECIFIED, 68),
        (EthernetAddress::BROADCAST, Ipv4Addr::BROADCAST, 67),
        body,
    )
}

/// An Ethernet frame carrying a UDP datagram of `payload` from `src` to `dst`, each a MAC
/// address, an IPv4 address and a port; checksums filled.
pub fn udp_frame(
    src: (EthernetAddress, Ipv4Addr, u16),
    dst: (EthernetAddress, Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    use smoltcp::wire::{UdpPacket, UdpRepr};
    let mut frame = vec![0u8; 14 + 20 + 8 + payload.len()];
    EthernetRepr {
        src_addr: src.0,
        dst_addr: dst.0,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    Ipv4Repr {
        src_addr: src.1,
        dst_addr: dst.1,
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    }
    .emit(
        &mut Ipv4Packet::new_unchecked(&mut frame[14..]),
        &ChecksumCapabilities::default(),
    );
    UdpRepr {
        src_port: src.2,
        dst_port: dst.2,
    }
    .emit(
        &mut UdpPacket::new_unchecked(&mut frame[34..]),
        &IpAddress::Ipv4(src.1),
        &IpAddress::Ipv4(dst.1),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    frame
}
