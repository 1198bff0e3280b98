//! The NAT on a virtual clock with a fake host network: the test plays the driver, answering
//! the core's host requests itself, and plays the client with raw frames.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetFrame, IpAddress, IpProtocol, Ipv4Packet, TcpControl};

use super::super::testkit::{self, *};
use super::super::{Event, VirtualHost};
use super::tcp::QUIET_AFTER;
use super::{EndReason, HostEvent, HostOp, NatEvent, NatSettings, SessionId};

pub fn settings() -> NatSettings {
    testkit::settings().nat
}

pub fn host_with(nat: NatSettings) -> VirtualHost {
    let mut s = testkit::settings();
    s.nat = nat;
    testkit::host(s)
}

/// The driver's report that the outbound connect of `id` succeeded.
fn connected(h: &mut VirtualHost, id: SessionId, now: Instant) {
    h.nat_host_event(id, HostEvent::Connected, now);
}

/// The driver's report that the outbound connect of `id` failed with `errno`.
fn connect_failed(h: &mut VirtualHost, id: SessionId, errno: i32, now: Instant) {
    let e = io::Error::from_raw_os_error(errno);
    h.nat_host_event(id, HostEvent::ConnectFailed(&e), now);
}

/// The reasons of the sessions that ended since the last call.
fn ended(h: &mut VirtualHost) -> Vec<EndReason> {
    let mut out = Vec::new();
    while let Some(e) = h.poll_event() {
        if let Event::Nat(NatEvent::Ended { reason, .. }) = e {
            out.push(reason);
        }
    }
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
    connected(&mut h, id, t(1100));
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
    connect_failed(&mut h, id, libc::ECONNREFUSED, t(5));
    let segs = tcp_segments(&sent(&mut h, t(5)));
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(segs[0].2, TcpControl::Rst);
    assert_eq!(segs[0].4, Some(5001));
    assert!(h.nat().table().is_empty());
    assert_eq!(ended(&mut h), [EndReason::Refused]);
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
        connected(h, id, now);
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
    h.nat_host_event(id, HostEvent::WriteShut, t(2));
    assert!(!h.nat_tcp_relay(id, t(2)).unwrap().client_finished());
    assert_eq!(
        relay_give(&mut h, id, b"HTTP/1.0 200 OK\r\n\r\nhello", t(3)),
        24
    );
    let (bytes, fin, _) = c.receive(&mut h, t(3));
    assert_eq!((bytes, fin), (24, false));
    // Host EOF: FIN to the client, which acknowledges it; the connection is over.
    h.nat_host_event(id, HostEvent::EndOfStream, t(4));
    let (_, fin, _) = c.receive(&mut h, t(4));
    assert!(fin, "FIN to the client after the host's EOF");
    let _ = sent(&mut h, t(5));
    assert!(
        h.nat_tcp_relay(id, t(5)).is_none(),
        "the core ended the session"
    );
    assert!(h.nat().table().is_empty());
    assert_eq!(ended(&mut h), [EndReason::ClosedByClient]);
    let closes = ops(&mut h);
    assert_eq!(closes, [format!("Close {{ id: {id:?}, abort: false }}")]);
}

#[test]
fn the_host_half_closes_first_and_the_client_keeps_sending() {
    let mut h = host_with(settings());
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40011, t(0));
    relay_give(&mut h, id, b"banner", t(1));
    h.nat_host_event(id, HostEvent::EndOfStream, t(1));
    let (bytes, fin, _) = c.receive(&mut h, t(1));
    assert_eq!((bytes, fin), (6, true));
    // The client can still send after the host's FIN.
    c.send(&mut h, TcpControl::Psh, b"late data", t(2));
    assert_eq!(relay_take(&mut h, id, t(2)), b"late data");
    assert_eq!(h.nat().table().len(), 1, "still open one way");
    c.send(&mut h, TcpControl::Fin, &[], t(3));
    let _ = sent(&mut h, t(3));
    assert_eq!(
        h.nat().table().len(),
        1,
        "the relay carries the client's FIN first"
    );
    assert!(h.nat_tcp_relay(id, t(3)).unwrap().client_finished());
    h.nat_host_event(id, HostEvent::WriteShut, t(3));
    let _ = sent(&mut h, t(3));
    assert!(h.nat().table().is_empty());
    assert_eq!(ended(&mut h), [EndReason::ClosedByRemote]);
}

#[test]
fn resets_are_carried_both_ways() {
    let mut h = host_with(settings());
    // Client RST: the session ends and the host socket is closed with a RST (abort), never
    // shut down with a FIN first.
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40012, t(0));
    let _ = ops(&mut h);
    c.send(&mut h, TcpControl::Rst, &[], t(1));
    assert!(h.nat_tcp_relay(id, t(1)).is_none());
    assert_eq!(
        ops(&mut h),
        [format!("Close {{ id: {id:?}, abort: true }}")]
    );
    assert_eq!(ended(&mut h), [EndReason::ResetByClient]);
    // Host RST: the client gets one.
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 81), 40013, t(2));
    h.nat_host_event(id, HostEvent::Reset, t(2));
    let (_, _, rst) = c.receive(&mut h, t(2));
    assert!(rst, "RST to the client");
    assert_eq!(ended(&mut h), [EndReason::ResetByRemote]);
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
    connect_failed(&mut h, id, libc::ETIMEDOUT, t(30_000));
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
    assert_eq!(ended(&mut h), [EndReason::Unreachable]);
}

#[test]
fn idle_tcp_sessions_are_reset_and_idle_udp_sessions_closed() {
    let mut s = settings();
    s.tcp_timeout = Duration::from_secs(60);
    s.udp_timeout = Duration::from_secs(30);
    let mut h = host_with(s);
    let (mut c, _id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40015, t(0));
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
    assert!(h.nat().table().is_empty());
    assert_eq!(
        ended(&mut h),
        [EndReason::IdleTimeout, EndReason::IdleTimeout]
    );
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
    s.deny = vec!["10.99.0.0/16".parse().unwrap()];
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

/// The ICMP destination unreachable messages among `frames`: (source, code, the quoted UDP
/// source port).
fn icmp_unreachables(frames: &[Vec<u8>]) -> Vec<(Ipv4Addr, u8, u16)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Icmp {
                return None;
            }
            assert_eq!(ip.dst_addr(), CLIENT_IP);
            let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).ok()?;
            assert_eq!(
                icmp.msg_type(),
                smoltcp::wire::Icmpv4Message::DstUnreachable
            );
            let quoted = &icmp.data()[20..28];
            let sport = u16::from_be_bytes([quoted[0], quoted[1]]);
            Some((ip.src_addr(), icmp.msg_code(), sport))
        })
        .collect()
}

#[test]
fn udp_socket_errors_reach_the_client_as_icmp_errors() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 5000);
    h.handle_frame(t(0), &udp_frame(remote, 41020, b"one"));
    let id = h.nat().table().iter().next().unwrap().id;
    ops(&mut h);
    // Errors on a live flow, as the driver reads them from the socket: port unreachable comes
    // from the remote, host and network unreachable and prohibited from us; the flow stays.
    for (errno, from, code) in [
        (libc::ECONNREFUSED, REMOTE, 3),
        (libc::EHOSTUNREACH, OUR_IP, 1),
        (libc::ENETUNREACH, OUR_IP, 0),
        (libc::EACCES, OUR_IP, 13),
    ] {
        let e = io::Error::from_raw_os_error(errno);
        h.nat_host_event(id, HostEvent::Error(&e), t(1));
        assert_eq!(
            icmp_unreachables(&sent(&mut h, t(1))),
            [(from, code, 41020)],
            "errno {errno}"
        );
    }
    assert!(h.nat().table().get(id).is_some());
    assert_eq!(ended(&mut h), []);
    // A socket that cannot be opened because a route forbids it: the client hears why, and
    // the session ends as unreachable, not as a limit.
    for (port, errno, code) in [(41021, libc::EACCES, Some(13)), (41022, libc::EINVAL, None)] {
        h.handle_frame(t(2), &udp_frame(remote, port, b"two"));
        let id = h
            .nat()
            .table()
            .iter()
            .find(|s| s.key.client.port() == port)
            .unwrap()
            .id;
        ops(&mut h);
        let e = io::Error::from_raw_os_error(errno);
        h.nat_host_event(id, HostEvent::OpenFailed(&e), t(3));
        let want: Vec<(Ipv4Addr, u8, u16)> = code.map(|c| (OUR_IP, c, port)).into_iter().collect();
        assert_eq!(
            icmp_unreachables(&sent(&mut h, t(3))),
            want,
            "errno {errno}"
        );
        assert!(h.nat().table().get(id).is_none());
        assert_eq!(ended(&mut h), [EndReason::Unreachable], "errno {errno}");
    }
    // Out of sockets is a limit.
    h.handle_frame(t(4), &udp_frame(remote, 41023, b"three"));
    let id = h
        .nat()
        .table()
        .iter()
        .find(|s| s.key.client.port() == 41023)
        .unwrap()
        .id;
    ops(&mut h);
    let e = io::Error::from_raw_os_error(libc::EMFILE);
    h.nat_host_event(id, HostEvent::OpenFailed(&e), t(5));
    assert_eq!(ended(&mut h), [EndReason::Limit]);
}

#[test]
fn a_prohibited_connect_becomes_icmp_administratively_prohibited() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 443);
    h.handle_frame(
        t(0),
        &tcp_frame(remote, 40015, TcpControl::Syn, 9000, None, &[]),
    );
    let (id, _) = connect_op(&mut h);
    connect_failed(&mut h, id, libc::EACCES, t(1));
    let frames = sent(&mut h, t(1));
    assert_eq!(frames.len(), 1);
    let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(
        (ip.src_addr(), ip.next_header()),
        (OUR_IP, IpProtocol::Icmp)
    );
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(
        (icmp.msg_type(), icmp.msg_code()),
        (smoltcp::wire::Icmpv4Message::DstUnreachable, 13)
    );
    assert_eq!(ended(&mut h), [EndReason::Unreachable]);
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
    connect_failed(&mut h, id, libc::ECONNREFUSED, t(1));
    let (id2, target) = connect_op(&mut h);
    assert_eq!((id2, target), (id, b));
    connected(&mut h, id, t(2));
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

#[test]
fn link_local_and_the_hosts_own_addresses_are_refused_unless_allowed() {
    let metadata = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
    let own = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 22);
    let mut s = settings();
    s.host_addresses = vec![(*own.ip()).into(), "2001:db8::1".parse().unwrap()];
    let mut h = host_with(s.clone());
    for (dst, sport) in [(metadata, 40060), (own, 40061)] {
        h.handle_frame(t(0), &tcp_frame(dst, sport, TcpControl::Syn, 1, None, &[]));
    }
    h.handle_frame(t(0), &udp_frame(metadata, 41060, b"x"));
    h.handle_frame(t(2000), &udp_frame(own, 41061, b"x"));
    assert!(
        ops(&mut h).is_empty(),
        "nothing goes to 169.254.0.0/16 or the host"
    );
    let segs = tcp_segments(&sent(&mut h, t(2000)));
    assert_eq!(segs.iter().filter(|s| s.2 == TcpControl::Rst).count(), 2);
    assert_eq!(h.nat().counters().refused_rules, 4);
    let mut details = Vec::new();
    while let Some(e) = h.poll_event() {
        if let Event::Nat(NatEvent::Refused { reason, detail, .. }) = e {
            assert_eq!(reason, EndReason::DeniedByRule);
            details.push(detail);
        }
    }
    // One line per second of refusals: the first and the last.
    assert_eq!(
        details,
        [
            "destination is link-local, 169.254.0.0/16 (nat.allow_link_local = false)",
            "destination is one of the host's own addresses (nat.allow_host_addresses = false)",
        ]
    );
    // Each allowed on its own.
    s.allow_link_local = true;
    let mut h = host_with(s.clone());
    h.handle_frame(
        t(0),
        &tcp_frame(metadata, 40062, TcpControl::Syn, 1, None, &[]),
    );
    h.handle_frame(t(0), &tcp_frame(own, 40063, TcpControl::Syn, 1, None, &[]));
    assert_eq!(ops(&mut h).len(), 1);
    s.allow_link_local = false;
    s.allow_host_addresses = true;
    let mut h = host_with(s);
    h.handle_frame(
        t(0),
        &tcp_frame(metadata, 40064, TcpControl::Syn, 1, None, &[]),
    );
    h.handle_frame(t(0), &tcp_frame(own, 40065, TcpControl::Syn, 1, None, &[]));
    let o = ops(&mut h);
    assert_eq!(o.len(), 1);
    assert!(o[0].contains("10.77.0.1:22"), "{o:?}");
}

#[test]
fn redirects_follow_the_link_local_and_host_address_rules() {
    use super::admit::safety_rules;
    let host = testkit::settings().host;
    let mut s = settings();
    s.host_addresses = vec!["10.77.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    for dst in ["169.254.169.254", "169.254.0.1", "10.77.0.1"] {
        assert!(
            safety_rules(dst.parse().unwrap(), &host, &s).is_err(),
            "{dst}"
        );
    }
    assert_eq!(
        safety_rules("10.77.0.2".parse().unwrap(), &host, &s),
        Ok(())
    );
    for target in [
        "[fe80::1]:80",
        "[2001:db8::1]:80",
        "[::ffff:169.254.169.254]:80",
    ] {
        let target: SocketAddr = target.parse().unwrap();
        assert!(
            super::admit::redirect_rules(target, &host, &s).is_err(),
            "{target}"
        );
    }
    let fine: SocketAddr = "[2001:db8::2]:80".parse().unwrap();
    assert_eq!(super::admit::redirect_rules(fine, &host, &s), Ok(()));
    s.allow_link_local = true;
    s.allow_host_addresses = true;
    for target in [
        "[fe80::1]:80",
        "[2001:db8::1]:80",
        "169.254.169.254:80",
        "10.77.0.1:22",
    ] {
        let target: SocketAddr = target.parse().unwrap();
        assert_eq!(
            super::admit::redirect_rules(target, &host, &s),
            Ok(()),
            "{target}"
        );
    }
}

#[test]
fn a_client_that_never_completes_the_handshake_is_ended_after_the_handshake_timeout() {
    let mut s = settings();
    s.tcp_handshake_timeout = Duration::from_secs(20);
    let mut h = host_with(s);
    let remote = SocketAddrV4::new(REMOTE, 80);
    // The SYN of a client that will never ACK (or of a spoofed address that never sees the
    // SYN-ACK).
    h.handle_frame(
        t(0),
        &tcp_frame(remote, 40070, TcpControl::Syn, 1, None, &[]),
    );
    let (id, _) = connect_op(&mut h);
    connected(&mut h, id, t(1000));
    assert!(!tcp_segments(&sent(&mut h, t(1000))).is_empty(), "SYN-ACK");
    // A client that does complete it is left alone.
    let (_c, done) = Client::connect(&mut h, remote, 40071, t(1000));
    assert!(h.poll_timeout().is_some_and(|at| at <= t(21_000)));
    // The half-open one's SYN retransmissions do not extend it.
    h.handle_frame(
        t(15_000),
        &tcp_frame(remote, 40070, TcpControl::Syn, 1, None, &[]),
    );
    h.handle_timeout(t(20_999));
    assert!(h.nat().table().get(id).is_some());
    h.handle_timeout(t(21_000));
    assert!(h.nat().table().get(id).is_none(), "half-open session ended");
    assert!(
        h.nat().table().get(done).is_some(),
        "the established one stays"
    );
    assert_eq!(ended(&mut h), [EndReason::HandshakeTimeout]);
    assert_eq!(
        h.nat().counters().ended[EndReason::HandshakeTimeout.index()],
        1
    );
    let closes = ops(&mut h);
    assert!(
        closes.contains(&format!("Close {{ id: {id:?}, abort: true }}")),
        "{closes:?}"
    );
}

#[test]
fn sessions_come_only_from_client_addresses_of_the_segment() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 80);
    let spoofed = [
        Ipv4Addr::new(10, 9, 9, 9),       // another network
        Ipv4Addr::new(192, 168, 30, 255), // the segment's broadcast address
        Ipv4Addr::new(192, 168, 30, 0),   // its network address
        OUR_IP,                           // the virtual host itself
    ];
    for (i, src) in spoofed.iter().enumerate() {
        let src = SocketAddrV4::new(*src, 40080 + i as u16);
        h.handle_frame(t(0), &tcp_syn_from(CLIENT_MAC, src, remote));
    }
    assert!(ops(&mut h).is_empty(), "no connect");
    assert!(sent(&mut h, t(0)).is_empty(), "nothing answered");
    assert!(h.nat().table().is_empty());
    assert_eq!(h.nat().counters().refused_rules, 4);
    let mut details = Vec::new();
    while let Some(e) = h.poll_event() {
        if let Event::Nat(NatEvent::Refused { reason, detail, .. }) = e {
            details.push((reason, detail));
        }
    }
    assert_eq!(
        details,
        [(
            EndReason::DeniedByRule,
            "source is not a client address of the segment".to_owned()
        )]
    );
}

#[test]
fn the_per_client_limit_counts_by_mac_as_well_as_by_address() {
    let mut s = settings();
    s.max_sessions_per_client = 2;
    let mut h = host_with(s);
    let remote = SocketAddrV4::new(REMOTE, 80);
    // One MAC rotating its source address: capped all the same.
    for last in 10..13u8 {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, last), 40090);
        h.handle_frame(t(0), &tcp_syn_from(CLIENT_MAC, src, remote));
    }
    assert_eq!(h.nat().table().len(), 2);
    assert_eq!(h.nat().counters().refused_limits, 1);
    let mut details = Vec::new();
    while let Some(e) = h.poll_event() {
        if let Event::Nat(NatEvent::Refused { detail, .. }) = e {
            details.push(detail);
        }
    }
    assert_eq!(
        details,
        ["client 52:54:00:00:00:01 has 2 sessions (nat.max_sessions_per_client)"]
    );
    // Another MAC is not held back.
    let other = smoltcp::wire::EthernetAddress([0x52, 0x54, 0, 0, 0, 2]);
    let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 20), 40091);
    h.handle_frame(t(0), &tcp_syn_from(other, src, remote));
    assert_eq!(h.nat().table().len(), 3);
}
/// Found by the `frames` fuzz target (fuzz/): smoltcp read the SYN-ACK's unscaled window back
/// as scaled, so right after the handshake it took up to `65535 << 5` bytes (2 MiB) as in the
/// window of a 1 MiB buffer, and a client's segment beyond the buffer was recorded as received
/// but never stored: a debug-build assertion ("len_written == payload_len"), and in a release
/// build a panic of the whole gateway once the client filled the gap before it. The fuzzer's
/// minimised input was a connection with window scaling and one byte 2,031,616 bytes past
/// the SYN; the release-build crash needs the second part.
#[test]
fn fuzz_regression_segments_beyond_the_receive_buffer_are_out_of_the_window() {
    let mut h = host_with(settings());
    assert_eq!(settings().tcp_buffer, 1 << 20);
    let now = t(0);
    let remote = SocketAddrV4::new(REMOTE, 80);
    let isn: u32 = 520_101_663;
    h.handle_frame(
        now,
        &tcp_segment(remote, 40003, TcpControl::Syn, isn, None, Some(7), &[]),
    );
    let (id, _) = connect_op(&mut h);
    connected(&mut h, id, now);
    let segs = tcp_segments(&sent(&mut h, now));
    let synack = segs
        .iter()
        .find(|s| s.2 == TcpControl::Syn)
        .expect("SYN-ACK");
    let ack = synack.3.wrapping_add(1);
    let seg = |offset: usize, data: &[u8]| {
        let seq = isn.wrapping_add(1).wrapping_add(offset as u32);
        tcp_segment(remote, 40003, TcpControl::None, seq, Some(ack), None, data)
    };
    h.handle_frame(now, &seg(0, &[]));
    // The fuzzer's byte.
    h.handle_frame(now, &seg(2_031_616, &[31]));
    // 1000 bytes from 10 before the end of 1 MiB, then everything before them, the relay not
    // reading meanwhile.
    let end = (1 << 20) - 10;
    h.handle_frame(now, &seg(end, &[b'X'; 1000]));
    let mut at = 0;
    while at < end {
        let n = 1460.min(end - at);
        h.handle_frame(now, &seg(at, &vec![b'a'; n]));
        at += n;
    }
    let got = relay_take(&mut h, id, now);
    assert!(got.len() > 1_000_000, "{} bytes relayed", got.len());
    assert!(
        got.iter().all(|&b| b == b'a'),
        "bytes never sent were relayed"
    );
}

/// The resident pages of connection `id`'s receive and send buffers.
fn resident(h: &VirtualHost, id: SessionId) -> [usize; 2] {
    h.nat
        .stack
        .buffer_pages(id)
        .map(|p| p.map_or(0, |p| p.resident()))
}

#[test]
fn a_quiet_connection_gives_its_buffer_memory_back_and_goes_on() {
    let mut s = settings();
    s.tcp_buffer = 256 * 1024;
    let mut h = host_with(s);
    let remote = SocketAddrV4::new(REMOTE, 80);
    let (mut c, id) = Client::connect(&mut h, remote, 40090, t(0));
    let (mut held, held_id) = Client::connect(&mut h, remote, 40091, t(0));
    // The buffers live in a mapping of the connection's own: nothing is in memory before bytes
    // pass, not even a first page (an allocator's header would keep one resident for good).
    assert_eq!(resident(&h, id), [0, 0], "fresh buffers take no memory");
    let spans = h
        .nat
        .stack
        .buffer_pages(id)
        .map(|p| p.map_or(0, |p| p.len()));
    assert!(
        spans[0] >= 256 * 1024 && spans[1] >= 256 * 1024,
        "every byte of both buffers is on pages that can be given back: {spans:?}"
    );
    // 200 KiB from the host and 64 KiB from the client pass through the buffers.
    let down: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut given, mut got, mut now) = (0, 0, 1);
    while got < down.len() {
        given += relay_give(&mut h, id, &down[given..], t(now));
        got += c.receive(&mut h, t(now)).0;
        now += 1;
    }
    for chunk in vec![0x33u8; 64 * 1024].chunks(1400) {
        c.send(&mut h, TcpControl::Psh, chunk, t(now));
        assert_eq!(relay_take(&mut h, id, t(now)).len(), chunk.len());
        let _ = c.receive(&mut h, t(now));
    }
    // The other connection's client never acknowledges: its bytes wait in the send buffer.
    relay_give(&mut h, held_id, &down[..100 * 1024], t(now));
    let _ = sent(&mut h, t(now));
    let busy = resident(&h, id);
    assert!(busy[0] >= 8 && busy[1] >= 40, "pages touched: {busy:?}");
    let waiting = resident(&h, held_id);
    assert!(waiting[1] >= 20, "{waiting:?}");
    // Quiet for two periods: the memory goes back, but not the memory of waiting bytes.
    let quiet = now + 2 * QUIET_AFTER.as_millis() as i64 + 1;
    let mut at = now;
    while at < quiet {
        at = h
            .poll_timeout()
            .map_or(quiet, |d| d.total_millis() - t(0).total_millis());
        at = at.min(quiet);
        h.handle_timeout(t(at));
        let _ = sent(&mut h, t(at));
    }
    assert_eq!(resident(&h, id), [0, 0]);
    assert_eq!(
        resident(&h, held_id)[1],
        waiting[1],
        "waiting bytes keep their pages"
    );
    let released = h.nat().counters().buffer_bytes_released;
    assert!(released >= (busy[0] + busy[1]) as u64 * 4096, "{released}");
    // The connection goes on: both ways, bytes intact.
    let more: Vec<u8> = (0..50_000).map(|i| (i % 13) as u8).collect();
    assert_eq!(relay_give(&mut h, id, &more, t(at)), more.len());
    let mut got = 0;
    while got < more.len() {
        got += c.receive(&mut h, t(at)).0;
        at += 1;
    }
    c.send(&mut h, TcpControl::Psh, b"still here", t(at));
    assert_eq!(relay_take(&mut h, id, t(at)), b"still here");
    let _ = held.receive(&mut h, t(at));
}

/// One connection through the NAT: the client sends `up` and the host `down`, both intact;
/// the client, with `far_out_of_order`, first sends a byte 5000 bytes ahead (past a gap it
/// never fills) and resets at the end, else both sides close. Returns when it is gone.
fn one_connection(h: &mut VirtualHost, port: u16, up: &[u8], down: &[u8], far_out_of_order: bool) {
    let (mut c, id) = Client::connect(h, SocketAddrV4::new(REMOTE, 80), port, t(0));
    if far_out_of_order {
        let seq = c.seq;
        c.seq = c.seq.wrapping_add(5000);
        c.send(h, TcpControl::Psh, b"x", t(1));
        c.seq = seq;
    }
    let mut got = Vec::new();
    for chunk in up.chunks(1400) {
        c.send(h, TcpControl::Psh, chunk, t(1));
        if !far_out_of_order {
            got.extend(relay_take(h, id, t(1)));
        }
        let _ = c.receive(h, t(1));
    }
    if !far_out_of_order {
        assert!(got == up, "the client's bytes changed");
    }
    let (mut given, mut received) = (0, 0);
    while received < down.len() {
        given += relay_give(h, id, &down[given..], t(2));
        received += c.receive(h, t(2)).0;
    }
    if far_out_of_order {
        c.send(h, TcpControl::Rst, &[], t(3));
    } else {
        c.send(h, TcpControl::Fin, &[], t(3));
        let _ = c.receive(h, t(3));
        h.nat_host_event(id, HostEvent::WriteShut, t(3));
        h.nat_host_event(id, HostEvent::EndOfStream, t(3));
        let (_, fin, _) = c.receive(h, t(3));
        assert!(fin);
    }
    let _ = sent(h, t(4));
    let _ = sent(h, t(4));
    assert!(
        h.nat_tcp_relay(id, t(4)).is_none(),
        "the connection is over"
    );
    let _ = (ended(h), ops(h));
}

/// The buffer mapping of a connection that wrote only the first page of each buffer serves the
/// next connection (no mmap, munmap or page fault); one that carried more either way, or got
/// a byte far out of order, is unmapped.
#[test]
fn short_connections_leave_their_buffer_mapping_to_the_next_one() {
    let mut h = host_with(settings());
    let pooled = |h: &VirtualHost| h.nat.stack.pooled_mappings();
    let big: Vec<u8> = (0..6000).map(|i| (i % 241) as u8).collect();
    one_connection(&mut h, 40100, b"GET /", b"hello", false);
    assert_eq!(pooled(&h), 1, "a short connection's mapping is kept");
    // The next one reuses it (its bytes arrive intact) and carries more than a page up.
    one_connection(&mut h, 40101, &big, b"ok", false);
    assert_eq!(pooled(&h), 0, "a page or more from the client: unmapped");
    one_connection(&mut h, 40102, b"GET /big", &big, false);
    assert_eq!(pooled(&h), 0, "a page or more from the host: unmapped");
    one_connection(&mut h, 40103, b"", b"", true);
    assert_eq!(pooled(&h), 0, "a byte far out of order: unmapped");
    one_connection(&mut h, 40104, b"a", b"b", false);
    one_connection(&mut h, 40105, &big[..4000], &big[..4000], false);
    assert_eq!(pooled(&h), 1, "up to a page each way: kept");
}

/// Bytes that came out of order, past a gap, wait in the receive buffer (smoltcp's assembler)
/// while nothing moves: a quiet connection keeps those pages, and the bytes reach the host
/// intact once the gap is filled. (Giving them back would have turned them into zeros.)
#[test]
fn out_of_order_bytes_keep_their_pages_through_a_quiet_period() {
    let mut s = settings();
    s.tcp_buffer = 256 * 1024;
    let mut h = host_with(s);
    let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40096, t(0));
    let first: Vec<u8> = (0..1000).map(|i| (i % 7) as u8).collect();
    let gap: Vec<u8> = (0..1000).map(|i| (i % 11) as u8).collect();
    let after: Vec<u8> = (0..6000).map(|i| (i % 13) as u8 + 1).collect();
    c.send(&mut h, TcpControl::Psh, &first, t(1));
    assert_eq!(relay_take(&mut h, id, t(1)), first);
    // The next 1000 bytes are lost; the 6000 after them arrive, out of order.
    let gap_seq = c.seq;
    c.seq = c.seq.wrapping_add(gap.len() as u32);
    for chunk in after.chunks(1400) {
        c.send(&mut h, TcpControl::Psh, chunk, t(2));
    }
    let _ = sent(&mut h, t(2));
    let waiting = resident(&h, id);
    assert!(
        waiting[0] >= 1,
        "the out-of-order bytes are in memory: {waiting:?}"
    );
    // Quiet for two periods of the check.
    let quiet = 2 + 2 * QUIET_AFTER.as_millis() as i64 + 1;
    let mut at = 2;
    while at < quiet {
        at = h
            .poll_timeout()
            .map_or(quiet, |d| d.total_millis() - t(0).total_millis())
            .min(quiet);
        h.handle_timeout(t(at));
        let _ = sent(&mut h, t(at));
    }
    assert_eq!(resident(&h, id)[0], waiting[0], "their pages stay");
    // The lost bytes come again: everything reaches the host, in order and intact.
    c.seq = gap_seq;
    c.send(&mut h, TcpControl::Psh, &gap, t(at));
    let got = relay_take(&mut h, id, t(at));
    let mut expected = gap.clone();
    expected.extend_from_slice(&after);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the bytes after the gap changed");
}

#[test]
fn with_segmentation_offload_segments_are_as_long_as_the_window_allows_both_ways() {
    for offload in [true, false] {
        let mut h = host_with(settings());
        h.set_tcp_offload(offload);
        // The client's SYN says MSS 1460 (its link's); its window is 64,000 bytes.
        let (mut c, id) = Client::connect(&mut h, SocketAddrV4::new(REMOTE, 80), 40095, t(0));
        // A few round trips for the congestion window to open (it starts at 2 KiB).
        let mut longest = 0;
        for round in 1..40 {
            relay_give(&mut h, id, &[7u8; 60_000], t(round));
            let segs = tcp_segments(&sent(&mut h, t(round)));
            longest = segs.iter().map(|s| s.5).max().unwrap_or(0).max(longest);
            // The client acknowledges what it got.
            if let Some(end) = segs.iter().map(|s| s.3.wrapping_add(s.5 as u32)).max() {
                c.ack = end;
            }
            c.send(&mut h, TcpControl::None, &[], t(round));
        }
        if offload {
            assert!(longest > 30_000, "{longest}");
        } else {
            assert_eq!(longest, 1460);
        }
        // A client's super-frame: one 30,000-byte segment, taken whole.
        c.send(&mut h, TcpControl::Psh, &[9u8; 30_000], t(2));
        let mut got = 0;
        while h.nat_tcp_relay(id, t(2)).unwrap().has_client_data() {
            got += relay_take(&mut h, id, t(2)).len();
        }
        assert_eq!(got, 30_000, "offload = {offload}");
    }
}

#[test]
fn a_syn_with_fin_opens_nothing() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 80);
    let mut frame = tcp_frame(remote, 40097, TcpControl::Syn, 1, None, &[]);
    // Set FIN beside SYN and fix the checksum.
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let mut seg = smoltcp::wire::TcpPacket::new_unchecked(ip.payload_mut());
        seg.set_fin(true);
        seg.fill_checksum(&src.into(), &dst.into());
    }
    h.handle_frame(t(0), &frame);
    assert!(ops(&mut h).is_empty(), "no connect for a SYN+FIN");
    assert!(h.nat().table().is_empty());
    // smoltcp drops it without an answer, as a listener-less host may.
    assert!(tcp_segments(&sent(&mut h, t(0))).is_empty());
}

#[test]
fn a_tcp_segment_with_a_bad_checksum_opens_nothing_unless_the_backend_vouched_for_it() {
    let mut h = host_with(settings());
    let remote = SocketAddrV4::new(REMOTE, 80);
    let mut frame = tcp_frame(remote, 40098, TcpControl::Syn, 1, None, &[]);
    // The checksum field as a local sender leaves it with offload on: the partial sum only.
    frame[14 + 20 + 16] ^= 0x5a;
    h.handle_frame(t(0), &frame);
    assert!(
        ops(&mut h).is_empty(),
        "no connect for a SYN with a bad checksum"
    );
    assert!(h.nat().table().is_empty());
    assert_eq!(h.counters().malformed, 1);
    // Vouched for (the TAP device's CHECKSUM_PARTIAL frames), the same bytes open the session.
    h.handle_verified_frame(t(0), &frame);
    assert_eq!(ops(&mut h).len(), 1, "one connect");
    assert_eq!(h.nat().table().len(), 1);
    assert_eq!(h.counters().malformed, 1);
    // And the next frame is checked again.
    let mut other = tcp_frame(remote, 40099, TcpControl::Syn, 1, None, &[]);
    other[14 + 20 + 16] ^= 0x5a;
    h.handle_frame(t(0), &other);
    assert_eq!(h.counters().malformed, 2);
    assert_eq!(h.nat().table().len(), 1);
}
