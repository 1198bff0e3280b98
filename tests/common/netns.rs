//! Network namespaces and processes for tests with real third-party clients.
//!
//! Safety rules (DESIGN.md): every test makes its own namespaces with names unique to the test
//! process, uses only the project's test addresses inside them, stops what it started by PID,
//! and removes its namespaces on the way out (also when it panics: the guards' `Drop`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// True when the test may touch namespaces. Without root the test is skipped, except under CI,
/// where a skipped network test would hide a broken set-up: then it fails.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (network namespaces, TAP devices), and CI must run it");
    }
    eprintln!("{test}: skipped: needs root for network namespaces and TAP devices");
    false
}

/// `tshark -r FILE` with the given arguments; panics if tshark cannot read the file.
pub fn tshark(file: &Path, args: &[&str]) -> String {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test with a clear message when a required program is missing.
pub fn require_programs(programs: &[&str]) {
    for p in programs {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{p} is not installed: run scripts/test.sh (it installs the test clients)"
        );
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process: `{prefix}{pid}{n}`, at most 15 bytes.
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// Runs `ip` with `args` and returns its output; panics with the command and stderr on failure.
pub fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .expect("run command in namespace")
    }

    /// Runs a command inside the namespace and panics if it fails.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {}: {}{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `dev` exists in the namespace.
    pub fn wait_for_link(&self, dev: &str, limit: Duration) {
        wait_until(limit, &format!("link {dev} in {}", self.name), || {
            self.exec(&["ip", "link", "show", "dev", dev])
                .status
                .success()
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process, stopped by its PID on drop (SIGTERM, then SIGKILL).
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        Proc {
            child,
            what: what.into(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                std::mem::forget(self);
                return status;
            }
            if Instant::now() > deadline {
                self.signal(libc::SIGKILL);
                panic!("{} did not stop within 10 s of SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `limit` naming `what`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a file, empty if missing.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The hubnat binary under test.
pub fn hubnat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hubnat"))
}

/// The `key=value` fields of the last line of `text` that starts with `marker`. A word without
/// `=` continues the value before it (a list of DNS servers). Panics, showing `text`, when no
/// line starts with `marker`.
pub fn fields(text: &str, marker: &str) -> std::collections::HashMap<String, String> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with(marker))
        .unwrap_or_else(|| panic!("no line starting with {marker:?} in:\n{text}"));
    let mut map = std::collections::HashMap::new();
    let mut last: Option<String> = None;
    for part in line.split(' ') {
        match (part.split_once('='), &last) {
            (Some((k, v)), _) => {
                map.insert(k.to_owned(), v.to_owned());
                last = Some(k.to_owned());
            }
            (None, Some(k)) => {
                let value: &mut String = map.get_mut(k).expect("invariant: inserted above");
                value.push(' ');
                value.push_str(part);
            }
            (None, None) => {}
        }
    }
    map
}

/// A veth pair `a` (in `na`) — `b` (in `nb`), both up at `mtu`.
pub fn veth(na: &Netns, a: &str, nb: &Netns, b: &str, mtu: &str) {
    na.exec_ok(&[
        "ip", "link", "add", a, "mtu", mtu, "type", "veth", "peer", "name", b, "mtu", mtu, "netns",
        &nb.name,
    ]);
    na.exec_ok(&["ip", "link", "set", a, "up"]);
    nb.exec_ok(&["ip", "link", "set", b, "up"]);
}
