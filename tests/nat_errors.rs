//! Errors and ends, end to end, with real clients in network namespaces (see
//! tests/common/topology.rs): what one side does reaches the other as it would without a NAT,
//! and the security log names why each session ended.
//!
//! - TCP: a RST from the client reaches the server as a RST (ECONNRESET, not EOF), and one from
//!   the server reaches the client as a RST; clean closes in both orders are told apart
//!   ("closed by client", "closed by remote"), a curl download included. Both ends are
//!   `tests/fixtures/tcp_end.py`, which prints what its side saw.
//! - UDP: a closed port answers `dig` with "connection refused" as it does over a plain kernel
//!   route; an address the gateway has no route to, or an `unreachable` route, or a neighbour
//!   that never answers ARP, reaches the client as an ICMP network or host unreachable from the
//!   virtual host (read from the client's error queue by `tests/fixtures/udp_probe.py`), and
//!   TCP to the same address fails at once with the same error; the logs name the real cause.
//!
//! Safety rules (DESIGN.md): every address used here is inside the topology's own plan
//! (10.77.x.y, 192.168.30.0/24); the "unreachable" ones are unrouted or routed to nothing inside
//! the gateway namespace, which has no link but the one to the server namespace.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::{read, require_programs, require_root, wait_until, Proc};
use common::topology::{
    fixture, Options, Topology, CLOSED_PORT, DIRECT_SERVER_SIDE_IP, ECHO_PORT, HTTP_PORT,
    SERVER_IP, VHOST_IP,
};

fn tap() -> Topology {
    require_programs(&["python3", "dig", "curl"]);
    Topology::tap(Options::default())
}

/// A `tcp_end.py` server in the server namespace on `port`, listening; returns it and its log.
fn tcp_end_server(topo: &Topology, port: u16, mode: &str) -> (Proc, PathBuf) {
    let log = topo.path(&format!("tcp-end-server-{port}.log"));
    let mut cmd = topo.server.command("python3");
    cmd.arg(fixture("tcp_end.py")).args([
        "server",
        "--bind",
        SERVER_IP,
        "--port",
        &port.to_string(),
        "--mode",
        mode,
    ]);
    let mut proc = Proc::spawn(cmd, "tcp_end.py server", &log);
    wait_until(Duration::from_secs(10), "tcp_end.py to listen", || {
        assert!(
            proc.is_running(),
            "tcp_end.py server exited:\n{}",
            read(&log)
        );
        read(&log).contains("server: listening")
    });
    (proc, log)
}

/// Runs a `tcp_end.py` client in the client namespace against `port`; returns its output.
fn tcp_end_client(topo: &Topology, port: u16, mode: &str) -> String {
    let fixture = fixture("tcp_end.py");
    let to = format!("{SERVER_IP}:{port}");
    let (out, took) = topo.client_run(&[
        "python3",
        fixture.to_str().unwrap(),
        "client",
        "--connect",
        &to,
        "--mode",
        mode,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tcp_end.py client --mode {mode} ({}, {took:?}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("tcp_end.py client --mode {mode} ({took:?}):\n{text}");
    text
}

/// Waits for the server to exit and returns what it printed.
fn server_saw(mut server: Proc, log: &Path) -> String {
    wait_until(Duration::from_secs(20), "tcp_end.py server to exit", || {
        !server.is_running()
    });
    let text = read(log);
    eprintln!("tcp_end.py server:\n{text}");
    text
}

/// The security log's `NAT session deleted` line of the one session to `remote`, once written.
fn deleted(topo: &Topology, remote: &str) -> String {
    let mut line = String::new();
    wait_until(
        Duration::from_secs(15),
        &format!("the deletion of the session to {remote} in the security log"),
        || {
            let log = topo.security_log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("NAT session deleted: ") && names_remote(l, remote))
                .collect();
            assert!(
                lines.len() <= 1,
                "more than one session to {remote}:\n{log}"
            );
            line = lines.first().map(|l| l.to_string()).unwrap_or_default();
            !line.is_empty()
        },
    );
    eprintln!("security log: {line}");
    line
}

/// Whether a security log line is about the session to `remote` (`remote=` is a field of its
/// own: followed by a space or the end of the line).
fn names_remote(line: &str, remote: &str) -> bool {
    let field = format!("remote={remote}");
    line.split(' ').any(|f| f == field)
}

/// The `reason="..."` of a security log line.
fn reason(line: &str) -> &str {
    line.split_once("reason=\"")
        .and_then(|(_, r)| r.split_once('"'))
        .map(|(r, _)| r)
        .unwrap_or_else(|| panic!("no reason in {line:?}"))
}

#[test]
fn a_client_reset_reaches_the_server_as_a_reset() {
    if !require_root("a_client_reset_reaches_the_server_as_a_reset") {
        return;
    }
    let topo = tap();
    let port = 7001;
    let (server, log) = tcp_end_server(&topo, port, "observe");
    let client = tcp_end_client(&topo, port, "reset");
    assert!(client.contains("client: sent=reset"), "{client}");
    let seen = server_saw(server, &log);
    assert!(
        seen.contains("server: seen=reset"),
        "the server did not see the client's RST as a reset:\n{seen}"
    );
    let line = deleted(&topo, &format!("{SERVER_IP}:{port}"));
    assert_eq!(reason(&line), "reset by client", "{line}");
    topo.finish();
}

#[test]
fn a_remote_reset_reaches_the_client_as_a_reset() {
    if !require_root("a_remote_reset_reaches_the_client_as_a_reset") {
        return;
    }
    let topo = tap();
    let port = 7002;
    let (server, log) = tcp_end_server(&topo, port, "reset");
    let client = tcp_end_client(&topo, port, "observe");
    assert!(
        client.contains("client: seen=reset"),
        "the client did not see the server's RST as a reset:\n{client}"
    );
    let seen = server_saw(server, &log);
    assert!(seen.contains("server: sent=reset"), "{seen}");
    let line = deleted(&topo, &format!("{SERVER_IP}:{port}"));
    assert_eq!(reason(&line), "reset by remote", "{line}");
    topo.finish();
}

#[test]
fn a_client_that_closes_first_is_closed_by_client() {
    if !require_root("a_client_that_closes_first_is_closed_by_client") {
        return;
    }
    let topo = tap();
    let port = 7003;
    let (server, log) = tcp_end_server(&topo, port, "observe");
    let client = tcp_end_client(&topo, port, "close");
    assert!(client.contains("client: seen=eof bytes=0"), "{client}");
    let seen = server_saw(server, &log);
    assert!(seen.contains("server: seen=eof bytes=0"), "{seen}");
    let line = deleted(&topo, &format!("{SERVER_IP}:{port}"));
    assert_eq!(reason(&line), "closed by client", "{line}");
    topo.finish();
}

#[test]
fn a_remote_that_closes_first_is_closed_by_remote() {
    if !require_root("a_remote_that_closes_first_is_closed_by_remote") {
        return;
    }
    let topo = tap();
    let port = 7004;
    let (server, log) = tcp_end_server(&topo, port, "close");
    let client = tcp_end_client(&topo, port, "observe");
    assert!(client.contains("client: seen=eof bytes=100000"), "{client}");
    let seen = server_saw(server, &log);
    assert!(seen.contains("server: seen=eof bytes=0"), "{seen}");
    let line = deleted(&topo, &format!("{SERVER_IP}:{port}"));
    assert_eq!(reason(&line), "closed by remote", "{line}");
    topo.finish();
}

/// dig's verdict on a query to a closed UDP port of the server.
fn dig_closed_port(topo: &Topology) -> String {
    let at = format!("@{SERVER_IP}");
    let port = CLOSED_PORT.to_string();
    let (out, took) = topo.client_run(&[
        "dig",
        "-4",
        &at,
        "-p",
        &port,
        "+tries=1",
        "+timeout=5",
        "example.test",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("dig to closed port ({}, {took:?}):\n{text}", out.status);
    text
}

#[test]
fn udp_to_a_closed_port_is_refused_as_without_the_nat() {
    if !require_root("udp_to_a_closed_port_is_refused_as_without_the_nat") {
        return;
    }
    require_programs(&["dig"]);
    let want = format!("communications error to {SERVER_IP}#{CLOSED_PORT}: connection refused");
    let reference = dig_closed_port(&Topology::direct(Options::default()));
    assert!(reference.contains(&want), "without the NAT:\n{reference}");
    let topo = tap();
    let through = dig_closed_port(&topo);
    assert!(through.contains(&want), "through the NAT:\n{through}");
    assert!(!through.contains("timed out"), "{through}");
    // What dig read: an ICMP port unreachable from the server's own address.
    let to = format!("{SERVER_IP}:{CLOSED_PORT}");
    assert_eq!(
        without_time(&topo.probe("udp", &to, None)),
        format!("result=error errno=ECONNREFUSED origin=icmp type=3 code=3 offender={SERVER_IP}")
    );
    topo.finish();
}

/// A curl download from the test server ends with a clean close. Which side closes first is
/// a race, and both occur: the server sends `Connection: close` and closes right after the
/// last byte, and curl closes as soon as it has the last byte (Content-Length), so the
/// client's FIN can reach hubnat before hubnat has read the server's. So: ten downloads, each
/// "closed by remote" or "closed by client", never a reset.
#[test]
fn curl_downloads_end_with_a_clean_close() {
    if !require_root("curl_downloads_end_with_a_clean_close") {
        return;
    }
    require_programs(&["python3", "dig", "curl"]);
    let topo = Topology::tap(Options {
        files: vec![("small".into(), 64 * 1024)],
        ..Options::default()
    });
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/files/small");
    let n = 10;
    for _ in 0..n {
        let (out, took) = topo.client_run(&[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &url,
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200 65536",
            "curl ({}, {took:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let remote = format!("{SERVER_IP}:{HTTP_PORT}");
    let mut reasons = Vec::new();
    wait_until(
        Duration::from_secs(15),
        "every download's deletion in the security log",
        || {
            reasons = topo
                .security_log()
                .lines()
                .filter(|l| l.contains("NAT session deleted: ") && names_remote(l, &remote))
                .map(|l| reason(l).to_owned())
                .collect();
            reasons.len() == n
        },
    );
    let by_remote = reasons.iter().filter(|r| *r == "closed by remote").count();
    let by_client = reasons.iter().filter(|r| *r == "closed by client").count();
    eprintln!("curl downloads: {by_remote} closed by remote, {by_client} closed by client");
    assert_eq!(by_remote + by_client, n, "{reasons:?}");
    topo.finish();
}

/// The `key=value` fields of a probe's line, `after` left out.
fn without_time(line: &str) -> String {
    line.split(' ')
        .filter(|f| !f.starts_with("after="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The security log's `NAT session failed` reason of the session to `remote`, once written.
fn failed_reason(topo: &Topology, remote: &str) -> String {
    let mut line = String::new();
    wait_until(
        Duration::from_secs(15),
        &format!("the failure of the session to {remote} in the security log"),
        || {
            line = topo
                .security_log()
                .lines()
                .find(|l| l.contains("NAT session failed: ") && names_remote(l, remote))
                .unwrap_or_default()
                .to_owned();
            !line.is_empty()
        },
    );
    eprintln!("security log: {line}");
    reason(&line).to_owned()
}

/// Neither log blames a resource limit for a failure that was a route's.
fn no_resource_blame(topo: &Topology) {
    let log = read(&topo.hubnat_log);
    let sec = topo.security_log();
    for words in [
        "cannot open a host socket",
        "open files",
        "out of host resources",
    ] {
        assert!(!log.contains(words), "hubnat's log says {words:?}:\n{log}");
        assert!(
            !sec.contains(words),
            "the security log says {words:?}:\n{sec}"
        );
    }
    assert!(!sec.contains("reason=\"limit\""), "{sec}");
}

/// hubnat's CPU time so far, in clock ticks (user + system, from /proc).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = read(Path::new(&format!("/proc/{pid}/stat")));
    // The fields after the command name (which is in parentheses): utime is the 12th, stime
    // the 13th of them.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// hubnat idles once the errors are delivered: a socket error left unread (an error queue not
/// emptied) would wake it over and over.
fn assert_idle(topo: &Topology) {
    let pid = topo.hubnat_pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    // A busy loop takes a whole core: about 100 ticks in this second.
    assert!(
        used < 30,
        "hubnat used {used} ticks of CPU in 1 s while idle"
    );
}

/// Checks, as a safety rule and a premise, that the gateway namespace routes `ip` as `want`
/// (`ip route get` fails with "Network is unreachable" when there is no route at all).
fn gateway_route(topo: &Topology, ip: &str) -> String {
    let out = topo.gw.exec(&["ip", "route", "get", ip]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where the gateway's kernel finds out that a destination is unreachable.
#[derive(Clone, Copy, PartialEq)]
enum Found {
    /// At once, from its routes: the host socket cannot be opened (UDP) or connected (TCP),
    /// and the session ends as "unreachable".
    AtOpen,
    /// Later, from an ICMP error (or a failed ARP): the host UDP socket receives the error,
    /// and the flow stays (a later datagram may get through); a TCP connect fails.
    Later,
}

/// The unreachable-destination tests. First the reference, without the NAT: the client's
/// router is the server namespace (forwarding on, `route` added to it), and UDP and TCP to
/// `ip` fail there with `errno`, the UDP one from the router's ICMP error of code `code`. Then
/// through hubnat, with `route` added in the gateway namespace: the client sees the same, the
/// ICMP error from the virtual host (its router now), and the logs say `cause`.
fn unreachable_as_without_the_nat(
    ip: &str,
    route: Option<&[&str]>,
    errno: &str,
    code: u8,
    cause: &str,
    found: Found,
) {
    let udp_to = format!("{ip}:5000");
    let tcp_to = format!("{ip}:5001");
    let want_udp = |router: &str| {
        format!("result=error errno={errno} origin=icmp type=3 code={code} offender={router}")
    };
    let want_tcp = format!("result=error errno={errno}");
    {
        let direct = Topology::direct(Options::default());
        direct
            .server
            .exec_ok(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        if let Some(route) = route {
            direct.server.exec_ok(route);
        }
        let udp = without_time(&direct.probe("udp", &udp_to, None));
        assert_eq!(
            udp,
            want_udp(DIRECT_SERVER_SIDE_IP),
            "UDP to {udp_to} without the NAT"
        );
        let tcp = without_time(&direct.probe("tcp", &tcp_to, None));
        assert_eq!(tcp, want_tcp, "TCP to {tcp_to} without the NAT");
    }
    let topo = tap();
    if let Some(route) = route {
        topo.gw.exec_ok(route);
    }
    // Safety rules, and the premise: the gateway namespace has no default route.
    let default = topo.gw.exec_ok(&["ip", "route", "show", "default"]);
    assert!(
        default.trim().is_empty(),
        "a default route in the gateway: {default}"
    );
    let found_by_route = gateway_route(&topo, ip);
    eprintln!("gateway: ip route get {ip}: {}", found_by_route.trim());
    let udp = without_time(&topo.probe("udp", &udp_to, None));
    assert_eq!(udp, want_udp(VHOST_IP), "UDP to {udp_to} through the NAT");
    let tcp = without_time(&topo.probe("tcp", &tcp_to, None));
    assert_eq!(tcp, want_tcp, "TCP to {tcp_to} through the NAT");
    let ended: &[&String] = match found {
        Found::AtOpen => &[&udp_to, &tcp_to],
        Found::Later => &[&tcp_to],
    };
    for to in ended {
        let why = failed_reason(&topo, to);
        assert!(why.starts_with(cause), "the failure to {to}: {why:?}");
        assert_eq!(reason(&deleted(&topo, to)), "unreachable", "{to}");
    }
    if found == Found::Later {
        let log = topo.security_log();
        assert!(
            log.lines()
                .any(|l| l.contains("NAT session created: ") && names_remote(l, &udp_to)),
            "{log}"
        );
        assert!(
            !log.lines().any(|l| names_remote(l, &udp_to)
                && (l.contains("NAT session failed: ") || l.contains("NAT session deleted: "))),
            "the UDP flow ended on an ICMP error:\n{log}"
        );
    }
    assert_idle(&topo);
    no_resource_blame(&topo);
    topo.finish();
}

#[test]
fn udp_and_tcp_to_an_unrouted_network_get_network_unreachable() {
    if !require_root("udp_and_tcp_to_an_unrouted_network_get_network_unreachable") {
        return;
    }
    // No route at all: the gateway namespace has none but its link's (no default route).
    unreachable_as_without_the_nat(
        "10.77.9.9",
        None,
        "ENETUNREACH",
        0,
        "network unreachable",
        Found::AtOpen,
    );
}

#[test]
fn udp_and_tcp_to_an_unreachable_route_get_host_unreachable() {
    if !require_root("udp_and_tcp_to_an_unreachable_route_get_host_unreachable") {
        return;
    }
    unreachable_as_without_the_nat(
        "10.77.8.8",
        Some(&["ip", "route", "add", "unreachable", "10.77.8.0/24"]),
        "EHOSTUNREACH",
        1,
        "host unreachable",
        Found::AtOpen,
    );
}

#[test]
fn udp_and_tcp_to_a_silent_neighbour_get_host_unreachable() {
    if !require_root("udp_and_tcp_to_a_silent_neighbour_get_host_unreachable") {
        return;
    }
    // An address on the link between the gateway and the server namespaces that nobody
    // holds: the router's ARP requests go unanswered and its kernel reports host unreachable
    // after about three seconds. Through hubnat the host UDP socket learns it from its error
    // queue (IP_RECVERR).
    unreachable_as_without_the_nat(
        "10.77.0.99",
        None,
        "EHOSTUNREACH",
        1,
        "host unreachable",
        Found::Later,
    );
}

#[test]
fn udp_to_a_network_a_router_cannot_reach_gets_network_unreachable() {
    if !require_root("udp_to_a_network_a_router_cannot_reach_gets_network_unreachable") {
        return;
    }
    // The server namespace becomes a router with no route to 10.77.7.0/24: it answers the
    // gateway's datagram with an ICMP network unreachable, which the host socket receives.
    let topo = tap();
    topo.gw.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.77.7.0/24",
        "via",
        SERVER_IP,
        "dev",
        &topo.uplink_dev,
    ]);
    topo.server
        .exec_ok(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
    let to = "10.77.7.7:5000";
    let line = topo.probe("udp", to, None);
    assert_eq!(
        without_time(&line),
        format!("result=error errno=ENETUNREACH origin=icmp type=3 code=0 offender={VHOST_IP}"),
        "UDP to {to}"
    );
    assert_idle(&topo);
    no_resource_blame(&topo);
    topo.finish();
}

#[test]
fn a_udp_flow_whose_route_goes_away_gets_host_unreachable_and_recovers() {
    if !require_root("a_udp_flow_whose_route_goes_away_gets_host_unreachable_and_recovers") {
        return;
    }
    let topo = tap();
    let to = format!("{SERVER_IP}:{ECHO_PORT}");
    let sport = Some(40001);
    let reply = "result=reply bytes=16";
    assert_eq!(without_time(&topo.probe("udp", &to, sport)), reply);
    // The flow's host socket is open; now its sends fail with EHOSTUNREACH.
    let unroute = [
        "ip",
        "route",
        "add",
        "unreachable",
        &format!("{SERVER_IP}/32"),
    ];
    topo.gw.exec_ok(&unroute);
    assert_eq!(
        without_time(&topo.probe("udp", &to, sport)),
        format!("result=error errno=EHOSTUNREACH origin=icmp type=3 code=1 offender={VHOST_IP}")
    );
    topo.gw.exec_ok(&[
        "ip",
        "route",
        "del",
        "unreachable",
        &format!("{SERVER_IP}/32"),
    ]);
    assert_eq!(without_time(&topo.probe("udp", &to, sport)), reply);
    // One flow throughout: the error did not end it.
    let log = topo.security_log();
    let client = format!("client={}:40001 ", topo.client_ip.as_ref().unwrap());
    let created = log
        .lines()
        .filter(|l| l.contains("NAT session created: ") && l.contains(&client))
        .count();
    assert_eq!(created, 1, "{log}");
    assert!(!log.contains("NAT session deleted: "), "{log}");
    assert_idle(&topo);
    no_resource_blame(&topo);
    topo.finish();
}

#[test]
fn udp_and_tcp_to_a_prohibited_route_get_administratively_prohibited() {
    if !require_root("udp_and_tcp_to_a_prohibited_route_get_administratively_prohibited") {
        return;
    }
    // A `prohibit` route: a kernel router answers ICMP "communication administratively
    // prohibited" (code 13), which a client reads as EHOSTUNREACH; the gateway's own sockets
    // get EACCES.
    unreachable_as_without_the_nat(
        "10.77.6.6",
        Some(&["ip", "route", "add", "prohibit", "10.77.6.0/24"]),
        "EHOSTUNREACH",
        13,
        "prohibited",
        Found::AtOpen,
    );
}
