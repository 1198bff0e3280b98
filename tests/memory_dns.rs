//! The DNS redirect through the real driver, on the in-memory hub: raw UDP queries from a
//! client to the virtual host's port 53, and a real UDP server on the host's loopback as the
//! upstream. Each query must leave from a socket (a source port) of its own with an id the
//! client did not choose, and its answer come back with the client's id. No namespaces, no
//! root.

mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use common::inproc::start;
use hubnat::config::Config;
use hubnat_hub::MemoryHub;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket,
};

const CLIENT_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 0x42]);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 50);
const VHOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
const QUERIES: u16 = 4;

/// A query for `files.hubnat.test` with `id`, from the client's port `sport` to the virtual
/// host's port 53 (broadcast at the Ethernet level: the client has not asked for the MAC).
fn query_frame(id: u16, sport: u16) -> Vec<u8> {
    let mut dns = id.to_be_bytes().to_vec();
    dns.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    dns.extend_from_slice(b"\x05files\x06hubnat\x04test\x00\x00\x01\x00\x01");
    hubnat::core::testkit::udp_frame(
        (CLIENT_MAC, CLIENT_IP, sport),
        (EthernetAddress::BROADCAST, VHOST_IP, 53),
        &dns,
    )
}

/// The DNS payload and destination port of a UDP frame from the virtual host's port 53.
fn answer_in(frame: &[u8]) -> Option<(u16, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 || eth.dst_addr() != CLIENT_MAC {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp || ip.src_addr() != VHOST_IP {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    (udp.src_port() == 53).then(|| (udp.dst_port(), udp.payload().to_vec()))
}

#[test]
fn each_query_leaves_from_its_own_port_with_a_random_id() {
    // The upstream: answers every query with its own id, and notes where it came from.
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..QUERIES {
            let (n, from) = upstream.recv_from(&mut buf).expect("a query");
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            seen.push((from.port(), id));
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x80; // QR: an answer
            upstream.send_to(&answer, from).unwrap();
        }
        seen
    });

    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.dns.upstream = vec![up_addr];
    let gw = start(config, &hub);
    let client = hub.connect();

    // One at a time, each waiting for its answer.
    let mut answered = Vec::new();
    let mut buf = Vec::new();
    for i in 0..QUERIES {
        let (id, sport) = (0x1000 + i, 41000 + i);
        assert!(client.try_send(&query_frame(id, sport)));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if client.try_recv(&mut buf) {
                if let Some((dport, dns)) = answer_in(&buf) {
                    assert_eq!(dport, sport);
                    assert_eq!(u16::from_be_bytes([dns[0], dns[1]]), id, "the client's id");
                    answered.push(id);
                    break;
                }
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(Instant::now() < deadline, "no answer to query {id:#x}");
        }
    }
    assert_eq!(answered.len(), usize::from(QUERIES));
    let seen = server.join().unwrap();
    gw.stop();

    let ports: HashSet<u16> = seen.iter().map(|(port, _)| *port).collect();
    assert_eq!(
        ports.len(),
        seen.len(),
        "every query from a port of its own: {seen:?}"
    );
    for (i, (_, id)) in seen.iter().enumerate() {
        assert_ne!(
            *id,
            0x1000 + i as u16,
            "the upstream saw the client's id: {seen:?}"
        );
    }
}
