//! The control API and the operator CLI against a running gateway, in process: the real
//! driver on the in-memory hub, the control server on a socket in a temporary state directory,
//! a smoltcp client on another port of the hub, a real `TcpListener` on 127.0.0.1 as the remote
//! (reached with `nat.allow_host_loopback`), and the real `hubnat` binary as the operator. The
//! test that runs the CLI as another user needs root (it uses `setpriv`); the rest need nothing.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant as StdInstant};

use common::cli::{cli, json, ok, parse_metrics};
use common::inproc::{start, Running};
use common::smol_client::{acquire, SmolClient};
use hubnat::config::{Config, Override, Sources};
use hubnat::control::client::Client;
use hubnat::control::{ControlOptions, ControlServer};
use hubnat_hub::MemoryHub;
use serde_json::Value;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::time::Instant;

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x1a];
const PATIENCE: Duration = Duration::from_secs(10);

fn config(state: &Path) -> Config {
    let mut c = Config::default();
    c.state.dir = state.to_owned();
    c.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    c.nat.allow_host_loopback = true;
    c.dns.upstream = vec![];
    c
}

/// A gateway and its control server.
struct Gw {
    running: Running,
    control: ControlServer,
}

fn start_gw(config: Config, hub: &MemoryHub) -> Gw {
    let running = start(config.clone(), hub);
    let control = ControlServer::start(
        running.handle.clone(),
        ControlOptions::new(&config, Vec::new()),
    )
    .expect("control server starts");
    Gw { running, control }
}

impl Gw {
    fn stop(self) {
        self.control.stop();
        self.running.stop();
    }
}

fn socket(state: &Path) -> PathBuf {
    state.join("control.sock")
}

/// Runs a command that must fail, and returns its one-line error.
fn fails(sock: &Path, args: &[&str]) -> String {
    let out = cli(sock, args);
    assert!(!out.status.success(), "hubnat {args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("hubnat: error: "), "{err}");
    err
}

fn poll_until(client: &mut SmolClient, what: &str, mut done: impl FnMut(&mut SmolClient) -> bool) {
    let until = StdInstant::now() + PATIENCE;
    while !done(client) {
        assert!(StdInstant::now() < until, "timed out: {what}");
        client.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn security_log(state: &Path) -> String {
    std::fs::read_to_string(state.join("security.log")).unwrap_or_default()
}

#[test]
fn the_cli_reads_and_changes_a_running_gateway() {
    let state = tempfile::tempdir().unwrap();
    let sock = socket(state.path());
    let hub = MemoryHub::new(1500);
    let gw = start_gw(config(state.path()), &hub);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is the owner's");

    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    let got = acquire(&mut client, PATIENCE);
    let ip = got.address.address();

    // status --json: the fields scripts read.
    let s = json(&sock, &["status", "--json"]);
    assert_eq!(s["nat"]["enabled"], true);
    assert_eq!(s["dhcp"]["enabled"], true);
    assert_eq!(s["enabled"], true);
    assert_eq!(s["leases"], 1);
    assert_eq!(s["sessions"]["tcp"], 0);
    assert!(s["dhcp"]["acks"].as_u64().unwrap() >= 1, "{s}");
    let human = ok(&sock, &["status"]);
    assert!(
        human.contains("dhcp") && human.contains("1 bound, pool of 191"),
        "{human}"
    );

    // The lease table.
    let leases = json(&sock, &["dhcp", "table", "--json"]);
    let row = &leases[0];
    assert_eq!(row["mac"], "52:54:00:00:00:1a");
    assert_eq!(row["ip"], ip.to_string());
    assert_eq!(row["state"], "bound");
    assert!(row["expires"].as_str().unwrap().ends_with('Z'), "{row}");
    assert!(row.get("hostname").is_some());
    let table = ok(&sock, &["dhcp", "table"]);
    assert!(
        table.starts_with("ID") && table.contains("52:54:00:00:00:1a"),
        "{table}"
    );

    // A live TCP session, listed with its bytes, then ended by the operator.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(e),
            }
        }
    });
    let h: SocketHandle = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), 40000);
    poll_until(&mut client, "established", |c| {
        c.tcp(h).state() == State::Established
    });
    let data = vec![7u8; 20000];
    let mut sent = 0;
    poll_until(&mut client, "the data is sent", |c| {
        let s = c.tcp(h);
        if sent < data.len() && s.can_send() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        sent == data.len() && c.tcp(h).send_queue() == 0
    });
    let rows = json(&sock, &["nat", "table", "--json", "--protocol", "tcp"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    for key in [
        "id",
        "protocol",
        "client",
        "remote",
        "client_mac",
        "remote_name",
        "state",
        "created",
        "last_activity",
        "bytes_to_remote",
        "bytes_to_client",
    ] {
        assert!(r.get(key).is_some(), "{key} missing: {r}");
    }
    assert_eq!(r["protocol"], "tcp");
    assert_eq!(r["client"], format!("{ip}:40000"));
    assert_eq!(r["remote"], format!("127.0.0.1:{port}"));
    assert_eq!(r["bytes_to_remote"], 20000);
    assert!(
        json(&sock, &["nat", "table", "--json", "--protocol", "udp"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(json(
        &sock,
        &["nat", "table", "--json", "--client", "192.168.30.250"]
    )
    .as_array()
    .unwrap()
    .is_empty());
    let table = ok(&sock, &["nat", "table"]);
    assert!(
        table.starts_with("ID") && table.contains(&format!("127.0.0.1:{port}")),
        "{table}"
    );
    let id = r["id"].as_u64().unwrap().to_string();
    assert!(ok(&sock, &["nat", "kill", &id]).contains("ended"));
    poll_until(&mut client, "the client sees a reset", |c| {
        c.tcp(h).state() == State::Closed
    });
    let seen = server.join().unwrap();
    assert!(
        seen.is_err(),
        "the server saw a reset, not an EOF: {seen:?}"
    );
    let err = fails(&sock, &["nat", "kill", &id]);
    assert!(err.contains(&format!("no session {id}")), "{err}");

    // Settings: a valid change applies and is kept in the state directory.
    let out = ok(
        &sock,
        &["dhcp", "set", "range_end=192.168.30.100", "lease=10m"],
    );
    assert!(
        out.contains("dhcp.range_end = \"192.168.30.100\" (was \"192.168.30.200\")"),
        "{out}"
    );
    let d = json(&sock, &["dhcp", "get", "--json"]);
    assert_eq!(
        (d["range_end"].as_str(), d["lease"].as_str()),
        (Some("192.168.30.100"), Some("10m"))
    );
    let persisted = std::fs::read_to_string(state.path().join("overrides.toml")).unwrap();
    assert!(
        persisted.contains("range_end = \"192.168.30.100\""),
        "{persisted}"
    );
    let human = ok(&sock, &["dhcp", "get"]);
    assert!(human.contains("the state directory"), "{human}");

    // Invalid changes: refused whole, with the key; nothing changes.
    let before = json(&sock, &["dhcp", "get", "--json"]);
    let err = fails(
        &sock,
        &["dhcp", "set", "lease=5m", "range_end=192.168.31.5"],
    );
    assert!(
        err.contains("dhcp.range_end") && err.contains("outside the subnet"),
        "{err}"
    );
    assert_eq!(json(&sock, &["dhcp", "get", "--json"]), before);
    let nat_before = json(&sock, &["nat", "get", "--json"]);
    let err = fails(&sock, &["nat", "set", "mtu=0"]);
    assert!(err.contains("nat.mtu") && err.contains("576"), "{err}");
    let err = fails(&sock, &["nat", "set", "bogus=1"]);
    assert!(
        err.contains("nat.bogus") && err.contains("unknown key"),
        "{err}"
    );
    assert_eq!(json(&sock, &["nat", "get", "--json"]), nat_before);
    // The API's error is JSON with the key and the reason.
    let (status, body) = Client::new(&sock)
        .raw(
            hyper::Method::PATCH,
            "/v1/nat",
            Some(&serde_json::json!({ "mtu": 0 })),
        )
        .unwrap();
    assert_eq!(status.as_u16(), 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["key"], "nat.mtu", "{body}");
    assert!(body["error"]["reason"]
        .as_str()
        .unwrap()
        .contains("must be from 576"));

    // The functions on and off.
    ok(&sock, &["nat", "disable"]);
    assert_eq!(json(&sock, &["status", "--json"])["nat"]["enabled"], false);
    ok(&sock, &["nat", "enable"]);
    ok(&sock, &["dhcp", "disable"]);
    assert_eq!(json(&sock, &["status", "--json"])["dhcp"]["enabled"], false);
    ok(&sock, &["dhcp", "enable"]);
    ok(&sock, &["disable"]);
    assert_eq!(json(&sock, &["status", "--json"])["enabled"], false);
    ok(&sock, &["enable"]);
    assert_eq!(json(&sock, &["status", "--json"])["enabled"], true);
    assert!(ok(&sock, &["nat", "enable"]).contains("no change"));

    // The DNS section.
    ok(&sock, &["dns", "set", "upstream=[\"192.0.2.53\"]"]);
    assert_eq!(
        json(&sock, &["dns", "get", "--json"])["upstream"],
        serde_json::json!(["192.0.2.53"])
    );

    // The host section moves the virtual host.
    ok(&sock, &["host", "set", "ip=192.168.30.2"]);
    assert_eq!(
        json(&sock, &["host", "get", "--json"])["ip"],
        "192.168.30.2"
    );
    assert_eq!(json(&sock, &["status", "--json"])["ip"], "192.168.30.2");

    // Releasing a lease.
    let out = ok(&sock, &["dhcp", "release", "52:54:00:00:00:1a"]);
    assert!(out.contains(&ip.to_string()), "{out}");
    let leases = json(&sock, &["dhcp", "table", "--json"]);
    assert_ne!(leases[0]["state"], "bound", "{leases}");
    let err = fails(&sock, &["dhcp", "release", "not-a-mac"]);
    assert!(
        err.contains("neither a MAC address nor an IPv4 address"),
        "{err}"
    );

    // The security log names the operator's uid for each change, end and release.
    let log = security_log(state.path());
    let uid = unsafe { libc::geteuid() };
    assert!(
        log.contains(&format!("setting changed: key=dhcp.range_end old=\"192.168.30.200\" new=\"192.168.30.100\" by=\"the control API (uid {uid})\"")),
        "{log}"
    );
    assert!(log.contains("key=nat.enabled old=true new=false"), "{log}");
    assert!(
        log.contains(&format!(
            "CONTROL session ended by operator: id={id} by=\"the control API (uid {uid})\""
        )),
        "{log}"
    );
    assert!(
        log.contains("CONTROL lease released by operator: mac=52:54:00:00:00:1a"),
        "{log}"
    );

    // Unknown paths and methods.
    let (status, _) = Client::new(&sock)
        .raw(hyper::Method::GET, "/v1/nope", None)
        .unwrap();
    assert_eq!(status.as_u16(), 404);
    let (status, _) = Client::new(&sock)
        .raw(hyper::Method::DELETE, "/v1/status", None)
        .unwrap();
    assert_eq!(status.as_u16(), 405);

    // A restart keeps the changes: the loader reads them from the state directory.
    gw.stop();
    assert!(!sock.exists(), "the socket is removed on exit");
    let err = fails(&sock, &["status"]);
    assert!(
        err.contains("no gateway is running") && err.contains("hubnat run"),
        "{err}"
    );
    let sources = Sources {
        persisted: true,
        overrides: vec![Override::new(
            "state.dir",
            format!("{:?}", state.path().display().to_string()),
        )],
        ..Sources::default()
    };
    let mut reloaded = Config::load(&sources).unwrap().config;
    assert_eq!(reloaded.dhcp.range_end, Ipv4Addr::new(192, 168, 30, 100));
    assert_eq!(reloaded.dhcp.lease, Duration::from_secs(600));
    assert_eq!(reloaded.host.ip, Ipv4Addr::new(192, 168, 30, 2));
    reloaded.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    let overridden = Config::overridden(&reloaded, &sources);
    let running = start(reloaded.clone(), &hub);
    let control = ControlServer::start(
        running.handle.clone(),
        ControlOptions::new(&reloaded, overridden),
    )
    .unwrap();
    let s = json(&sock, &["status", "--json"]);
    assert_eq!(s["ip"], "192.168.30.2");
    let origins: Vec<(String, String)> = s["overridden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["key"].as_str().unwrap().into(),
                o["origin"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        origins.contains(&(
            "dhcp.range_end".into(),
            hubnat::config::ORIGIN_PERSISTED.into()
        )),
        "{origins:?}"
    );
    control.stop();
    running.stop();
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let state = tempfile::tempdir().unwrap();
    let sock = socket(state.path());
    let hub = MemoryHub::new(1500);
    let mut cfg = config(state.path());
    cfg.control.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let running = start(cfg.clone(), &hub);
    let control =
        ControlServer::start(running.handle.clone(), ControlOptions::new(&cfg, vec![])).unwrap();
    let scrape = || -> String {
        let (status, body) = Client::new(&sock)
            .raw(hyper::Method::GET, "/metrics", None)
            .unwrap();
        assert_eq!(status.as_u16(), 200);
        String::from_utf8(body.to_vec()).unwrap()
    };
    let before = parse_metrics(&scrape());
    assert_eq!(before["hubnat_leases{}"], 0.0);
    assert_eq!(before["hubnat_pool_size{}"], 191.0);
    assert_eq!(before["hubnat_enabled{function=nat}"], 1.0);

    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    acquire(&mut client, PATIENCE);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf.len()
    });
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), 40001);
    poll_until(&mut client, "established", |c| {
        c.tcp(h).state() == State::Established
    });
    let mut sent = 0;
    poll_until(&mut client, "sent", |c| {
        let s = c.tcp(h);
        if sent < 5000 && s.can_send() {
            sent += s.send_slice(&[1u8; 5000][sent..]).unwrap();
        }
        sent == 5000 && c.tcp(h).send_queue() == 0
    });
    let after = parse_metrics(&scrape());
    assert_eq!(after["hubnat_leases{}"], 1.0);
    assert_eq!(after["hubnat_sessions{protocol=tcp}"], 1.0);
    assert_eq!(after["hubnat_sessions_created_total{protocol=tcp}"], 1.0);
    assert_eq!(after["hubnat_bytes_total{direction=to_remote}"], 5000.0);
    assert!(after["hubnat_dhcp_messages_total{type=ack}"] >= 1.0);
    assert!(
        after["hubnat_frames_total{direction=in}"] > before["hubnat_frames_total{direction=in}"]
    );

    // The TCP listener serves /metrics and nothing else.
    let addr = control.metrics_addr().expect("metrics listener");
    let get = |path: &str| -> String {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let text = get("/metrics");
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("hubnat_sessions{protocol=\"tcp\"} 1"),
        "{text}"
    );
    assert!(get("/v1/status").starts_with("HTTP/1.1 404"));

    client.tcp(h).close();
    poll_until(&mut client, "closed", |c| {
        matches!(c.tcp(h).state(), State::TimeWait | State::Closed)
    });
    assert_eq!(server.join().unwrap(), 5000);
    control.stop();
    running.stop();
}

/// Another user: shut out by the socket's mode, and refused changes (but allowed to read) when
/// an administrator opens the socket to everyone.
#[test]
fn another_user_cannot_change_settings() {
    if !common::netns::require_root("another_user_cannot_change_settings") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let sock = socket(state.path());
    let hub = MemoryHub::new(1500);
    let gw = start_gw(config(state.path()), &hub);
    let as_nobody = |args: &[&str]| -> Output {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_hubnat"))
            .args(args)
            .arg("--control")
            .arg(&sock)
            .output()
            .expect("setpriv")
    };
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(&["nat", "disable"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied on the control socket") && err.contains("uid 65534"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        &["nat", "disable"][..],
        &["dhcp", "set", "lease=5m"],
        &["nat", "kill", "1"],
        &["disable"],
    ] {
        let out = as_nobody(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "only the socket's owner (uid 0) and root may change anything; you are uid 65534"
            ),
            "{err}"
        );
    }
    let s = json(&sock, &["status", "--json"]);
    assert_eq!(
        (s["enabled"].as_bool(), s["nat"]["enabled"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(json(&sock, &["dhcp", "get", "--json"])["lease"], "2h");
    assert!(!state.path().join("overrides.toml").exists());
    gw.stop();
}

/// Idle connections are bounded: past the limit new ones are closed, and the slots come back
/// when the idle ones go.
#[test]
fn connections_are_bounded() {
    let state = tempfile::tempdir().unwrap();
    let sock = socket(state.path());
    let hub = MemoryHub::new(1500);
    let gw = start_gw(config(state.path()), &hub);
    let idle: Vec<_> = (0..hubnat::control::MAX_CONNECTIONS)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    // The server takes them in its own time; wait until the next one is refused.
    let until = StdInstant::now() + PATIENCE;
    while Client::new(&sock).get("/v1/status").is_ok() {
        assert!(StdInstant::now() < until, "the limit never applies");
        std::thread::sleep(Duration::from_millis(20));
    }
    fails(&sock, &["status"]);
    drop(idle);
    let until = StdInstant::now() + PATIENCE;
    while Client::new(&sock).get("/v1/status").is_err() {
        assert!(StdInstant::now() < until, "the slots never come back");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.stop();
}
