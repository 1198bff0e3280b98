//! How the core's per-packet cost grows with the number of live TCP sessions.
//!
//! `cargo bench --bench core_sessions` builds a [`VirtualHost`] in memory, opens N TCP sessions
//! through its NAT (the bench plays the client with raw frames and the driver with the relay
//! API, no sockets), then pushes 1400-byte data segments through one of them and measures the
//! time per segment: feeding the frame, taking the bytes out as the relay task would, and one
//! egress poll per 64 frames (as the driver does per batch). It prints a row per N with the
//! ratio to N = 1, and the resident memory after opening the sessions. smoltcp looks through
//! its socket set for each segment, so the cost is expected to grow with N: this says how much.

use std::net::SocketAddrV4;
use std::time::Instant as StdInstant;

use hubnat::core::nat::{HostEvent, HostOp, IcmpMode, SessionId};
use hubnat::core::testkit::{self, t, REMOTE};
use hubnat::core::VirtualHost;
use hubnat_backend::FrameBatch;
use smoltcp::wire::{Ipv4Packet, TcpControl, TcpPacket};

/// The shared fixture's virtual host, with room for `max` sessions of `buffer`-byte buffers.
fn host(max: usize, buffer: usize) -> VirtualHost {
    let mut s = testkit::settings();
    s.dhcp.enabled = false;
    s.nat.max_sessions = max;
    s.nat.max_sessions_per_client = max;
    s.nat.tcp_buffer = buffer;
    s.nat.dns_upstreams = vec![];
    let mut h = VirtualHost::new(s, Vec::new(), 7, t(0));
    h.set_icmp_mode(IcmpMode::Synthesized);
    h
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

/// The SYN-ACK's sequence number for `port` among the frames sent.
fn synack_seq(frames: &FrameBatch, port: u16) -> Option<u32> {
    frames.iter().find_map(|f| {
        let ip = Ipv4Packet::new_checked(&f[14..]).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        (tcp.syn() && tcp.dst_port() == port).then(|| tcp.seq_number().0 as u32)
    })
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `n` sessions; returns the host and, for session 0, (id, client seq, our seq).
fn open(n: usize, buffer: usize) -> (VirtualHost, SessionId, u32, u32) {
    let mut h = host(n + 10, buffer);
    let mut spare = FrameBatch::new(512, 1514);
    let mut first = None;
    for i in 0..n {
        let port = 10000 + i as u16;
        h.handle_frame(t(0), &segment(port, TcpControl::Syn, 1000, None, &[]));
        let mut id = None;
        h.drain_host_ops(|op| {
            if let HostOp::TcpConnect { id: got, .. } = op {
                id = Some(got);
            }
        });
        let id = id.expect("a connect request");
        h.nat_host_event(id, HostEvent::Connected, t(0));
        h.poll(t(0));
        spare.clear();
        h.take_transmit(&mut spare);
        let ours = synack_seq(&spare, port).expect("SYN-ACK");
        spare.clear();
        h.handle_frame(
            t(0),
            &segment(port, TcpControl::None, 1001, Some(ours + 1), &[]),
        );
        if first.is_none() {
            first = Some((id, 1001, ours + 1));
        }
    }
    h.poll(t(0));
    spare.clear();
    h.take_transmit(&mut spare);
    let (id, seq, ack) = first.expect("n > 0");
    (h, id, seq, ack)
}

/// One measurement: `n` sessions with `buffer`-byte buffers; prints ns per segment and the
/// resident memory the sessions added.
fn measure(n: usize, buffer: usize) -> (f64, f64) {
    let segments = 50_000u32;
    let payload = [0x5au8; 1400];
    let before = rss_kib();
    let (mut h, id, mut seq, ack) = open(n, buffer);
    let grown = rss_kib().saturating_sub(before);
    let mut spare = FrameBatch::new(512, 1514);
    let mut sink = 0usize;
    let started = StdInstant::now();
    for i in 0..segments {
        let now = t(1 + i64::from(i / 64));
        h.handle_frame(
            now,
            &segment(10000, TcpControl::Psh, seq, Some(ack), &payload),
        );
        seq = seq.wrapping_add(payload.len() as u32);
        let mut relay = h.nat_tcp_relay(id, now).expect("session");
        sink += relay.take_client_data(|d| Ok(d.len())).unwrap_or(0);
        if i % 64 == 63 {
            h.poll(now);
            spare.clear();
            h.take_transmit(&mut spare);
        }
    }
    let took = started.elapsed();
    assert_eq!(
        sink,
        segments as usize * payload.len(),
        "every byte reached the relay"
    );
    (
        took.as_nanos() as f64 / f64::from(segments),
        grown as f64 / 1024.0,
    )
}

fn main() {
    // Each measurement runs in a fresh process, so that memory freed by one does not flatter
    // or spoil the next (the allocator reuses it). The allocator is set as `hubnat run` sets
    // it (`HUBNAT_BENCH_DEFAULT_MALLOC=1` leaves glibc's default, to compare).
    if std::env::var_os("HUBNAT_BENCH_DEFAULT_MALLOC").is_none() {
        hubnat::host::fix_mmap_threshold();
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--one") {
        let n: usize = args[pos + 1].parse().expect("sessions");
        let buffer: usize = args[pos + 2].parse().expect("buffer");
        let (ns, mib) = measure(n, buffer);
        println!("{ns} {mib}");
        return;
    }
    println!(
        "{:>8} {:>9} {:>11} {:>11} {:>6} {:>16}",
        "sessions", "buffer", "ns/segment", "Gbit/s eqv", "vs 1", "RSS growth MiB"
    );
    let me = std::env::current_exe().expect("own path");
    for buffer in [1usize << 20, 256 << 10] {
        let mut base = None;
        for n in [1usize, 100, 1000, 10_000] {
            let out = std::process::Command::new(&me)
                .args(["--one", &n.to_string(), &buffer.to_string()])
                .output()
                .expect("run a measurement");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let mut parts = text
                .split_whitespace()
                .map(|p| p.parse::<f64>().expect("number"));
            let (ns, mib) = (parts.next().expect("ns"), parts.next().expect("MiB"));
            let gbit = 1400.0 * 8.0 / ns;
            let ratio = base.map_or(1.0, |b: f64| ns / b);
            base.get_or_insert(ns);
            println!(
                "{n:>8} {:>9} {ns:>11.0} {gbit:>11.2} {ratio:>6.2} {mib:>16.1}",
                format!("{}KiB", buffer >> 10)
            );
        }
    }
}
