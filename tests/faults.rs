//! Faults, with real clients in network namespaces (the TAP topology of
//! tests/common/topology.rs; issue 12, point 4): what breaks around the gateway, and what the
//! clients see of it.
//!
//! - The upstream DNS stops answering: first its port is closed (dnsmasq stopped by its PID:
//!   the query gets ICMP port unreachable), then a socket there takes queries and never
//!   answers. Either way `dig @192.168.30.1` gets SERVFAIL from the virtual host once the
//!   upstream's time is up (not a timeout), while a download by address goes on and ends
//!   intact.
//! - The remote resets mid-transfer (SO_LINGER 0 after part of an HTTP body): curl gets
//!   "Connection reset by peer" (exit 56) with only the part, never a clean end, and the
//!   security log says "reset by remote".
//! - Descriptors run out (hubnat under `prlimit --nofile`): the start-up warning that
//!   nat.max_sessions does not fit; a rate-limited download started first completes intact
//!   while a flood of connections beyond the limit is refused (the client sees ECONNREFUSED;
//!   the security log says "out of host resources: Too many open files"); a new DHCP client
//!   gets a lease, and it is in leases.json.
//! - `kill -9` during heavy lease churn (`tests/fixtures/dhcp_churn.py`: many MACs at once),
//!   then a restart on the same state directory: every lease whose ACK a client saw is in the
//!   restarted gateway's table.
//! - The disk fills (the state directory on a 64 KiB tmpfs, mounted in hubnat's own mount
//!   namespace only): a new client's DISCOVER is OFFERed but its REQUESTs get no ACK, and its
//!   lease is not on disk; once space is freed, its next REQUEST gets the lease, and it is in
//!   leases.json.
//!
//! Needs root. Safety rules (DESIGN.md): the topology's own namespaces and addresses
//! (10.77.x.y, 192.168.30.0/24); the tmpfs lives and dies with hubnat's own mount namespace
//! (nothing is mounted in the test's); every process is stopped by its PID.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::cli::{cli, json};
use common::netns::{read, require_programs, require_root, unique, wait_until, Proc};
use common::topology::{fixture, Options, Topology, DNS_NAME, HTTP_PORT, SERVER_IP, VHOST_IP};
use hubnat::core::dhcp::{server::fmt_mac, LeaseState};

/// The TAP backend's TOML for a restart on the same device name.
fn tap_backend(topo: &Topology) -> String {
    format!(
        "[backend]\nkind = \"tap\"\n[backend.tap]\nname = \"{}\"\n",
        topo.client_dev.as_deref().unwrap()
    )
}

/// The bound leases of a lease file's directory, MAC → address.
fn saved_bound(dir: &Path) -> HashMap<String, String> {
    hubnat::state::load_leases(dir)
        .unwrap_or_else(|e| panic!("leases.json in {}: {e}", dir.display()))
        .into_iter()
        .filter(|l| l.state == LeaseState::Bound)
        .map(|l| (fmt_mac(&l.mac), l.ip.to_string()))
        .collect()
}

/// A macvlan interface on the client's TAP device, with MAC `mac`, up: another client on the
/// segment. It goes with the client namespace.
fn macvlan(topo: &Topology, mac: &str) -> String {
    let dev = unique("hnfm");
    let tap = topo.client_dev.clone().unwrap();
    topo.client.exec_ok(&[
        "ip", "link", "add", "link", &tap, "name", &dev, "address", mac, "type", "macvlan", "mode",
        "bridge",
    ]);
    topo.client.exec_ok(&["ip", "link", "set", &dev, "up"]);
    dev
}

/// `dig @192.168.30.1 files.hubnat.test`, one try, with more time than the gateway's answer
/// needs (the hang guard); returns dig's output.
fn dig(topo: &Topology) -> String {
    let at = format!("@{VHOST_IP}");
    let (out, took) = topo.client_run(&["dig", &at, "+tries=1", "+timeout=20", DNS_NAME]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("dig ({}, {took:?}):\n{text}", out.status);
    text
}

/// The `status:` of dig's header line, or the whole output when there is none (no answer).
fn dig_status(text: &str) -> &str {
    text.split_once("status: ")
        .and_then(|(_, rest)| rest.split_once(','))
        .map(|(status, _)| status)
        .unwrap_or(text)
}

/// The `reason="..."` of the security log's `NAT session deleted` line of the one session to
/// `remote`, once it is written.
fn deleted_reason(topo: &Topology, remote: &str) -> String {
    let field = format!("remote={remote}");
    let mut line = String::new();
    wait_until(
        Duration::from_secs(20),
        &format!("the end of the session to {remote} in the security log"),
        || {
            line = topo
                .security_log()
                .lines()
                .find(|l| l.contains("NAT session deleted: ") && l.split(' ').any(|f| f == field))
                .unwrap_or_default()
                .to_owned();
            !line.is_empty()
        },
    );
    eprintln!("security log: {line}");
    line.split_once("reason=\"")
        .and_then(|(_, r)| r.split_once('"'))
        .map(|(r, _)| r.to_owned())
        .unwrap_or_else(|| panic!("no reason in {line:?}"))
}

/// Runs `sh -c script` in hubnat's mount namespace (where its state directory is a tmpfs).
fn in_gateway_mounts(topo: &Topology, script: &str) -> Output {
    Command::new("nsenter")
        .args(["--target", &topo.hubnat_pid().to_string(), "--mount", "--"])
        .args(["sh", "-c", script])
        .output()
        .expect("nsenter")
}

/// Whether `path` is a mount point in the mount namespace of `pid` ("self": the test's).
fn mounted(pid: &str, path: &Path) -> bool {
    let info = read(Path::new(&format!("/proc/{pid}/mountinfo")));
    let path = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

#[test]
fn an_upstream_dns_that_stops_answering_gives_servfail_while_the_nat_goes_on() {
    if !require_root("an_upstream_dns_that_stops_answering_gives_servfail_while_the_nat_goes_on") {
        return;
    }
    require_programs(&["dig", "curl", "python3"]);
    let mut topo = Topology::tap(Options {
        files: vec![("big".into(), 8_000_000)],
        ..Options::default()
    });
    // Before: the redirect answers from the upstream.
    let before = dig(&topo);
    assert_eq!(dig_status(&before), "NOERROR", "{before}");
    assert!(before.contains(&format!("{DNS_NAME}.\t")) && before.contains(SERVER_IP));

    // A download by address runs all along: at 128 KiB/s, 8 MB takes over 60 s, more than the
    // two DNS failures take even on a loaded machine.
    let mut download = topo.start_download("big", "128K");

    // The upstream's port closes: dnsmasq stopped by its PID.
    let status = topo.stop_process("dnsmasq");
    eprintln!("dnsmasq stopped: {status}");
    let moved = download.received();
    let closed = dig(&topo);
    assert_eq!(dig_status(&closed), "SERVFAIL", "{closed}");
    assert!(
        closed.contains(&format!("SERVER: {VHOST_IP}#53")),
        "{closed}"
    );
    assert!(
        download.is_running(),
        "the download ended during the DNS failure"
    );
    // curl paces a rate-limited download by its average: after a burst it may pause for
    // seconds, so "goes on" means "moves again", not "moved during the dig".
    wait_until(Duration::from_secs(60), "the download to move on", || {
        download.received() > moved || !download.is_running()
    });

    // The upstream takes queries and never answers.
    let silent_log = topo.path("silent-dns.log");
    let mut cmd = topo.server.command("python3");
    cmd.args([
        "-c",
        "import socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind((sys.argv[1], 53))\n\
         print('listening', flush=True)\n\
         while True:\n    data, peer = s.recvfrom(65536)\n    print('query', len(data), peer, flush=True)\n",
        SERVER_IP,
    ]);
    let mut silent = Proc::spawn(cmd, "silent DNS", &silent_log);
    wait_until(Duration::from_secs(10), "the silent DNS socket", || {
        assert!(silent.is_running(), "{}", read(&silent_log));
        read(&silent_log).contains("listening")
    });
    let moved = download.received();
    let unanswered = dig(&topo);
    assert_eq!(dig_status(&unanswered), "SERVFAIL", "{unanswered}");
    assert!(
        read(&silent_log).contains("query "),
        "the query did not reach the silent upstream:\n{}",
        read(&silent_log)
    );
    assert!(
        download.is_running(),
        "the download ended during the DNS failure"
    );
    // curl paces a rate-limited download by its average: after a burst it may pause for
    // seconds, so "goes on" means "moves again", not "moved during the dig".
    wait_until(Duration::from_secs(60), "the download to move on", || {
        download.received() > moved || !download.is_running()
    });

    download.finish(Duration::from_secs(180));
    drop(silent);
    topo.finish();
}

/// A server that answers one HTTP request with a `Content-Length` of TOTAL, sends PART bytes
/// of it, waits for the file GO, then closes with SO_LINGER 0 (a RST).
const RESET_SERVER: &str = r#"
import os, socket, struct, sys, time
bind, port, part, total, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((bind, port))
srv.listen(1)
print("listening", flush=True)
conn, peer = srv.accept()
request = b""
while b"\r\n\r\n" not in request:
    chunk = conn.recv(4096)
    if not chunk:
        sys.exit("no request")
    request += chunk
conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % total)
conn.sendall(os.urandom(part))
print("sent part", part, flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
conn.close()
print("sent reset", flush=True)
"#;

#[test]
fn a_remote_reset_mid_transfer_reaches_curl_as_a_reset() {
    if !require_root("a_remote_reset_mid_transfer_reaches_curl_as_a_reset") {
        return;
    }
    require_programs(&["curl", "python3"]);
    let topo = Topology::tap(Options::default());
    let (port, part, total) = (7101u16, 300_000u64, 1_000_000u64);
    let go = topo.path("reset.go");
    let log = topo.path("reset-server.log");
    let mut cmd = topo.server.command("python3");
    cmd.args(["-c", RESET_SERVER, SERVER_IP])
        .arg(port.to_string())
        .arg(part.to_string())
        .arg(total.to_string())
        .arg(&go);
    let mut server = Proc::spawn(cmd, "reset server", &log);
    wait_until(
        Duration::from_secs(10),
        "the reset server to listen",
        || {
            assert!(server.is_running(), "{}", read(&log));
            read(&log).contains("listening")
        },
    );

    let out = topo.path("reset-download");
    let url = format!("http://{SERVER_IP}:{port}/part");
    let mut curl: Child = topo
        .curl(&["--no-buffer", "-o", out.to_str().unwrap(), &url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let len = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    // The client has the whole part before the server resets.
    wait_until(Duration::from_secs(30), "the part at the client", || {
        assert!(curl.try_wait().unwrap().is_none(), "curl ended early");
        len() >= part
    });
    std::fs::write(&go, b"").unwrap();
    wait_until(Duration::from_secs(30), "curl to end", || {
        curl.try_wait().unwrap().is_some()
    });
    let status = curl.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(curl.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("curl ({status}): {err}");
    assert_eq!(status.code(), Some(56), "curl's exit: {err}");
    assert!(err.contains("Connection reset by peer"), "{err}");
    assert_eq!(len(), part, "the bytes before the reset, and no more");
    assert!(read(&log).contains("sent reset"), "{}", read(&log));
    assert_eq!(
        deleted_reason(&topo, &format!("{SERVER_IP}:{port}")),
        "reset by remote"
    );
    drop(server);
    topo.finish();
}

/// Opens COUNT TCP connections to HOST:PORT one after another, prints one line of counts by
/// outcome (`connected=N ECONNREFUSED=N ...`), and holds the connected ones until STOP exists.
const CONNECT_FLOOD: &str = r#"
import errno, os, socket, sys, time
host, port, count, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
held, results = [], {}
for i in range(count):
    s = socket.socket()
    s.settimeout(20)
    try:
        s.connect((host, port))
        held.append(s)
        r = "connected"
    except socket.timeout:
        r = "timeout"
        s.close()
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e))
        s.close()
    results[r] = results.get(r, 0) + 1
print(" ".join("%s=%d" % kv for kv in sorted(results.items())), flush=True)
while not os.path.exists(stop):
    time.sleep(0.05)
"#;

#[test]
fn out_of_descriptors_new_sessions_are_refused_while_old_ones_and_dhcp_go_on() {
    if !require_root("out_of_descriptors_new_sessions_are_refused_while_old_ones_and_dhcp_go_on") {
        return;
    }
    require_programs(&["curl", "python3", "prlimit", "udhcpc"]);
    // 96 descriptors: hubnat's warning keeps 64 aside and says about 32 sessions fit; it holds
    // some twenty itself, so the flood gets a few dozen more before it runs out.
    const LIMIT: u32 = 96;
    const FLOOD: u32 = 200;
    let topo = Topology::tap(Options {
        files: vec![("big".into(), 8_000_000), ("small".into(), 64 * 1024)],
        wrapper: vec!["prlimit".into(), format!("--nofile={LIMIT}:{LIMIT}")],
        ..Options::default()
    });
    let warning = format!(
        "nat.max_sessions = 16384, but the open-file limit is {LIMIT}: only about {} sessions \
         can be open at once",
        LIMIT - 64
    );
    assert!(
        read(&topo.hubnat_log).contains(&warning),
        "{}",
        read(&topo.hubnat_log)
    );
    assert!(
        topo.security_log()
            .contains(&format!("GATEWAY warning: {warning}")),
        "{}",
        topo.security_log()
    );

    // The download first, rate-limited so that it outlasts the flood (30 s at least).
    let mut download = topo.start_download("big", "256K");

    let stop = topo.path("flood.stop");
    let flood_log = topo.path("flood.log");
    let mut cmd = topo.client.command("python3");
    cmd.args(["-c", CONNECT_FLOOD, SERVER_IP])
        .arg(HTTP_PORT.to_string())
        .arg(FLOOD.to_string())
        .arg(&stop);
    let mut flood = Proc::spawn(cmd, "connect flood", &flood_log);
    wait_until(Duration::from_secs(120), "the flood's outcome", || {
        assert!(flood.is_running(), "{}", read(&flood_log));
        !read(&flood_log).is_empty()
    });
    let outcome: HashMap<String, u32> = read(&flood_log)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect();
    eprintln!("flood: {outcome:?}");
    let connected = outcome.get("connected").copied().unwrap_or(0);
    let refused = outcome.get("ECONNREFUSED").copied().unwrap_or(0);
    assert!(connected > 0 && refused > 0, "{outcome:?}");
    assert_eq!(
        connected + refused,
        FLOOD,
        "every connection is either served or refused at once: {outcome:?}"
    );
    assert!(connected < LIMIT, "{outcome:?}");

    // Why, in the security log and hubnat's own log.
    let log = topo.security_log();
    assert!(
        log.lines().any(|l| l.contains("NAT session failed: ")
            && l.contains(&format!("remote={SERVER_IP}:{HTTP_PORT}"))
            && l.contains("reason=\"out of host resources: Too many open files")),
        "{log}"
    );
    assert!(
        read(&topo.hubnat_log).contains("cannot open a host socket (out of host resources)"),
        "{}",
        read(&topo.hubnat_log)
    );

    // While every descriptor is taken: the download moves, and a new client gets a lease that
    // is on disk.
    assert!(download.is_running(), "the download ended during the flood");
    let moved = download.received();
    let mac = "02:fd:00:00:00:03";
    let dev = macvlan(&topo, mac);
    let (ip, _) = topo.one_lease_on(&dev, 1);
    assert_eq!(
        saved_bound(&topo.path("state")).get(mac),
        Some(&ip),
        "the new client's lease in leases.json"
    );
    wait_until(Duration::from_secs(30), "the download to move", || {
        download.received() > moved || !download.is_running()
    });

    // The flood ends; the download completes intact, and new sessions are served again.
    std::fs::write(&stop, b"").unwrap();
    drop(flood);
    download.finish(Duration::from_secs(180));
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/files/small");
    wait_until(
        Duration::from_secs(30),
        "a new session after the flood",
        || {
            topo.curl(&["--fail", "-o", "/dev/null", &url])
                .status()
                .unwrap()
                .success()
        },
    );
    topo.finish();
}

#[test]
fn every_acknowledged_lease_survives_kill_9_during_lease_churn() {
    if !require_root("every_acknowledged_lease_survives_kill_9_during_lease_churn") {
        return;
    }
    require_programs(&["python3", "udhcpc"]);
    let mut topo = Topology::tap(Options::default());
    let state = topo.path("state");
    let sock = state.join("control.sock");
    let dev = topo.client_dev.clone().unwrap();
    let stop = topo.path("churn.stop");
    let log = topo.path("churn.log");
    let mut cmd = topo.client.command("python3");
    cmd.arg(fixture("dhcp_churn.py"))
        .args(["--dev", &dev, "--inflight", "16", "--keep", "120", "--stop"])
        .arg(&stop);
    let mut churn = Proc::spawn(cmd, "dhcp_churn.py", &log);
    let acks = |text: &str| text.lines().filter(|l| l.starts_with("ack ")).count();
    let releases = |text: &str| text.lines().filter(|l| l.starts_with("release ")).count();
    wait_until(Duration::from_secs(120), "heavy lease churn", || {
        assert!(churn.is_running(), "{}", read(&log));
        let text = read(&log);
        acks(&text) >= 1000 && releases(&text) >= 100
    });

    // In the middle of it: SIGKILL, by PID.
    topo.signal_hubnat(libc::SIGKILL);
    let status = topo.stop_hubnat();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    // The TAP device goes with hubnat, and the churn with it.
    wait_until(Duration::from_secs(30), "the churn to notice", || {
        !churn.is_running()
    });
    std::fs::write(&stop, b"").unwrap();
    let text = read(&log);
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("stop error="),
        "the churn must have been cut off by the kill: {last}"
    );
    assert!(text.lines().all(|l| !l.starts_with("nak ")), "{text}");
    // What the clients were told: the last word on each MAC.
    let mut acked: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["ack", mac, ip] => {
                acked.insert(mac.to_string(), ip.to_string());
            }
            ["release", mac, _] => {
                acked.remove(*mac);
            }
            _ => {}
        }
    }
    eprintln!(
        "churn: {} ACKs, {} releases, {} clients bound at the kill; {last}",
        acks(&text),
        releases(&text),
        acked.len()
    );

    // The restart, on the same state directory.
    topo.start_hubnat(&tap_backend(&topo));
    wait_until(
        Duration::from_secs(20),
        "the control socket after the restart",
        || cli(&sock, &["status"]).status.success(),
    );
    let table = json(&sock, &["dhcp", "table", "--json"]);
    let bound: HashMap<String, String> = table
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["state"] == "bound")
        .map(|l| {
            (
                l["mac"].as_str().unwrap().to_owned(),
                l["ip"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|(mac, ip)| bound.get(*mac) != Some(*ip))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged leases missing after the restart: {lost:?}",
        lost.len(),
        acked.len()
    );
    topo.finish();
}

#[test]
fn a_full_disk_withholds_the_ack_until_the_lease_can_be_saved() {
    if !require_root("a_full_disk_withholds_the_ack_until_the_lease_can_be_saved") {
        return;
    }
    require_programs(&["udhcpc", "unshare", "nsenter", "dd"]);
    // hubnat in a mount namespace of its own, whose state directory is a 64 KiB tmpfs: it goes
    // with hubnat's last process, whatever happens to the test.
    let topo = Topology::tap(Options {
        wrapper: [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mkdir -p \"$0\" && mount -t tmpfs -o size=64k,mode=0700 hubnat-faults \"$0\" && exec \"$@\"",
            "{state}",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    });
    let state = topo.path("state");
    let pid = topo.hubnat_pid().to_string();
    assert!(mounted(&pid, &state), "the tmpfs in hubnat's namespace");
    assert!(
        !mounted("self", &state),
        "nothing mounted in the test's namespace"
    );
    let state_str = state.to_str().unwrap();
    // The gateway's lease file, copied out of its namespace: bound leases by MAC.
    let copy = topo.path("leases-copy");
    std::fs::create_dir_all(&copy).unwrap();
    let saved = || {
        let out = in_gateway_mounts(&topo, &format!("cat {state_str}/leases.json"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(copy.join("leases.json"), &out.stdout).unwrap();
        saved_bound(&copy)
    };
    assert_eq!(
        saved().get(&mac_of(&topo, topo.client_dev.as_deref().unwrap())),
        topo.client_ip.as_ref(),
        "the first client's lease on the tmpfs"
    );

    // Fill it.
    let fill = in_gateway_mounts(
        &topo,
        &format!("dd if=/dev/zero of={state_str}/fill bs=4096; stat -f -c %a {state_str}"),
    );
    let free = String::from_utf8_lossy(&fill.stdout);
    assert!(
        String::from_utf8_lossy(&fill.stderr).contains("No space left on device"),
        "{}",
        String::from_utf8_lossy(&fill.stderr)
    );
    assert_eq!(free.trim(), "0", "free blocks after the fill");

    // A new client: udhcpc on a macvlan with a MAC of its own, trying again and again.
    let mac = "02:fd:00:00:00:05";
    let dev = macvlan(&topo, mac);
    let events = topo.path("full-disk-udhcpc-events.log");
    let script = topo.path("full-disk-udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"event=$1 ip=$ip\" >> \"$TEST_EVENTS\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = topo.client_cmd("udhcpc");
    cmd.env("TEST_EVENTS", &events)
        .args(["-f", "-i", &dev, "-s", script.to_str().unwrap()])
        .args(["-t", "3", "-T", "1", "-A", "1"]);
    let udhcpc_log = topo.path("full-disk-udhcpc.log");
    let mut udhcpc = Proc::spawn(cmd, "udhcpc (new client)", &udhcpc_log);
    let selects = || {
        read(&udhcpc_log)
            .matches("broadcasting select for ")
            .count()
    };
    // OFFERs came ("select" is udhcpc's REQUEST of the address it was offered: three per
    // offer), and the REQUESTs go unanswered.
    wait_until(Duration::from_secs(60), "REQUESTs without an ACK", || {
        assert!(udhcpc.is_running(), "{}", read(&udhcpc_log));
        selects() >= 4
    });
    let seen = read(&udhcpc_log);
    assert!(
        !seen.contains("lease of "),
        "an ACK with the disk full:\n{seen}"
    );
    assert!(!read(&events).contains("event=bound"), "{}", read(&events));
    let hubnat_log = read(&topo.hubnat_log);
    assert!(
        hubnat_log.contains("cannot save the lease table")
            && hubnat_log.contains("DHCP ACKs withheld"),
        "{hubnat_log}"
    );
    assert_eq!(saved().get(mac), None, "a lease on disk with the disk full");

    // Space again: the next REQUEST gets the lease, and it is on disk.
    let out = in_gateway_mounts(&topo, &format!("rm {state_str}/fill"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(60),
        "the lease after the space came back",
        || {
            assert!(udhcpc.is_running(), "{}", read(&udhcpc_log));
            read(&events).contains("event=bound")
        },
    );
    let bound = read(&events);
    let ip = bound
        .lines()
        .find_map(|l| l.strip_prefix("event=bound ip="))
        .unwrap()
        .to_owned();
    assert_eq!(saved().get(mac), Some(&ip), "the lease in leases.json");
    drop(udhcpc);
    topo.finish();
    assert!(!mounted("self", &state), "nothing left mounted");
}

/// The MAC of `dev` in the client namespace.
fn mac_of(topo: &Topology, dev: &str) -> String {
    let out = topo
        .client
        .exec_ok(&["cat", &format!("/sys/class/net/{dev}/address")]);
    out.trim().to_owned()
}
