//! The WASM policies in a running gateway, in process: the `deny-destinations` example
//! (built by `scripts/build-policies.sh` into `target/policies/`) refuses a port, and a
//! smoltcp client on the memory hub sees the refusal as a reset while another port works; the
//! real `hubnat policy list|reload` against the control socket lists the policies and reloads
//! them from a configuration file the test rewrites, while a connection stays open.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant as StdInstant};

use std::io::{Read, Write};
use std::path::Path;

use common::cli::{cli, json, ok, parse_metrics};
use common::inproc::start;
use common::smol_client::{acquire, SmolClient};
use hubnat::config::{Config, OnError, PolicyConfig, Sources};
use hubnat::control::{ControlOptions, ControlServer, PolicySource};
use hubnat_hub::MemoryHub;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::time::Instant;

use hubnat::policy::built_component as component;

/// Polls until the connection from `local_port` to `port` leaves SYN-SENT; its state then.
fn connect(client: &mut SmolClient, port: u16, local_port: u16) -> State {
    open(client, port, local_port).1
}

/// [`connect`], with the client's socket.
fn open(client: &mut SmolClient, port: u16, local_port: u16) -> (SocketHandle, State) {
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), local_port);
    poll_until(client, "an answer to the SYN", |c| {
        c.tcp(h).state() != State::SynSent
    });
    (h, client.tcp(h).state())
}

fn poll_until(client: &mut SmolClient, what: &str, mut done: impl FnMut(&mut SmolClient) -> bool) {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while !done(client) {
        assert!(StdInstant::now() < deadline, "timed out: {what}");
        client.poll(Instant::now());
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
        timeout: Duration::from_secs(1),
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

/// Writes a configuration file whose one policy is `deny-destinations` at `path`, refusing
/// `port`.
fn write_policy_file(file: &Path, path: &Path, port: u16) {
    let text = format!(
        "[[policy]]\nname = \"deny\"\npath = {:?}\ntimeout = \"1s\"\nmemory = \"16MiB\"\n\
         [policy.config]\nports = \"{port}\"\n",
        path.display().to_string()
    );
    std::fs::write(file, text).unwrap();
}

#[test]
fn the_cli_lists_and_reloads_policies_while_a_connection_stays_open() {
    let state = tempfile::tempdir().unwrap();
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let (a, b) = (
        listeners[0].local_addr().unwrap().port(),
        listeners[1].local_addr().unwrap().port(),
    );
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.nat.allow_host_loopback = true;
    config.dns.upstream = vec![];
    // No policy at start: a reload brings the first in.
    let hub = MemoryHub::new(1500);
    let gw = start(config.clone(), &hub);
    let file = state.path().join("policies.toml");
    let sources = Sources {
        file: Some(file.clone()),
        ..Sources::default()
    };
    let mut options = ControlOptions::new(&config, Vec::new());
    options.policy_source = Some(PolicySource::new(move || {
        Config::load(&sources).map(|l| l.config.policy)
    }));
    let control = ControlServer::start(gw.handle.clone(), options).unwrap();
    let sock = control.socket().to_owned();
    let mut client = SmolClient::new(hub.connect(), [0x52, 0, 0, 0, 0, 0x22], Instant::now());
    acquire(&mut client, Duration::from_secs(10));

    assert_eq!(
        json(&sock, &["policy", "list", "--json"]),
        serde_json::json!([])
    );
    // A file that does not load changes nothing, and says which key is wrong.
    std::fs::write(&file, "[[policy]]\nname = \"deny\"\ntimeout = \"1h\"\n").unwrap();
    let out = cli(&sock, &["policy", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("policy[0]"), "{err}");

    write_policy_file(&file, &component("deny-destinations"), a);
    let out = ok(&sock, &["policy", "reload"]);
    assert!(out.contains("reloaded: in force deny"), "{out}");
    assert_eq!(connect(&mut client, a, 50000), State::Closed, "A refused");
    let (kept, kept_state) = open(&mut client, b, 50001);
    assert_eq!(kept_state, State::Established);
    let (mut remote, _) = listeners[1].accept().unwrap();
    remote
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    // The policy now refuses B instead: new flows see it; the open connection to B goes on.
    write_policy_file(&file, &component("deny-destinations"), b);
    ok(&sock, &["policy", "reload"]);
    assert_eq!(
        connect(&mut client, a, 50002),
        State::Established,
        "A allowed now"
    );
    assert_eq!(
        connect(&mut client, b, 50003),
        State::Closed,
        "B refused now"
    );

    // A broken module keeps the one in force, and the command says so and fails.
    let garbage = state.path().join("broken.wasm");
    std::fs::write(&garbage, b"not wasm").unwrap();
    write_policy_file(&file, &garbage, a);
    let out = cli(&sock, &["policy", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed load exits non-zero");
    assert!(
        err.contains("policy \"deny\"")
            && err.contains("broken.wasm")
            && err.contains("its previous module stays in force"),
        "{err}"
    );
    assert_eq!(
        connect(&mut client, b, 50004),
        State::Closed,
        "B still refused"
    );
    assert_eq!(connect(&mut client, a, 50005), State::Established);

    // The list counts what the module in force did since it was loaded: two checks of A
    // (allowed), two of B (refused); the failed reload kept its counters.
    let list = json(&sock, &["policy", "list", "--json"]);
    let p = &list[0];
    assert_eq!(p["name"], "deny");
    assert_eq!(p["session_filter"], true);
    assert_eq!(p["dhcp_customizer"], false);
    assert_eq!(p["calls"]["session"], 4, "{p}");
    assert_eq!(p["calls"]["rejected"], 2, "{p}");
    let table = ok(&sock, &["policy", "list"]);
    assert!(
        table.starts_with("NAME") && table.contains("deny-destinations.wasm"),
        "{table}"
    );
    let metrics = ok(&sock, &["status", "--json"]);
    assert!(metrics.contains("\"policies\""), "{metrics}");
    let (_, body) = hubnat::control::client::Client::new(&sock)
        .raw(hyper::Method::GET, "/metrics", None)
        .unwrap();
    let metrics = parse_metrics(&String::from_utf8_lossy(&body));
    assert_eq!(
        metrics["hubnat_policy_calls_total{hook=session,policy=deny}"],
        4.0
    );
    assert_eq!(
        metrics["hubnat_policy_outcomes_total{outcome=reject,policy=deny}"],
        2.0
    );
    assert_eq!(
        metrics["hubnat_policy_errors_total{kind=timeout,policy=deny}"],
        0.0
    );

    // The connection opened before the reloads still carries data both ways.
    assert_eq!(client.tcp(kept).state(), State::Established);
    client.tcp(kept).send_slice(b"ping").unwrap();
    client.poll(Instant::now());
    let mut got = [0u8; 4];
    remote.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    remote.write_all(b"pong").unwrap();
    poll_until(&mut client, "the answer on the kept connection", |c| {
        c.tcp(kept).recv_queue() >= 4
    });
    let mut got = [0u8; 4];
    client.tcp(kept).recv_slice(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    control.stop();
    gw.stop();
    let log = std::fs::read_to_string(state.path().join("security.log")).unwrap();
    assert!(
        log.contains("POLICY reloaded: in_force=[\"deny\"] kept_previous=[\"deny\"]")
            && log.contains("by=\"the control API (uid "),
        "{log}"
    );
}
