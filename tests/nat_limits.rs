//! Floods from one client, with real clients in network namespaces: the session limits refuse
//! what is over them, a process out of file descriptors refuses sessions instead of failing,
//! and once the flood has timed out the client is served again.

mod common;

use std::time::Duration;

use common::netns::{read, require_root, wait_until};
use common::topology::{Options, Topology, HTTP_PORT, SERVER_IP};

/// Sends one datagram to each of `count` ports of the server, from one socket.
fn udp_flood(topo: &Topology, count: u32) {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range({count}):\n    s.sendto(b'flood', ('{SERVER_IP}', 20000 + i))\n"
    );
    let out = topo
        .client_cmd("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens `count` TCP connections to the HTTP server at once, holding them for a moment.
fn syn_flood(topo: &Topology, count: u32) {
    let script = format!(
        "import socket, time\nsocks = []\n\
         for i in range({count}):\n    s = socket.socket()\n    s.setblocking(False)\n    s.connect_ex(('{SERVER_IP}', {HTTP_PORT}))\n    socks.append(s)\n\
         time.sleep(1)\n"
    );
    let out = topo
        .client_cmd("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small download through the NAT works.
fn still_served(topo: &Topology) {
    let out = topo
        .client_cmd("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/files/small"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn security_log(topo: &Topology) -> String {
    read(&topo.path("state").join("security.log"))
}

#[test]
fn a_udp_flow_flood_stops_at_the_per_client_limit() {
    if !require_root("a_udp_flow_flood_stops_at_the_per_client_limit") {
        return;
    }
    let mut topo = Topology::tap(Options {
        files: vec![("small".into(), 64 * 1024)],
        config: "[nat]\nmax_sessions_per_client = 40\nudp_timeout = \"3s\"\n".into(),
        ..Options::default()
    });
    udp_flood(&topo, 300);
    wait_until(
        Duration::from_secs(5),
        "the refusal in the security log",
        || security_log(&topo).contains("max_sessions_per_client"),
    );
    assert!(topo.hubnat_running());
    let created = security_log(&topo).matches("NAT session created: ").count();
    assert!(
        created <= 40,
        "{created} sessions created past the limit of 40"
    );
    // While the flood's sessions live, this client gets nothing new; when they time out, it does.
    wait_until(
        Duration::from_secs(15),
        "the flood's sessions to time out",
        || {
            security_log(&topo)
                .matches("reason=\"idle timeout\"")
                .count()
                >= created
        },
    );
    still_served(&topo);
}

#[test]
fn running_out_of_file_descriptors_refuses_sessions_and_recovers() {
    if !require_root("running_out_of_file_descriptors_refuses_sessions_and_recovers") {
        return;
    }
    let mut topo = Topology::tap(Options {
        files: vec![("small".into(), 64 * 1024)],
        config: "[nat]\nudp_timeout = \"3s\"\ntcp_timeout = \"5s\"\n".into(),
        ..Options::default()
    });
    // Leave hubnat a few dozen descriptors (it holds about fifteen itself).
    let pid = topo.hubnat_pid().to_string();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=48:48"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    udp_flood(&topo, 200);
    syn_flood(&topo, 100);
    wait_until(
        Duration::from_secs(10),
        "the open-file failures in the log",
        || read(&topo.hubnat_log).contains("cannot open a host socket"),
    );
    assert!(
        topo.hubnat_running(),
        "hubnat died under the flood:\n{}",
        read(&topo.hubnat_log)
    );
    let log = security_log(&topo);
    assert!(
        log.contains("NAT session failed") && log.contains("Too many open files"),
        "{log}"
    );
    // After the flood times out, descriptors are free again and the client is served.
    std::thread::sleep(Duration::from_secs(6));
    wait_until(
        Duration::from_secs(20),
        "a download after the flood",
        || {
            topo.client_cmd("curl")
                .args([
                    "-sS",
                    "--noproxy",
                    "*",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                ])
                .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/files/small"))
                .status()
                .is_ok_and(|s| s.success())
        },
    );
    assert!(topo.hubnat_running());
}
