//! The WASM policies in a running gateway, in process: the `deny-destinations` example
//! (built by `scripts/build-policies.sh` into `target/policies/`) refuses a port, and a
//! smoltcp client on the memory hub sees the refusal as a reset while another port works.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant as StdInstant};

use common::inproc::start;
use common::smol_client::{acquire, SmolClient};
use hubnat::config::{Config, OnError, PolicyConfig};
use hubnat_hub::MemoryHub;
use smoltcp::socket::tcp::State;
use smoltcp::time::Instant;

use hubnat::policy::built_component as component;

/// Polls until the connection from `local_port` to `port` leaves SYN-SENT; its state then.
fn connect(client: &mut SmolClient, port: u16, local_port: u16) -> State {
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), local_port);
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        client.poll(Instant::now());
        let state = client.tcp(h).state();
        if state != State::SynSent {
            return state;
        }
        assert!(StdInstant::now() < deadline, "no answer to the SYN");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_denied_port_is_reset_at_once_and_another_port_works() {
    let state = tempfile::tempdir().unwrap();
    let (open, denied) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (open_port, denied_port) = (
        open.local_addr().unwrap().port(),
        denied.local_addr().unwrap().port(),
    );
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.nat.allow_host_loopback = true;
    config.dns.upstream = vec![];
    config.policy = vec![PolicyConfig {
        name: "no-test-port".into(),
        path: component("deny-destinations"),
        on_error: OnError::Allow,
        timeout: Duration::from_millis(50),
        memory: 16 << 20,
        config: [("ports".to_string(), denied_port.to_string())].into(),
    }];
    let hub = MemoryHub::new(1500);
    let gw = start(config, &hub);
    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0x21], Instant::now());
    acquire(&mut client, Duration::from_secs(10));

    assert_eq!(connect(&mut client, open_port, 50000), State::Established);
    assert_eq!(
        connect(&mut client, denied_port, 50001),
        State::Closed,
        "the policy's reject is a RST"
    );
    gw.stop();
    let log = std::fs::read_to_string(state.path().join("security.log")).unwrap();
    assert!(
        log.contains("POLICY loaded: policies=\"no-test-port\""),
        "{log}"
    );
    assert!(
        log.contains("reason=\"denied by policy\"")
            && log.contains("rejected by policy no-test-port"),
        "{log}"
    );
    denied.set_nonblocking(true).unwrap();
    assert!(denied.accept().is_err(), "nothing reached the denied port");
}
