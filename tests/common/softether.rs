//! SoftEther VPN (Debian's `softether-vpnserver`, `softether-vpnclient`, `softether-vpncmd`)
//! run as a test's own processes, with all of their state in the test's directory.
//!
//! Debian builds SoftEther with its directories compiled in: the configuration in
//! `/var/lib/softether`, logs in `/var/log/softether`, pid and control files in
//! `/run/softether`, and a cache in `/tmp`; the program finds `hamcore.se2` next to itself.
//! So each SoftEther process of a test gets a private tree `DIR/{lib,log,run,tmp}`, with a copy
//! of the program and its `hamcore.se2` in `DIR/lib/prog`, and runs in a mount namespace of
//! its own (`unshare --mount --propagation private`) where that tree is bind-mounted over
//! `/var/lib`, `/var/log`, `/run` and `/tmp`. Nothing of the host's is read or written, and
//! the mounts vanish with the process. It runs in the test's network namespace (`ip netns
//! exec`), which has no link beyond the test's own namespaces, so the server's attempts to
//! reach SoftEther's dynamic DNS and keep-alive hosts fail inside it.
//!
//! `vpnserver execsvc` / `vpnclient execsvc` run in the foreground, but each keeps a watchdog
//! parent that restarts its worker: [`SoftEther::stop`] signals the parent, then the worker, by
//! their PIDs (the worker's read from `/proc` before). Their TAP devices (`tap_NAME` of a local
//! bridge, `vpn_NAME` of a client's virtual adapter) disappear with the worker.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::netns::{wait_until, Netns, Proc};

/// Where Debian installs the programs.
pub const LIBEXEC: &str = "/usr/libexec/softether";

/// True when the three Debian packages are installed.
pub fn installed() -> bool {
    ["vpnserver", "vpnclient", "vpncmd"]
        .iter()
        .all(|p| Path::new(LIBEXEC).join(p).join(p).is_file())
}

/// Panics with the packages to install when SoftEther is missing.
pub fn require_installed() {
    assert!(
        installed(),
        "SoftEther VPN is not installed: apt-get install softether-vpnserver softether-vpnclient \
         softether-vpncmd (scripts/test.sh installs them)"
    );
}

/// A private tree for one SoftEther program (`vpnserver`, `vpnclient` or `vpncmd`): the copy of
/// the program and the directories mounted over the compiled-in ones.
#[derive(Clone, Debug)]
pub struct Tree {
    pub root: PathBuf,
    program: &'static str,
}

impl Tree {
    /// Makes `root/{lib/prog,lib/softether,log/softether,run/softether,tmp}` and copies the
    /// program with its `hamcore.se2` (Debian's is a symbolic link: the copy follows it).
    pub fn new(root: &Path, program: &'static str) -> Tree {
        for d in [
            "lib/prog",
            "lib/softether",
            "log/softether",
            "run/softether",
            "tmp",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let src = Path::new(LIBEXEC).join(program);
        std::fs::copy(src.join(program), root.join("lib/prog").join(program))
            .unwrap_or_else(|e| panic!("copy {program}: {e}"));
        std::fs::copy(src.join("hamcore.se2"), root.join("lib/prog/hamcore.se2"))
            .unwrap_or_else(|e| panic!("copy {program}'s hamcore.se2: {e}"));
        Tree {
            root: root.to_path_buf(),
            program,
        }
    }

    /// `ip netns exec NS unshare --mount … sh -c 'mount --bind …; exec PROGRAM "$@"' sh ARGS`:
    /// the program in `ns` with this tree over its directories. `ip netns exec`, `unshare` and
    /// `sh` each exec the next, so the child's PID is the program's.
    pub fn command(&self, ns: &Netns, args: &[&str]) -> Command {
        let r = self.root.display();
        let script = format!(
            "mount --bind {r}/lib /var/lib && mount --bind {r}/log /var/log && \
             mount --bind {r}/run /run && mount --bind {r}/tmp /tmp && \
             exec /var/lib/prog/{p} \"$@\"",
            p = self.program
        );
        let mut c = ns.command("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg("sh")
            .args(args);
        c
    }
}

/// A running `vpnserver execsvc` or `vpnclient execsvc`.
pub struct SoftEther {
    proc: Option<Proc>,
    pub tree: Tree,
    pub log: PathBuf,
    what: String,
}

impl SoftEther {
    /// Starts `PROGRAM execsvc` in `ns` from `tree`, its output in `log`.
    pub fn start(ns: &Netns, tree: &Tree, log: &Path) -> SoftEther {
        let what = format!("{} in {}", tree.program, ns.name);
        let proc = Proc::spawn(tree.command(ns, &["execsvc"]), &what, log);
        SoftEther {
            proc: Some(proc),
            tree: tree.clone(),
            log: log.to_path_buf(),
            what,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.as_ref().expect("running").pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.is_running())
    }

    /// Stops the watchdog, then its worker, by PID (SIGTERM, SIGKILL after 10 s), and waits
    /// until both are gone.
    pub fn stop(&mut self) {
        let Some(mut parent) = self.proc.take() else {
            return;
        };
        let workers = children(parent.pid());
        parent.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while parent.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(parent); // SIGKILL if it still runs
        for w in workers {
            signal_and_reap(w, &self.what);
        }
    }
}

impl Drop for SoftEther {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The PIDs of `pid`'s children (its worker).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGTERM to a worker whose parent (our child) is gone, then SIGKILL after 10 s; it is not our
/// child, so it is polled through `kill(pid, 0)` until it disappears.
fn signal_and_reap(pid: i32, what: &str) {
    let alive = || {
        // A zombie still answers kill(0); a reaped or exited-and-reparented one does not stay.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && !stat.contains(") Z ")
    };
    // SAFETY: signalling a process this test started (the worker of its SoftEther), by PID.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            eprintln!("softether: {what}'s worker {pid} needed SIGKILL");
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vpncmd` against a server or client in `ns`, from its own tree.
pub struct Vpncmd {
    tree: Tree,
    /// `localhost:5555 /SERVER` or `localhost /CLIENT`.
    target: Vec<String>,
}

impl Vpncmd {
    /// The admin tool for the VPN Server listening on `port` in `ns`.
    pub fn server(root: &Path, port: u16) -> Vpncmd {
        Vpncmd {
            tree: Tree::new(root, "vpncmd"),
            target: vec![format!("localhost:{port}"), "/SERVER".into()],
        }
    }

    /// The admin tool for the VPN Client in `ns`.
    pub fn client(root: &Path) -> Vpncmd {
        Vpncmd {
            tree: Tree::new(root, "vpncmd"),
            target: vec!["localhost".into(), "/CLIENT".into()],
        }
    }

    /// Runs `vpncmd TARGET [extra] /CMD COMMAND ARGS...` in `ns`.
    pub fn run(&self, ns: &Netns, extra: &[&str], command: &[&str]) -> Output {
        let mut args: Vec<&str> = self.target.iter().map(String::as_str).collect();
        args.extend(extra);
        args.push("/CMD");
        args.extend(command);
        self.tree
            .command(ns, &args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run vpncmd")
    }

    /// [`run`](Self::run), which must succeed ("The command completed successfully."); its
    /// output.
    pub fn ok(&self, ns: &Netns, extra: &[&str], command: &[&str]) -> String {
        let out = self.run(ns, extra, command);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("The command completed successfully."),
            "vpncmd {extra:?} /CMD {command:?} ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("vpncmd {}: ok", command.join(" "));
        text
    }

    /// Retries `command` until it succeeds (the program is still starting), for `limit`.
    pub fn ok_when_up(&self, ns: &Netns, extra: &[&str], command: &[&str], limit: Duration) {
        let mut last = String::new();
        wait_until(limit, &format!("vpncmd {command:?} to work"), || {
            let out = self.run(ns, extra, command);
            last = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success() && last.contains("The command completed successfully.")
        });
    }
}
