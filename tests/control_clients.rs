//! The operator CLI against a running gateway with real clients in network namespaces (the
//! TAP topology of `tests/common/topology.rs`): `dhcp set` then a new lease in the new range
//! with the new lease time, `dhcp release`, `nat disable` (curl fails, DHCP works) and
//! `nat enable`, a live curl download in `nat table --json` with growing bytes that `nat kill`
//! resets, `host set` moving the virtual host, the metrics moving with the traffic, and every
//! change still there after a restart. Needs root; follows DESIGN.md's safety rules (the
//! topology's own namespaces, processes stopped by PID).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{cli, json, ok};
use common::netns::{require_programs, require_root, wait_until};
use common::topology::{Options, Topology, HTTP_PORT, SERVER_IP, VHOST_IP};
use serde_json::Value;

fn curl(topo: &Topology, args: &[&str]) -> Command {
    let mut c = topo.client_cmd("curl");
    c.args([
        "-sS",
        "--noproxy",
        "*",
        "--connect-timeout",
        "3",
        "--max-time",
        "60",
    ])
    .args(args);
    c
}

fn url(path: &str) -> String {
    format!("http://{SERVER_IP}:{HTTP_PORT}{path}")
}

fn metric(sock: &Path, name: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(sock)
        .arg("http://hubnat/metrics")
        .output()
        .expect("curl");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn the_cli_drives_a_gateway_serving_real_clients() {
    if !require_root("the_cli_drives_a_gateway_serving_real_clients") {
        return;
    }
    require_programs(&["curl", "udhcpc", "ping"]);
    let mut topo = Topology::tap(Options {
        files: vec![("small".into(), 100_000), ("big".into(), 30_000_000)],
        ..Options::default()
    });
    let state: PathBuf = topo.path("state");
    let sock = state.join("control.sock");
    assert!(
        sock.exists(),
        "the control socket is in the state directory"
    );
    let tap = topo.client_dev.clone().unwrap();

    // dhcp set: a new range and lease time; the client's next lease has both.
    let first_ip = topo.client_ip.clone().unwrap();
    let out = ok(
        &sock,
        &[
            "dhcp",
            "set",
            "range_start=192.168.30.50",
            "range_end=192.168.30.60",
            "lease=3m",
        ],
    );
    assert!(out.contains("dhcp.lease = \"3m\" (was \"2h\")"), "{out}");
    // dhcp release frees the old lease.
    let out = ok(&sock, &["dhcp", "release", &first_ip]);
    assert!(out.contains(&format!("released {first_ip}")), "{out}");
    let leases = json(&sock, &["dhcp", "table", "--json"]);
    assert!(
        leases
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] != "bound"),
        "{leases}"
    );
    let (ip, lease) = topo.one_lease(1);
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!((50..=60).contains(&last), "{ip} is in the new range");
    assert_eq!(lease, 180, "the new lease time");
    let leases = json(&sock, &["dhcp", "table", "--json"]);
    assert!(
        leases
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["ip"] == ip.as_str() && l["state"] == "bound"),
        "{leases}"
    );

    // nat disable: the client's TCP connect fails, DHCP still works; nat enable restores it.
    assert!(curl(&topo, &["-o", "/dev/null", &url("/files/small")])
        .status()
        .unwrap()
        .success());
    ok(&sock, &["nat", "disable"]);
    let out = curl(&topo, &["-o", "/dev/null", &url("/files/small")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "curl must fail with the NAT off");
    let (again, _) = topo.one_lease(2);
    assert_eq!(again, ip, "DHCP still answers with the NAT off");
    ok(&sock, &["nat", "enable"]);
    assert!(curl(&topo, &["-o", "/dev/null", &url("/files/small")])
        .status()
        .unwrap()
        .success());

    // A live download: listed with growing bytes, then killed (the client sees a reset).
    let bytes_before = metric(&sock, "hubnat_bytes_total{direction=\"to_client\"}");
    let mut download = curl(
        &topo,
        &["--limit-rate", "1M", "-o", "/dev/null", &url("/files/big")],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let row = |sock: &Path| -> Option<Value> {
        let rows = json(sock, &["nat", "table", "--json", "--protocol", "tcp"]);
        rows.as_array()?
            .iter()
            .find(|r| r["remote"] == format!("{SERVER_IP}:{HTTP_PORT}"))
            .cloned()
    };
    let mut first = None;
    wait_until(Duration::from_secs(10), "the download in the table", || {
        first = row(&sock).filter(|r| r["bytes_to_client"].as_u64() > Some(0));
        first.is_some()
    });
    let first = first.unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let second = row(&sock).expect("still listed");
    assert_eq!(first["id"], second["id"]);
    assert!(
        second["bytes_to_client"].as_u64() > first["bytes_to_client"].as_u64(),
        "bytes grow: {first} then {second}"
    );
    assert_eq!(
        second["client"].as_str().unwrap().split(':').next(),
        Some(first_ip.as_str())
    );
    assert_eq!(second["protocol"], "tcp");
    assert!(second["last_activity"].as_str().unwrap().ends_with('Z'));
    let table = ok(&sock, &["nat", "table", "--client", &first_ip]);
    assert!(
        table.contains(&format!("{SERVER_IP}:{HTTP_PORT}")),
        "{table}"
    );
    let id = second["id"].as_u64().unwrap().to_string();
    ok(&sock, &["nat", "kill", &id]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = download.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "curl goes on after the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(download.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(56), "curl: {err}");
    assert!(err.contains("reset"), "{err}");
    assert!(
        metric(&sock, "hubnat_bytes_total{direction=\"to_client\"}") > bytes_before + 1_000_000.0
    );
    assert!(
        metric(
            &sock,
            "hubnat_sessions_ended_total{reason=\"ended by operator\"}"
        ) >= 1.0
    );
    let log = topo.security_log();
    assert!(
        log.contains(&format!("CONTROL session ended by operator: id={id}")),
        "{log}"
    );

    // host set moves the virtual host: it answers ping at its new address.
    ok(&sock, &["host", "set", "ip=192.168.30.2"]);
    let (out, _) = topo.client_run(&["ping", "-c", "1", "-W", "3", "192.168.30.2"]);
    assert!(
        out.status.success(),
        "ping the moved host: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (out, _) = topo.client_run(&["ping", "-c", "1", "-W", "2", VHOST_IP]);
    assert!(!out.status.success(), "the old address is gone");

    // A restart keeps every change.
    let status = topo.stop_hubnat();
    assert!(status.success());
    assert!(!sock.exists());
    topo.start_hubnat(&format!(
        "[backend]\nkind = \"tap\"\n[backend.tap]\nname = \"{tap}\"\n"
    ));
    wait_until(
        Duration::from_secs(15),
        "the control socket after the restart",
        || cli(&sock, &["status"]).status.success(),
    );
    let d = json(&sock, &["dhcp", "get", "--json"]);
    assert_eq!(
        (
            d["range_start"].as_str(),
            d["range_end"].as_str(),
            d["lease"].as_str()
        ),
        (Some("192.168.30.50"), Some("192.168.30.60"), Some("3m"))
    );
    assert_eq!(
        json(&sock, &["host", "get", "--json"])["ip"],
        "192.168.30.2"
    );
    let s = json(&sock, &["status", "--json"]);
    assert_eq!(s["ip"], "192.168.30.2");
    let from_state: Vec<&str> = s["overridden"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            o["origin"]
                .as_str()
                .unwrap()
                .starts_with("the state directory")
        })
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    for key in [
        "dhcp.range_start",
        "dhcp.range_end",
        "dhcp.lease",
        "nat.enabled",
        "host.ip",
    ] {
        assert!(from_state.contains(&key), "{key} in {from_state:?}");
    }
    let human = ok(&sock, &["status"]);
    assert!(
        human.contains("host.ip") && human.contains("the state directory"),
        "{human}"
    );
    topo.finish();
}
