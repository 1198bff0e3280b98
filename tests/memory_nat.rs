//! In-process end to end through the real driver: a smoltcp client on the in-memory hub gets a
//! lease, then talks TCP through the NAT to a real `TcpListener` on the host's loopback
//! (allowed here with `nat.allow_host_loopback`). No namespaces, no root.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use common::inproc::start;
use common::smol_client::{acquire, SmolClient};
use hubnat::config::Config;
use hubnat_hub::MemoryHub;
use smoltcp::time::Instant;

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// A host-side server: reads everything until EOF, then sends it back and closes.
fn echo_after_eof(listener: TcpListener) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        s.write_all(&all).unwrap();
        all.len()
    })
}

#[test]
fn tcp_through_the_driver_with_half_close_both_ways() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.nat.allow_host_loopback = true;
    config.dns.upstream = vec![];
    let gw = start(config, &hub);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = echo_after_eof(listener);

    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0x77], Instant::now());
    acquire(&mut client, Duration::from_secs(10));
    let data = pattern(4 << 20);
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), 50000);
    let (mut sent, mut received, mut closed_ours) = (0usize, Vec::new(), false);
    let deadline = StdInstant::now() + Duration::from_secs(60);
    loop {
        client.poll(Instant::now());
        let s = client.tcp(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        if sent == data.len() && !closed_ours && s.send_queue() == 0 {
            // Client half-close: the host server sees EOF, then answers.
            s.close();
            closed_ours = true;
        }
        while s.can_recv() {
            s.recv(|b| {
                received.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        if !s.may_recv() && closed_ours {
            break; // the host's FIN arrived after all its data
        }
        assert!(
            StdInstant::now() < deadline,
            "transfer stalled: sent {sent}, received {}",
            received.len()
        );
        if !s.can_send() && !s.can_recv() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert_eq!(server.join().unwrap(), data.len());
    assert_eq!(received.len(), data.len());
    assert!(received == data, "echo differs");
    // The client's last ACK (smoltcp may delay it) ends the session on the gateway's side: keep
    // the client polling until the gateway has logged the end.
    let log_path = state.path().join("security.log");
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("NAT session deleted: id=1 ")
    {
        client.poll(Instant::now());
        assert!(StdInstant::now() < deadline, "the session never ended");
        std::thread::sleep(Duration::from_millis(1));
    }

    // A refused connection: nothing listens on the port any more.
    let h2 = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), 50001);
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        client.poll(Instant::now());
        if !client.tcp(h2).is_open() {
            break;
        }
        assert!(StdInstant::now() < deadline, "no RST for a refused connect");
        std::thread::sleep(Duration::from_millis(1));
    }
    gw.stop();
    let log = std::fs::read_to_string(state.path().join("security.log")).unwrap();
    assert!(
        log.contains("NAT session connected: id=1 proto=tcp"),
        "{log}"
    );
    assert!(log.contains(&format!("NAT session deleted: id=1 proto=tcp client=192.168.30.10:50000 remote=127.0.0.1:{port} bytes_out={} bytes_in={}", data.len(), data.len())), "{log}");
    assert!(log.contains("reason=\"closed by client\""), "{log}");
    assert!(
        log.contains("NAT session failed: id=2") && log.contains("reason=\"refused\""),
        "{log}"
    );
}
