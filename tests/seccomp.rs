//! The seccomp filter of `hubnat run` (`process.seccomp`, `src/seccomp.rs`), on the real
//! binary: on by default on every thread (`Seccomp: 2` in `/proc/PID/status` and in each
//! task's), off when asked, a bad value refused with the key named; and a gateway with the
//! filter enforced that goes through the paths that make unusual system calls — policy calls
//! that loop, grow their memory and trap, a capture that rotates, `policy reload` and SIGHUP,
//! the memory limit's reading, a TCP echo through the NAT, a lease, then SIGTERM with the
//! leases saved — and is still alive after each (a missing call kills it with SIGSYS).
//!
//! The gateway runs on the hub backend, connected to a hub socket the test listens on (a Unix
//! socket in its temporary directory), with a smoltcp client on that hub; the only outside
//! hosts are listeners of the test on 127.0.0.1 (`nat.allow_host_loopback`). Every process
//! the test starts is stopped by its PID.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant as StdInstant};

use common::cli::{cli, json, ok};
use common::netns::{hubnat_bin, read, wait_until, Proc};
use common::smol_client::{acquire, SmolClient};
use hubnat_backend::capture::rotated_path;
use hubnat_hub::{Endpoint, HubSocket, HubSocketConfig};
use smoltcp::socket::tcp::State;
use smoltcp::time::Instant;

/// A `hubnat run` on the hub backend, connected to a hub socket of the test.
struct Gateway {
    proc: Proc,
    hub: HubSocket,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Gateway {
    /// Starts `hubnat run` with `config` (the text of its configuration file, given the
    /// temporary directory) and `flags`, and waits until its control API answers.
    fn start(config: impl Fn(&Path) -> String, flags: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let hub_path = dir.path().join("hub.sock");
        let hub = HubSocket::start(HubSocketConfig::new(
            1500,
            vec![Endpoint::Unix(hub_path.clone())],
        ))
        .expect("the test's hub socket starts");
        let file = dir.path().join("hubnat.toml");
        std::fs::write(&file, config(dir.path())).unwrap();
        let log = dir.path().join("hubnat.log");
        let mut cmd = Command::new(hubnat_bin());
        cmd.args(["run", "--backend", "hub", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--hub-connect")
            .arg(format!("unix:{}", hub_path.display()))
            .args(flags)
            .env_remove("RUST_LOG");
        let mut proc = Proc::spawn(cmd, "hubnat", &log);
        let gw_sock = dir.path().join("state/control.sock");
        let deadline = StdInstant::now() + Duration::from_secs(20);
        loop {
            assert!(proc.is_running(), "hubnat stopped: {}", read(&log));
            if gw_sock.exists() && cli(&gw_sock, &["status", "--json"]).status.success() {
                break;
            }
            assert!(
                StdInstant::now() < deadline,
                "hubnat did not answer: {}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Gateway {
            proc,
            hub,
            dir,
            log,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("state/control.sock")
    }

    fn log(&self) -> String {
        read(&self.log)
    }

    /// Panics with the log when the gateway has died (SIGSYS shows as signal 31).
    fn alive(&mut self, after: &str) {
        if let Some(status) = self.proc.child.try_wait().expect("wait") {
            panic!(
                "hubnat died after {after}: {status} (SIGSYS: a system call the filter lacks; \
                 dmesg | grep -i seccomp names it)\n{}",
                self.log()
            );
        }
    }
}

/// `Seccomp` and `Seccomp_filters` of `/proc/PID/status` (or of a task's status file).
fn seccomp_fields(status: &Path) -> (String, String) {
    let text = read(status);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

/// The fields for the process and each of its threads, (name, Seccomp, Seccomp_filters).
fn every_thread(pid: i32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let name = read(&task.path().join("comm")).trim().to_owned();
        let (mode, filters) = seccomp_fields(&task.path().join("status"));
        out.push((name, mode, filters));
    }
    out
}

/// Whether this test process runs without a seccomp filter (its children start from there).
fn unfiltered_here() -> bool {
    seccomp_fields(Path::new("/proc/self/status")).0 == "0"
}

const BASE: &str = "[nat]\nallow_host_loopback = true\n[dns]\nupstream = []\n";

#[test]
fn enforce_is_the_default_and_covers_every_thread() {
    if !unfiltered_here() {
        eprintln!("skipped: this test process runs under a seccomp filter already");
        return;
    }
    let mut gw = Gateway::start(|_| BASE.to_owned(), &[]);
    let pid = gw.proc.pid();
    assert_eq!(
        seccomp_fields(Path::new(&format!("/proc/{pid}/status"))),
        ("2".to_owned(), "2".to_owned()),
        "mode 2 (filter), the allow-list and clone3's filter"
    );
    let threads = every_thread(pid);
    assert!(threads.len() >= 2, "{threads:?}");
    for (name, mode, filters) in &threads {
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("2", "2"),
            "thread {name}"
        );
    }
    let log = gw.log();
    assert!(
        log.contains("seccomp filter on (process.seccomp = \"enforce\")"),
        "{log}"
    );
    // The CLI works against it, and it stops cleanly.
    json(&gw.sock(), &["status", "--json"]);
    gw.alive("status");
    let status = gw.proc.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn off_leaves_it_off_and_log_installs_it() {
    if !unfiltered_here() {
        eprintln!("skipped: this test process runs under a seccomp filter already");
        return;
    }
    let gw = Gateway::start(|_| BASE.to_owned(), &["--set", "process.seccomp=\"off\""]);
    let pid = gw.proc.pid();
    for (name, mode, filters) in every_thread(pid) {
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("0", "0"),
            "thread {name}"
        );
    }
    assert!(gw.log().contains("seccomp filter off"), "{}", gw.log());
    assert!(gw.proc.stop().success());

    let gw = Gateway::start(|_| format!("{BASE}[process]\nseccomp = \"log\"\n"), &[]);
    let pid = gw.proc.pid();
    for (name, mode, filters) in every_thread(pid) {
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("2", "2"),
            "thread {name}"
        );
    }
    assert!(
        gw.log().contains("seccomp filter on, logging only"),
        "{}",
        gw.log()
    );
    assert!(gw.proc.stop().success());
}

#[test]
fn a_bad_value_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["config", "run"] {
        let out = Command::new(hubnat_bin())
            .args([
                command,
                "--set",
                "process.seccomp=\"strict\"",
                "--state-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {err}");
        assert!(
            err.contains("config key process.seccomp = \"strict\"")
                && err.contains("enforce, log, off"),
            "{command}: {err}"
        );
    }
}

/// Polls `client` until `done`, for at most 10 s.
fn poll_until(client: &mut SmolClient, what: &str, mut done: impl FnMut(&mut SmolClient) -> bool) {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while !done(client) {
        assert!(StdInstant::now() < deadline, "timed out: {what}");
        client.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Connects from `local_port` to 127.0.0.1:`port`; the state once the SYN is answered.
fn connect(
    client: &mut SmolClient,
    port: u16,
    local_port: u16,
) -> (smoltcp::iface::SocketHandle, State) {
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), local_port);
    poll_until(client, "an answer to the SYN", |c| {
        c.tcp(h).state() != State::SynSent
    });
    (h, client.tcp(h).state())
}

#[test]
fn the_filtered_gateway_survives_traps_timeouts_rotation_reloads_and_sigterm() {
    if !unfiltered_here() {
        eprintln!("skipped: this test process runs under a seccomp filter already");
        return;
    }
    let policy = hubnat::policy::built_component("misbehave");
    // misbehave: remote port 1 loops, 2 grows its memory without bound, 3 panics (a trap).
    let config = |dir: &Path, timeout: &str| {
        format!(
            "{BASE}[capture]\npath = {:?}\nmax_size = \"4KiB\"\nmax_files = 2\n\
             [[policy]]\nname = \"misbehave\"\npath = {:?}\non_error = \"deny\"\n\
             timeout = \"{timeout}\"\nmemory = \"4MiB\"\n",
            dir.join("capture.pcap").display().to_string(),
            policy.display().to_string()
        )
    };
    let mut gw = Gateway::start(|dir| config(dir, "5ms"), &[]);
    let sock = gw.sock();
    let pid = gw.proc.pid();
    assert_eq!(
        seccomp_fields(Path::new(&format!("/proc/{pid}/status"))).0,
        "2"
    );

    let mac = [0x52, 0, 0, 0x5e, 0xcc, 0x01];
    let mut client = SmolClient::new(gw.hub.hub().connect(), mac, Instant::now());
    acquire(&mut client, Duration::from_secs(15));
    gw.alive("a DHCP exchange");

    // A TCP echo through the NAT: a host socket, its task, the relay; enough bytes to rotate
    // the 4 KiB capture several times.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
    });
    let (h, state) = connect(&mut client, port, 40000);
    assert_eq!(state, State::Established, "{}", gw.log());
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut sent, mut got) = (0, Vec::new());
    poll_until(&mut client, "the echo", |c| {
        let s = c.tcp(h);
        if sent < data.len() && s.can_send() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        if s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() == data.len()
    });
    assert!(got == data, "the echo came back changed");
    client.tcp(h).close();
    poll_until(&mut client, "the close", |c| {
        matches!(c.tcp(h).state(), State::Closed | State::TimeWait)
    });
    echo.join().unwrap();
    gw.alive("a TCP echo through the NAT");
    let pcap = gw.dir.path().join("capture.pcap");
    wait_until(Duration::from_secs(5), "a rotated capture", || {
        rotated_path(&pcap, 1).exists()
    });

    // Policy calls that loop (the epoch deadline), grow their memory (the limit) and trap:
    // each is an error, so the session is refused (on_error = "deny"), and the gateway lives.
    for (remote_port, what) in [
        (1, "a policy call that loops"),
        (2, "one that grows its memory"),
        (3, "one that traps"),
    ] {
        let (_, state) = connect(&mut client, remote_port, 40000 + remote_port);
        assert_eq!(state, State::Closed, "{what}: refused");
        gw.alive(what);
    }

    // Each call failed (the one that grows its memory may meet the 5 ms deadline before the
    // memory limit on a busy machine).
    let calls = &json(&sock, &["policy", "list", "--json"])[0]["calls"];
    let count = |key: &str| calls[key].as_u64().unwrap_or_default();
    assert!(
        count("timeouts") >= 1
            && count("traps") == 1
            && count("timeouts") + count("out_of_memory") + count("traps") == 3,
        "{calls}"
    );

    // The control API, a reload through it, and SIGHUP.
    let status = json(&sock, &["status", "--json"]);
    assert!(status.is_object(), "{status}");
    std::fs::write(
        gw.dir.path().join("hubnat.toml"),
        config(gw.dir.path(), "20ms"),
    )
    .unwrap();
    let out = ok(&sock, &["policy", "reload"]);
    assert!(out.contains("misbehave"), "{out}");
    gw.alive("policy reload");
    gw.proc.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(20), "the SIGHUP reload", || {
        gw.log().contains("by=SIGHUP")
    });
    gw.alive("SIGHUP");
    let (_, state) = connect(&mut client, 3, 40010);
    assert_eq!(state, State::Closed, "the reloaded policy traps too");
    gw.alive("a trap after the reloads");

    // SIGTERM: a clean exit, the lease saved.
    let log = gw.log.clone();
    let state_dir = gw.dir.path().join("state");
    let status = gw.proc.stop();
    assert!(status.success(), "{status}: {}", read(&log));
    let leases = read(&state_dir.join("leases.json"));
    assert!(leases.contains("52:00:00:5e:cc:01"), "{leases}");
    let seclog = read(&state_dir.join("security.log"));
    assert!(
        seclog.contains("GATEWAY stopped") || seclog.contains("stopped"),
        "{seclog}"
    );
}
