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
