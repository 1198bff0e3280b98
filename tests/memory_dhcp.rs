//! In-memory end to end: the real gateway (driver, core, state directory) on the in-memory hub,
//! judged by smoltcp's DHCPv4 client, which nobody on this project wrote.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant as StdInstant};

use common::inproc::start;
use common::smol_client::{acquire, acquire_all, try_acquire, Got, SmolClient};
use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Encodable, Encoder};
use hubnat::config::Config;
use hubnat_hub::MemoryHub;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress};

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);

fn config(state: &Path) -> Config {
    let mut c = Config::default();
    c.state.dir = state.to_owned();
    c.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    c.dhcp.domain = Some("hubnat.test".into());
    c.dhcp.dns = vec![GW, Ipv4Addr::new(192, 168, 30, 2)];
    c.dhcp.lease = Duration::from_secs(3600);
    c
}

fn security_log(state: &Path) -> String {
    std::fs::read_to_string(state.join("security.log")).unwrap_or_default()
}

/// Sends a RELEASE for `ip` from `client`, built with dhcproto (smoltcp's client never
/// releases).
fn release(client: &SmolClient, ip: Ipv4Addr) {
    let mut msg = Message::new_with_id(
        7,
        ip,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &client.mac.0,
    );
    msg.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Release));
    msg.opts_mut().insert(DhcpOption::ServerIdentifier(GW));
    let mut body = Vec::new();
    msg.encode(&mut Encoder::new(&mut body)).unwrap();
    let frame = hubnat::core::testkit::udp_frame(
        (client.mac, ip, 68),
        (EthernetAddress([0x00, 0xac, 0, 0, 0, 1]), GW, 67),
        &body,
    );
    assert!(client.device.port.try_send(&frame));
}

#[test]
fn smoltcp_client_gets_a_lease_with_the_configured_options_and_can_ping() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 1], Instant::now());
    let got = acquire(&mut client, Duration::from_secs(10));
    assert_eq!(got.address.address(), Ipv4Addr::new(192, 168, 30, 10));
    assert_eq!(got.address.prefix_len(), 24);
    assert_eq!(got.router, Some(GW));
    assert_eq!(got.dns, vec![GW, Ipv4Addr::new(192, 168, 30, 2)]);
    assert_eq!(got.server, GW);
    assert_eq!(got.lease_secs, Some(3600));
    assert_eq!(got.domain.as_deref(), Some("hubnat.test"));

    // The client can ping the virtual host (and resolves it by ARP first).
    client.send_ping(GW, 1);
    let deadline = StdInstant::now() + Duration::from_secs(5);
    let pong = loop {
        client.poll(Instant::now());
        if let Some(p) = client.take_pong() {
            break p;
        }
        assert!(
            StdInstant::now() < deadline,
            "no echo reply from the virtual host"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(pong, (IpAddress::Ipv4(GW), 1));
    gw.stop();

    let log = security_log(state.path());
    assert!(
        log.contains("DHCP lease created: id=1 mac=52:54:00:00:00:01 ip=192.168.30.10"),
        "security log:\n{log}"
    );
    assert!(
        log.contains("GATEWAY stopped: reason=shutdown"),
        "security log:\n{log}"
    );
}

#[test]
fn two_clients_get_different_addresses() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    let mut a = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0xa], Instant::now());
    let mut b = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0xb], Instant::now());
    let [ga, gb]: [Got; 2] = acquire_all(&mut [&mut a, &mut b], Duration::from_secs(10))
        .try_into()
        .unwrap();
    assert_ne!(ga.address.address(), gb.address.address());
    for g in [&ga, &gb] {
        let n = u32::from(g.address.address());
        assert!((u32::from(Ipv4Addr::new(192, 168, 30, 10))
            ..=u32::from(Ipv4Addr::new(192, 168, 30, 200)))
            .contains(&n));
    }
    gw.stop();
}

#[test]
fn a_released_address_is_given_to_the_next_client() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut cfg = config(state.path());
    cfg.dhcp.range_end = cfg.dhcp.range_start; // one address
    let gw = start(cfg, &hub);
    let mut a = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0xa], Instant::now());
    let got_a = acquire(&mut a, Duration::from_secs(10));
    let mut b = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0xb], Instant::now());
    assert_eq!(
        try_acquire(&mut b, Duration::from_secs(1)),
        None,
        "the pool is full"
    );
    assert!(security_log(state.path()).contains("DHCP pool exhausted: mac=52:54:00:00:00:0b"));
    release(&a, got_a.address.address());
    drop(a);
    let got_b = acquire(&mut b, Duration::from_secs(10));
    assert_eq!(got_b.address.address(), got_a.address.address());
    gw.stop();
    let log = security_log(state.path());
    assert!(
        log.contains("DHCP lease released: id=1 mac=52:54:00:00:00:0a ip=192.168.30.10"),
        "{log}"
    );
}

#[test]
fn a_returning_mac_gets_its_address_back_after_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mac_a = [0x52, 0x54, 0, 0, 0, 0xa];
    let first = {
        let gw = start(config(state.path()), &hub);
        let mut a = SmolClient::new(hub.connect(), mac_a, Instant::now());
        let got = acquire(&mut a, Duration::from_secs(10));
        gw.stop();
        got
    };
    assert!(state.path().join("leases.json").exists());

    // A new gateway on the same state directory: a newcomer must not get a's address...
    let gw = start(config(state.path()), &hub);
    let mut c = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0xc], Instant::now());
    let got_c = acquire(&mut c, Duration::from_secs(10));
    assert_ne!(got_c.address.address(), first.address.address());
    // ... and a, back with a fresh stack (no memory of its lease), gets its address again.
    let mut a = SmolClient::new(hub.connect(), mac_a, Instant::now());
    let again = acquire(&mut a, Duration::from_secs(10));
    assert_eq!(again.address.address(), first.address.address());
    gw.stop();
    let log = security_log(state.path());
    assert!(log.contains("leases_restored=1"), "{log}");
}

#[test]
fn no_ack_leaves_while_the_lease_table_cannot_be_saved() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    // The save writes leases.tmp and renames it: a directory of that name makes it fail, as a
    // full disk would.
    let blocker = state.path().join("leases.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0x41], Instant::now());
    assert!(
        try_acquire(&mut client, Duration::from_secs(4)).is_none(),
        "an ACK left although its lease was not saved"
    );
    assert!(!state.path().join("leases.json").exists());
    // The disk has room again: the client's next try is ACKed, and the lease is on disk.
    std::fs::remove_dir(&blocker).unwrap();
    let got = acquire(&mut client, Duration::from_secs(30));
    let saved = std::fs::read_to_string(state.path().join("leases.json")).unwrap();
    assert!(
        saved.contains("52:54:00:00:00:41") && saved.contains(&got.address.address().to_string()),
        "{saved}"
    );
    gw.stop();
}

/// A DHCP message from `mac` (ciaddr `ciaddr`, options `opts`), broadcast from 0.0.0.0:68
/// (or unicast from `ciaddr` to the server when it is set), as a frame.
fn dhcp_from(mac: [u8; 6], ciaddr: Ipv4Addr, opts: Vec<DhcpOption>) -> Vec<u8> {
    let mut msg = Message::new_with_id(
        u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]),
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    for o in opts {
        msg.opts_mut().insert(o);
    }
    let mut body = Vec::new();
    msg.encode(&mut Encoder::new(&mut body)).unwrap();
    let dst = if ciaddr.is_unspecified() {
        (EthernetAddress::BROADCAST, Ipv4Addr::BROADCAST, 67)
    } else {
        (EthernetAddress([0x00, 0xac, 0, 0, 0, 1]), GW, 67)
    };
    hubnat::core::testkit::udp_frame((EthernetAddress(mac), ciaddr, 68), dst, &body)
}

/// The DHCP replies that reached `port` so far, decoded.
fn replies(port: &hubnat_hub::MemoryPort) -> Vec<Message> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while port.try_recv(&mut buf) {
        if buf.len() > 42 && buf[23] == 17 && buf[34..36] == [0, 67] {
            if let Ok(m) =
                <Message as dhcproto::Decodable>::decode(&mut dhcproto::Decoder::new(&buf[42..]))
            {
                out.push(m);
            }
        }
    }
    out
}

#[test]
fn starvation_from_random_macs_takes_the_free_addresses_but_no_bound_lease() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    let mut a = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0xa], Instant::now());
    let got = acquire(&mut a, Duration::from_secs(10));
    let ip_a = got.address.address();

    // The attacker binds address after address, DISCOVER then REQUEST, from made-up MACs.
    let attacker = hub.connect();
    let mut bound = 0;
    for n in 0..400u32 {
        let mac = [0x02, 0xee, (n >> 16) as u8, (n >> 8) as u8, n as u8, 0x01];
        attacker.try_send(&dhcp_from(
            mac,
            Ipv4Addr::UNSPECIFIED,
            vec![DhcpOption::MessageType(MessageType::Discover)],
        ));
        let offer = (0..200).find_map(|_| {
            std::thread::sleep(Duration::from_millis(1));
            replies(&attacker)
                .into_iter()
                .find(|m| m.chaddr()[..6] == mac && m.opts().msg_type() == Some(MessageType::Offer))
        });
        let Some(offer) = offer else {
            break; // the pool is exhausted: no offer
        };
        attacker.try_send(&dhcp_from(
            mac,
            Ipv4Addr::UNSPECIFIED,
            vec![
                DhcpOption::MessageType(MessageType::Request),
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
                DhcpOption::ServerIdentifier(GW),
            ],
        ));
        bound += 1;
        assert_ne!(
            offer.yiaddr(),
            ip_a,
            "the bound client's address was offered"
        );
    }
    assert!(bound >= 150, "the attacker bound {bound} addresses");
    let status = async_io::block_on(gw.handle.status()).unwrap();
    assert_eq!(status.leases, status.pool_size, "the pool is exhausted");

    // The client that was there keeps its address: its renewal is ACKed.
    let mac_a = [0x52, 0x54, 0, 0, 0, 0xa];
    let port_a = hub.connect();
    port_a.try_send(&dhcp_from(
        mac_a,
        ip_a,
        vec![DhcpOption::MessageType(MessageType::Request)],
    ));
    let ack = (0..1000).find_map(|_| {
        std::thread::sleep(Duration::from_millis(2));
        replies(&port_a)
            .into_iter()
            .find(|m| m.chaddr()[..6] == mac_a)
    });
    let ack = ack.expect("an answer to the renewal");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip_a);
    gw.stop();
    let log = security_log(state.path());
    assert!(log.contains("DHCP pool exhausted"), "{log}");
}
