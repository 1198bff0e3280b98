//! hubnat as the sidecar of a real SoftEther VPN Server: the virtual NAT and DHCP server of a
//! virtual hub whose SecureNAT is off, reached by real SoftEther VPN Client sessions.
//!
//! ```text
//!  client ns A                 gateway ns                                   server ns
//!  ┌──────────────────┐ veth  ┌──────────────────────────────────────┐ veth ┌──────────────┐
//!  │ vpnclient        │──TCP─▶│ vpnserver :5555, hub SIDECAR         │      │ 10.77.0.2    │
//!  │ vpn_se0: udhcpc, │ 5555  │  (SecureNAT off), local bridge       │      │ HTTP :8080   │
//!  │ dig, curl        │       │  /TAP:yes ─▶ tap_sidecar             │      │ dnsmasq :53  │
//!  └──────────────────┘       │ hubnat, raw backend on tap_sidecar ──┼─────▶│              │
//!  client ns B: the same ────▶│  10.77.0.1: its only uplink          │      └──────────────┘
//!                             └──────────────────────────────────────┘
//! ```
//!
//! Why the raw backend: `BridgeCreate HUB /DEVICE:NAME /TAP:yes` makes SoftEther create and own
//! the TAP device `tap_NAME` (it holds the descriptor; the kernel side is the interface). hubnat
//! joins that interface as one more station with an `AF_PACKET` socket, which is what the raw
//! backend is for. hubnat's TAP backend would need a device of its own that SoftEther then
//! bridges to as if it were a NIC (two packet sockets instead of one), and SoftEther speaks no
//! hub-socket protocol.
//!
//! SoftEther's state (configuration, logs, pid and control files, caches) lives in the test's
//! directory, bind-mounted over the compiled-in paths in a private mount namespace
//! (`tests/common/softether.rs`). Per DESIGN.md's safety rules the namespaces are this test's
//! own, with the project's test addresses (10.77.40.0/24 and 10.77.41.0/24 carry the VPN
//! sessions); nothing has a route beyond them, processes are stopped by PID, and the
//! namespaces (with every TAP device in them) are removed afterwards, also on failure.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::json;
use common::netns::{
    fields, read, require_programs, require_root, unique, veth, wait_until, Netns, Proc,
};
use common::softether::{self, SoftEther, Tree, Vpncmd};
use common::topology::{
    fixture, sha256, Options, Topology, DNS_NAME, HTTP_PORT, SERVER_IP, VHOST_IP,
};

/// The virtual hub.
const HUB: &str = "SIDECAR";
/// The local bridge's device name: SoftEther creates the TAP device `tap_` + this.
const BRIDGE_DEVICE: &str = "sidecar";
const TAP: &str = "tap_sidecar";
/// The VPN Server's listener (the only one kept).
const VPN_PORT: u16 = 5555;
/// A VPN Client's virtual network adapter: SoftEther names the interface `vpn_` + this.
const NIC: &str = "se0";
const VPN_DEV: &str = "vpn_se0";
const ACCOUNT: &str = "sidecar";
const FILE: &str = "blob";
const FILE_SIZE: u64 = 2 << 20;

/// The VPN Server in the gateway namespace, configured as the guide (docs/sidecar-softether.md)
/// says.
struct Server {
    /// The vpnserver process, stopped by PID when dropped.
    _process: SoftEther,
    cmd: Vpncmd,
}

impl Server {
    fn start(gw: &Netns, dir: &Path) -> Server {
        let tree = Tree::new(&dir.join("vpnserver"), "vpnserver");
        let se = SoftEther::start(gw, &tree, &dir.join("vpnserver.log"));
        let cmd = Vpncmd::server(&dir.join("vpncmd-server"), VPN_PORT);
        let started = Instant::now();
        // The first command waits until the server answers.
        cmd.ok_when_up(gw, &[], &["ServerInfoGet"], Duration::from_secs(30));
        eprintln!("vpnserver answers after {:?}", started.elapsed());
        Server { _process: se, cmd }
    }

    /// The set-up of the guide: a hub with SecureNAT off, two users, one listener, no cloud
    /// services, and the local bridge to a new TAP device.
    fn configure(&self, gw: &Netns) {
        let c = &self.cmd;
        let hub = format!("/ADMINHUB:{HUB}");
        for port in ["443", "992", "1194"] {
            c.ok(gw, &[], &["ListenerDelete", port]);
        }
        c.ok(gw, &[], &["VpnAzureSetEnable", "no"]);
        c.ok(gw, &[], &["HubCreate", HUB, "/PASSWORD:hub-admin-pw"]);
        c.ok(gw, &[&hub], &["SecureNatDisable"]);
        for (user, pw) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
            c.ok(
                gw,
                &[&hub],
                &[
                    "UserCreate",
                    user,
                    "/GROUP:none",
                    "/REALNAME:none",
                    "/NOTE:none",
                ],
            );
            c.ok(
                gw,
                &[&hub],
                &["UserPasswordSet", user, &format!("/PASSWORD:{pw}")],
            );
        }
        c.ok(
            gw,
            &[],
            &[
                "BridgeCreate",
                HUB,
                &format!("/DEVICE:{BRIDGE_DEVICE}"),
                "/TAP:yes",
            ],
        );
        gw.wait_for_link(TAP, Duration::from_secs(15));
        // The hub's table of sessions shows the local bridge.
        let sessions = c.ok(gw, &[&hub], &["SessionList"]);
        assert!(sessions.contains("Local Bridge"), "{sessions}");
        // Written to vpn_server.config now (SoftEther otherwise saves every few minutes).
        c.ok(gw, &[], &["Flush"]);
    }
}

/// A SoftEther VPN Client in `ns`, connected to the hub over a veth to the gateway namespace.
struct Client {
    /// The VPN Client process, stopped by PID when dropped.
    _process: SoftEther,
    cmd: Vpncmd,
}

impl Client {
    /// The VPN Client connects as `user` over a new veth (`net`.2 → `net`.1, the server).
    fn connect(ns: &Netns, gw: &Netns, dir: &Path, user: &str, pw: &str, net: &str) -> Client {
        let (g, c) = (unique("hsv"), unique("hsc"));
        veth(gw, &g, ns, &c, "1500");
        gw.exec_ok(&["ip", "addr", "add", &format!("{net}.1/24"), "dev", &g]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{net}.2/24"), "dev", &c]);
        let tree = Tree::new(&dir.join(format!("vpnclient-{user}")), "vpnclient");
        let se = SoftEther::start(ns, &tree, &dir.join(format!("vpnclient-{user}.log")));
        let cmd = Vpncmd::client(&dir.join(format!("vpncmd-client-{user}")));
        let started = Instant::now();
        cmd.ok_when_up(ns, &[], &["NicCreate", NIC], Duration::from_secs(30));
        ns.wait_for_link(VPN_DEV, Duration::from_secs(10));
        cmd.ok(
            ns,
            &[],
            &[
                "AccountCreate",
                ACCOUNT,
                &format!("/SERVER:{net}.1:{VPN_PORT}"),
                &format!("/HUB:{HUB}"),
                &format!("/USERNAME:{user}"),
                &format!("/NICNAME:{NIC}"),
            ],
        );
        cmd.ok(
            ns,
            &[],
            &[
                "AccountPasswordSet",
                ACCOUNT,
                &format!("/PASSWORD:{pw}"),
                "/TYPE:standard",
            ],
        );
        // Reconnect every 5 s (the least SoftEther allows) when the hub goes away.
        cmd.ok(
            ns,
            &[],
            &["AccountRetrySet", ACCOUNT, "/NUM:999", "/INTERVAL:5"],
        );
        // One TCP connection per session, no UDP acceleration: after a restart of the server,
        // the client's additional connections were refused over and over and the session
        // timed out.
        cmd.ok(
            ns,
            &[],
            &[
                "AccountDetailSet",
                ACCOUNT,
                "/MAXTCP:1",
                "/INTERVAL:1",
                "/TTL:0",
                "/HALF:no",
                "/BRIDGE:no",
                "/MONITOR:no",
                "/NOTRACK:no",
                "/NOQOS:no",
                "/DISABLEUDP:yes",
            ],
        );
        cmd.ok(ns, &[], &["AccountConnect", ACCOUNT]);
        let client = Client { _process: se, cmd };
        client.wait_established(ns, 1, Duration::from_secs(30));
        eprintln!("{user}: VPN session established in {:?}", started.elapsed());
        client
    }

    /// Waits until the session has been established `times` times in all and is up now, with
    /// the virtual adapter up.
    fn wait_established(&self, ns: &Netns, times: u32, limit: Duration) {
        let what = format!("VPN session number {times} to be established");
        wait_until(limit, &what, || {
            let out = self.cmd.run(ns, &[], &["AccountStatusGet", ACCOUNT]);
            let text = String::from_utf8_lossy(&out.stdout);
            let count = text
                .lines()
                .find(|l| l.starts_with("Number of Established Sessions"))
                .and_then(|l| l.split('|').nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0);
            text.contains("Session Established")
                && count >= times
                && ns
                    .exec_ok(&["ip", "-o", "link", "show", "dev", VPN_DEV])
                    .contains("LOWER_UP")
        });
    }
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Busybox udhcpc on `VPN_DEV` in `ns`, with the topology's event script (address and default
/// route through the router option); returns it and its event file once bound.
fn udhcpc(ns: &Netns, dir: &Path, name: &str) -> (Proc, std::path::PathBuf) {
    let events = dir.join(format!("udhcpc-{name}-events.log"));
    let mut cmd = ns.command("udhcpc");
    cmd.env("TEST_HUBNAT_EVENTS", &events).args([
        "-f",
        "-i",
        VPN_DEV,
        "-s",
        fixture("udhcpc-script.sh").to_str().unwrap(),
        "-t",
        "20",
        "-T",
        "1",
        "-x",
        &format!("hostname:{name}"),
    ]);
    let p = Proc::spawn(cmd, "udhcpc", &dir.join(format!("udhcpc-{name}.log")));
    let started = Instant::now();
    wait_until(Duration::from_secs(30), &format!("{name}'s lease"), || {
        read(&events).contains("event=bound")
    });
    eprintln!(
        "{name}: lease over the VPN in {:?}: {}",
        started.elapsed(),
        read(&events)
            .lines()
            .find(|l| l.starts_with("event=bound"))
            .unwrap()
    );
    (p, events)
}

/// A command in `ns` with no proxy variables.
fn clean(ns: &Netns, program: &str) -> Command {
    let mut c = ns.command(program);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// Resolves the file server's name through hubnat's DNS (`dig @192.168.30.1`), downloads the
/// file by that name with curl, and checks its SHA-256 against the served file.
fn resolve_and_download(ns: &Netns, topo: &Topology, who: &str) {
    let out = clean(ns, "dig")
        .args([
            "-4",
            &format!("@{VHOST_IP}"),
            "+short",
            "+time=3",
            "+tries=3",
            DNS_NAME,
        ])
        .output()
        .expect("dig");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        answer,
        SERVER_IP,
        "{who}: dig @{VHOST_IP} {DNS_NAME}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{who}: dig @{VHOST_IP} {DNS_NAME} -> {answer}");
    let dest = topo.path(&format!("{who}-{FILE}"));
    let _ = std::fs::remove_file(&dest);
    let url = format!("http://{DNS_NAME}:{HTTP_PORT}/files/{FILE}");
    let started = Instant::now();
    let out = clean(ns, "curl")
        .args([
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "--connect-timeout",
            "10",
            "--max-time",
            "60",
        ])
        .args(["--resolve", &format!("{DNS_NAME}:{HTTP_PORT}:{answer}")])
        .args(["-o", dest.to_str().unwrap(), &url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{who}: curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (got, want) = (sha256(&dest), sha256(&topo.www.join(FILE)));
    assert_eq!(got, want, "{who}: SHA-256 of the download");
    eprintln!(
        "{who}: downloaded {url} ({} bytes) in {:?} through the hub and hubnat's NAT, sha256 {got} matches",
        std::fs::metadata(&dest).unwrap().len(),
        started.elapsed()
    );
}

#[test]
fn softether_hub_clients_get_leases_and_downloads_from_hubnat() {
    if !require_root("softether_hub_clients_get_leases_and_downloads_from_hubnat") {
        return;
    }
    require_programs(&["udhcpc", "curl", "dig", "unshare", "mount", "sha256sum"]);
    softether::require_installed();
    let test_started = Instant::now();
    let mut topo = Topology::new(Options {
        files: vec![(FILE.into(), FILE_SIZE)],
        log_level: "hubnat_raw=debug,info".into(),
        ..Options::default()
    });
    let dir = topo.path("softether");
    std::fs::create_dir(&dir).unwrap();
    let client_b_ns = Netns::new("hsclb");

    // The VPN Server beside hubnat, in the gateway namespace.
    let server = Server::start(&topo.gw, &dir);
    server.configure(&topo.gw);
    let config_file = dir.join("vpnserver/lib/softether/vpn_server.config");
    wait_until(
        Duration::from_secs(10),
        "vpn_server.config in the test's tree",
        || read(&config_file).contains(BRIDGE_DEVICE),
    );

    // hubnat on the hub's TAP device.
    topo.start_hubnat(&format!(
        "[backend]\nkind = \"raw\"\n[backend.raw]\ninterface = \"{TAP}\"\n"
    ));
    wait_until(Duration::from_secs(15), "hubnat to start", || {
        read(&topo.hubnat_log).contains("hubnat started")
    });

    // Client A: a VPN Client session, then a lease from hubnat, a name and a download.
    let client_a = Client::connect(
        &topo.client,
        &topo.gw,
        &dir,
        "alice",
        "alice-pw",
        "10.77.40",
    );
    topo.client_dev = Some(VPN_DEV.into());
    let ip_a = topo.dhcp(VPN_DEV);
    resolve_and_download(&topo.client, &topo, "alice");

    // Client B, on the same hub: another address.
    let client_b = Client::connect(&client_b_ns, &topo.gw, &dir, "bob", "bob-pw", "10.77.41");
    let (udhcpc_b, events_b) = udhcpc(&client_b_ns, &dir, "bob");
    let ip_b = fields(&read(&events_b), "event=bound")["ip"].clone();
    assert_ne!(ip_a, ip_b, "two clients of the hub got the same address");
    resolve_and_download(&client_b_ns, &topo, "bob");

    // Both are in hubnat's lease table, with the MACs of their VPN adapters.
    let sock = topo.path("state").join("control.sock");
    let mac = |ns: &Netns| {
        let link = ns.exec_ok(&["ip", "-o", "link", "show", "dev", VPN_DEV]);
        let mut w = link.split_whitespace();
        w.find(|x| *x == "link/ether")
            .and_then(|_| w.next())
            .unwrap()
            .to_owned()
    };
    let (mac_a, mac_b) = (mac(&topo.client), mac(&client_b_ns));
    let table = json(&sock, &["dhcp", "table", "--json"]);
    eprintln!("hubnat dhcp table --json: {table}");
    for (m, ip) in [(&mac_a, &ip_a), (&mac_b, &ip_b)] {
        assert!(
            table
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["mac"] == m.as_str() && l["ip"] == ip.as_str() && l["state"] == "bound"),
            "{m} {ip} not bound in {table}"
        );
    }
    eprintln!(
        "hubnat dhcp table:\n{}",
        common::cli::ok(&sock, &["dhcp", "table"])
    );

    // The hub restarts: vpnserver stopped by PID (its TAP device goes away with it) and started
    // again from the same configuration. hubnat waits without spinning, reopens the new
    // device, keeps its leases, and the client is served again once its session is back.
    let restart_started = Instant::now();
    let c = &server.cmd;
    c.ok(
        &topo.gw,
        &[],
        &["BridgeDelete", HUB, &format!("/DEVICE:{BRIDGE_DEVICE}")],
    );
    wait_until(
        Duration::from_secs(10),
        "hubnat to see the TAP device go",
        || read(&topo.hubnat_log).contains("interface went down; waiting for it to come back"),
    );
    assert!(
        !topo
            .gw
            .exec(&["ip", "link", "show", "dev", TAP])
            .status
            .success(),
        "{TAP} is still there"
    );
    // Gone for a while: hubnat waits without spinning.
    let before = cpu_ticks(topo.hubnat_pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(topo.hubnat_pid()) - before;
    assert!(
        spent <= 10,
        "hubnat used {spent} ticks of CPU in 2 s while its interface was gone"
    );
    assert!(
        topo.hubnat_running(),
        "hubnat exited when the hub's interface went away"
    );
    c.ok(
        &topo.gw,
        &[],
        &[
            "BridgeCreate",
            HUB,
            &format!("/DEVICE:{BRIDGE_DEVICE}"),
            "/TAP:yes",
        ],
    );
    topo.gw.wait_for_link(TAP, Duration::from_secs(20));
    wait_until(
        Duration::from_secs(15),
        "hubnat to resume on the new TAP device",
        || read(&topo.hubnat_log).contains("interface is up again; resuming"),
    );
    eprintln!(
        "hub's bridge deleted and created again: hubnat resumed after {:?}",
        restart_started.elapsed()
    );
    let events_a = topo.path("udhcpc-events.log");
    // udhcpc may have lost its lease while the adapter was down (it then starts over with a
    // DISCOVER): either way its next lease must be the address it had.
    let seen = read(&events_a).lines().count();
    topo.signal_process("udhcpc", libc::SIGUSR1);
    let mut line = String::new();
    wait_until(
        Duration::from_secs(30),
        "alice's lease after the restart",
        || {
            let text = read(&events_a);
            let found = text
                .lines()
                .skip(seen)
                .find(|l| l.starts_with("event=renew") || l.starts_with("event=bound"));
            if let Some(l) = found {
                line = l.to_owned();
            }
            found.is_some()
        },
    );
    eprintln!("alice after the hub restart: {line}");
    assert!(
        line.contains(&format!("ip={ip_a} ")),
        "the lease was kept: {line}"
    );
    resolve_and_download(&topo.client, &topo, "alice-after-restart");
    let table = json(&sock, &["dhcp", "table", "--json"]);
    assert!(
        table
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["mac"] == mac_b.as_str() && l["ip"] == ip_b.as_str()),
        "bob's lease is gone after the restart: {table}"
    );

    drop(udhcpc_b);
    drop((client_a, client_b, server));
    topo.finish();
    eprintln!(
        "sidecar_softether: whole test in {:?}",
        test_started.elapsed()
    );
}
