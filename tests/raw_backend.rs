//! The raw backend with real third-party clients, in network namespaces.
//!
//! hubnat runs in a gateway namespace and attaches (AF_PACKET) to its end of a veth pair; the
//! other end is in a client namespace, where busybox udhcpc configures it. The gateway
//! namespace's own kernel also lives on that veth end: its traffic must never be taken as a
//! client's. Per DESIGN.md's safety rules the namespaces are this test's own, have no other
//! links (the download test adds only a veth to its own server namespace), use only the
//! project's test addresses, and are removed afterwards; processes are stopped by PID.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cli::json;
use common::netns::{
    fields, hubnat_bin, read, require_programs, require_root, tshark, unique, veth, wait_until,
    Netns, Proc,
};
use common::topology::{fixture, sha256, Options, Topology, HTTP_PORT, SERVER_IP};

const HOST_MAC: &str = "00:ac:11:22:33:55";
const GW: &str = "192.168.30.1";

/// Namespaces, the veth pair and hubnat on the raw backend.
struct RawGateway {
    hubnat: Option<Proc>,
    client: Netns,
    gw: Netns,
    /// hubnat's end (in `gw`) and the client's end (in `client`).
    gw_dev: String,
    client_dev: String,
    dir: tempfile::TempDir,
}

impl RawGateway {
    fn start() -> RawGateway {
        let dir = tempfile::tempdir().unwrap();
        let gw = Netns::new("hrgw");
        let client = Netns::new("hrcl");
        let (gw_dev, client_dev) = (unique("hrg"), unique("hrc"));
        veth(&gw, &gw_dev, &client, &client_dev, "1500");
        let config = dir.path().join("hubnat.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[host]
mac = "{HOST_MAC}"

[dhcp]
lease = "30s"
domain = "hubnat.test"
# No probes for another DHCP server: the capture holds the client's exchanges only.
authoritative = true

[dns]
upstream = []

[backend]
kind = "raw"
[backend.raw]
interface = "{gw_dev}"

[capture]
path = "{capture}"

[state]
dir = "{state}"

[log]
level = "debug"
"#,
                capture = dir.path().join("segment.pcap").display(),
                state = dir.path().join("state").display(),
            ),
        )
        .unwrap();
        let mut cmd = gw.command(hubnat_bin().to_str().unwrap());
        cmd.args(["run", "--config", config.to_str().unwrap()]);
        let log = dir.path().join("hubnat.log");
        let mut hubnat = Proc::spawn(cmd, "hubnat", &log);
        wait_until(
            Duration::from_secs(15),
            "hubnat to attach to the interface",
            || {
                assert!(hubnat.is_running(), "hubnat exited early:\n{}", read(&log));
                read(&log).contains("hubnat started")
            },
        );
        RawGateway {
            hubnat: Some(hubnat),
            client,
            gw,
            gw_dev,
            client_dev,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        read(&self.path("hubnat.log"))
    }

    fn security_log(&self) -> String {
        read(&self.path("state").join("security.log"))
    }

    fn pid(&self) -> i32 {
        self.hubnat.as_ref().unwrap().pid()
    }

    /// Starts udhcpc on the client's end; returns it and the events file.
    fn udhcpc(&self) -> (Proc, PathBuf) {
        let events = self.path("udhcpc-events.log");
        let mut cmd = self.client.command("udhcpc");
        cmd.env("TEST_HUBNAT_EVENTS", &events).args([
            "-f",
            "-i",
            &self.client_dev,
            "-s",
            fixture("udhcpc-script.sh").to_str().unwrap(),
            "-t",
            "20",
            "-T",
            "1",
            "-x",
            "hostname:raw-client",
        ]);
        (Proc::spawn(cmd, "udhcpc", &self.path("udhcpc.log")), events)
    }

    fn ping_gw(&self) -> bool {
        self.client
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", GW])
            .status
            .success()
    }

    fn stop(mut self) {
        let status = self.hubnat.take().unwrap().stop();
        assert!(
            status.success(),
            "hubnat exit status {status}:\n{}",
            self.log()
        );
        let _ = (&self.gw, &self.client);
    }
}

impl Drop for RawGateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- hubnat.log ----\n{}", self.log());
        }
    }
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn tshark_dhcp_types(pcap: &Path) -> Vec<String> {
    tshark(
        pcap,
        &["-Y", "dhcp", "-T", "fields", "-e", "dhcp.option.dhcp"],
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn udhcpc_gets_a_lease_over_a_veth_and_the_hosts_own_traffic_is_ignored() {
    if !require_root("udhcpc_gets_a_lease_over_a_veth_and_the_hosts_own_traffic_is_ignored") {
        return;
    }
    require_programs(&["udhcpc", "ping", "ip", "tshark"]);
    let gw = RawGateway::start();

    // The gateway namespace's own DHCP client on the very interface hubnat is attached to: its
    // DISCOVERs leave the host (PACKET_OUTGOING), so hubnat must not answer them.
    let out = gw.gw.exec(&[
        "udhcpc",
        "-i",
        &gw.gw_dev,
        "-n",
        "-q",
        "-t",
        "3",
        "-T",
        "1",
        "-s",
        "/bin/true",
    ]);
    assert!(
        !out.status.success(),
        "the host's own udhcpc got a lease from hubnat:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !gw.security_log().contains("DHCP lease created"),
        "{}",
        gw.security_log()
    );

    // The client on the other end gets a lease, pings the virtual host, and renews.
    let started = Instant::now();
    let (udhcpc, events) = gw.udhcpc();
    wait_until(Duration::from_secs(30), "udhcpc to bind", || {
        read(&events).contains("event=bound")
    });
    let bound = fields(&read(&events), "event=bound");
    eprintln!(
        "udhcpc over raw: lease in {:?}: {bound:?}",
        started.elapsed()
    );
    let ip = bound["ip"].clone();
    let last: u8 = ip
        .strip_prefix("192.168.30.")
        .and_then(|l| l.parse().ok())
        .expect("an address on the segment");
    assert!((10..=200).contains(&last), "{ip}");
    assert_eq!(bound["router"], GW);
    assert_eq!(bound["serverid"], GW);
    assert_eq!(bound["lease"], "30");
    assert!(gw.ping_gw(), "ping {GW} over the raw backend failed");
    let neigh = gw
        .client
        .exec_ok(&["ip", "neigh", "show", GW, "dev", &gw.client_dev]);
    assert!(
        neigh.contains(&format!("lladdr {HOST_MAC}")),
        "ARP for {GW}: {neigh:?}"
    );
    udhcpc.signal(libc::SIGUSR1);
    wait_until(Duration::from_secs(20), "udhcpc to renew", || {
        read(&events).contains("event=renew")
    });
    assert_eq!(fields(&read(&events), "event=renew")["ip"], ip);

    // Exactly one client was served: the one behind the veth.
    let log = gw.security_log();
    assert_eq!(log.matches("DHCP lease created").count(), 1, "{log}");
    assert!(
        log.contains(&format!("ip={ip} ")) && log.contains("hostname=\"raw-client\""),
        "{log}"
    );
    udhcpc.stop();

    // The [capture] of the binary (flushed after every batch) recorded the exchange, both
    // directions, and nothing of the host's own DHCP attempt (which was never the segment's).
    let types = tshark_dhcp_types(&gw.path("segment.pcap"));
    assert_eq!(
        &types[..4],
        ["1", "2", "3", "5"],
        "DHCP in the capture: {types:?}"
    );
    assert!(
        types[4..].windows(2).any(|w| w == ["3", "5"]),
        "the renewal: {types:?}"
    );
    gw.stop();
}

#[test]
fn the_raw_backend_waits_for_a_down_interface_and_resumes() {
    if !require_root("the_raw_backend_waits_for_a_down_interface_and_resumes") {
        return;
    }
    require_programs(&["udhcpc", "ping", "ip"]);
    let gw = RawGateway::start();
    let (udhcpc, events) = gw.udhcpc();
    wait_until(Duration::from_secs(30), "udhcpc to bind", || {
        read(&events).contains("event=bound")
    });
    assert!(gw.ping_gw());

    // Down: a log line, then quiet waiting (no busy loop).
    gw.gw.exec_ok(&["ip", "link", "set", &gw.gw_dev, "down"]);
    wait_until(Duration::from_secs(10), "the down log line", || {
        gw.log()
            .contains("interface went down; waiting for it to come back")
    });
    let before = cpu_ticks(gw.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(gw.pid()) - before;
    assert!(
        spent <= 10,
        "hubnat used {spent} ticks of CPU in 2 s while waiting: a busy loop"
    );
    assert!(!gw.ping_gw(), "ping worked through a down interface");

    // Up again: resumed, with a log line, and the client is served as before.
    gw.gw.exec_ok(&["ip", "link", "set", &gw.gw_dev, "up"]);
    wait_until(Duration::from_secs(10), "the resume log line", || {
        gw.log().contains("interface is up again; resuming")
    });
    wait_until(
        Duration::from_secs(15),
        "ping after the interface came back",
        || gw.ping_gw(),
    );
    let renewals = read(&events).matches("event=renew").count();
    udhcpc.signal(libc::SIGUSR1);
    wait_until(Duration::from_secs(20), "udhcpc to renew", || {
        read(&events).matches("event=renew").count() > renewals
    });

    // Deleted and created again (a new interface index): the same.
    gw.gw.exec_ok(&["ip", "link", "del", &gw.gw_dev]);
    wait_until(Duration::from_secs(10), "the second down log line", || {
        gw.log().matches("interface went down").count() >= 2
    });
    veth(&gw.gw, &gw.gw_dev, &gw.client, &gw.client_dev, "1500");
    wait_until(Duration::from_secs(10), "the second resume", || {
        gw.log().matches("interface is up again; resuming").count() >= 2
    });
    // The client's end is new: give it its address again.
    let ip = fields(&read(&events), "event=bound")["ip"].clone();
    gw.client.exec_ok(&[
        "ip",
        "addr",
        "replace",
        &format!("{ip}/24"),
        "dev",
        &gw.client_dev,
    ]);
    wait_until(Duration::from_secs(15), "ping on the new interface", || {
        gw.ping_gw()
    });
    assert!(gw.hubnat.as_ref().is_some());
    udhcpc.stop();
    gw.stop();
}

/// Through the NAT: a veth client of the raw backend downloads a file from the test server
/// namespace and uploads it back, with its offloads on.
#[test]
fn raw_client_downloads_through_the_nat() {
    if !require_root("raw_client_downloads_through_the_nat") {
        return;
    }
    raw_download_and_upload(true);
}

/// The same with `backend.raw.offload = false`: super-frames are cut into wire-sized segments
/// by the backend, and every segment to the client fits the MTU.
#[test]
fn raw_client_downloads_through_the_nat_without_offload() {
    if !require_root("raw_client_downloads_through_the_nat_without_offload") {
        return;
    }
    raw_download_and_upload(false);
}

fn raw_download_and_upload(offload: bool) {
    require_programs(&["udhcpc", "curl", "ethtool"]);
    let size = 4 << 20;
    let options = Options {
        files: vec![("blob".into(), size)],
        log_level: "hubnat_raw=debug,info".into(),
        ..Options::default()
    };
    let mut topo = Topology::new(options);
    let (gw_dev, client_dev) = topo.link_gateway_to_client();
    topo.start_hubnat(&format!(
        "[backend]\nkind = \"raw\"\n[backend.raw]\ninterface = \"{gw_dev}\"\noffload = {offload}\n"
    ));
    wait_until(Duration::from_secs(15), "hubnat to start", || {
        read(&topo.hubnat_log).contains("hubnat started")
    });
    topo.dhcp(&client_dev);
    // The client's veth keeps its offloads on (the default): its TCP segments reach the raw
    // backend with partial checksums, and as TSO super-frames once the window opens. The
    // backend finishes and cuts them (backends/raw/src/offload.rs).
    let features = topo.client.exec_ok(&["ethtool", "-k", &client_dev]);
    assert!(features.contains("tx-checksumming: on"), "{features}");
    let sock = topo.path("state").join("control.sock");
    let frames_out = || {
        json(&sock, &["status", "--json"])["counters"]["frames_out"]
            .as_u64()
            .unwrap()
    };
    let frames_before = frames_out();
    let out = topo.path("blob.downloaded");
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/files/blob");
    let (result, took) = topo.client_run(&[
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-o",
        out.to_str().unwrap(),
        &url,
    ]);
    assert!(
        result.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("raw: downloaded {size} bytes in {took:?}");
    // The download's frames to the client: with offload, TCP segments of up to 64 KiB (cut
    // by the kernel where the client's veth needs it; it does not); without, each fits the MTU.
    let frames = frames_out() - frames_before;
    let mtu_segments = size / 1460;
    if offload {
        assert!(
            frames < mtu_segments / 4,
            "{frames} frames for {size} bytes"
        );
    } else {
        assert!(frames >= mtu_segments, "{frames} frames for {size} bytes");
    }
    eprintln!("raw (offload {offload}): {frames} frames to the client for the download");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(sha256(&out), sha256(&topo.www.join("blob")));
    // And an upload, which is where the client's TSO super-frames come from.
    let (result, took) = topo.client_run(&[
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-T",
        out.to_str().unwrap(),
        &format!("http://{SERVER_IP}:{HTTP_PORT}/upload/blob"),
    ]);
    assert!(
        result.status.success(),
        "curl upload: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("raw: uploaded {size} bytes in {took:?}");
    let uploads = topo.received_uploads();
    assert_eq!(
        uploads.last().map(|u| (u.1, u.2.clone())),
        Some((size, sha256(&out))),
        "{uploads:?}"
    );
    let log = read(&topo.hubnat_log);
    assert!(
        log.contains("a local sender's partial checksum: taking it as the kernel does"),
        "{log}"
    );
    let whole = "a local sender's TCP super-frame: taken whole";
    let cut = "a local sender's TCP super-frame: cutting it";
    let (said, not) = if offload { (whole, cut) } else { (cut, whole) };
    assert!(log.contains(said) && !log.contains(not), "{log}");
}
