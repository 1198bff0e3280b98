//! Least privilege with the real binary: `hubnat run` started as root that gives up root for
//! `nobody` once its TAP device is open (and still carries a real client's DHCP and curl),
//! hubnat running as `nobody` from the start on the hub backend, and on a persistent TAP
//! device created for `nobody`.
//!
//! Safety rules (DESIGN.md): the namespaces are this test's own (see tests/common/topology.rs
//! and netns.rs), only 10.77.x.y and 192.168.30.0/24 are used, processes are stopped by PID and
//! the namespaces deleted on drop. Needs root (namespaces, TAP devices, `setpriv`).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::netns::{
    hubnat_bin, read, require_programs, require_root, unique, wait_until, Netns, Proc,
};
use common::topology::{Options, Topology, HTTP_PORT, SERVER_IP, VHOST_IP};

const NOBODY: u32 = 65534;

/// The `Key:` line of /proc/PID/status, its first field.
fn proc_status(pid: i32, key: &str) -> String {
    let text = read(Path::new(&format!("/proc/{pid}/status")));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Asserts that `pid` runs as nobody with no capability and no way to gain one.
fn assert_unprivileged(pid: i32) {
    assert_eq!(proc_status(pid, "Uid"), NOBODY.to_string(), "real uid");
    let uids = read(Path::new(&format!("/proc/{pid}/status")));
    let line = uids.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        line.split_whitespace()
            .skip(1)
            .all(|u| u == NOBODY.to_string()),
        "real, effective, saved and fs uids: {line}"
    );
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
}

#[test]
fn started_as_root_it_gives_up_root_once_the_tap_is_open() {
    if !require_root("started_as_root_it_gives_up_root_once_the_tap_is_open") {
        return;
    }
    require_programs(&["curl"]);
    let topo = Topology::tap(Options {
        files: vec![("small".into(), 200_000)],
        config: "[process]\nuser = \"nobody\"\n".into(),
        ..Options::default()
    });
    let pid = topo.hubnat_pid();
    assert_unprivileged(pid);
    // The state directory is nobody's now; the control socket stays root's.
    let state = topo.path("state");
    for name in ["", "leases.json", "security.log", "lock"] {
        let path = state.join(name);
        assert_eq!(
            std::fs::metadata(&path).map(|m| m.uid()).ok(),
            Some(NOBODY),
            "{}",
            path.display()
        );
    }
    assert_eq!(
        std::fs::metadata(state.join("control.sock")).unwrap().uid(),
        0
    );
    // The client got its lease (Topology::tap); the NAT works as nobody.
    let (out, _) = topo.client_run(&[
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://{SERVER_IP}:{HTTP_PORT}/files/small"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200000", "{out:?}");
    // Root still drives it through the control socket.
    let status = Command::new(hubnat_bin())
        .args(["status", "--json", "--control"])
        .arg(state.join("control.sock"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let log = read(&topo.hubnat_log);
    assert!(log.contains("gave up root"), "{log}");
    topo.finish();
}

/// A DHCP DISCOVER from `mac` as the hub socket frames it, and whether an OFFER comes back.
fn offer_through_hub(socket: &Path) -> bool {
    let mut peer = UnixStream::connect(socket).expect("connect to the hub socket");
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let discover = hubnat::core::testkit::dhcp_frame(dhcproto::v4::MessageType::Discover, None);
    for _ in 0..5 {
        peer.write_all(&(discover.len() as u32).to_be_bytes())
            .unwrap();
        peer.write_all(&discover).unwrap();
        let mut len = [0u8; 4];
        while peer.read_exact(&mut len).is_ok() {
            let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
            peer.read_exact(&mut frame).unwrap();
            // UDP from port 67 with the OFFER message type (option 53 = 2).
            let dhcp = frame.get(42..).unwrap_or_default();
            if frame.len() > 42
                && frame[23] == 17
                && frame[34..36] == [0, 67]
                && dhcp.windows(3).any(|w| w == [53, 1, 2])
            {
                return true;
            }
        }
    }
    false
}

/// A state directory owned by nobody in a directory others may search.
fn nobody_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("hubnat-priv-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    dir
}

/// `hubnat run` as nobody from the start (`setpriv`), in `netns` if given. With `tun`, the
/// process sees that device node as /dev/net/tun (a bind mount in a mount namespace of its
/// own): this machine's /dev/net/tun may be mode 0600, where most systems have 0666.
fn run_as_nobody(dir: &Path, args: &[&str], netns: Option<&Netns>, tun: Option<&Path>) -> Proc {
    let state = dir.join("state");
    let mut cmd = match netns {
        Some(ns) => ns.command("unshare"),
        None => Command::new("unshare"),
    };
    let bind = tun
        .map(|t| format!("mount --bind {} /dev/net/tun && ", t.display()))
        .unwrap_or_default();
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "{bind}exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \"$0\" \"$@\""
        ))
        .arg(hubnat_bin())
        .args(["run", "--state-dir"])
        .arg(&state)
        .args([
            "--set",
            "dns.upstream=[]",
            "--set",
            "host.mac=\"00:ac:11:22:33:44\"",
        ])
        .args(args);
    Proc::spawn(cmd, "hubnat as nobody", &dir.join("hubnat.log"))
}

#[test]
fn on_the_hub_backend_it_runs_as_an_ordinary_user_from_the_start() {
    if !require_root("on_the_hub_backend_it_runs_as_an_ordinary_user_from_the_start") {
        return;
    }
    require_programs(&["setpriv"]);
    let dir = nobody_dir();
    let socket = dir.path().join("state").join("hub.sock");
    let listen = format!("unix:{}", socket.display());
    let mut hubnat = run_as_nobody(
        dir.path(),
        &["--backend", "hub", "--hub-listen", &listen],
        None,
        None,
    );
    let log = dir.path().join("hubnat.log");
    wait_until(Duration::from_secs(15), "hubnat to start as nobody", || {
        assert!(hubnat.is_running(), "hubnat exited:\n{}", read(&log));
        read(&log).contains("hubnat started")
    });
    assert_unprivileged(hubnat.pid());
    assert!(offer_through_hub(&socket), "no OFFER:\n{}", read(&log));
    assert!(hubnat.stop().success(), "{}", read(&log));
    assert!(read(&dir.path().join("state/security.log")).contains("GATEWAY stopped"));
}

#[test]
fn a_persistent_tap_made_for_a_user_works_without_root() {
    if !require_root("a_persistent_tap_made_for_a_user_works_without_root") {
        return;
    }
    require_programs(&["setpriv", "ip", "udhcpc"]);
    let (gw, client) = (Netns::new("hnpg"), Netns::new("hnpc"));
    let tap = unique("hnpt");
    // Root makes the device once, for nobody, with the MTU hubnat is configured for.
    gw.exec_ok(&[
        "ip", "tuntap", "add", "dev", &tap, "mode", "tap", "user", "65534",
    ]);
    gw.exec_ok(&["ip", "link", "set", "dev", &tap, "mtu", "1500", "up"]);
    let dir = nobody_dir();
    // /dev/net/tun as most systems have it (mode 0666), for this process only.
    let tun = dir.path().join("tun");
    let made = Command::new("mknod")
        .arg(&tun)
        .args(["c", "10", "200"])
        .status()
        .unwrap();
    assert!(made.success(), "mknod");
    std::fs::set_permissions(&tun, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut hubnat = run_as_nobody(
        dir.path(),
        &["--backend", "tap", "--tap-name", &tap],
        Some(&gw),
        Some(&tun),
    );
    let log = dir.path().join("hubnat.log");
    wait_until(
        Duration::from_secs(15),
        "hubnat to open the TAP as nobody",
        || {
            assert!(hubnat.is_running(), "hubnat exited:\n{}", read(&log));
            read(&log).contains("TAP device open")
        },
    );
    assert_unprivileged(hubnat.pid());
    // The kernel side of the device becomes a client's interface; a real DHCP client on it.
    gw.exec_ok(&["ip", "link", "set", &tap, "netns", &client.name]);
    client.wait_for_link(&tap, Duration::from_secs(5));
    client.exec_ok(&["ip", "link", "set", &tap, "up"]);
    let out = client.exec(&[
        "udhcpc",
        "-i",
        &tap,
        "-n",
        "-q",
        "-t",
        "10",
        "-T",
        "1",
        "-s",
        "/bin/true",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "udhcpc: {text}\nhubnat:\n{}",
        read(&log)
    );
    assert!(text.contains("lease of 192.168.30."), "{text}");
    assert!(
        text.contains(&format!("obtained from {VHOST_IP}")) || text.contains("obtained"),
        "{text}"
    );
    assert!(hubnat.stop().success(), "{}", read(&log));
}
