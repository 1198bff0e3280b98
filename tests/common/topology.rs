//! The three-namespace topology of the real-client NAT tests.
//!
//! ```text
//!  client ns                     gateway ns                          server ns
//!  ┌────────────────┐  TAP      ┌──────────────────────┐  veth      ┌────────────────────────┐
//!  │ udhcpc, curl,  │◀────────▶│ hubnat run (TAP)      │◀─────────▶│ 10.77.0.2/24           │
//!  │ dig, ping, ... │ (moved in)│ 10.77.0.1/24: its only│            │ HTTP :8080, UDP echo   │
//!  │ 192.168.30.x   │           │ link leads to server  │            │ :7777, dnsmasq :53,    │
//!  └────────────────┘           └──────────────────────┘            │ iperf3 -s :5201        │
//!                                                                    └────────────────────────┘
//! ```
//!
//! Safety rules (DESIGN.md): the three namespaces are this process's own (names from
//! [`unique`]), use only 10.77.x.y and the segment's 192.168.30.0/24, have no link to anything
//! else, and no command sends traffic outside them. Every process is stopped by its PID and the
//! namespaces are deleted on drop, also when a test panics. On a panic the tails of the logs
//! are printed. `TEST_HUBNAT_KEEP=1` keeps the working directory (logs, configs, captures);
//! `TEST_HUBNAT_PCAP=1` runs tcpdump on the client's interface and the gateway's uplink.
//!
//! Reuse: [`Topology::tap`] builds everything for the TAP backend. Other backends build the
//! servers with [`Topology::new`], link the client with [`Topology::link_gateway_to_client`]
//! (a veth pair for the raw backend) or not at all (a QEMU guest on the hub socket), start
//! hubnat with [`Topology::start_hubnat`] and their own `[backend]` TOML, then run
//! [`Topology::dhcp`]. [`Topology::direct`] gives the client a plain kernel route to the server
//! instead of hubnat: the self-check of the fixtures and the baseline of measurements.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::netns::{hubnat_bin, read, require_programs, unique, veth, wait_until, Netns, Proc};

/// The test server's address (on its veth to the gateway).
pub const SERVER_IP: &str = "10.77.0.2";
/// The gateway namespace's address on its only link, the veth to the server.
pub const UPLINK_IP: &str = "10.77.0.1";
/// The virtual host (router, DHCP server, DNS redirect) on the segment.
pub const VHOST_IP: &str = "192.168.30.1";
/// The virtual host's MAC in the generated configuration.
pub const HOST_MAC: &str = "00:ac:11:22:33:44";
/// The direct-route variant: the client's side of its veth to the server, and the server's.
pub const DIRECT_CLIENT_IP: &str = "10.77.1.2";
pub const DIRECT_SERVER_SIDE_IP: &str = "10.77.1.1";

pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 7777;
pub const IPERF_PORT: u16 = 5201;
/// A port nothing listens on in the server namespace.
pub const CLOSED_PORT: u16 = 9;
/// A name the upstream dnsmasq holds; it resolves to [`SERVER_IP`].
pub const DNS_NAME: &str = "files.hubnat.test";

/// What to build.
#[derive(Clone, Debug)]
pub struct Options {
    /// The MTU everywhere: `nat.mtu` (and so the TAP device), the client's interface, the veths.
    pub mtu: u32,
    /// Files the HTTP server serves under `/files/NAME`: random bytes of the given size.
    pub files: Vec<(String, u64)>,
    /// Also run `iperf3 -s` in the server namespace.
    pub iperf: bool,
    /// TOML merged over the generated hubnat configuration (tables merge key by key).
    pub config: String,
    /// hubnat's `log.level`.
    pub log_level: String,
    /// A command hubnat runs under, which must end by exec'ing its arguments (so that the
    /// process is hubnat's): `ip netns exec GW WRAPPER... hubnat run --config FILE`. For
    /// example `prlimit --nofile=N:N`. `{state}` in an argument is the state directory.
    pub wrapper: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            mtu: 1500,
            files: Vec::new(),
            iperf: false,
            config: String::new(),
            log_level: "info".into(),
            wrapper: Vec::new(),
        }
    }
}

/// The namespaces, the servers, hubnat and the DHCP client of one test.
pub struct Topology {
    // Fields drop in declaration order: processes first, then the namespaces, then the files.
    procs: Vec<Proc>,
    hubnat: Option<Proc>,
    pub client: Netns,
    pub gw: Netns,
    pub server: Netns,
    pub opts: Options,
    /// The client's interface toward the gateway (the TAP device, a veth, ...), once linked.
    pub client_dev: Option<String>,
    /// The address the DHCP client got, once bound.
    pub client_ip: Option<String>,
    /// The gateway's end of the veth to the server.
    pub uplink_dev: String,
    /// The server's end of the veth to the gateway.
    pub server_dev: String,
    /// Where the HTTP server's files live (`/files/NAME` is `www/NAME`).
    pub www: PathBuf,
    /// One line per received upload: `NAME LENGTH SHA256`.
    pub uploads: PathBuf,
    pub hubnat_log: PathBuf,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Topology {
    /// The servers in their namespace, the gateway namespace linked to them, and an empty
    /// client namespace. hubnat is not started.
    pub fn new(opts: Options) -> Topology {
        let mut progs = vec!["ip", "python3", "dnsmasq", "sha256sum"];
        if opts.iperf {
            progs.push("iperf3");
        }
        require_programs(&progs);
        let dir = tempfile::Builder::new()
            .prefix("hubnat-topo-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().to_path_buf();
        // Searchable by others: a hubnat that gives up root still reaches its state directory.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod the topology directory");
        let server = Netns::new("hnsv");
        let gw = Netns::new("hngw");
        let client = Netns::new("hncl");
        let uplink_dev = unique("hnup");
        let server_dev = unique("hnsv");
        let www = path.join("www");
        std::fs::create_dir(&www).unwrap();
        let mut topo = Topology {
            procs: Vec::new(),
            hubnat: None,
            client,
            gw,
            server,
            client_dev: None,
            client_ip: None,
            uplink_dev,
            server_dev,
            uploads: path.join("uploads.log"),
            hubnat_log: path.join("hubnat.log"),
            www,
            opts,
            dir: Some(dir),
            path,
        };
        let mtu = topo.opts.mtu.to_string();
        veth(
            &topo.gw,
            &topo.uplink_dev,
            &topo.server,
            &topo.server_dev,
            &mtu,
        );
        topo.gw.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{UPLINK_IP}/24"),
            "dev",
            &topo.uplink_dev,
        ]);
        topo.server.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &topo.server_dev,
        ]);
        // Let the gateway's host-side pings use an ICMP datagram socket (the default range
        // "1 0" allows nobody, root included). This namespace's setting only.
        // (/proc/sys/net is the writer's namespace's; no procps needed.)
        topo.gw.exec_ok(&[
            "sh",
            "-c",
            "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range",
        ]);
        // The link works (ARP both ways) before anything starts.
        topo.gw.exec_ok(&["ping", "-c", "1", "-W", "5", SERVER_IP]);
        for (name, size) in topo.opts.files.clone() {
            random_file(&topo.www.join(&name), size);
        }
        topo.start_servers();
        topo
    }

    /// The full TAP set-up: [`Topology::new`], hubnat on a TAP device, the device moved into the
    /// client namespace, and a DHCP lease with a default route through the virtual host.
    pub fn tap(opts: Options) -> Topology {
        require_programs(&["udhcpc"]);
        let mut topo = Topology::new(opts);
        let tap = unique("hntap");
        topo.start_hubnat(&format!(
            "[backend]\nkind = \"tap\"\n[backend.tap]\nname = \"{tap}\"\n"
        ));
        let log = topo.hubnat_log.clone();
        let hubnat = topo.hubnat.as_mut().unwrap();
        wait_until(
            Duration::from_secs(15),
            "hubnat to open its TAP device",
            || {
                assert!(hubnat.is_running(), "hubnat exited early:\n{}", read(&log));
                topo.gw
                    .exec(&["ip", "link", "show", "dev", &tap])
                    .status
                    .success()
            },
        );
        // The kernel side of the TAP device becomes the client's network interface.
        topo.gw
            .exec_ok(&["ip", "link", "set", &tap, "netns", &topo.client.name]);
        topo.client.wait_for_link(&tap, Duration::from_secs(5));
        let mtu = link_mtu(&topo.client, &tap);
        if mtu != topo.opts.mtu {
            eprintln!(
                "topology: {tap} has MTU {mtu} after the move, setting {}",
                topo.opts.mtu
            );
            topo.client
                .exec_ok(&["ip", "link", "set", &tap, "mtu", &topo.opts.mtu.to_string()]);
        }
        topo.client.exec_ok(&["ip", "link", "set", &tap, "up"]);
        topo.client_dev = Some(tap.clone());
        topo.pcap_client();
        topo.dhcp(&tap);
        // The segment itself works before anything goes through the NAT.
        topo.client
            .exec_ok(&["ping", "-c", "1", "-W", "3", VHOST_IP]);
        topo
    }

    /// The self-check and baseline variant: no hubnat; the client has a veth straight to the
    /// server namespace (10.77.1.2 → 10.77.1.1, default route through it), so it reaches
    /// 10.77.0.2 by plain kernel routing. DNS is then asked of 10.77.0.2 itself.
    pub fn direct(opts: Options) -> Topology {
        let mut topo = Topology::new(opts);
        let (cdev, sdev) = (unique("hndc"), unique("hnds"));
        veth(
            &topo.client,
            &cdev,
            &topo.server,
            &sdev,
            &topo.opts.mtu.to_string(),
        );
        topo.server.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{DIRECT_SERVER_SIDE_IP}/24"),
            "dev",
            &sdev,
        ]);
        topo.client.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{DIRECT_CLIENT_IP}/24"),
            "dev",
            &cdev,
        ]);
        topo.client.exec_ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            DIRECT_SERVER_SIDE_IP,
            "dev",
            &cdev,
        ]);
        topo.client
            .exec_ok(&["ping", "-c", "1", "-W", "5", SERVER_IP]);
        topo.client_dev = Some(cdev);
        topo.client_ip = Some(DIRECT_CLIENT_IP.into());
        topo.pcap_client();
        topo
    }

    /// A veth pair from the gateway namespace to the client namespace (for the raw backend):
    /// returns (gateway end, client end), both up at the topology's MTU, no addresses.
    pub fn link_gateway_to_client(&mut self) -> (String, String) {
        let (g, c) = (unique("hngc"), unique("hncg"));
        veth(&self.gw, &g, &self.client, &c, &self.opts.mtu.to_string());
        self.client_dev = Some(c.clone());
        (g, c)
    }

    /// The working directory (configs, logs, captures).
    pub fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The hubnat configuration: the generated base (host MAC, DNS upstream 10.77.0.2, MTU,
    /// state dir, log level), then `backend` (TOML), then `opts.config` merged over it.
    pub fn hubnat_config(&self, backend: &str) -> String {
        let base = format!(
            r#"
[host]
mac = "{HOST_MAC}"

[dhcp]
domain = "hubnat.test"

[nat]
mtu = {mtu}

[dns]
upstream = ["{SERVER_IP}"]

[state]
dir = "{state}"

[log]
level = "{level}"
"#,
            mtu = self.opts.mtu,
            state = self.path("state").display(),
            level = self.opts.log_level,
        );
        let mut table: toml::Table = base.parse().unwrap();
        for extra in [backend, self.opts.config.as_str()] {
            let extra: toml::Table = extra
                .parse()
                .unwrap_or_else(|e| panic!("bad TOML for hubnat: {e}\n{extra}"));
            merge(&mut table, extra);
        }
        toml::to_string(&table).unwrap()
    }

    /// Writes the configuration and starts `hubnat run --config FILE` in the gateway namespace.
    pub fn start_hubnat(&mut self, backend: &str) {
        assert!(self.hubnat.is_none(), "hubnat already started");
        let config = self.path("hubnat.toml");
        std::fs::write(&config, self.hubnat_config(backend)).unwrap();
        if let Some(p) = self.pcap(&self.gw, &self.uplink_dev, "uplink.pcap") {
            self.procs.push(p);
        }
        let state = self.path("state");
        let mut cmd = match self.opts.wrapper.split_first() {
            None => self.gw.command(hubnat_bin().to_str().unwrap()),
            Some((program, args)) => {
                let mut cmd = self.gw.command(program);
                cmd.args(
                    args.iter()
                        .map(|a| a.replace("{state}", state.to_str().unwrap())),
                )
                .arg(hubnat_bin());
                cmd
            }
        };
        cmd.args(["run", "--config", config.to_str().unwrap()]);
        self.hubnat = Some(Proc::spawn(cmd, "hubnat", &self.hubnat_log));
    }

    /// The end of a test: hubnat must still be running (it did not crash under the test), and
    /// must stop cleanly on SIGTERM. Everything else is torn down by the drop.
    pub fn finish(mut self) {
        assert!(
            self.hubnat_running(),
            "hubnat exited during the test:\n{}",
            read(&self.hubnat_log)
        );
        let status = self.stop_hubnat();
        assert!(
            status.success(),
            "hubnat exit status {status} on SIGTERM:\n{}",
            read(&self.hubnat_log)
        );
    }

    /// Stops hubnat with SIGTERM and returns its exit status.
    pub fn stop_hubnat(&mut self) -> std::process::ExitStatus {
        self.hubnat.take().expect("hubnat not running").stop()
    }

    /// Runs busybox udhcpc on `dev` in the client namespace with a script that sets the address
    /// and the default route from the router option; waits for the lease and returns the address.
    pub fn dhcp(&mut self, dev: &str) -> String {
        let events = self.path("udhcpc-events.log");
        let mut cmd = self.client.command("udhcpc");
        cmd.env("TEST_HUBNAT_EVENTS", &events).args([
            "-f",
            "-i",
            dev,
            "-s",
            fixture("udhcpc-script.sh").to_str().unwrap(),
            "-t",
            "20",
            "-T",
            "1",
            "-x",
            "hostname:nat-client",
        ]);
        let started = Instant::now();
        self.procs
            .push(Proc::spawn(cmd, "udhcpc", &self.path("udhcpc.log")));
        let log = self.hubnat_log.clone();
        let hubnat = &mut self.hubnat;
        wait_until(Duration::from_secs(30), "udhcpc to get a lease", || {
            if let Some(h) = hubnat.as_mut() {
                assert!(h.is_running(), "hubnat exited:\n{}", read(&log));
            }
            read(&events).contains("event=bound")
        });
        let line = read(&events)
            .lines()
            .find(|l| l.starts_with("event=bound"))
            .unwrap()
            .to_owned();
        let ip = line
            .split(' ')
            .find_map(|f| f.strip_prefix("ip="))
            .unwrap()
            .to_owned();
        eprintln!("topology: {dev} bound in {:?}: {line}", started.elapsed());
        let route = self.client.exec_ok(&["ip", "route", "show", "default"]);
        assert!(
            route.contains(&format!("via {VHOST_IP}")),
            "no default route via {VHOST_IP} after the lease: {route:?}"
        );
        self.client_ip = Some(ip.clone());
        ip
    }

    /// A command in the client namespace with proxy variables removed.
    pub fn client_cmd(&self, program: &str) -> Command {
        clean(self.client.command(program))
    }

    /// Runs a command in the client namespace; returns its output and how long it took.
    pub fn client_run(&self, args: &[&str]) -> (Output, Duration) {
        let started = Instant::now();
        let out = self
            .client_cmd(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .expect("run in client namespace");
        (out, started.elapsed())
    }

    /// The server namespace's counter of ICMP echo requests received (`Icmp: InEchos`).
    pub fn server_in_echos(&self) -> u64 {
        let snmp = self.server.exec_ok(&["cat", "/proc/net/snmp"]);
        let mut lines = snmp.lines().filter(|l| l.starts_with("Icmp:"));
        let (head, vals) = (lines.next().unwrap(), lines.next().unwrap());
        let i = head
            .split_whitespace()
            .position(|k| k == "InEchos")
            .unwrap();
        vals.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    /// hubnat's security log (in its state directory).
    pub fn security_log(&self) -> String {
        read(&self.path("state").join("security.log"))
    }

    /// Uploads received by the HTTP server: (name, length, sha256).
    pub fn received_uploads(&self) -> Vec<(String, u64, String)> {
        read(&self.uploads)
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((
                    f.next()?.to_owned(),
                    f.next()?.parse().ok()?,
                    f.next()?.to_owned(),
                ))
            })
            .collect()
    }

    /// Stops the topology's process `what` (as named in its `Proc`: "dnsmasq", "HTTP server",
    /// ...) by its PID with SIGTERM; returns its exit status.
    pub fn stop_process(&mut self, what: &str) -> std::process::ExitStatus {
        let i = self
            .procs
            .iter()
            .position(|p| p.what == what)
            .unwrap_or_else(|| panic!("no process {what:?} in the topology"));
        self.procs.remove(i).stop()
    }

    /// Sends `sig` to the topology's process `what` (as named in its `Proc`), by its PID.
    pub fn signal_process(&self, what: &str, sig: i32) {
        self.procs
            .iter()
            .find(|p| p.what == what)
            .unwrap_or_else(|| panic!("no process {what:?} in the topology"))
            .signal(sig);
    }

    /// True while hubnat runs (false when it was never started or has exited).
    pub fn hubnat_running(&mut self) -> bool {
        self.hubnat.as_mut().is_some_and(|h| h.is_running())
    }

    /// hubnat's process id (it must be running).
    pub fn hubnat_pid(&self) -> i32 {
        self.hubnat.as_ref().expect("hubnat not running").pid()
    }

    /// Sends `sig` to hubnat (it must be running), by its PID.
    pub fn signal_hubnat(&self, sig: i32) {
        self.hubnat
            .as_ref()
            .expect("hubnat not running")
            .signal(sig);
    }

    /// curl in the client namespace with the flags every call uses: quiet but with errors, no
    /// proxy, a connect bounded to 10 s and the whole transfer to 120 s.
    pub fn curl(&self, args: &[&str]) -> Command {
        let mut c = self.client_cmd("curl");
        c.args([
            "-sS",
            "--noproxy",
            "*",
            "--connect-timeout",
            "10",
            "--max-time",
            "120",
        ])
        .args(args);
        c
    }

    /// Starts `curl --limit-rate RATE` of `/files/NAME` from the HTTP server in the client
    /// namespace, into the working directory, and returns once its first bytes are there.
    pub fn start_download(&self, name: &str, rate: &str) -> Download {
        let out = self.path(&format!("download-{name}"));
        let url = format!("http://{SERVER_IP}:{HTTP_PORT}/files/{name}");
        let child = self
            .curl(&[
                "--fail",
                "--limit-rate",
                rate,
                "-o",
                out.to_str().unwrap(),
                &url,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start curl");
        let mut download = Download {
            child,
            out,
            served: self.www.join(name),
        };
        wait_until(
            Duration::from_secs(20),
            &format!("the first bytes of /files/{name}"),
            || {
                assert!(
                    download.is_running() || download.received() > 0,
                    "curl exited"
                );
                download.received() > 0
            },
        );
        download
    }

    /// Runs `tests/fixtures/probe.py PROTO --to TO [--sport SPORT]` in the client namespace
    /// (one UDP datagram and what came back, ICMP errors read from the socket's error queue;
    /// or one TCP connect) and returns its line, `result=… after=S`.
    pub fn probe(&self, proto: &str, to: &str, sport: Option<u16>) -> String {
        let fixture = fixture("probe.py");
        let mut args = vec!["python3", fixture.to_str().unwrap(), proto, "--to", to];
        let sport = sport.map(|p| p.to_string());
        if let Some(p) = &sport {
            args.extend(["--sport", p.as_str()]);
        }
        let (out, took) = self.client_run(&args);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "probe.py {proto} --to {to} ({}, {took:?}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("probe.py {proto} --to {to}: {text}");
        text
    }

    /// A one-shot DHCP exchange by busybox udhcpc on the client's interface (the address is not
    /// configured; the topology's own DHCP client keeps its own): returns (address, lease
    /// seconds). `n` tells apart the event files of several calls.
    pub fn one_lease(&self, n: u32) -> (String, u64) {
        let dev = self.client_dev.clone().expect("no client interface");
        self.one_lease_on(&dev, n)
    }

    /// [`one_lease`](Self::one_lease) on another interface of the client namespace (a macvlan
    /// with a MAC of its own: another client).
    pub fn one_lease_on(&self, dev: &str, n: u32) -> (String, u64) {
        let events = self.path(&format!("oneshot-{n}.log"));
        let script = self.path("oneshot.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"event=$1 ip=$ip lease=$lease\" >> \"$TEST_EVENTS\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let out = self
            .client_cmd("udhcpc")
            .env("TEST_EVENTS", &events)
            .args(["-f", "-q", "-n", "-i", dev, "-s", script.to_str().unwrap()])
            .args(["-t", "10", "-T", "1"])
            .stdin(Stdio::null())
            .output()
            .expect("udhcpc");
        let text = read(&events);
        let line = text
            .lines()
            .find(|l| l.starts_with("event=bound"))
            .unwrap_or_else(|| {
                panic!("no lease: {text}\n{}", String::from_utf8_lossy(&out.stderr))
            });
        let field = |k: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        (field("ip="), field("lease=").parse().unwrap())
    }

    /// Another `tests/fixtures/http_server.py` in the server namespace, on `bind:port`, serving
    /// the files of `root` under `/files/`; returns once it listens. `bind` must be an address
    /// of the server namespace (one of the topology's plan). Stopped with the topology.
    pub fn start_http_server(&mut self, bind: &str, port: u16, root: &Path) {
        let mut http = self.server.command("python3");
        let uploads = self.path(&format!("uploads-{bind}-{port}.log"));
        http.arg(fixture("http_server.py")).args([
            "--bind",
            bind,
            "--port",
            &port.to_string(),
            "--root",
            root.to_str().unwrap(),
            "--uploads",
            uploads.to_str().unwrap(),
        ]);
        let log = self.path(&format!("http-{bind}-{port}.log"));
        self.procs
            .push(Proc::spawn(http, "extra HTTP server", &log));
        self.wait_listening("tcp", bind, port);
    }

    /// Another `tests/fixtures/udp_echo_server.py` in the server namespace, on `bind:port`;
    /// returns once it listens. Stopped with the topology.
    pub fn start_udp_echo(&mut self, bind: &str, port: u16) {
        let mut echo = self.server.command("python3");
        echo.arg(fixture("udp_echo_server.py"))
            .args(["--bind", bind, "--port", &port.to_string()]);
        let log = self.path(&format!("udp-echo-{bind}-{port}.log"));
        self.procs
            .push(Proc::spawn(echo, "extra UDP echo server", &log));
        self.wait_listening("udp", bind, port);
    }

    /// Waits until something listens on `proto` (`tcp` or `udp`) `bind:port` in the server
    /// namespace; fails if one of the topology's processes exits meanwhile.
    fn wait_listening(&mut self, proto: &str, bind: &str, port: u16) {
        let srv = &self.server;
        let procs = &mut self.procs;
        wait_until(
            Duration::from_secs(15),
            &format!("a server to listen on {proto} {bind}:{port}"),
            || {
                for p in procs.iter_mut() {
                    assert!(p.is_running(), "{} exited early", p.what);
                }
                let ss = srv.exec(&["ss", "-H", "-lntu"]);
                String::from_utf8_lossy(&ss.stdout)
                    .lines()
                    .any(|l| l.starts_with(proto) && l.contains(&format!("{bind}:{port} ")))
            },
        );
    }

    fn start_servers(&mut self) {
        let srv = &self.server;
        let mut http = srv.command("python3");
        http.arg(fixture("http_server.py")).args([
            "--bind",
            SERVER_IP,
            "--port",
            &HTTP_PORT.to_string(),
            "--root",
            self.www.to_str().unwrap(),
            "--uploads",
            self.uploads.to_str().unwrap(),
        ]);
        self.procs
            .push(Proc::spawn(http, "HTTP server", &self.path("http.log")));
        let mut echo = srv.command("python3");
        echo.arg(fixture("udp_echo_server.py")).args([
            "--bind",
            SERVER_IP,
            "--port",
            &ECHO_PORT.to_string(),
        ]);
        self.procs.push(Proc::spawn(
            echo,
            "UDP echo server",
            &self.path("udp-echo.log"),
        ));
        let mut dns = srv.command("dnsmasq");
        dns.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={SERVER_IP}"),
            "--port=53",
            &format!("--host-record={DNS_NAME},{SERVER_IP}"),
            "--log-queries",
            "--log-facility=-",
            "--user=root",
            "--group=root",
            &format!("--pid-file={}", self.path("dnsmasq.pid").display()),
            "--leasefile-ro",
        ]);
        self.procs
            .push(Proc::spawn(dns, "dnsmasq", &self.path("dnsmasq.log")));
        if self.opts.iperf {
            let mut iperf = srv.command("iperf3");
            iperf.args(["-s", "-B", SERVER_IP, "-p", &IPERF_PORT.to_string()]);
            self.procs.push(Proc::spawn(
                iperf,
                "iperf3 -s",
                &self.path("iperf3-server.log"),
            ));
        }
        let mut wanted = vec![
            ("tcp", HTTP_PORT),
            ("udp", ECHO_PORT),
            ("udp", 53),
            ("tcp", 53),
        ];
        if self.opts.iperf {
            wanted.push(("tcp", IPERF_PORT));
        }
        let procs = &mut self.procs;
        wait_until(
            Duration::from_secs(15),
            "the test servers to listen",
            || {
                for p in procs.iter_mut() {
                    assert!(p.is_running(), "{} exited early", p.what);
                }
                let ss = srv.exec(&["ss", "-H", "-lntu"]);
                let ss = String::from_utf8_lossy(&ss.stdout);
                wanted.iter().all(|(proto, port)| {
                    ss.lines().any(|l| {
                        l.starts_with(proto) && l.contains(&format!("{SERVER_IP}:{port} "))
                    })
                })
            },
        );
    }

    fn pcap_client(&mut self) {
        if let Some(dev) = self.client_dev.clone() {
            if let Some(p) = self.pcap(&self.client, &dev, "client.pcap") {
                self.procs.push(p);
            }
        }
    }

    /// With `TEST_HUBNAT_PCAP` set: tcpdump on `dev` in `ns` into the working directory.
    fn pcap(&self, ns: &Netns, dev: &str, file: &str) -> Option<Proc> {
        std::env::var_os("TEST_HUBNAT_PCAP")?;
        let mut cmd = ns.command("tcpdump");
        cmd.args([
            "-i",
            dev,
            "-n",
            "-s",
            "256",
            "-U",
            "-w",
            self.path(file).to_str().unwrap(),
        ]);
        let p = Proc::spawn(cmd, "tcpdump", &self.path(&format!("{file}.log")));
        std::thread::sleep(Duration::from_millis(300));
        Some(p)
    }

    fn dump_logs(&self) {
        for name in [
            "hubnat.log",
            "udhcpc.log",
            "udhcpc-events.log",
            "http.log",
            "udp-echo.log",
            "dnsmasq.log",
            "iperf3-server.log",
        ] {
            let text = read(&self.path(name));
            if text.is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- {name} (last {} of {} lines) ----\n{}",
                tail.len(),
                lines.len(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        // hubnat first (SIGTERM so it saves its state, SIGKILL after 10 s), then the rest by PID.
        if let Some(mut h) = self.hubnat.take() {
            if h.is_running() {
                h.signal(libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while h.is_running() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        // Captures get SIGINT so they close their files; everything left gets SIGKILL on drop.
        for p in self.procs.iter().filter(|p| p.what == "tcpdump") {
            p.signal(libc::SIGINT);
        }
        if self.procs.iter().any(|p| p.what == "tcpdump") {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.procs.clear();
        if std::env::var_os("TEST_HUBNAT_KEEP").is_some()
            || std::env::var_os("TEST_HUBNAT_PCAP").is_some()
        {
            if let Some(dir) = self.dir.take() {
                eprintln!("topology: kept {}", dir.keep().display());
            }
        }
    }
}

/// A download running in the background ([`Topology::start_download`]); curl is stopped by its
/// PID on drop if it still runs.
pub struct Download {
    child: std::process::Child,
    /// Where the bytes go.
    pub out: PathBuf,
    served: PathBuf,
}

impl Download {
    /// The bytes received so far.
    pub fn received(&self) -> u64 {
        std::fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0)
    }

    /// The length of the whole file.
    pub fn total(&self) -> u64 {
        std::fs::metadata(&self.served).map(|m| m.len()).unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait for curl").is_none()
    }

    /// Waits for curl to end (a hang guard of `limit`): it must have succeeded, with every byte
    /// and the served file's SHA-256.
    pub fn finish(mut self, limit: Duration) {
        wait_until(limit, "the download to end", || !self.is_running());
        let status = self.child.wait().expect("wait for curl");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
        assert!(status.success(), "the download failed ({status}): {err}");
        assert_eq!(self.received(), self.total(), "downloaded length");
        assert_eq!(
            sha256(&self.out),
            sha256(&self.served),
            "SHA-256 of the download"
        );
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The path of a file under tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The SHA-256 of a file, in hex (sha256sum).
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Writes `size` random bytes to `path`.
pub fn random_file(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        getrandom::fill(&mut buf[..n]).unwrap();
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// The MTU of `dev` in `ns`.
pub fn link_mtu(ns: &Netns, dev: &str) -> u32 {
    let out = ns.exec_ok(&["ip", "-o", "link", "show", "dev", dev]);
    let mut words = out.split_whitespace();
    words
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {out:?}"))
}

/// Removes proxy settings from a command's environment: every request goes straight to the
/// namespaces' own addresses.
fn clean(mut cmd: Command) -> Command {
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// Merges `extra` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
