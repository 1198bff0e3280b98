//! WASM policies in a running gateway, judged by real clients in network namespaces: the TAP
//! topology of `tests/common/topology.rs`, hubnat run as the real binary with `[[policy]]`
//! tables, the components built by `scripts/build-policies.sh` into `target/policies/`.
//!
//! - `deny-destinations` refusing two ports the server listens on: a TCP connect to one is
//!   refused at once (curl exit 7, ECONNREFUSED) while :8080 serves; a UDP datagram to the
//!   other gets ICMP destination unreachable, code 13 (administratively prohibited) from the
//!   virtual host, read from the client socket's error queue, while another UDP port echoes;
//!   the security log names the policy, and nothing reached the denied listener.
//! - A redirect by `misbehave` (port 4 → 192.0.2.1:8080) lands on a second HTTP server at
//!   192.0.2.1 (TEST-NET-1, an address of the server namespace) that answers differently.
//! - `per-mac-dhcp`: ISC dhclient on an interface whose MAC has the configured prefix gets the
//!   policy's DNS servers, domain, lease time and classless static routes (option 121, set up
//!   as routes by the script), and one whose MAC does not gets hubnat's defaults. The two
//!   clients are macvlan interfaces on the TAP device, each in a namespace of its own.
//! - Limits: `misbehave` with a 5 ms timeout, 4 MiB of memory and `on_error = "deny"`:
//!   connections to ports 1 (endless loop) and 2 (memory growth), which have listeners, are
//!   refused, with "call failed" lines naming the policy; during a storm of such flows from a
//!   second client, the first client's rate-limited download started before it keeps moving
//!   bytes and completes intact, its DHCP request is answered and its new connection served.
//! - Reload on SIGHUP: a policy's new
//!   `[policy.config]` applies to new sessions while a download goes on, and a module that
//!   fails to load leaves the previous one in force, with the reason in the security log.
//!
//! Needs root. Safety rules (DESIGN.md): every namespace is this test process's own and is
//! deleted on drop; the addresses are the topology's plan (10.77.x.y, 192.168.30.0/24) and
//! 192.0.2.1 inside the server namespace; the DNS servers and routes a policy hands out are
//! only written into the clients' configuration, never used; every process is stopped by its
//! PID.

mod common;

use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use common::netns::{
    fields, read, require_programs, require_root, unique, wait_until, Netns, Proc,
};
use common::topology::{sha256, Options, Topology, ECHO_PORT, HTTP_PORT, SERVER_IP, VHOST_IP};
use hubnat::policy::built_component;

/// A `[[policy]]` table for hubnat's configuration.
fn policy_toml(
    name: &str,
    component: &str,
    on_error: &str,
    (timeout, memory): (&str, &str),
    config: &[(&str, &str)],
) -> String {
    let mut text = format!(
        "[[policy]]\nname = \"{name}\"\npath = \"{}\"\non_error = \"{on_error}\"\n\
         timeout = \"{timeout}\"\nmemory = \"{memory}\"\n[policy.config]\n",
        built_component(component).display()
    );
    for (k, v) in config {
        text.push_str(&format!("{k} = \"{v}\"\n"));
    }
    text
}

fn url(port: u16, path: &str) -> String {
    format!("http://{SERVER_IP}:{port}{path}")
}

/// GETs `url` from the client; the body, or a panic with curl's error.
fn get(topo: &Topology, url: &str) -> String {
    let out = topo.curl(&["--fail", url]).output().unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// curl to `url` must fail to connect with "Connection refused" (exit 7; a connect that timed
/// out would be exit 28). curl 7.88 names the errno only in its verbose trace.
fn assert_refused(topo: &Topology, url: &str) {
    let out = topo.curl(&["-v", url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "curl {url}: {err}");
    assert!(err.contains("Connection refused"), "curl {url}: {err}");
}

/// `probe.py tcp` to `SERVER:port` gets ECONNREFUSED.
fn assert_probe_refused(topo: &Topology, port: u16) {
    let line = topo.probe("tcp", &format!("{SERVER_IP}:{port}"), None);
    assert!(
        line.starts_with("result=error errno=ECONNREFUSED "),
        "TCP to port {port}: {line}"
    );
}

/// The lines of the security log that contain every one of `parts`.
fn log_lines(topo: &Topology, parts: &[&str]) -> Vec<String> {
    topo.security_log()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}

/// Waits for a line of the security log with every one of `parts`; returns the last such line.
fn wait_log(topo: &Topology, parts: &[&str]) -> String {
    let mut found = Vec::new();
    wait_until(
        Duration::from_secs(15),
        &format!("a security log line with {parts:?}"),
        || {
            found = log_lines(topo, parts);
            !found.is_empty()
        },
    );
    found.pop().unwrap()
}

/// Starts a rate-limited download of `/files/NAME` into `out` (about 2 MB/s), and waits until
/// its first bytes are there.
fn start_download(topo: &Topology, name: &str, out: &Path) -> Child {
    let child = topo
        .curl(&[
            "--fail",
            "--limit-rate",
            "2M",
            "-o",
            out.to_str().unwrap(),
            &url(HTTP_PORT, &format!("/files/{name}")),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(15),
        "the download's first bytes",
        || file_len(out) > 0,
    );
    child
}

/// Waits for the download to end; it must have succeeded with the served file's checksum.
fn finish_download(topo: &Topology, mut child: Child, name: &str, out: &Path) {
    let mut status: Option<ExitStatus> = None;
    wait_until(Duration::from_secs(120), "the download to end", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.unwrap().success(), "the download failed: {err}");
    let served = topo.www.join(name);
    assert_eq!(file_len(out), file_len(&served), "downloaded length");
    assert_eq!(sha256(out), sha256(&served), "SHA-256 of the download");
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Two ports the server listens on, refused by `deny-destinations`: TCP refused at once, UDP
/// answered with ICMP "administratively prohibited"; the other ports work.
#[test]
fn denied_ports_are_refused_and_udp_gets_administratively_prohibited() {
    if !require_root("denied_ports_are_refused_and_udp_gets_administratively_prohibited") {
        return;
    }
    require_programs(&["curl", "python3"]);
    const DENIED_TCP: u16 = 8081;
    const OPEN_UDP: u16 = 7778;
    let mut topo = Topology::tap(Options {
        files: vec![("small".into(), 100_000)],
        config: policy_toml(
            "no-alt-ports",
            "deny-destinations",
            "allow",
            ("1s", "16MiB"),
            &[("ports", &format!("{DENIED_TCP},{ECHO_PORT}"))],
        ),
        ..Options::default()
    });
    let www = topo.www.clone();
    topo.start_http_server(SERVER_IP, DENIED_TCP, &www);
    topo.start_udp_echo(SERVER_IP, OPEN_UDP);
    // Premise: the denied TCP port serves without the NAT (from the gateway namespace).
    let direct = topo.gw.exec_ok(&[
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        &url(DENIED_TCP, "/health"),
    ]);
    assert_eq!(
        direct, "ok\n",
        "the listener on {DENIED_TCP} answers directly"
    );
    assert!(
        topo.security_log()
            .contains("POLICY loaded: policies=\"no-alt-ports\" session_filter=true"),
        "{}",
        topo.security_log()
    );

    // UDP: the allowed port echoes; the denied one gets type 3 code 13 from the virtual host.
    let line = topo.probe("udp", &format!("{SERVER_IP}:{OPEN_UDP}"), None);
    assert!(line.starts_with("result=reply bytes=16 "), "{line}");
    // Linux reports code 13 to a connected UDP socket as EHOSTUNREACH.
    let line = topo.probe("udp", &format!("{SERVER_IP}:{ECHO_PORT}"), None);
    let want =
        format!("result=error errno=EHOSTUNREACH origin=icmp type=3 code=13 offender={VHOST_IP} ");
    assert!(
        line.starts_with(&want),
        "UDP to the denied port {ECHO_PORT}: {line}"
    );
    let remote = format!("remote={SERVER_IP}:{ECHO_PORT} ");
    let refused = wait_log(&topo, &["NAT session refused: proto=udp", &remote]);
    assert!(
        refused.contains("reason=\"denied by policy\"")
            && refused.contains("detail=\"rejected by policy no-alt-ports\""),
        "{refused}"
    );
    // Refusals are logged at most once per interval; let it pass so the TCP one has its line.
    let interval = hubnat::core::nat::REFUSAL_LOG_INTERVAL.total_millis();
    std::thread::sleep(Duration::from_millis(interval + 100));

    // TCP: :8080 serves, the denied port is refused at once (a RST to the SYN).
    assert_eq!(get(&topo, &url(HTTP_PORT, "/health")), "ok\n");
    assert_refused(&topo, &url(DENIED_TCP, "/files/small"));
    assert_probe_refused(&topo, DENIED_TCP);
    let remote = format!("remote={SERVER_IP}:{DENIED_TCP} ");
    let refused = wait_log(&topo, &["NAT session refused: proto=tcp", &remote]);
    assert!(
        refused.contains("reason=\"denied by policy\"")
            && refused.contains("detail=\"rejected by policy no-alt-ports\""),
        "{refused}"
    );
    // Nothing of the client's reached the denied listeners.
    for port in [DENIED_TCP, ECHO_PORT] {
        let created = log_lines(
            &topo,
            &[
                "NAT session created",
                &format!("remote={SERVER_IP}:{port} "),
            ],
        );
        assert!(created.is_empty(), "a session to port {port}: {created:?}");
    }
    let denied_log = read(&topo.path(&format!("http-{SERVER_IP}-{DENIED_TCP}.log")));
    assert!(
        !denied_log.contains("/files/small"),
        "the request reached the denied listener:\n{denied_log}"
    );
    topo.finish();
}

/// `misbehave` redirects port 4 to 192.0.2.1:8080, a second HTTP server in the server
/// namespace; the client asked 10.77.0.2:4 and gets that server's answer.
#[test]
fn a_redirect_lands_on_the_other_server() {
    if !require_root("a_redirect_lands_on_the_other_server") {
        return;
    }
    require_programs(&["curl", "python3"]);
    const TARGET: &str = "192.0.2.1";
    let mut topo = Topology::tap(Options {
        config: policy_toml("misbehave", "misbehave", "deny", ("1s", "16MiB"), &[]),
        ..Options::default()
    });
    // TEST-NET-1 on the server's veth, routed there from the gateway namespace.
    topo.server.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{TARGET}/32"),
        "dev",
        &topo.server_dev,
    ]);
    topo.gw.exec_ok(&[
        "ip",
        "route",
        "add",
        &format!("{TARGET}/32"),
        "via",
        SERVER_IP,
        "dev",
        &topo.uplink_dev,
    ]);
    std::fs::write(topo.www.join("who"), "the server at 10.77.0.2\n").unwrap();
    let other = topo.path("www-redirect");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("who"), "the redirect target 192.0.2.1\n").unwrap();
    topo.start_http_server(TARGET, 8080, &other);

    assert_eq!(
        get(&topo, &url(HTTP_PORT, "/files/who")),
        "the server at 10.77.0.2\n"
    );
    // Nothing listens on port 4 of 10.77.0.2: only the redirect can answer.
    assert_eq!(
        get(&topo, &url(4, "/files/who")),
        "the redirect target 192.0.2.1\n",
        "curl to {SERVER_IP}:4"
    );
    let created = wait_log(
        &topo,
        &["NAT session created", &format!("remote={SERVER_IP}:4 ")],
    );
    assert!(
        created.contains(&format!("via={TARGET}:8080"))
            && created.contains("redirected_by_policy=\"misbehave\""),
        "{created}"
    );
    let target_log = read(&topo.path(&format!("http-{TARGET}-8080.log")));
    assert!(
        target_log.contains("GET /files/who"),
        "the target's log:\n{target_log}"
    );
    topo.finish();
}

/// Writes a dhclient script that records each event and, when bound, sets the address and
/// the classless static routes (option 121) it got, or without them a default route through
/// the first router (RFC 3442: option 121 replaces option 3).
fn write_dhclient_script(path: &Path, events: &Path) {
    let script = format!(
        r#"#!/bin/sh
# dhclient script of tests/policy_clients.rs: configure first, then record the event.
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT)
    ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface"
    # Option 121 as dhclient passes it: octets, separated by spaces or commas.
    set -- $(echo "$new_rfc3442_classless_static_routes" | tr ',' ' ')
    while [ $# -ge 5 ]; do
      len=$1; shift
      n=$(( (len + 7) / 8 )); net=""; i=0
      while [ $i -lt 4 ]; do
        if [ $i -lt $n ]; then o=$1; shift; else o=0; fi
        net="$net${{net:+.}}$o"; i=$((i + 1))
      done
      via="$1.$2.$3.$4"; shift 4
      if [ "$via" = 0.0.0.0 ]; then
        ip route replace "$net/$len" dev "$interface"
      else
        ip route replace "$net/$len" via "$via" dev "$interface"
      fi
    done
    if [ -z "$new_rfc3442_classless_static_routes" ]; then
      for r in $new_routers; do
        ip route replace default via "$r" dev "$interface"
        break
      done
    fi
    ;;
esac
echo "reason=$reason ip=$new_ip_address dns=$new_domain_name_servers domain=$new_domain_name lease=$new_dhcp_lease_time routes=$new_rfc3442_classless_static_routes" >> {events}
exit 0
"#,
        events = events.display()
    );
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// One DHCP client on the segment: a macvlan interface on the TAP device with its own MAC, in
/// a namespace of its own, and ISC dhclient on it.
struct MacClient {
    // Drops first: dhclient, then the namespace (the macvlan goes with it).
    dhclient: Proc,
    ns: Netns,
    events: std::path::PathBuf,
    leases: std::path::PathBuf,
}

impl MacClient {
    fn start(topo: &Topology, mac: &str, tag: &str) -> MacClient {
        let ns = Netns::new("hnmc");
        let dev = unique("hnmv");
        let tap = topo.client_dev.clone().unwrap();
        topo.client.exec_ok(&[
            "ip", "link", "add", "link", &tap, "name", &dev, "address", mac, "type", "macvlan",
            "mode", "bridge",
        ]);
        topo.client
            .exec_ok(&["ip", "link", "set", &dev, "netns", &ns.name]);
        ns.exec_ok(&["ip", "link", "set", &dev, "up"]);
        let events = topo.path(&format!("dhclient-{tag}-events.log"));
        let script = topo.path(&format!("dhclient-{tag}-script"));
        write_dhclient_script(&script, &events);
        let conf = topo.path("dhclient.conf");
        std::fs::write(
            &conf,
            "option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;\n\
             request subnet-mask, routers, domain-name, domain-name-servers, dhcp-lease-time, \
             rfc3442-classless-static-routes;\n",
        )
        .unwrap();
        let leases = topo.path(&format!("dhclient-{tag}.leases"));
        let mut cmd = ns.command("dhclient");
        cmd.args(["-d", "-1", "-v", "-cf", conf.to_str().unwrap()])
            .args(["-sf", script.to_str().unwrap()])
            .args(["-lf", leases.to_str().unwrap()])
            .args([
                "-pf",
                topo.path(&format!("dhclient-{tag}.pid")).to_str().unwrap(),
                &dev,
            ]);
        let log = topo.path(&format!("dhclient-{tag}.log"));
        let dhclient = Proc::spawn(cmd, "dhclient", &log);
        wait_until(Duration::from_secs(30), "dhclient to bind", || {
            assert!(read(&log).lines().count() < 10_000);
            read(&events).contains("reason=BOUND")
        });
        MacClient {
            dhclient,
            ns,
            events,
            leases,
        }
    }

    /// The fields of its BOUND event.
    fn bound(&self) -> std::collections::HashMap<String, String> {
        fields(&read(&self.events), "reason=BOUND")
    }

    fn routes(&self) -> String {
        self.ns.exec_ok(&["ip", "-4", "route", "show"])
    }
}

/// `per-mac-dhcp`: the client whose MAC has the prefix gets the policy's options, the other
/// hubnat's defaults; both seen by ISC dhclient.
#[test]
fn dhclient_gets_the_options_of_its_mac_prefix() {
    if !require_root("dhclient_gets_the_options_of_its_mac_prefix") {
        return;
    }
    require_programs(&["dhclient", "ip"]);
    let topo = Topology::tap(Options {
        config: policy_toml(
            "lab-macs",
            "per-mac-dhcp",
            "allow",
            ("1s", "16MiB"),
            &[
                ("mac_prefix", "02:aa:bb"),
                ("dns", "10.77.0.53, 10.77.0.54"),
                ("domain", "lab.hubnat.test"),
                (
                    "routes",
                    "10.77.50.0/24 via 192.168.30.254, 0.0.0.0/0 via 192.168.30.1",
                ),
                ("lease", "600"),
            ],
        ),
        ..Options::default()
    });
    let (lab_mac, other_mac) = ("02:aa:bb:00:00:01", "02:cc:dd:00:00:02");
    let lab = MacClient::start(&topo, lab_mac, "lab");
    let other = MacClient::start(&topo, other_mac, "other");

    let got = lab.bound();
    eprintln!("matching MAC: {got:?}");
    assert_eq!(got["dns"], "10.77.0.53 10.77.0.54");
    assert_eq!(got["domain"], "lab.hubnat.test");
    assert_eq!(got["lease"], "600");
    let routes = lab.routes();
    assert!(
        routes.contains("10.77.50.0/24 via 192.168.30.254 ")
            && routes.contains("default via 192.168.30.1 "),
        "the classless static routes in the matching client's namespace:\n{routes}"
    );
    let leases = read(&lab.leases);
    assert!(
        leases.contains("option domain-name-servers 10.77.0.53,10.77.0.54;")
            && leases.contains("option rfc3442-classless-static-routes "),
        "{leases}"
    );

    let got = other.bound();
    eprintln!("other MAC: {got:?}");
    assert_eq!(got["dns"], VHOST_IP);
    assert_eq!(got["domain"], "hubnat.test");
    assert_eq!(got["lease"], "7200");
    assert_eq!(got["routes"], "");
    let routes = other.routes();
    assert!(!routes.contains("10.77.50.0"), "{routes}");
    assert_ne!(got["ip"], lab.bound()["ip"]);

    // The line names the policy and what it changed.
    let changed = wait_log(
        &topo,
        &["DHCP reply changed by policy", &format!("mac={lab_mac} ")],
    );
    assert!(
        changed.contains("policy=\"lab-macs\"")
            && changed.contains("set_options=[6, 15, 121]")
            && changed.contains("Some(600)"),
        "{changed}"
    );
    assert!(
        log_lines(&topo, &["DHCP reply changed by policy", other_mac]).is_empty(),
        "{}",
        topo.security_log()
    );
    drop((lab.dhclient, other.dhclient));
    drop((lab.ns, other.ns));
    topo.finish();
}

/// New flows to ports 1 and 2 of the server, two every 10 ms, until `stop` exists (at most
/// 20,000 of them or 120 s). Prints how many so far.
const STORM: &str = r#"
import os, socket, sys, time
server, stop = sys.argv[1], sys.argv[2]
socks, n, t0 = [], 0, time.monotonic()
while n < 20000 and time.monotonic() - t0 < 120 and not os.path.exists(stop):
    for port in (1, 2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((server, port))
        socks.append(s)
        n += 1
    if len(socks) > 200:
        for s in socks[:100]:
            s.close()
        del socks[:100]
    print(n, flush=True)
    time.sleep(0.01)
"#;

/// `misbehave` with small limits and `on_error = "deny"`: the looping and the memory-hungry
/// calls are stopped and refused, and a storm of them from a second client on the segment
/// does not stop the gateway serving the first. (The storm comes from another client because
/// each client may have at most 64 flows waiting for a verdict: a client that storms may
/// refuse its own new flows, by design.)
#[test]
fn failing_policy_calls_are_refused_and_the_gateway_keeps_serving() {
    if !require_root("failing_policy_calls_are_refused_and_the_gateway_keeps_serving") {
        return;
    }
    require_programs(&["curl", "python3", "udhcpc", "dhclient"]);
    let mut topo = Topology::tap(Options {
        files: vec![("big".into(), 20_000_000)],
        config: policy_toml("misbehave", "misbehave", "deny", ("5ms", "4MiB"), &[]),
        ..Options::default()
    });
    // Listeners on ports 1 and 2: were a failing call let through, the connect would succeed.
    let www = topo.www.clone();
    topo.start_http_server(SERVER_IP, 1, &www);
    topo.start_http_server(SERVER_IP, 2, &www);

    assert_probe_refused(&topo, 1);
    assert_probe_refused(&topo, 2);
    let failed = |failure: &str| {
        wait_log(
            &topo,
            &[
                "POLICY call failed: policy=\"misbehave\"",
                &format!("failure=\"{failure}\""),
                "on_error=Deny",
            ],
        )
    };
    failed("ran past its timeout");
    failed("tried to grow its memory past its limit");
    let failures = |topo: &Topology| log_lines(topo, &["POLICY call failed"]).len();

    // A download started before the storm.
    let out = topo.path("got-big");
    let download = start_download(&topo, "big", &out);

    // The storm, from a second client (a macvlan on the TAP device with a lease of its own).
    let stormer = MacClient::start(&topo, "02:5e:00:00:00:01", "storm");
    let stop = topo.path("storm.stop");
    let mut cmd = stormer.ns.command("python3");
    cmd.args(["-c", STORM, SERVER_IP, stop.to_str().unwrap()]);
    let storm_log = topo.path("storm.log");
    let mut storm = Proc::spawn(cmd, "storm", &storm_log);
    let sent = || -> u64 {
        read(&storm_log)
            .lines()
            .last()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    };
    let before = failures(&topo);
    wait_until(Duration::from_secs(30), "the storm to get going", || {
        sent() >= 300 && failures(&topo) >= before + 20
    });
    let (bytes0, failures0, sent0) = (file_len(&out), failures(&topo), sent());

    // During the storm: a DHCP request of the first client is answered, its new connection
    // is served, and its flow to port 1 is refused.
    let (ip, _) = topo.one_lease(1);
    assert_eq!(Some(ip), topo.client_ip, "the same lease again");
    assert_eq!(get(&topo, &url(HTTP_PORT, "/health")), "ok\n");
    assert_probe_refused(&topo, 1);
    wait_until(Duration::from_secs(30), "the download to move", || {
        file_len(&out) > bytes0
    });
    // The storm went on all along: more flows, more failed calls, and it still runs.
    wait_until(Duration::from_secs(30), "more of the storm", || {
        sent() >= sent0 + 100 && failures(&topo) > failures0
    });
    assert!(storm.is_running(), "the storm ended too soon");
    eprintln!(
        "during the storm: the download went from {bytes0} to {} bytes; the storm sent {} \
         flows, {} failed calls were logged",
        file_len(&out),
        sent(),
        failures(&topo),
    );
    std::fs::write(&stop, "").unwrap();
    wait_until(Duration::from_secs(10), "the storm to stop", || {
        !storm.is_running()
    });

    finish_download(&topo, download, "big", &out);
    assert_eq!(get(&topo, &url(HTTP_PORT, "/health")), "ok\n");
    drop(stormer);
    topo.finish();
}

/// Rewrites the first `[[policy]]` of hubnat's configuration file with `change`.
fn rewrite_policy(topo: &Topology, change: impl FnOnce(&mut toml::Table)) {
    let path = topo.path("hubnat.toml");
    let mut config: toml::Table = read(&path).parse().unwrap();
    let policy = config
        .get_mut("policy")
        .and_then(|p| p.as_array_mut())
        .and_then(|a| a.first_mut())
        .and_then(|p| p.as_table_mut())
        .expect("a [[policy]] table");
    change(policy);
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
}

/// SIGHUP reloads the `[[policy]]` list: new verdicts for new sessions, established ones
/// untouched, and a module that fails to load keeps the previous one.
#[test]
fn sighup_reloads_the_policies_and_a_broken_module_keeps_the_previous_one() {
    if !require_root("sighup_reloads_the_policies_and_a_broken_module_keeps_the_previous_one") {
        return;
    }
    require_programs(&["curl", "python3"]);
    const PORT_A: u16 = 8081;
    const PORT_B: u16 = 8082;
    let mut topo = Topology::tap(Options {
        files: vec![("big".into(), 20_000_000)],
        config: policy_toml(
            "deny",
            "deny-destinations",
            "allow",
            ("1s", "16MiB"),
            &[("ports", &PORT_A.to_string())],
        ),
        ..Options::default()
    });
    let www = topo.www.clone();
    topo.start_http_server(SERVER_IP, PORT_A, &www);
    topo.start_http_server(SERVER_IP, PORT_B, &www);
    assert_refused(&topo, &url(PORT_A, "/health"));
    assert_eq!(get(&topo, &url(PORT_B, "/health")), "ok\n");

    let out = topo.path("got-big");
    let download = start_download(&topo, "big", &out);

    // The policy now denies B instead of A.
    rewrite_policy(&topo, |p| {
        let config = p.get_mut("config").and_then(|c| c.as_table_mut()).unwrap();
        config.insert("ports".into(), PORT_B.to_string().into());
    });
    topo.signal_hubnat(libc::SIGHUP);
    let reloaded = wait_log(&topo, &["POLICY reloaded"]);
    assert!(
        reloaded.contains("in_force=[\"deny\"] kept_previous=[] errors=[]"),
        "{reloaded}"
    );
    assert_eq!(get(&topo, &url(PORT_A, "/health")), "ok\n");
    assert_refused(&topo, &url(PORT_B, "/health"));
    let bytes = file_len(&out);

    // A broken module: the previous one stays in force, and the log says why.
    let garbage = topo.path("garbage.wasm");
    std::fs::write(&garbage, b"this is not a WebAssembly component\n").unwrap();
    rewrite_policy(&topo, |p| {
        p.insert("path".into(), garbage.display().to_string().into());
    });
    topo.signal_hubnat(libc::SIGHUP);
    wait_until(Duration::from_secs(15), "the second reload", || {
        log_lines(&topo, &["POLICY reloaded"]).len() == 2
    });
    let reloaded = log_lines(&topo, &["POLICY reloaded"]).pop().unwrap();
    assert!(
        reloaded.contains("in_force=[\"deny\"] kept_previous=[\"deny\"]")
            && reloaded.contains("garbage.wasm"),
        "{reloaded}"
    );
    assert_refused(&topo, &url(PORT_B, "/health"));
    assert_eq!(get(&topo, &url(PORT_A, "/health")), "ok\n");

    wait_until(Duration::from_secs(30), "the download to move", || {
        file_len(&out) > bytes
    });
    finish_download(&topo, download, "big", &out);
    topo.finish();
}
