//! Real clients through the NAT, in network namespaces (see tests/common/topology.rs).
//!
//! A client namespace gets a lease from hubnat over a TAP device, with a default route through
//! the virtual host 192.168.30.1, and reaches a test server namespace (10.77.0.2: HTTP, UDP
//! echo, dnsmasq) only through hubnat, which runs in a gateway namespace whose one link leads
//! to the server. Each test asserts what the client and the server saw: SHA-256 of 50 MB each
//! way, twenty transfers at once, a refused connection that fails at once, a hundred UDP
//! datagrams up to the MTU, DNS over UDP and TCP through the redirect, and a real ping.
//!
//! `fixtures_work_over_a_direct_route*` run the same checks over a plain kernel route, without
//! hubnat, so that a failure of the fixtures is told apart from a failure of the NAT.
//!
//! Debugging: `TEST_HUBNAT_PCAP=1` captures on the client's TAP and on the gateway's uplink and
//! keeps the working directory (`TEST_HUBNAT_KEEP=1` keeps it without captures).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::{require_root, wait_until};
use common::topology::{
    random_file, sha256, Options, Topology, CLOSED_PORT, DNS_NAME, ECHO_PORT, HTTP_PORT, SERVER_IP,
    VHOST_IP,
};

const MB: u64 = 1 << 20;
/// UDP payload that fills an IP datagram of `mtu` bytes (20 bytes IP, 8 bytes UDP).
fn max_udp(mtu: u32) -> u32 {
    mtu - 28
}

/// curl with the flags every call uses: quiet but with errors, no proxy, bounded in time.
fn curl(topo: &Topology, args: &[&str]) -> std::process::Command {
    let mut c = topo.client_cmd("curl");
    c.args([
        "-sS",
        "--noproxy",
        "*",
        "--connect-timeout",
        "5",
        "--max-time",
        "120",
    ])
    .args(args);
    c
}

fn url(path: &str) -> String {
    format!("http://{SERVER_IP}:{HTTP_PORT}{path}")
}

/// Downloads `/files/NAME` into the working directory; the SHA-256 must match the served file.
fn check_download(topo: &Topology, name: &str) {
    let out_path = topo.path(&format!("got-{name}"));
    let started = Instant::now();
    let out = curl(
        topo,
        &[
            "--fail",
            "-o",
            out_path.to_str().unwrap(),
            "-w",
            "%{http_code} %{size_download}",
            &url(&format!("/files/{name}")),
        ],
    )
    .output()
    .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "download of {name} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let served = topo.www.join(name);
    let size = std::fs::metadata(&served).unwrap().len();
    let got = std::fs::metadata(&out_path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(got, size, "downloaded {got} of {size} bytes of {name}");
    assert_eq!(
        sha256(&out_path),
        sha256(&served),
        "SHA-256 of the downloaded {name}"
    );
    eprintln!(
        "download {name}: {size} bytes in {took:?} ({:.0} Mbit/s)",
        mbits(size, took)
    );
    let _ = std::fs::remove_file(&out_path);
}

/// Uploads `local` as `/upload/NAME`; the server's SHA-256 (in its answer and in its log) must
/// match the local file's.
fn check_upload(topo: &Topology, local: &Path, name: &str) {
    let size = std::fs::metadata(local).unwrap().len();
    let want = sha256(local);
    let started = Instant::now();
    let out = curl(
        topo,
        &[
            "--fail",
            "-T",
            local.to_str().unwrap(),
            &url(&format!("/upload/{name}")),
        ],
    )
    .output()
    .unwrap();
    let took = started.elapsed();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "upload of {name} failed ({}): {body}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        body.trim(),
        format!("{want} {size}"),
        "the server's SHA-256 and length of the uploaded {name}"
    );
    let logged = topo.received_uploads();
    assert!(
        logged.contains(&(name.to_owned(), size, want.clone())),
        "upload {name} not in the server's log: {logged:?}"
    );
    eprintln!(
        "upload {name}: {size} bytes in {took:?} ({:.0} Mbit/s)",
        mbits(size, took)
    );
}

fn mbits(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
}

/// `n` transfers at once: even ones download `/files/parK`, odd ones upload a local file.
fn check_parallel(topo: &Topology, n: usize) {
    let mut children = Vec::new();
    for k in 0..n {
        if k % 2 == 0 {
            let name = format!("par{k}");
            let out = topo.path(&format!("got-{name}"));
            let child = curl(
                topo,
                &[
                    "--fail",
                    "-o",
                    out.to_str().unwrap(),
                    &url(&format!("/files/{name}")),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
            children.push((k, name, child));
        } else {
            let name = format!("par{k}");
            let local = topo.path(&format!("up-{name}"));
            let child = curl(
                topo,
                &[
                    "--fail",
                    "-T",
                    local.to_str().unwrap(),
                    &url(&format!("/upload/{name}")),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
            children.push((k, name, child));
        }
    }
    let mut failures = Vec::new();
    for (k, name, child) in children {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "{name}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        if k % 2 == 0 {
            let got = topo.path(&format!("got-{name}"));
            if sha256(&got) != sha256(&topo.www.join(&name)) {
                failures.push(format!("{name}: downloaded SHA-256 differs"));
            }
        } else {
            let local = topo.path(&format!("up-{name}"));
            let want = format!(
                "{} {}",
                sha256(&local),
                std::fs::metadata(&local).unwrap().len()
            );
            let body = String::from_utf8_lossy(&out.stdout);
            if body.trim() != want {
                failures.push(format!("{name}: server answered {body:?}, want {want:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} parallel transfers failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The parallel transfers' files: the served ones (in Options) and the ones to upload.
fn parallel_files(n: usize, size: u64) -> Vec<(String, u64)> {
    (0..n)
        .step_by(2)
        .map(|k| (format!("par{k}"), size))
        .collect()
}

fn make_upload_files(topo: &Topology, n: usize, size: u64) {
    for k in (1..n).step_by(2) {
        random_file(&topo.path(&format!("up-par{k}")), size);
    }
}

/// A connection to a port nothing listens on fails at once with "Connection refused" (curl
/// 7.88 names the errno only in its verbose trace: "connect to ... failed: Connection refused").
fn check_refused(topo: &Topology) {
    let started = Instant::now();
    let out = curl(topo, &["-v", &format!("http://{SERVER_IP}:{CLOSED_PORT}/")])
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to closed port {CLOSED_PORT}: {} after {took:?}: {err}",
        out.status
    );
    assert!(
        err.contains("Connection refused"),
        "curl to closed port {CLOSED_PORT} after {took:?}: {err}"
    );
    assert!(took < Duration::from_secs(1), "the refusal took {took:?}");
    eprintln!("closed port: refused after {took:?}");
}

/// 100 datagrams of sizes from 1 byte to `max` come back from the echo server byte for byte.
fn check_udp_echo(topo: &Topology, max: u32) {
    let fixture = common::topology::fixture("udp_echo_client.py");
    let (out, took) = topo.client_run(&[
        "python3",
        fixture.to_str().unwrap(),
        "--server",
        &format!("{SERVER_IP}:{ECHO_PORT}"),
        "--count",
        "100",
        "--max-size",
        &max.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "UDP echo ({}, {took:?}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("sent=100 ok=100 lost=0 corrupt=0 max={max}")),
        "{text}"
    );
    eprintln!("UDP echo: 100 datagrams up to {max} bytes in {took:?}");
}

/// `dig @server` answers DNS_NAME with the server's address, over UDP and over TCP.
fn check_dns(topo: &Topology, server: &str) {
    for tcp in [false, true] {
        let mut args = vec!["dig", "-4"];
        let at = format!("@{server}");
        args.extend([at.as_str(), DNS_NAME, "A", "+short", "+time=3", "+tries=1"]);
        if tcp {
            args.push("+tcp");
        }
        let (out, took) = topo.client_run(&args);
        let via = if tcp { "TCP" } else { "UDP" };
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "dig over {via} ({}, {took:?}): {answer}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            answer.trim(),
            SERVER_IP,
            "dig @{server} {DNS_NAME} over {via}"
        );
        eprintln!("DNS over {via} via {server}: {} in {took:?}", answer.trim());
    }
}

/// `ping -c 3` of the server answers, and the server really received the echo requests.
fn check_ping(topo: &Topology) {
    let before = topo.server_in_echos();
    let (out, took) = topo.client_run(&["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_IP]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ping {SERVER_IP} ({}, {took:?}):\n{text}",
        out.status
    );
    assert!(text.contains("3 received"), "{text}");
    let after = topo.server_in_echos();
    assert!(
        after >= before + 3,
        "the server got {} echo requests (a reply not from the server?):\n{text}",
        after - before
    );
}

/// The number in a `key=value` field of a log line (0 when missing).
fn field(line: &str, key: &str) -> u64 {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn tap(opts: Options) -> Topology {
    common::netns::require_programs(&["curl", "dig", "ping"]);
    Topology::tap(opts)
}

fn direct_self_check(mtu: u32, big: u64) {
    common::netns::require_programs(&["curl", "dig", "ping"]);
    let n = 20;
    let mut files = parallel_files(n, 2 * MB);
    files.push(("big".into(), big));
    let topo = Topology::direct(Options {
        mtu,
        files,
        ..Options::default()
    });
    random_file(&topo.path("up-big"), big);
    make_upload_files(&topo, n, 2 * MB);
    check_download(&topo, "big");
    check_upload(&topo, &topo.path("up-big"), "big");
    check_parallel(&topo, n);
    check_refused(&topo);
    check_udp_echo(&topo, max_udp(mtu));
    check_dns(&topo, SERVER_IP);
    check_ping(&topo);
}

#[test]
fn fixtures_work_over_a_direct_route() {
    if !require_root("fixtures_work_over_a_direct_route") {
        return;
    }
    direct_self_check(1500, 50 * MB);
}

#[test]
fn fixtures_work_over_a_direct_route_at_mtu_65520() {
    if !require_root("fixtures_work_over_a_direct_route_at_mtu_65520") {
        return;
    }
    direct_self_check(65520, 8 * MB);
}

#[test]
fn tcp_download_and_upload_50_mb() {
    if !require_root("tcp_download_and_upload_50_mb") {
        return;
    }
    let topo = tap(Options {
        files: vec![("big".into(), 50 * MB)],
        ..Options::default()
    });
    random_file(&topo.path("up-big"), 50 * MB);
    check_download(&topo, "big");
    check_upload(&topo, &topo.path("up-big"), "big");
    // The session table counted them: once closed, each session is logged with its bytes.
    let remote = format!("remote={SERVER_IP}:{HTTP_PORT} ");
    wait_until(
        Duration::from_secs(15),
        "both sessions' deletion in the security log",
        || {
            let log = topo.security_log();
            let counts: Vec<(u64, u64)> = log
                .lines()
                .filter(|l| {
                    l.contains("NAT session deleted")
                        && l.contains("proto=tcp")
                        && l.contains(&remote)
                })
                .map(|l| (field(l, "bytes_out"), field(l, "bytes_in")))
                .collect();
            counts.iter().any(|&(_, i)| i >= 50 * MB) && counts.iter().any(|&(o, _)| o >= 50 * MB)
        },
    );
    topo.finish();
}

#[test]
fn twenty_parallel_transfers() {
    if !require_root("twenty_parallel_transfers") {
        return;
    }
    let n = 20;
    let topo = tap(Options {
        files: parallel_files(n, 2 * MB),
        ..Options::default()
    });
    make_upload_files(&topo, n, 2 * MB);
    check_parallel(&topo, n);
    topo.finish();
}

#[test]
fn closed_port_is_refused_at_once() {
    if !require_root("closed_port_is_refused_at_once") {
        return;
    }
    let topo = tap(Options::default());
    check_refused(&topo);
    let remote = format!("remote={SERVER_IP}:{CLOSED_PORT}");
    wait_until(
        Duration::from_secs(5),
        "the failed session in the security log",
        || {
            topo.security_log()
                .lines()
                .any(|l| l.contains("NAT session failed") && l.contains(&remote))
        },
    );
    topo.finish();
}

#[test]
fn udp_echo_of_100_datagrams_up_to_the_mtu() {
    if !require_root("udp_echo_of_100_datagrams_up_to_the_mtu") {
        return;
    }
    let topo = tap(Options::default());
    check_udp_echo(&topo, max_udp(1500));
    topo.finish();
}

#[test]
fn dns_redirect_over_udp_and_tcp() {
    if !require_root("dns_redirect_over_udp_and_tcp") {
        return;
    }
    let topo = tap(Options::default());
    check_dns(&topo, VHOST_IP);
    topo.finish();
}

#[test]
fn ping_the_server_through_the_nat() {
    if !require_root("ping_the_server_through_the_nat") {
        return;
    }
    let topo = tap(Options::default());
    check_ping(&topo);
    topo.finish();
}

#[test]
fn mtu_65520_transfers_and_udp_echo() {
    if !require_root("mtu_65520_transfers_and_udp_echo") {
        return;
    }
    let mtu = 65520;
    let topo = tap(Options {
        mtu,
        files: vec![("big".into(), 20 * MB)],
        ..Options::default()
    });
    assert_eq!(
        common::topology::link_mtu(&topo.client, topo.client_dev.as_ref().unwrap()),
        mtu
    );
    random_file(&topo.path("up-big"), 20 * MB);
    check_udp_echo(&topo, max_udp(mtu));
    check_download(&topo, "big");
    check_upload(&topo, &topo.path("up-big"), "big");
    topo.finish();
}

#[test]
fn udp_echo_of_fragmented_datagrams() {
    if !require_root("udp_echo_of_fragmented_datagrams") {
        return;
    }
    // Up to 8000 bytes at MTU 1500: the client's kernel fragments each datagram, hubnat
    // reassembles it for its host socket, and fragments the echo on its way back.
    let topo = tap(Options::default());
    check_udp_echo(&topo, 8000);
    topo.finish();
}

/// The largest TCP segment tcpdump sees on the client's TAP device while `run` runs, among
/// those from `src` (to the client when `src` is the server, else from it).
fn largest_segment_seen(topo: &Topology, from_server: bool, run: impl FnOnce()) -> u64 {
    let dev = topo.client_dev.clone().unwrap();
    let filter = if from_server {
        format!("tcp and src host {SERVER_IP}")
    } else {
        format!("tcp and dst host {SERVER_IP}")
    };
    let log = topo.path(&format!("tcpdump-{from_server}.log"));
    let mut cmd = topo.client.command("tcpdump");
    cmd.args(["-i", &dev, "-nn", "-l", "-q", &filter]);
    let mut dump = common::netns::Proc::spawn(cmd, "tcpdump", &log);
    wait_until(Duration::from_secs(10), "tcpdump to listen", || {
        common::netns::read(&log).contains("listening on")
    });
    run();
    std::thread::sleep(Duration::from_millis(300));
    dump.signal(libc::SIGINT);
    let _ = dump.child.wait();
    common::netns::read(&log)
        .lines()
        .filter_map(|l| {
            l.rsplit_once("tcp ")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .max()
        .unwrap_or(0)
}

fn offload_state(topo: &Topology) -> String {
    let dev = topo.client_dev.clone().unwrap();
    let out = topo.client.exec_ok(&["ethtool", "-k", &dev]);
    out.lines()
        .find(|l| l.starts_with("tcp-segmentation-offload:"))
        .unwrap_or("")
        .to_owned()
}

/// With `backend.tap.offload` (the default) the kernel and hubnat pass TCP segments far
/// longer than the MTU both ways, and the bytes arrive intact; without it, every segment
/// fits the MTU.
#[test]
fn tcp_segments_longer_than_the_mtu_cross_the_tap_device_with_offload_only() {
    if !require_root("tcp_segments_longer_than_the_mtu_cross_the_tap_device_with_offload_only") {
        return;
    }
    common::netns::require_programs(&["tcpdump", "ethtool"]);
    for offload in [true, false] {
        let topo = tap(Options {
            files: vec![("big".into(), 20 * MB)],
            config: format!("[backend.tap]\noffload = {offload}\n"),
            ..Options::default()
        });
        random_file(&topo.path("up-big"), 20 * MB);
        let state = offload_state(&topo);
        let down = largest_segment_seen(&topo, true, || check_download(&topo, "big"));
        let up = largest_segment_seen(&topo, false, || {
            check_upload(&topo, &topo.path("up-big"), "big")
        });
        eprintln!(
            "offload = {offload}: {state}; largest segment to the client {down}, from it {up}"
        );
        if offload {
            assert_eq!(state, "tcp-segmentation-offload: on");
            assert!(down > 8000, "to the client: {down}");
            assert!(up > 8000, "from the client: {up}");
        } else {
            assert_eq!(state, "tcp-segmentation-offload: off");
            assert!(down <= 1460 && up <= 1460, "{down} {up}");
        }
        topo.finish();
    }
}
