//! The NAT on a virtual clock with a fake host network: the test plays the driver, answering
//! the core's host requests itself, and plays the client with raw frames.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration as StdDuration;

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

use super::super::dhcp::DhcpSettings;
use super::super::{HostSettings, VirtualHost};
use super::{ConnectFailure, HostOp, IcmpMode, NatSettings, SessionId};

pub const OUR_MAC: EthernetAddress = EthernetAddress([0x00, 0xac, 1, 2, 3, 4]);
pub const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
pub const CLIENT_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 1]);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

pub fn settings() -> NatSettings {
    NatSettings {
        enabled: true,
        mtu: 1500,
        tcp_timeout: Duration::from_secs(7200),
        udp_timeout: Duration::from_secs(600),
        allow_host_loopback: false,
        deny: vec![],
        max_sessions: 100,
        max_sessions_per_client: 10,
        tcp_buffer: 1 << 20,
        dns_upstreams: vec!["10.77.0.53:53".parse().unwrap()],
        icmp_mode: IcmpMode::Real,
    }
}

pub fn host_with(nat: NatSettings) -> VirtualHost {
    let host = HostSettings {
        mac: OUR_MAC,
        ip: OUR_IP,
        mask: Ipv4Addr::new(255, 255, 255, 0),
        mtu: nat.mtu,
    };
    let dhcp = DhcpSettings {
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
    };
    VirtualHost::new(host, dhcp, Vec::new(), nat, 42, t(0))
}

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

pub fn tcp_frame(
    dst: SocketAddrV4,
    sport: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 64000,
        window_scale: None,
        max_seg_size: if control == TcpControl::Syn {
            Some(1460)
        } else {
            None
        },
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

fn connect_op(h: &mut VirtualHost) -> (SessionId, SocketAddr) {
    let mut found = None;
    h.drain_host_ops(|op| {
        if let HostOp::TcpConnect { id, target } = op {
            found = Some((id, target));
        }
    });
    found.expect("a TcpConnect request")
}

#[test]
fn syn_is_deferred_until_the_connect_succeeds() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 80);
    h.handle_frame(
        t(0),
        &tcp_frame(remote, 40000, TcpControl::Syn, 1000, None, &[]),
    );
    assert!(
        tcp_segments(&sent(&mut h, t(0))).is_empty(),
        "no SYN-ACK before the connect"
    );
    let (id, target) = connect_op(&mut h);
    assert_eq!(target, SocketAddr::V4(remote));
    // A retransmitted SYN does not create a second session.
    h.handle_frame(
        t(1000),
        &tcp_frame(remote, 40000, TcpControl::Syn, 1000, None, &[]),
    );
    assert!(ops(&mut h).is_empty());
    assert_eq!(h.nat().table().len(), 1);
    assert!(h.nat_tcp_connected(id, t(1100)));
    let segs = tcp_segments(&sent(&mut h, t(1100)));
    assert_eq!(segs.len(), 1, "{segs:?}");
    let (src, dst, control, _, ack, _) = segs[0];
    assert_eq!(
        (src, dst, control, ack),
        (
            remote,
            SocketAddrV4::new(CLIENT_IP, 40000),
            TcpControl::Syn,
            Some(1001)
        )
    );
}

#[test]
fn refused_connect_becomes_a_rst() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 9);
    h.handle_frame(
        t(0),
        &tcp_frame(remote, 40001, TcpControl::Syn, 5000, None, &[]),
    );
    let (id, _) = connect_op(&mut h);
    h.nat_tcp_connect_failed(id, ConnectFailure::Refused, t(5));
    let segs = tcp_segments(&sent(&mut h, t(5)));
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(segs[0].2, TcpControl::Rst);
    assert_eq!(segs[0].4, Some(5001));
    assert!(h.nat().table().is_empty());
}

/// A raw-frame TCP client: tracks sequence numbers so a test can drive a whole connection.
struct Client {
    remote: SocketAddrV4,
    port: u16,
    seq: u32,
    ack: u32,
}

impl Client {
    /// Opens a connection through the NAT; returns the client and the session id.
    fn connect(
        h: &mut VirtualHost,
        remote: SocketAddrV4,
        port: u16,
        now: Instant,
    ) -> (Client, SessionId) {
        let isn = 7000;
        h.handle_frame(
            now,
            &tcp_frame(remote, port, TcpControl::Syn, isn, None, &[]),
        );
        let (id, _) = connect_op(h);
        assert!(h.nat_tcp_connected(id, now));
        let segs = tcp_segments(&sent(h, now));
        let synack = segs
            .iter()
            .find(|s| s.2 == TcpControl::Syn)
            .expect("SYN-ACK");
        let mut c = Client {
            remote,
            port,
            seq: isn + 1,
            ack: synack.3.wrapping_add(1),
        };
        c.send(h, TcpControl::None, &[], now);
        (c, id)
    }

    fn send(&mut self, h: &mut VirtualHost, control: TcpControl, data: &[u8], now: Instant) {
        h.handle_frame(
            now,
            &tcp_frame(
                self.remote,
                self.port,
                control,
                self.seq,
                Some(self.ack),
                data,
            ),
        );
        self.seq = self.seq.wrapping_add(data.len() as u32);
        if matches!(control, TcpControl::Fin) {
            self.seq = self.seq.wrapping_add(1);
        }
    }

    /// Takes what the NAT sent: acknowledges data and FINs; returns (data bytes, FIN seen, RST seen).
    fn receive(&mut self, h: &mut VirtualHost, now: Instant) -> (usize, bool, bool) {
        let segs = tcp_segments(&sent(h, now));
        let (mut bytes, mut fin, mut rst) = (0, false, false);
        for (_, _, control, seq, _, len) in segs {
            if control == TcpControl::Rst {
                rst = true;
                continue;
            }
            if seq == self.ack {
                self.ack = self.ack.wrapping_add(len as u32);
                bytes += len;
                if control == TcpControl::Fin {
                    self.ack = self.ack.wrapping_add(1);
                    fin = true;
                }
            }
        }
        if bytes > 0 || fin {
            self.send(h, TcpControl::None, &[], now);
        }
        (bytes, fin, rst)
    }
}

fn relay_take(h: &mut VirtualHost, id: SessionId, now: Instant) -> Vec<u8> {
    let mut got = Vec::new();
    let mut relay = h.nat_tcp_relay(id, now).expect("session");
    relay
        .take_client_data(|d| {
            got.extend_from_slice(d);
            Ok(d.len())
        })
        .unwrap();
    got
}

fn relay_give(h: &mut VirtualHost, id: SessionId, data: &[u8], now: Instant) -> usize {
    let mut relay = h.nat_tcp_relay(id, now).expect("session");
    relay
        .fill_from_host(|buf| {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            Ok(n)
        })
        .unwrap()
}

#[test]
fn data_flows_both_ways_and_the_client_half_closes_first() {
    let mut h = host_with(settings());
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40010, t(0));
    c.send(&mut h, TcpControl::Psh, b"GET / HTTP/1.0\r\n\r\n", t(1));
    assert_eq!(relay_take(&mut h, id, t(1)), b"GET / HTTP/1.0\r\n\r\n");
    // Client FIN: the relay sees it once the data is taken; the host may still send.
    c.send(&mut h, TcpControl::Fin, &[], t(2));
    let _ = c.receive(&mut h, t(2));
    assert!(h.nat_tcp_relay(id, t(2)).unwrap().client_finished());
    h.nat_tcp_relay(id, t(2)).unwrap().client_finish_done();
    assert_eq!(
        relay_give(&mut h, id, b"HTTP/1.0 200 OK\r\n\r\nhello", t(3)),
        24
    );
    let (bytes, fin, _) = c.receive(&mut h, t(3));
    assert_eq!((bytes, fin), (24, false));
    // Host EOF: FIN to the client, which acknowledges it; the connection is over.
    h.nat_tcp_relay(id, t(4)).unwrap().host_finished();
    let (_, fin, _) = c.receive(&mut h, t(4));
    assert!(fin, "FIN to the client after the host's EOF");
    let _ = sent(&mut h, t(5));
    assert!(h.nat_tcp_relay(id, t(5)).unwrap().is_closed());
    h.nat_tcp_finished(id, t(5));
    assert!(h.nat().table().is_empty());
}

#[test]
fn the_host_half_closes_first_and_the_client_keeps_sending() {
    let mut h = host_with(settings());
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40011, t(0));
    relay_give(&mut h, id, b"banner", t(1));
    h.nat_tcp_relay(id, t(1)).unwrap().host_finished();
    let (bytes, fin, _) = c.receive(&mut h, t(1));
    assert_eq!((bytes, fin), (6, true));
    // The client can still send after the host's FIN.
    c.send(&mut h, TcpControl::Psh, b"late data", t(2));
    assert_eq!(relay_take(&mut h, id, t(2)), b"late data");
    assert!(!h.nat_tcp_relay(id, t(2)).unwrap().is_closed());
    c.send(&mut h, TcpControl::Fin, &[], t(3));
    let _ = sent(&mut h, t(3));
    assert!(h.nat_tcp_relay(id, t(3)).unwrap().is_closed());
}

#[test]
fn resets_are_carried_both_ways() {
    let mut h = host_with(settings());
    // Client RST: the relay sees a closed connection.
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40012, t(0));
    c.send(&mut h, TcpControl::Rst, &[], t(1));
    assert!(h.nat_tcp_relay(id, t(1)).unwrap().is_closed());
    h.nat_tcp_finished(id, t(1));
    // Host RST: the client gets one.
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 81), 40013, t(2));
    h.nat_tcp_relay(id, t(2)).unwrap().host_reset();
    let (_, _, rst) = c.receive(&mut h, t(2));
    assert!(rst, "RST to the client");
}

#[test]
fn unreachable_connect_becomes_icmp_host_unreachable() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 443);
    h.handle_frame(
        t(0),
        &tcp_frame(remote, 40014, TcpControl::Syn, 9000, None, &[]),
    );
    let (id, _) = connect_op(&mut h);
    h.nat_tcp_connect_failed(id, ConnectFailure::TimedOut, t(30_000));
    let frames = sent(&mut h, t(30_000));
    assert_eq!(frames.len(), 1);
    let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(
        (ip.src_addr(), ip.dst_addr(), ip.next_header()),
        (OUR_IP, CLIENT_IP, IpProtocol::Icmp)
    );
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(
        (icmp.msg_type(), icmp.msg_code()),
        (smoltcp::wire::Icmpv4Message::DstUnreachable, 1)
    );
    // The quoted SYN carries the client's sequence number, so its stack matches the error.
    let quoted = &icmp.data()[20..28];
    assert_eq!(&quoted[4..8], &9000u32.to_be_bytes());
    assert!(h.nat().table().is_empty());
}

#[test]
fn idle_tcp_sessions_are_reset_and_idle_udp_sessions_closed() {
    let mut s = settings();
    s.tcp_timeout = Duration::from_secs(60);
    s.udp_timeout = Duration::from_secs(30);
    let mut h = host_with(s);
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40015, t(0));
    h.handle_frame(
        t(0),
        &udp_frame(SocketAddrV4::new(REMOTE, 5000), 41000, b"ping"),
    );
    let _ = ops(&mut h);
    assert_eq!(h.nat().table().len(), 2);
    let deadline = h.poll_timeout().expect("a deadline");
    assert!(deadline <= t(30_000));
    h.handle_timeout(t(30_000));
    let closed = ops(&mut h);
    assert!(closed.iter().any(|o| o.starts_with("Close")), "{closed:?}");
    assert_eq!(h.nat().table().len(), 1, "the UDP session went");
    h.handle_timeout(t(60_000));
    let (_, _, rst) = c.receive(&mut h, t(60_000));
    assert!(rst, "idle TCP session reset");
    assert!(h.nat_tcp_relay(id, t(60_000)).unwrap().is_closed());
}

#[test]
fn session_limits_refuse_new_flows() {
    let mut s = settings();
    s.max_sessions_per_client = 2;
    let mut h = host_with(s);
    for port in [40020, 40021] {
        h.handle_frame(
            t(0),
            &tcp_frame(
                SocketAddrV4::new(REMOTE, 80),
                port,
                TcpControl::Syn,
                1,
                None,
                &[],
            ),
        );
    }
    assert_eq!(ops(&mut h).len(), 2);
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(REMOTE, 80),
            40022,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    assert!(ops(&mut h).is_empty(), "no connect for the third");
    let segs = tcp_segments(&sent(&mut h, t(0)));
    assert!(
        segs.iter()
            .any(|s| s.2 == TcpControl::Rst && s.1.port() == 40022),
        "{segs:?}"
    );
    h.handle_frame(t(0), &udp_frame(SocketAddrV4::new(REMOTE, 53), 41001, b"x"));
    assert!(ops(&mut h).is_empty(), "no UDP flow either");
    assert_eq!(h.nat().counters().refused_limits, 2);
}

#[test]
fn loopback_and_denied_networks_are_refused() {
    let mut s = settings();
    s.deny = vec![(Ipv4Addr::new(10, 99, 0, 0), 16)];
    let mut h = host_with(s);
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 22),
            40030,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 1), 22),
            40031,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    assert!(ops(&mut h).is_empty());
    let segs = tcp_segments(&sent(&mut h, t(0)));
    assert_eq!(
        segs.iter().filter(|s| s.2 == TcpControl::Rst).count(),
        2,
        "{segs:?}"
    );
    h.handle_frame(
        t(0),
        &udp_frame(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 53), 41002, b"x"),
    );
    assert!(ops(&mut h).is_empty());
    let frames = sent(&mut h, t(0));
    let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(icmp.msg_code(), 13, "administratively prohibited");
    assert_eq!(h.nat().counters().refused_rules, 3);
    // With the loopback allowed, the same SYN goes out.
    let mut s = settings();
    s.allow_host_loopback = true;
    let mut h = host_with(s);
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 22),
            40032,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    assert_eq!(ops(&mut h).len(), 1);
}

pub fn udp_frame(dst: SocketAddrV4, sport: u16, payload: &[u8]) -> Vec<u8> {
    use smoltcp::wire::{UdpPacket, UdpRepr};
    ip_frame(*dst.ip(), IpProtocol::Udp, 8 + payload.len(), |buf| {
        UdpRepr {
            src_port: sport,
            dst_port: dst.port(),
        }
        .emit(
            &mut UdpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(CLIENT_IP),
            &IpAddress::Ipv4(*dst.ip()),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

/// UDP datagrams among `frames`, reassembling fragments: (src, dst, payload).
fn udp_datagrams(frames: &[Vec<u8>]) -> Vec<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    use smoltcp::wire::UdpPacket;
    let mut r = super::frag::Reassembler::default();
    let mut out = Vec::new();
    let mut whole = Vec::new();
    for f in frames {
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let packet: Vec<u8> = if ip.more_frags() || ip.frag_offset() != 0 {
            if !r.add(&ip, t(0), &mut whole) {
                continue;
            }
            whole.clone()
        } else {
            eth.payload()[..usize::from(ip.total_len())].to_vec()
        };
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        if ip.next_header() != IpProtocol::Udp {
            continue;
        }
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
        out.push((
            SocketAddrV4::new(ip.src_addr(), udp.src_port()),
            SocketAddrV4::new(ip.dst_addr(), udp.dst_port()),
            udp.payload().to_vec(),
        ));
    }
    out
}

#[test]
fn udp_flows_are_relayed_and_replies_come_from_the_remote() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 7);
    h.handle_frame(t(0), &udp_frame(remote, 41010, b"one"));
    h.handle_frame(t(1), &udp_frame(remote, 41010, b"two"));
    let o = ops(&mut h);
    assert_eq!(o.len(), 3, "{o:?}");
    assert!(
        o[0].starts_with("UdpOpen")
            && o[1].contains("[111, 110, 101]")
            && o[2].starts_with("UdpSend")
    );
    let id = h.nat().table().iter().next().unwrap().id;
    let n = h.nat_udp_receive(id, t(2), |buf| {
        buf[..5].copy_from_slice(b"reply");
        Ok(5)
    });
    assert_eq!(n.unwrap(), 5);
    let d = udp_datagrams(&sent(&mut h, t(2)));
    assert_eq!(
        d,
        vec![(
            remote,
            SocketAddrV4::new(CLIENT_IP, 41010),
            b"reply".to_vec()
        )]
    );
    let s = h.nat().table().get(id).unwrap();
    assert_eq!(
        (s.bytes_out, s.bytes_in, s.packets_out, s.packets_in),
        (6, 5, 2, 1)
    );
}

#[test]
fn fragmented_datagrams_are_reassembled_and_big_replies_fragmented() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 7);
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    // One 4008-byte UDP datagram in IPv4 fragments of 1480 bytes.
    let whole = udp_frame(remote, 41020, &payload);
    let udp_bytes = &whole[34..];
    let mut offset = 0;
    let mut ident = 0x4242u16;
    while offset < udp_bytes.len() {
        let end = (offset + 1480).min(udp_bytes.len());
        let frame = ip_frame(*remote.ip(), IpProtocol::Udp, end - offset, |buf| {
            buf.copy_from_slice(&udp_bytes[offset..end])
        });
        let mut frame = frame;
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_ident(ident);
        ip.set_dont_frag(false);
        ip.set_more_frags(end < udp_bytes.len());
        ip.set_frag_offset(offset as u16);
        ip.fill_checksum();
        h.handle_frame(t(0), &frame);
        offset = end;
    }
    ident += 1;
    let _ = ident;
    let mut sent_payloads = Vec::new();
    h.drain_host_ops(|op| {
        if let HostOp::UdpSend { payload, .. } = op {
            sent_payloads.push(payload.to_vec());
        }
    });
    assert_eq!(sent_payloads, vec![payload.clone()]);
    // A 4000-byte reply goes back in fragments that reassemble to the datagram.
    let id = h.nat().table().iter().next().unwrap().id;
    h.nat_udp_receive(id, t(1), |buf| {
        buf[..payload.len()].copy_from_slice(&payload);
        Ok(payload.len())
    })
    .unwrap();
    let frames = sent(&mut h, t(1));
    assert!(frames.len() >= 3, "fragmented: {} frames", frames.len());
    assert!(frames.iter().all(|f| f.len() <= 1514));
    let d = udp_datagrams(&frames);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].2, payload);
}

#[test]
fn dns_over_udp_fails_over_to_the_next_upstream() {
    let mut s = settings();
    let (a, b): (SocketAddr, SocketAddr) = (
        "10.77.0.53:53".parse().unwrap(),
        "10.77.0.54:5353".parse().unwrap(),
    );
    s.dns_upstreams = vec![a, b];
    let mut h = host_with(s);
    let mut query = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(b"\x05files\x06hubnat\x04test\x00\x00\x01\x00\x01");
    h.handle_frame(
        t(0),
        &udp_frame(SocketAddrV4::new(OUR_IP, 53), 41030, &query),
    );
    let mut sends = Vec::new();
    h.drain_host_ops(|op| {
        if let HostOp::DnsSend { upstream, payload } = op {
            sends.push((upstream, payload.to_vec()));
        }
    });
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].0, a);
    h.handle_timeout(t(2000));
    h.drain_host_ops(|op| {
        if let HostOp::DnsSend { upstream, payload } = op {
            sends.push((upstream, payload.to_vec()));
        }
    });
    assert_eq!(sends.len(), 2);
    assert_eq!(sends[1].0, b, "second upstream after the timeout");
    let mut answer = sends[1].1.clone();
    answer[2] |= 0x80;
    answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 77, 0, 2]);
    answer[7] = 1;
    h.nat_dns_answer(a, &answer, t(2100));
    assert!(
        udp_datagrams(&sent(&mut h, t(2100))).is_empty(),
        "the first upstream is no longer asked"
    );
    h.nat_dns_answer(b, &answer, t(2100));
    let d = udp_datagrams(&sent(&mut h, t(2100)));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, SocketAddrV4::new(OUR_IP, 53));
    assert_eq!(&d[0].2[..2], &[0xab, 0xcd], "the client's id is back");
}

#[test]
fn dns_over_tcp_goes_to_the_upstreams_in_turn() {
    let mut s = settings();
    let (a, b): (SocketAddr, SocketAddr) = (
        "10.77.0.53:53".parse().unwrap(),
        "10.77.0.54:53".parse().unwrap(),
    );
    s.dns_upstreams = vec![a, b];
    let mut h = host_with(s);
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(OUR_IP, 53),
            40040,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    let (id, target) = connect_op(&mut h);
    assert_eq!(target, a);
    h.nat_tcp_connect_failed(id, ConnectFailure::Refused, t(1));
    let (id2, target) = connect_op(&mut h);
    assert_eq!((id2, target), (id, b));
    assert!(h.nat_tcp_connected(id, t(2)));
    let segs = tcp_segments(&sent(&mut h, t(2)));
    assert_eq!(
        segs[0].0,
        SocketAddrV4::new(OUR_IP, 53),
        "SYN-ACK from the virtual host"
    );
    // TCP to any other port of ours is reset.
    h.handle_frame(
        t(3),
        &tcp_frame(
            SocketAddrV4::new(OUR_IP, 22),
            40041,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    assert!(ops(&mut h).is_empty());
    assert!(tcp_segments(&sent(&mut h, t(3)))
        .iter()
        .any(|s| s.2 == TcpControl::Rst));
}

#[test]
fn nat_disabled_carries_nothing() {
    let mut s = settings();
    s.enabled = false;
    let mut h = host_with(s);
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(REMOTE, 80),
            40050,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    h.handle_frame(t(0), &udp_frame(SocketAddrV4::new(REMOTE, 53), 41050, b"x"));
    assert!(ops(&mut h).is_empty());
    assert!(sent(&mut h, t(0)).is_empty());
    assert_eq!(h.nat().counters().disabled, 2);
}
