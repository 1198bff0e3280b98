//! Hostile traffic in process: a port of the in-memory hub that sends frames to the gateway
//! without pause must not starve everyone else. While it floods, a smoltcp client gets a lease
//! and moves data both ways through the NAT to a real `TcpListener` on the host's loopback
//! (allowed with `nat.allow_host_loopback`), and the gateway still stops when asked. No
//! namespaces, no root.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use common::inproc::start;
use common::smol_client::{acquire, SmolClient};
use hubnat::config::Config;
use hubnat_hub::MemoryHub;
use smoltcp::time::Instant;

const GATEWAY_MAC: [u8; 6] = [0x00, 0xac, 0, 0, 0, 0x01];

/// Sends frames of an unknown ethertype to the gateway's MAC as fast as the hub takes them,
/// until `stop`; returns how many.
fn flood(hub: &MemoryHub, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let port = hub.connect();
    std::thread::spawn(move || {
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&GATEWAY_MAC);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x66]);
        frame[12..14].copy_from_slice(&[0x88, 0xb5]);
        let mut sent = 0u64;
        let mut buf = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..256 {
                port.try_send(&frame);
            }
            sent += 256;
            // Whatever comes back to the flooder is thrown away.
            while port.try_recv(&mut buf) {}
        }
        sent
    })
}

#[test]
fn a_port_that_floods_the_gateway_does_not_starve_the_others() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    config.nat.allow_host_loopback = true;
    config.dns.upstream = vec![];
    let gw = start(config, &hub);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(&hub, stop.clone());

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let expected = data.len();
    // The host side: echoes everything back as it comes.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16384];
        let mut total = 0;
        while total < expected {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {total} bytes");
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
        total
    });

    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0x21], Instant::now());
    acquire(&mut client, Duration::from_secs(30));
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), 50000);
    let (mut sent, mut received) = (0usize, Vec::new());
    // A guard against a hang, not a speed limit: the transfer takes well under a second idle.
    let deadline = StdInstant::now() + Duration::from_secs(120);
    while received.len() < data.len() {
        client.poll(Instant::now());
        let s = client.tcp(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        while s.can_recv() {
            s.recv(|b| {
                received.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        assert!(
            StdInstant::now() < deadline,
            "starved: sent {sent}, received {} under the flood",
            received.len()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    assert!(received == data, "the echo differs");
    assert_eq!(server.join().unwrap(), data.len());

    let status = async_io::block_on(gw.handle.status()).unwrap();
    assert!(
        status.counters.unhandled > 10_000,
        "the flood reached the gateway: {:?}",
        status.counters
    );
    // The gateway stops while the flood goes on.
    gw.stop();
    stop.store(true, Ordering::Relaxed);
    assert!(flooder.join().unwrap() > 0);
}

/// Polls until the connection from `local_port` to `port` leaves SYN-SENT; its state then.
fn connect(
    client: &mut SmolClient,
    port: u16,
    local_port: u16,
) -> (smoltcp::iface::SocketHandle, smoltcp::socket::tcp::State) {
    use smoltcp::socket::tcp::State;
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), local_port);
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while client.tcp(h).state() == State::SynSent {
        assert!(StdInstant::now() < deadline, "no answer to the SYN");
        client.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
    (h, client.tcp(h).state())
}

#[test]
fn clients_that_never_read_meet_the_memory_limit_and_memory_comes_back() {
    use smoltcp::socket::tcp::State;
    // As `hubnat run` does: each TCP buffer a mapping of its own.
    hubnat::host::fix_mmap_threshold();
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let baseline = hubnat::host::resident_memory().unwrap();
    let limit = baseline + (48 << 20);
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.nat.allow_host_loopback = true;
    config.dns.upstream = vec![];
    config.nat.memory_limit = Some(limit);
    let gw = start(config, &hub);

    // A server that sends 4 MiB on every connection and waits: the client never reads, so
    // the data piles up in the gateway's buffers towards it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let chunk = vec![0x42u8; 1 << 20];
                for _ in 0..4 {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
        }
    });

    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0x31], Instant::now());
    acquire(&mut client, Duration::from_secs(10));
    let mut open = Vec::new();
    let refused = loop {
        assert!(
            open.len() < 200,
            "200 sessions of unread data and no refusal"
        );
        let (h, state) = connect(&mut client, port, 40000 + open.len() as u16);
        if state != State::Established {
            break state;
        }
        open.push(h);
        // Let the data arrive (and the gateway measure its memory, every 250 ms).
        let until = StdInstant::now() + Duration::from_millis(300);
        while StdInstant::now() < until {
            client.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    assert_eq!(refused, State::Closed, "refused with a reset");
    assert!(
        open.len() >= 5,
        "refused after only {} sessions",
        open.len()
    );
    eprintln!(
        "refused after {} sessions, {} MiB over the baseline",
        open.len(),
        (hubnat::host::resident_memory().unwrap() - baseline) >> 20
    );
    let grown = hubnat::host::resident_memory().unwrap() - baseline;
    let log = std::fs::read_to_string(state.path().join("security.log")).unwrap();
    assert!(
        log.contains("nat.memory_limit"),
        "the refusal names the limit:\n{log}"
    );
    let status = async_io::block_on(gw.handle.status()).unwrap();
    assert!(status.nat.refused_limits >= 1, "{:?}", status.nat);

    // The sessions end: their memory goes back, and new sessions are let in again.
    let ids: Vec<_> = async_io::block_on(gw.handle.sessions())
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    for id in ids {
        async_io::block_on(gw.handle.end_session(id, "the test")).unwrap();
    }
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        client.poll(Instant::now());
        let now_grown = hubnat::host::resident_memory()
            .unwrap()
            .saturating_sub(baseline);
        if now_grown < grown / 2 {
            break;
        }
        assert!(
            StdInstant::now() < deadline,
            "memory did not come back: {} MiB over the baseline, {} at the peak",
            now_grown >> 20,
            grown >> 20
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, state) = connect(&mut client, port, 45000);
    assert_eq!(
        state,
        State::Established,
        "a new session once memory is back"
    );
    gw.stop();
}
