//! What each of the core's paths costs, per frame or per transaction, with no sockets: the
//! bench plays the client with raw frames and the driver with the host-event API, as
//! `core_sessions` does.
//!
//! `cargo bench --bench core_paths` prints one row per path: operations per second and the
//! time per operation (the median of 5 runs of `ITERATIONS` each, after a warm-up run):
//!
//! - `arp`: an ARP request for the virtual host, and its reply taken from the transmit queue;
//! - `ping`: an echo request to the virtual host, and its reply;
//! - `dhcp`: a DISCOVER and a REQUEST from the same client (an OFFER and an ACK; the binding
//!   is renewed each time);
//! - `udp out`: a datagram from the client for an existing UDP session, handed to the driver
//!   as a `UdpSend`;
//! - `udp in`: a datagram from the host socket for that session, framed for the client;
//! - `tcp session`: a whole TCP session: SYN, connect request, `Connected`, SYN-ACK, the
//!   client's ACK, one byte each way, both FINs, and the session's end;
//! - `tcp segment`: a 1400-byte data segment from the client into an open session, taken out
//!   by the relay, with an egress poll per 64 segments (the driver's batch).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant as StdInstant;

use hubnat::core::nat::{HostEvent, HostOp, IcmpMode, SessionId};
use hubnat::core::testkit::{self, t, CLIENT_IP, CLIENT_MAC, OUR_IP, OUR_MAC, REMOTE};
use hubnat::core::VirtualHost;
use hubnat_backend::FrameBatch;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, TcpControl, TcpPacket};

const ITERATIONS: u32 = 20_000;

fn host() -> VirtualHost {
    let mut s = testkit::settings();
    s.nat.max_sessions = 1 << 20;
    s.nat.max_sessions_per_client = 1 << 20;
    s.nat.tcp_buffer = 256 << 10;
    s.nat.dns_upstreams = vec![];
    let mut h = VirtualHost::new(s, Vec::new(), 7, t(0));
    h.set_icmp_mode(IcmpMode::Synthesized);
    h
}

/// Takes everything the host has to send; returns how many frames.
fn drain(h: &mut VirtualHost, batch: &mut FrameBatch, now: smoltcp::time::Instant) -> usize {
    h.poll(now);
    let mut n = 0;
    loop {
        batch.clear();
        h.take_transmit(batch);
        if batch.is_empty() {
            return n;
        }
        n += batch.len();
    }
}

fn echo_request() -> Vec<u8> {
    let repr = Icmpv4Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: &[0x42; 56],
    };
    testkit::ip_frame(OUR_IP, IpProtocol::Icmp, repr.buffer_len(), |b| {
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(b),
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
    })
}

fn segment(port: u16, control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
    testkit::tcp_segment(
        SocketAddrV4::new(REMOTE, 80),
        port,
        control,
        seq,
        ack,
        Some(7),
        payload,
    )
}

/// The TCP segments the host sent to client port `port`: (seq, control, payload length).
fn segments_to(batch: &FrameBatch, port: u16) -> Vec<(u32, bool, bool, usize)> {
    batch
        .iter()
        .filter_map(|f| {
            let ip = Ipv4Packet::new_checked(&f[14..]).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            (tcp.dst_port() == port).then(|| {
                (
                    tcp.seq_number().0 as u32,
                    tcp.syn(),
                    tcp.fin(),
                    tcp.payload().len(),
                )
            })
        })
        .collect()
}

/// One whole TCP session on client port `port`.
fn tcp_session(
    h: &mut VirtualHost,
    batch: &mut FrameBatch,
    port: u16,
    now: smoltcp::time::Instant,
) {
    h.handle_frame(now, &segment(port, TcpControl::Syn, 1000, None, &[]));
    let mut id: Option<SessionId> = None;
    h.drain_host_ops(|op| {
        if let HostOp::TcpConnect { id: got, .. } = op {
            id = Some(got);
        }
    });
    let id = id.expect("a connect request");
    h.nat_host_event(id, HostEvent::Connected, now);
    h.poll(now);
    batch.clear();
    h.take_transmit(batch);
    let ours = segments_to(batch, port)
        .iter()
        .find(|s| s.1)
        .expect("SYN-ACK")
        .0;
    // The client's ACK with one byte, taken by the relay; one byte back.
    h.handle_frame(
        now,
        &segment(port, TcpControl::Psh, 1001, Some(ours + 1), b"x"),
    );
    let mut relay = h.nat_tcp_relay(id, now).expect("session");
    assert_eq!(relay.take_client_data(|d| Ok(d.len())).unwrap(), 1);
    assert_eq!(
        relay
            .fill_from_host(|b| {
                b[0] = b'y';
                Ok(1)
            })
            .unwrap(),
        1
    );
    drain(h, batch, now);
    // The client closes; the relay shuts the host's write side; the host closes.
    h.handle_frame(
        now,
        &segment(port, TcpControl::Fin, 1002, Some(ours + 2), &[]),
    );
    h.nat_host_event(id, HostEvent::WriteShut, now);
    h.nat_host_event(id, HostEvent::EndOfStream, now);
    h.poll(now);
    batch.clear();
    h.take_transmit(batch);
    let fin = segments_to(batch, port)
        .iter()
        .find(|s| s.2)
        .expect("FIN")
        .0;
    h.handle_frame(
        now,
        &segment(port, TcpControl::None, 1003, Some(fin + 1), &[]),
    );
    drain(h, batch, now);
    h.drain_host_ops(|_| {});
    while h.poll_event().is_some() {}
    assert!(h.nat_tcp_relay(id, now).is_none(), "the session ended");
}

/// Runs `op` `ITERATIONS` times per run, one warm-up run and 5 measured; returns the median
/// nanoseconds per operation.
fn time(mut op: impl FnMut(u32)) -> f64 {
    let mut runs = Vec::new();
    for run in 0..6 {
        let started = StdInstant::now();
        for i in 0..ITERATIONS {
            op(run * ITERATIONS + i);
        }
        if run > 0 {
            runs.push(started.elapsed().as_nanos() as f64 / f64::from(ITERATIONS));
        }
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    hubnat::host::fix_mmap_threshold();
    let mut rows: Vec<(&str, f64)> = Vec::new();
    let mut batch = FrameBatch::new(256, 65536);

    let mut h = host();
    let arp = testkit::arp_request(CLIENT_IP, OUR_IP);
    rows.push((
        "arp",
        time(|_| {
            h.handle_frame(t(0), &arp);
            assert_eq!(drain(&mut h, &mut batch, t(0)), 1);
        }),
    ));

    let ping = echo_request();
    rows.push((
        "ping",
        time(|_| {
            h.handle_frame(t(0), &ping);
            assert_eq!(drain(&mut h, &mut batch, t(0)), 1);
        }),
    ));

    let discover = testkit::dhcp_frame(dhcproto::v4::MessageType::Discover, None);
    let request = testkit::dhcp_frame(
        dhcproto::v4::MessageType::Request,
        Some((Ipv4Addr::new(192, 168, 30, 10), OUR_IP)),
    );
    rows.push((
        "dhcp",
        time(|_| {
            h.handle_frame(t(0), &discover);
            h.handle_frame(t(0), &request);
            assert_eq!(drain(&mut h, &mut batch, t(0)), 2);
            while h.poll_event().is_some() {}
        }),
    ));

    // UDP: one session, datagrams both ways.
    let remote = SocketAddrV4::new(REMOTE, 7777);
    let datagram = testkit::udp_frame(
        (CLIENT_MAC, CLIENT_IP, 40000),
        (OUR_MAC, *remote.ip(), remote.port()),
        &[0x11; 512],
    );
    h.handle_frame(t(0), &datagram);
    let mut udp = None;
    h.drain_host_ops(|op| {
        if let HostOp::UdpOpen { id, .. } = op {
            udp = Some(id);
        }
    });
    let udp = udp.expect("a UDP session");
    rows.push((
        "udp out",
        time(|_| {
            h.handle_frame(t(0), &datagram);
            let mut sends = 0;
            h.drain_host_ops(|op| {
                if matches!(op, HostOp::UdpSend { .. }) {
                    sends += 1;
                }
            });
            assert_eq!(sends, 1);
        }),
    ));
    rows.push((
        "udp in",
        time(|_| {
            h.nat_udp_receive(udp, t(0), |b| {
                b[..512].fill(0x22);
                Ok(512)
            })
            .unwrap();
            assert_eq!(drain(&mut h, &mut batch, t(0)), 1);
        }),
    ));

    let mut th = host();
    rows.push((
        "tcp session",
        time(|i| tcp_session(&mut th, &mut batch, 1024 + (i % 60_000) as u16, t(0))),
    ));

    // Data segments into one open session.
    let port = 65_000;
    th.handle_frame(t(0), &segment(port, TcpControl::Syn, 1000, None, &[]));
    let mut id = None;
    th.drain_host_ops(|op| {
        if let HostOp::TcpConnect { id: got, .. } = op {
            id = Some(got);
        }
    });
    let id = id.expect("a connect request");
    th.nat_host_event(id, HostEvent::Connected, t(0));
    th.poll(t(0));
    batch.clear();
    th.take_transmit(&mut batch);
    let ours = segments_to(&batch, port)
        .iter()
        .find(|s| s.1)
        .expect("SYN-ACK")
        .0;
    let mut seq = 1001u32;
    let payload = [0x5a; 1400];
    rows.push((
        "tcp segment",
        time(|i| {
            th.handle_frame(
                t(0),
                &segment(port, TcpControl::Psh, seq, Some(ours + 1), &payload),
            );
            seq = seq.wrapping_add(payload.len() as u32);
            let mut relay = th.nat_tcp_relay(id, t(0)).expect("session");
            // Two pieces when the segment wraps around the ring.
            let mut taken = 0;
            while relay.has_client_data() {
                taken += relay.take_client_data(|d| Ok(d.len())).unwrap();
            }
            assert_eq!(taken, 1400);
            if i % 64 == 63 {
                drain(&mut th, &mut batch, t(0));
            }
        }),
    ));

    println!("{:<12} {:>12} {:>10}", "path", "per second", "ns each");
    for (name, ns) in rows {
        println!("{name:<12} {:>12.0} {ns:>10.0}", 1e9 / ns);
    }
}
