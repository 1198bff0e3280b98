//! The Linux-bridge guide (docs/linux-bridge.md), run as written: hubnat on a bridge shared
//! with containers, beside another DHCP server on the bridge, and beside one on the bridge
//! device itself (libvirt's shape).
//!
//! ```text
//!  container ns ct1 ─ eth0 ══ ct1 ─┐   host (gateway) ns                         server ns
//!  container ns ct2 ─ eth0 ══ ct2 ─┤  ┌─────────────────────────────┐  veth   ┌──────────────┐
//!  dnsmasq ns       ─ eth0 ══ ds1 ─┼──│ br0 ── hubnat (raw on br0)  │────────▶│ 10.77.0.2    │
//!                            vm1 ──┘  │ 10.77.0.1: its only uplink  │         │ HTTP, DNS    │
//!                   (TAP, no reader)  └─────────────────────────────┘         └──────────────┘
//! ```
//!
//! The test reads its commands from the guide: the `ip` lines of the first `sh` block of
//! *With `ip`* (run in the host namespace, each `&&` part on its own, without a shell: only
//! `ip` commands are accepted, and `"$CT1"` is the container's namespace), `bridge.toml` from
//! the same section, the `[dhcp]` table of *Sharing the bridge*, and the warning line of
//! *Another DHCP server*. Further containers are plugged in with the guide's container line,
//! `ct1` renamed. So the guide and the test cannot drift apart.
//!
//! Safety rules (DESIGN.md): every namespace is this process's own (names from `unique`), the
//! addresses are the project's test addresses (192.168.30.0/24 on the bridge, 10.77.0.0/24 to
//! the server), the host namespace's only link beyond the bridge leads to the test's server
//! namespace, processes are stopped by PID, and the namespaces are deleted on drop, also when
//! a test panics. The interface names of the guide (`br0`, `vm1`, `ct1`, `eth0`) live inside
//! those namespaces, so they clash with nothing.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{json, ok};
use common::netns::{
    fields, read, require_programs, require_root, tshark, wait_until, Netns, Proc,
};
use common::topology::{sha256, Options, Topology, HOST_MAC, HTTP_PORT, SERVER_IP, VHOST_IP};

/// The other DHCP server's address on the bridge, and its range (hubnat's is .10–.200).
const OTHER_DHCP_IP: &str = "192.168.30.2";
const OTHER_RANGE: (u8, u8) = (210, 240);
/// hubnat's default range.
const HUBNAT_RANGE: (u8, u8) = (10, 200);
/// A client the other DHCP server answers 2 s late (dnsmasq's `--dhcp-reply-delay`), so that
/// hubnat's offer reaches it first once hubnat answers too.
const SLOW_MAC: &str = "52:54:00:00:00:b1";
/// A client inside the guide's `serve_macs`, and the one MAC of its `ignore_macs`.
const SERVED_MAC: &str = "52:54:00:00:00:c2";
const IGNORED_MAC: &str = "52:54:00:12:34:56";
/// The text both of hubnat's warnings about another DHCP server start with.
const WARNING: &str = "dhcp: another DHCP server answers on the segment";
/// The security log's line for the same event.
const SECLOG_OTHER: &str = "DHCP another DHCP server on the segment";

/// What the test takes from docs/linux-bridge.md.
struct Guide {
    /// The `ip` commands of *With `ip`*, as argument lists.
    setup: Vec<Vec<String>>,
    /// `bridge.toml`.
    bridge_toml: String,
    /// The command that runs hubnat.
    run: String,
    /// The `[dhcp]` table of *Sharing the bridge with hosts that have their own addresses*.
    sharing_toml: String,
    /// The warning of *Another DHCP server on the bridge*, up to the other server's MAC.
    warning: String,
    /// The arguments of the `hubnat` command that makes it answer anyway, in the same section.
    authoritative: Vec<String>,
}

impl Guide {
    fn read() -> Guide {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/linux-bridge.md");
        let doc = std::fs::read_to_string(&path).expect("read docs/linux-bridge.md");
        let with_ip = section(&doc, "## With `ip`");
        let sh = blocks(with_ip, "sh");
        assert_eq!(sh.len(), 2, "With `ip`: a set-up block and a run block");
        let setup = sh[0]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .flat_map(|l| l.split("&&"))
            .map(|c| {
                let words: Vec<String> = c.split_whitespace().map(str::to_owned).collect();
                assert!(
                    words.first().is_some_and(|w| w == "ip")
                        && words.iter().all(|w| w == "\"$CT1\""
                            || !w.contains(['$', '"', '\'', ';', '|', '<', '>', '`', '&'])),
                    "the guide's set-up must be plain ip commands: {c:?}"
                );
                words
            })
            .collect();
        let toml = blocks(with_ip, "toml");
        assert_eq!(toml.len(), 1, "With `ip`: bridge.toml");
        let sharing = blocks(
            section(
                &doc,
                "## Sharing the bridge with hosts that have their own addresses",
            ),
            "toml",
        );
        assert_eq!(sharing.len(), 1, "Sharing the bridge: one [dhcp] table");
        let other = section(&doc, "## Another DHCP server on the bridge");
        let text = blocks(other, "text");
        assert_eq!(text.len(), 1, "Another DHCP server: the warning line");
        let warning = text[0]
            .trim()
            .strip_suffix(" mac=…")
            .filter(|w| w.starts_with("WARN "))
            .unwrap_or_else(|| panic!("the guide's warning line: {:?}", text[0]))
            .to_owned();
        let set = blocks(other, "sh");
        assert_eq!(
            set.len(),
            1,
            "Another DHCP server: the command to answer anyway"
        );
        let authoritative: Vec<String> = set[0].split_whitespace().map(str::to_owned).collect();
        assert_eq!(
            authoritative.first().map(String::as_str),
            Some("hubnat"),
            "{authoritative:?}"
        );
        Guide {
            setup,
            bridge_toml: toml[0].clone(),
            run: sh[1].trim().to_owned(),
            sharing_toml: sharing[0].clone(),
            warning,
            authoritative: authoritative[1..].to_vec(),
        }
    }

    /// The guide's container commands (those naming `"$CT1"`), for the port `port` and the
    /// container namespace `ns`.
    fn container(&self, port: &str, ns: &Netns) -> Vec<Vec<String>> {
        let start = self
            .setup
            .iter()
            .position(|c| c.iter().any(|w| w == "\"$CT1\""))
            .expect("the guide plugs in a container with \"$CT1\"");
        self.setup[start..]
            .iter()
            .take_while(|c| c.iter().any(|w| w == "ct1"))
            .map(|c| {
                c.iter()
                    .map(|w| match w.as_str() {
                        "\"$CT1\"" => ns.name.clone(),
                        "ct1" => port.to_owned(),
                        _ => w.clone(),
                    })
                    .collect()
            })
            .collect()
    }
}

/// The text of `doc` under the heading line `heading`, up to the next `## ` heading.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/linux-bridge.md has no heading {heading:?}"))
        + heading.len()
        + 2;
    let rest = &doc[start..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The fenced code blocks of `lang` in `text`.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, l) if l == format!("```{lang}") => current = Some(String::new()),
            (Some(_), "```") => found.push(current.take().unwrap()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    found
}

/// The topology with the guide's bridge in the gateway ("host") namespace, and the processes
/// and namespaces the test adds to it.
struct Bridge {
    // Dropped in this order: processes, then their namespaces, then the topology.
    procs: Vec<Proc>,
    containers: Vec<Netns>,
    topo: Topology,
    guide: Guide,
}

impl Bridge {
    /// The topology's namespaces and servers, then the guide's set-up in the host namespace
    /// with its `ct1` in the topology's client namespace, whose `eth0` is brought up.
    fn new(opts: Options) -> Bridge {
        require_programs(&["udhcpc", "tcpdump", "tshark", "curl"]);
        let guide = Guide::read();
        let topo = Topology::new(opts);
        for cmd in &guide.setup {
            let args: Vec<&str> = cmd
                .iter()
                .map(|w| {
                    if w == "\"$CT1\"" {
                        topo.client.name.as_str()
                    } else {
                        w.as_str()
                    }
                })
                .collect();
            eprintln!("guide: {}", args.join(" "));
            topo.gw.exec_ok(&args);
        }
        topo.client.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        Bridge {
            procs: Vec::new(),
            containers: Vec::new(),
            topo,
            guide,
        }
    }

    /// A new container namespace plugged into the bridge as `port` with the guide's container
    /// commands; its `eth0` gets `mac` (else keeps the kernel's random one) and is brought up.
    /// Returns its index in `containers`.
    fn plug(&mut self, port: &str, mac: Option<&str>) -> usize {
        let ns = Netns::new("hbct");
        for cmd in self.guide.container(port, &ns) {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            eprintln!("guide: {}", args.join(" "));
            self.topo.gw.exec_ok(&args);
        }
        if let Some(mac) = mac {
            ns.exec_ok(&["ip", "link", "set", "eth0", "address", mac]);
        }
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        self.containers.push(ns);
        self.containers.len() - 1
    }

    /// The ports of `br0`.
    fn ports(&self) -> Vec<String> {
        self.topo
            .gw
            .exec_ok(&["ip", "-o", "link", "show", "master", "br0"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_owned())
            .collect()
    }

    /// hubnat with the guide's `bridge.toml` (and the topology's additions), as the guide's
    /// run command does; returns once it has started and its control socket answers.
    fn start_hubnat(&mut self) {
        assert_eq!(
            self.guide.run, "hubnat run --config bridge.toml",
            "the guide's run command is the one the topology uses"
        );
        let bridge_toml = self.guide.bridge_toml.clone();
        self.topo.start_hubnat(&bridge_toml);
        let log = self.topo.hubnat_log.clone();
        let sock = self.sock();
        let topo = &mut self.topo;
        wait_until(Duration::from_secs(20), "hubnat to start on br0", || {
            assert!(topo.hubnat_running(), "hubnat exited:\n{}", read(&log));
            read(&log).contains("hubnat started")
                && common::cli::cli(&sock, &["status"]).status.success()
        });
    }

    /// hubnat's control socket (the default: in the state directory).
    fn sock(&self) -> PathBuf {
        self.topo.path("state").join("control.sock")
    }

    /// hubnat's DHCP counters (`hubnat status --json`).
    fn dhcp_counters(&self) -> HashMap<String, u64> {
        let status = json(&self.sock(), &["status", "--json"]);
        status["dhcp"]
            .as_object()
            .expect("status.dhcp")
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    }

    /// dnsmasq as a DHCP server (no DNS) on `dev` in the container `container` (`None`: the
    /// host namespace), range 192.168.30.210–240, answering [`SLOW_MAC`] 2 s late; returns once
    /// it has started, with the path of its log.
    fn start_dnsmasq(&mut self, container: Option<usize>, dev: &str, name: &str) -> PathBuf {
        let log = self.topo.path(&format!("{name}.log"));
        let ns = match container {
            Some(i) => &self.containers[i],
            None => &self.topo.gw,
        };
        let mut cmd = ns.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--interface={dev}"),
            &format!(
                "--dhcp-range=192.168.30.{},192.168.30.{},255.255.255.0,2m",
                OTHER_RANGE.0, OTHER_RANGE.1
            ),
            "--no-ping",
            &format!("--dhcp-host={SLOW_MAC},set:slow"),
            "--dhcp-reply-delay=tag:slow,2",
            "--log-facility=-",
            "--user=root",
            "--group=root",
            &format!(
                "--pid-file={}",
                self.topo.path(&format!("{name}.pid")).display()
            ),
            &format!(
                "--dhcp-leasefile={}",
                self.topo.path(&format!("{name}.leases")).display()
            ),
        ]);
        let mut p = Proc::spawn(cmd, name, &log);
        wait_until(Duration::from_secs(15), "dnsmasq to start", || {
            assert!(p.is_running(), "dnsmasq exited:\n{}", read(&log));
            read(&log).contains("DHCP, IP range")
        });
        self.procs.push(p);
        log
    }

    /// tcpdump of the DHCP traffic on `br0` (every port's frames, and hubnat's), into
    /// `segment.pcap`; returns once it listens.
    fn start_capture(&mut self) {
        let log = self.topo.path("tcpdump.log");
        let mut cmd = self.topo.gw.command("tcpdump");
        cmd.args([
            "-i",
            "br0",
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
        ])
        .arg(self.topo.path("segment.pcap"))
        .args(["udp", "port", "67", "or", "udp", "port", "68"]);
        let mut p = Proc::spawn(cmd, "tcpdump", &log);
        wait_until(Duration::from_secs(15), "tcpdump to listen", || {
            assert!(p.is_running(), "tcpdump exited:\n{}", read(&log));
            read(&log).contains("listening on")
        });
        self.procs.push(p);
    }

    /// Stops the capture (SIGTERM: it closes the file) and returns its DHCP messages: (Ethernet
    /// source, message type, client hardware address, server identifier, offered address).
    fn stop_capture(&mut self) -> Vec<[String; 5]> {
        let i = self
            .procs
            .iter()
            .position(|p| p.what == "tcpdump")
            .expect("a capture");
        // Let the last frames reach the file first.
        std::thread::sleep(Duration::from_millis(300));
        self.procs.remove(i).stop();
        #[rustfmt::skip]
        let args = [
            "-Y", "dhcp", "-T", "fields",
            "-e", "eth.src", "-e", "dhcp.option.dhcp", "-e", "dhcp.hw.mac_addr",
            "-e", "dhcp.option.dhcp_server_id", "-e", "dhcp.ip.your",
        ];
        tshark(&self.topo.path("segment.pcap"), &args)
            .lines()
            .map(|l| {
                // A field that occurs twice (the hardware address of `chaddr` and of a client
                // identifier) is joined with commas: the first is the message's own.
                let mut f = l
                    .split('\t')
                    .map(|v| v.split(',').next().unwrap().to_owned());
                std::array::from_fn(|_| f.next().unwrap_or_default())
            })
            .collect()
    }

    /// The end of a test: hubnat still runs and stops cleanly on SIGTERM (as
    /// `Topology::finish`), then the test's own processes stop. The rest goes with the drop.
    fn finish(mut self) {
        assert!(
            self.topo.hubnat_running(),
            "hubnat exited during the test:\n{}",
            read(&self.topo.hubnat_log)
        );
        let status = self.topo.stop_hubnat();
        assert!(
            status.success(),
            "hubnat exit status {status} on SIGTERM:\n{}",
            read(&self.topo.hubnat_log)
        );
        for p in self.procs.drain(..) {
            p.stop();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in [
                "dhcp-server.log",
                "dnsmasq-on-br0.log",
                "tcpdump.log",
                "state/security.log",
            ] {
                let text = read(&self.topo.path(name));
                if !text.is_empty() {
                    eprintln!("---- {name} ----\n{text}");
                }
            }
            if let Ok(dir) = std::fs::read_dir(self.topo.path("")) {
                for e in dir.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("lease-") {
                        eprintln!("---- {name} ----\n{}", read(&e.path()));
                    }
                }
            }
        }
    }
}

/// A one-shot DHCP exchange by busybox udhcpc on `eth0` in `ns` (`-q -n`: it quits once bound,
/// or after `tries` DISCOVERs a second apart), with the fixture script that configures the
/// address and the default route. `broadcast` asks the servers for broadcast replies (`-B`).
/// Returns the fields of the `bound` event, if any; the events and udhcpc's output are kept in
/// `lease-NAME.log` and `lease-NAME.out`.
fn lease(
    topo: &Topology,
    ns: &Netns,
    name: &str,
    broadcast: bool,
    tries: u32,
) -> Option<HashMap<String, String>> {
    let events = topo.path(&format!("lease-{name}.log"));
    let mut cmd = ns.command("udhcpc");
    cmd.env("TEST_HUBNAT_EVENTS", &events)
        .args(["-f", "-q", "-n", "-i", "eth0", "-s"])
        .arg(common::topology::fixture("udhcpc-script.sh"))
        .args(["-t", &tries.to_string(), "-T", "1"]);
    if broadcast {
        cmd.arg("-B");
    }
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().expect("udhcpc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(topo.path(&format!("lease-{name}.out")), &text).unwrap();
    let bound = read(&events)
        .contains("event=bound")
        .then(|| fields(&read(&events), "event=bound"));
    eprintln!(
        "udhcpc {name} ({}, {:?}): {:?}",
        out.status,
        started.elapsed(),
        bound
    );
    bound
}

/// The last byte of `ip`, which must be on the segment 192.168.30.0/24.
fn host_part(ip: &str) -> u8 {
    ip.strip_prefix("192.168.30.")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{ip} is not on the segment"))
}

fn in_range(ip: &str, (lo, hi): (u8, u8)) -> bool {
    (lo..=hi).contains(&host_part(ip))
}

/// The MAC of `eth0` in `ns`.
fn mac_of(ns: &Netns) -> String {
    ns.exec_ok(&["cat", "/sys/class/net/eth0/address"])
        .trim()
        .to_owned()
}

/// *With `ip`* and *Sharing the bridge*: a container on the guide's bridge gets a lease from
/// hubnat and downloads through its NAT; with the guide's `serve_macs`/`ignore_macs`, a
/// container inside them gets a lease and two outside get no answer.
#[test]
fn the_guides_bridge_serves_its_containers_and_only_the_macs_it_lists() {
    if !require_root("the_guides_bridge_serves_its_containers_and_only_the_macs_it_lists") {
        return;
    }
    let started = Instant::now();
    let size = 2 << 20;
    let mut b = Bridge::new(Options {
        files: vec![("blob".into(), size)],
        ..Options::default()
    });
    let ports = b.ports();
    assert!(
        ports.iter().any(|p| p == "vm1") && ports.iter().any(|p| p == "ct1"),
        "the ports of br0: {ports:?}"
    );
    let vm1 = b
        .topo
        .gw
        .exec_ok(&["ip", "-o", "link", "show", "dev", "vm1"]);
    assert!(
        vm1.contains("NO-CARRIER"),
        "a TAP device with no reader: {vm1}"
    );

    // The guide's bridge.toml: every container is served.
    b.start_hubnat();
    let ip = b.topo.dhcp("eth0");
    let bound = fields(&read(&b.topo.path("udhcpc-events.log")), "event=bound");
    eprintln!("ct1 (MAC {}): {bound:?}", mac_of(&b.topo.client));
    assert!(in_range(&ip, HUBNAT_RANGE), "{ip}");
    assert_eq!(bound["serverid"], VHOST_IP);
    assert_eq!(bound["router"], VHOST_IP);
    let out = b.topo.path("blob.downloaded");
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/files/blob");
    let t = Instant::now();
    let result = b
        .topo
        .curl(&["--fail", "-o", out.to_str().unwrap(), &url])
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    assert!(
        result.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(sha256(&out), sha256(&b.topo.www.join("blob")));
    eprintln!(
        "ct1 downloaded {size} bytes through the NAT in {:?}, SHA-256 {}",
        t.elapsed(),
        sha256(&out)
    );

    // The guide's [dhcp] table of "Sharing the bridge" added: only the MACs it lists.
    b.topo.stop_process("udhcpc");
    let status = b.topo.stop_hubnat();
    assert!(status.success(), "hubnat exit status {status}");
    b.topo.opts.config = b.guide.sharing_toml.clone();
    b.start_hubnat();
    let served = b.plug("ct2", Some(SERVED_MAC));
    let ignored = b.plug("ct3", Some(IGNORED_MAC));
    let got = lease(&b.topo, &b.containers[served], "served", false, 10)
        .expect("a container in serve_macs gets a lease");
    assert!(in_range(&got["ip"], HUBNAT_RANGE), "{got:?}");
    assert_eq!(got["serverid"], VHOST_IP);
    b.containers[served].exec_ok(&["ping", "-c", "1", "-W", "3", VHOST_IP]);
    let ct1_mac = mac_of(&b.topo.client);
    assert!(!ct1_mac.starts_with("52:54:00:"), "{ct1_mac}");
    let (ignored_lease, outside_lease) = std::thread::scope(|s| {
        let ignored = s.spawn(|| lease(&b.topo, &b.containers[ignored], "ignored", false, 3));
        let outside = s.spawn(|| lease(&b.topo, &b.topo.client, "outside", false, 3));
        (ignored.join().unwrap(), outside.join().unwrap())
    });
    assert_eq!(ignored_lease, None, "{IGNORED_MAC} is in ignore_macs");
    assert_eq!(outside_lease, None, "{ct1_mac} is outside serve_macs");
    let c = b.dhcp_counters();
    eprintln!("hubnat's DHCP counters after the restart: {c:?}");
    // One client answered (a busy machine may make it send a message twice); the two others'
    // three DISCOVERs each reached hubnat and got nothing.
    assert!(
        c["offers"] >= 1 && c["acks"] >= 1 && c["naks"] == 0,
        "{c:?}"
    );
    assert_eq!(c["not_served"], 3 + 3, "{c:?}");
    assert!(c["discovers"] > c["not_served"], "{c:?}");
    // The security log (kept across the restart): ct1's lease before the restart, ct2's after,
    // nothing for the other two.
    let seclog = b.topo.security_log();
    let created = |mac: &str| {
        seclog
            .lines()
            .filter(|l| l.contains("DHCP lease created") && l.contains(&format!("mac={mac} ")))
            .count()
    };
    assert_eq!(created(&ct1_mac), 1, "{seclog}");
    assert_eq!(created(SERVED_MAC), 1, "{seclog}");
    assert_eq!(created(IGNORED_MAC), 0, "{seclog}");
    assert!(
        seclog.contains(&format!("mac={SERVED_MAC} ip={} ", got["ip"])),
        "{seclog}"
    );
    b.finish();
    eprintln!("bridge guide: {:?}", started.elapsed());
}

/// *Another DHCP server on the bridge*: dnsmasq on a port of the bridge. hubnat notices it
/// (its probe at start), says so once, and leaves every client to it; once made authoritative
/// it answers too.
#[test]
fn hubnat_stays_quiet_beside_another_dhcp_server_until_made_authoritative() {
    if !require_root("hubnat_stays_quiet_beside_another_dhcp_server_until_made_authoritative") {
        return;
    }
    require_programs(&["dnsmasq"]);
    let started = Instant::now();
    let mut b = Bridge::new(Options::default());
    let ds = b.plug("ds1", None);
    b.containers[ds].exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{OTHER_DHCP_IP}/24"),
        "dev",
        "eth0",
    ]);
    let ds_mac = mac_of(&b.containers[ds]);
    let dnsmasq_log = b.start_dnsmasq(Some(ds), "eth0", "dhcp-server");
    b.start_capture();
    b.start_hubnat();
    let log = b.topo.hubnat_log.clone();
    wait_until(
        Duration::from_secs(10),
        "hubnat's warning about the other DHCP server",
        || read(&log).contains(WARNING),
    );
    let warning = read(&log)
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap()
        .to_owned();
    eprintln!("hubnat: {warning}");
    assert!(
        warning.contains(&b.guide.warning)
            && warning.contains(&format!("server={OTHER_DHCP_IP} mac={ds_mac}")),
        "the guide shows {:?}; hubnat logged {warning:?}",
        b.guide.warning
    );

    // Several exchanges: the other server answers every one, hubnat none. Two ask for broadcast
    // replies, which hubnat sees too.
    let ct1_mac = mac_of(&b.topo.client);
    for (n, broadcast) in [false, true, true].into_iter().enumerate() {
        let got = lease(
            &b.topo,
            &b.topo.client,
            &format!("quiet-{n}"),
            broadcast,
            10,
        )
        .expect("a lease from the other server");
        assert_eq!(got["serverid"], OTHER_DHCP_IP, "{got:?}");
        assert!(in_range(&got["ip"], OTHER_RANGE), "{got:?}");
    }
    let c = b.dhcp_counters();
    eprintln!("hubnat's DHCP counters, not authoritative: {c:?}");
    assert_eq!((c["offers"], c["acks"], c["naks"]), (0, 0, 0), "{c:?}");
    assert!(c["discovers"] >= 3 && c["requests"] >= 3, "{c:?}");
    assert_eq!(c["quiet"], c["discovers"] + c["requests"], "{c:?}");
    assert!(c["probes"] >= 1, "{c:?}");
    // The reply to the probe, and the OFFER and ACK of each broadcast exchange.
    let (probe_reply, broadcast_replies) = (1, 2 * 2);
    assert!(
        c["other_server_replies"] >= probe_reply + broadcast_replies,
        "{c:?}"
    );

    // Made authoritative, as the guide says: hubnat answers too, and its offer comes first to
    // the client the other server answers late.
    let args: Vec<&str> = b.guide.authoritative.iter().map(String::as_str).collect();
    eprintln!("guide: hubnat {}", args.join(" "));
    ok(&b.sock(), &args);
    let slow = b.plug("ct2", Some(SLOW_MAC));
    let got = lease(&b.topo, &b.containers[slow], "authoritative", false, 10)
        .expect("a lease once authoritative");
    assert_eq!(got["serverid"], VHOST_IP, "{got:?}");
    assert!(in_range(&got["ip"], HUBNAT_RANGE), "{got:?}");
    let c = b.dhcp_counters();
    eprintln!("hubnat's DHCP counters, authoritative: {c:?}");
    assert!(c["offers"] >= 1 && c["acks"] >= 1, "{c:?}");
    wait_until(
        Duration::from_secs(10),
        "the other server's late offer",
        || {
            read(&dnsmasq_log)
                .lines()
                .any(|l| l.contains("DHCPOFFER(eth0)") && l.contains(SLOW_MAC))
        },
    );

    // On the wire: hubnat's probe, no reply of hubnat's to the first container, and its OFFER
    // and ACK to the second; the other server's replies to both.
    let msgs = b.stop_capture();
    for m in &msgs {
        eprintln!("capture: {}", m.join(" "));
    }
    let from = |src: &str, kind: &str, chaddr: &str| {
        msgs.iter()
            .filter(|m| m[0] == src && m[1] == kind && m[2] == chaddr)
            .count()
    };
    assert!(from(HOST_MAC, "1", HOST_MAC) >= 1, "hubnat's probe");
    for kind in ["2", "5", "6"] {
        assert_eq!(from(HOST_MAC, kind, &ct1_mac), 0, "hubnat answered ct1");
    }
    assert!(from(HOST_MAC, "2", SLOW_MAC) >= 1, "hubnat's OFFER");
    assert!(from(HOST_MAC, "5", SLOW_MAC) >= 1, "hubnat's ACK");
    assert!(from(&ds_mac, "2", HOST_MAC) >= 1, "the answer to the probe");
    assert!(from(&ds_mac, "5", &ct1_mac) >= 3, "the other server's ACKs");
    assert!(
        msgs.iter()
            .filter(|m| m[0] == HOST_MAC && m[1] == "2")
            .all(|m| m[3] == VHOST_IP && in_range(&m[4], HUBNAT_RANGE)),
        "hubnat's offers"
    );

    // Said once, however many replies it saw.
    let text = read(&log);
    assert_eq!(text.matches(WARNING).count(), 1, "{text}");
    let seclog = b.topo.security_log();
    assert_eq!(seclog.matches(SECLOG_OTHER).count(), 1, "{seclog}");
    let line = seclog.lines().find(|l| l.contains(SECLOG_OTHER)).unwrap();
    eprintln!("security log: {line}");
    b.finish();
    eprintln!("another DHCP server: {:?}", started.elapsed());
}

/// *With libvirt*: a DHCP server on the bridge device itself, in the host's own stack, as
/// libvirt runs its dnsmasq. hubnat cannot see it (its replies are the host's own frames,
/// which the raw backend leaves alone, and hubnat's probe goes to the ports, not up to the
/// host), so both answer. The guide says so and tells libvirt users to turn libvirt's DHCP
/// off; this test keeps that statement true.
#[test]
fn a_dhcp_server_on_the_bridge_device_itself_goes_unseen() {
    if !require_root("a_dhcp_server_on_the_bridge_device_itself_goes_unseen") {
        return;
    }
    require_programs(&["dnsmasq"]);
    let started = Instant::now();
    let mut b = Bridge::new(Options::default());
    b.topo.gw.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{OTHER_DHCP_IP}/24"),
        "dev",
        "br0",
    ]);
    let dnsmasq_log = b.start_dnsmasq(None, "br0", "dnsmasq-on-br0");
    b.start_hubnat();
    wait_until(Duration::from_secs(10), "hubnat's probe", || {
        b.dhcp_counters()["probes"] >= 1
    });
    let got = lease(&b.topo, &b.topo.client, "libvirt-shape", true, 10).expect("a lease");
    eprintln!("the client took {got:?}");
    wait_until(Duration::from_secs(10), "dnsmasq's offer", || {
        read(&dnsmasq_log).contains("DHCPOFFER(br0)")
    });
    let c = b.dhcp_counters();
    eprintln!("hubnat's DHCP counters beside dnsmasq on br0: {c:?}");
    let text = read(&b.topo.hubnat_log);
    assert!(
        c["offers"] >= 1 && c["other_server_replies"] == 0 && !text.contains(WARNING),
        "hubnat now sees a DHCP server on the bridge device itself: update \
         docs/linux-bridge.md (With libvirt) and this test. Counters {c:?}\n{text}"
    );
    b.finish();
    eprintln!("DHCP server on br0: {:?}", started.elapsed());
}
