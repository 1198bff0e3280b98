//! A real third-party peer on the hub socket: a QEMU guest whose virtio-net device is connected
//! with `-netdev stream,server=off,addr.type=unix,addr.path=SOCK`, exactly as it would be to
//! passt.
//!
//! The guest is built at test time from Debian packages: the kernel of `linux-image-amd64`
//! (fetched with `apt-get download`, its virtio modules unpacked; cached under
//! `target/tmp/qemu-guest/`), and an initramfs made of the static busybox of `busybox-static`
//! plus an `/init` script. The guest loads the virtio modules, runs busybox udhcpc on `eth0`,
//! pings the virtual host, and (in the NAT test) downloads a file with wget and prints its
//! SHA-256, all on its serial console, which the test reads.
//!
//! KVM is used when it works: on these machines `/dev/kvm` exists but a nested KVM guest hangs
//! in early boot, so a short probe boot decides (cached per host boot); TCG otherwise.
//! `TEST_HUBNAT_QEMU_ACCEL=kvm|tcg` forces one.
//!
//! Per DESIGN.md's safety rules hubnat runs in a namespace of its own (with, in the NAT test,
//! only a veth to the test's server namespace) and QEMU in an empty one: the guest's only link
//! is the Unix socket.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::netns::{
    fields, hubnat_bin, read, require_programs, require_root, wait_until, Netns, Proc,
};
use common::topology::{sha256, Options, Topology, HTTP_PORT, SERVER_IP};

const GUEST_MAC: &str = "52:54:00:77:00:01";
const GW: &str = "192.168.30.1";
/// How long a guest may take from start to power-off under TCG on a busy 2-core machine.
const GUEST_LIMIT: Duration = Duration::from_secs(150);
/// How long the KVM probe boot may take before KVM is declared unusable.
const KVM_PROBE_LIMIT: Duration = Duration::from_secs(12);

/// The virtio modules virtio_net needs, in load order (each after what it depends on).
const MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
if [ -n "$(arg hubnat.probe)" ]; then echo HUBNAT-PROBE-OK; poweroff -f; fi
echo HUBNAT-GUEST-UP
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
ip link set lo up
ip link set eth0 up || echo HUBNAT-NO-ETH0
if udhcpc -i eth0 -s /udhcpc.sh -t 30 -T 1 -n -q -f -x hostname:qemu-guest; then
  echo HUBNAT-DHCP-OK
  ping -c 3 -W 3 192.168.30.1 && echo HUBNAT-PING-OK
  url=$(arg hubnat.url)
  if [ -n "$url" ]; then
    # (busybox 1.35 wget crashes when -q and -T are given together)
    if wget -q -O /tmp/blob "$url"; then echo "HUBNAT-SHA256 $(sha256sum /tmp/blob)"; else echo HUBNAT-WGET-FAILED; fi
  fi
fi
echo HUBNAT-GUEST-DONE
poweroff -f
"#;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    echo "HUBNAT-LEASE ip=$ip mask=$mask router=$router dns=$dns lease=$lease serverid=$serverid domain=$domain"
    ;;
esac
exit 0
"#;

/// The guest's kernel and initramfs.
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    accel: &'static str,
}

fn cache_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-guest");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs an apt command; if it fails, refreshes the package lists once and tries again.
fn apt(args: &[&str], dir: &Path) -> String {
    let attempt = || {
        Command::new(args[0])
            .args(&args[1..])
            .current_dir(dir)
            .output()
            .expect("run apt")
    };
    let out = attempt();
    let out = if out.status.success() {
        out
    } else {
        eprintln!(
            "qemu-guest: {} failed ({}); running apt-get update",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        run(
            Command::new("apt-get").args(["update", "-qq"]),
            "apt-get update",
        );
        attempt()
    };
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel image and the virtio modules from Debian's current kernel package, downloaded
/// and unpacked once into the cache.
fn kernel_and_modules() -> (PathBuf, PathBuf) {
    let cache = cache_dir();
    let depends = apt(&["apt-cache", "depends", "linux-image-amd64"], &cache);
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .unwrap_or_else(|| {
            panic!("no kernel package in `apt-cache depends linux-image-amd64`: {depends}")
        })
        .to_owned();
    let unpacked = cache.join(&package);
    let (kernel, modules) = (unpacked.join("vmlinuz"), unpacked.join("modules"));
    if unpacked.join("ready").exists() {
        return (kernel, modules);
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let find_deb = || {
        std::fs::read_dir(&debs)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    let deb = match find_deb() {
        Some(deb) => deb,
        None => {
            eprintln!("qemu-guest: downloading {package}");
            apt(&["apt-get", "download", &package], &debs);
            find_deb().unwrap_or_else(|| {
                panic!(
                    "apt-get download {package} left no .deb in {}",
                    debs.display()
                )
            })
        }
    };
    let raw = unpacked.join("raw");
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::create_dir_all(&raw).unwrap();
    let mut patterns = vec!["./boot/vmlinuz-*".to_owned()];
    for m in MODULES {
        patterns.push(format!("*/{m}.ko*"));
    }
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards {}",
        deb.display(),
        raw.display(),
        patterns
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    run(
        Command::new("sh").args(["-c", &script]),
        "unpacking the kernel package",
    );
    std::fs::create_dir_all(&modules).unwrap();
    let mut found = Vec::new();
    collect_files(&raw, &mut found);
    for path in found {
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.starts_with("vmlinuz-") {
            std::fs::rename(&path, &kernel).unwrap();
        } else if let Some(stem) = name.strip_suffix(".ko.xz") {
            run(
                Command::new("sh").arg("-c").arg(format!(
                    "xz -dc '{}' > '{}'",
                    path.display(),
                    modules.join(format!("{stem}.ko")).display()
                )),
                "xz -d",
            );
        } else if let Some(stem) = name.strip_suffix(".ko.zst") {
            run(
                Command::new("zstd")
                    .args(["-qdf", "-o"])
                    .arg(modules.join(format!("{stem}.ko")))
                    .arg(&path),
                "zstd -d",
            );
        } else if name.ends_with(".ko") {
            std::fs::rename(&path, modules.join(&name)).unwrap();
        }
    }
    assert!(kernel.exists(), "no vmlinuz in {}", deb.display());
    assert!(
        modules.join("virtio_net.ko").exists(),
        "no virtio_net module in {}",
        deb.display()
    );
    std::fs::remove_dir_all(&raw).unwrap();
    std::fs::write(unpacked.join("ready"), "").unwrap();
    (kernel, modules)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        write!(
            self.out,
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        )
        .unwrap();
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// The initramfs: static busybox, the virtio modules, /init and the udhcpc script.
fn build_initrd(modules: &Path, path: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install busybox-static (scripts/test.sh does)"
    );
    let ldd = Command::new("ldd").arg(busybox).output().expect("ldd");
    let ldd =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "/bin/busybox is not static ({ldd}); install busybox-static"
    );
    let mut cpio = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap());
    for m in MODULES {
        let ko = modules.join(format!("{m}.ko"));
        if ko.exists() {
            cpio.file(
                &format!("lib/modules/{m}.ko"),
                0o644,
                &std::fs::read(ko).unwrap(),
            );
        }
    }
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("udhcpc.sh", 0o755, UDHCPC_SCRIPT.as_bytes());
    std::fs::write(path, cpio.finish()).unwrap();
}

/// The guest, built once per test process.
fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let started = Instant::now();
        let (kernel, modules) = kernel_and_modules();
        let initrd = cache_dir().join("initrd.cpio");
        build_initrd(&modules, &initrd);
        let mut guest = Guest {
            kernel,
            initrd,
            accel: "tcg",
        };
        guest.accel = choose_accel(&guest);
        eprintln!(
            "qemu-guest: ready in {:?}, accelerator {}",
            started.elapsed(),
            guest.accel
        );
        guest
    })
}

/// KVM if a probe boot with it reaches /init in time, else TCG; remembered per host boot.
fn choose_accel(guest: &Guest) -> &'static str {
    match std::env::var("TEST_HUBNAT_QEMU_ACCEL").as_deref() {
        Ok("kvm") => return "kvm",
        Ok("tcg") => return "tcg",
        _ => {}
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        return "tcg";
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let remembered = cache_dir().join(format!("kvm-probe-{}", boot_id.trim()));
    match read(&remembered).trim() {
        "kvm" => return "kvm",
        "tcg" => return "tcg",
        _ => {}
    }
    let log = cache_dir().join("kvm-probe.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(qemu_args(guest, "kvm", "hubnat.probe=1"))
        .args(["-nic", "none"]);
    let mut qemu = Proc::spawn(cmd, "qemu KVM probe", &log);
    let deadline = Instant::now() + KVM_PROBE_LIMIT;
    let ok = loop {
        if read(&log).contains("HUBNAT-PROBE-OK") {
            break true;
        }
        if !qemu.is_running() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(qemu); // SIGKILL by PID if it still runs
    let accel = if ok { "kvm" } else { "tcg" };
    eprintln!(
        "qemu-guest: KVM probe {}: using {accel}",
        if ok { "booted" } else { "did not boot in time" }
    );
    std::fs::write(remembered, accel).unwrap();
    accel
}

fn qemu_args(guest: &Guest, accel: &str, cmdline: &str) -> Vec<String> {
    [
        "-accel",
        accel,
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        guest.kernel.to_str().unwrap(),
        "-initrd",
        guest.initrd.to_str().unwrap(),
        "-append",
        &format!("console=ttyS0 quiet panic=-1 {cmdline}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Boots the guest on the hub socket `sock`, inside the namespace `ns`, and returns its console
/// output once it has powered off.
fn run_guest(ns: &Netns, sock: &Path, cmdline: &str, log: &Path) -> String {
    let guest = guest();
    let mut cmd = ns.command("qemu-system-x86_64");
    cmd.args(qemu_args(guest, guest.accel, cmdline)).args([
        "-netdev",
        &format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            sock.display()
        ),
        "-device",
        &format!("virtio-net-pci,netdev=n0,romfile=,mac={GUEST_MAC}"),
    ]);
    let started = Instant::now();
    let mut qemu = Proc::spawn(cmd, "qemu guest", log);
    wait_until(GUEST_LIMIT, "the guest to power off", || {
        read(log).contains("HUBNAT-GUEST-DONE") || !qemu.is_running()
    });
    wait_until(Duration::from_secs(10), "qemu to exit", || {
        !qemu.is_running()
    });
    let console = read(log);
    eprintln!(
        "qemu-guest: ran in {:?} ({})\n{console}",
        started.elapsed(),
        guest.accel
    );
    console
}

fn require_qemu(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    require_programs(&[
        "qemu-system-x86_64",
        "apt-get",
        "apt-cache",
        "dpkg-deb",
        "tar",
        "ldd",
    ]);
    true
}

#[test]
fn qemu_guest_gets_a_lease_over_the_hub_socket_and_pings_the_gateway() {
    if !require_qemu("qemu_guest_gets_a_lease_over_the_hub_socket_and_pings_the_gateway") {
        return;
    }
    let guest_ready = std::thread::spawn(guest);
    let dir = tempfile::tempdir().unwrap();
    let gw = Netns::new("hqgw");
    let empty = Netns::new("hqvm");
    let sock = dir.path().join("hub.sock");
    let config = dir.path().join("hubnat.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[host]
mac = "00:ac:11:22:33:66"

[dhcp]
lease = "10m"
domain = "hubnat.test"

[dns]
upstream = []

[backend]
kind = "hub"
[backend.hub]
listen = "unix:{sock}"

[state]
dir = "{state}"

[log]
level = "debug"
"#,
            sock = sock.display(),
            state = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut cmd = gw.command(hubnat_bin().to_str().unwrap());
    cmd.args(["run", "--config", config.to_str().unwrap()]);
    let log = dir.path().join("hubnat.log");
    let mut hubnat = Proc::spawn(cmd, "hubnat", &log);
    wait_until(Duration::from_secs(15), "hubnat's hub socket", || {
        assert!(hubnat.is_running(), "hubnat exited early:\n{}", read(&log));
        sock.exists()
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "owner only by default"
    );
    guest_ready.join().expect("the guest builds");

    let console = run_guest(&empty, &sock, "", &dir.path().join("qemu.log"));
    assert!(
        console.contains("HUBNAT-GUEST-UP"),
        "the guest did not boot:\n{console}"
    );
    assert!(
        !console.contains("HUBNAT-NO-ETH0"),
        "no virtio-net interface in the guest:\n{console}"
    );
    let lease = fields(&console, "HUBNAT-LEASE");
    let ip = lease["ip"].clone();
    let last: u8 = ip
        .strip_prefix("192.168.30.")
        .and_then(|l| l.parse().ok())
        .expect("an address on the segment");
    assert!((10..=200).contains(&last), "{ip}");
    assert_eq!(lease["router"], GW);
    assert_eq!(lease["serverid"], GW);
    assert_eq!(lease["mask"], "24");
    assert_eq!(lease["lease"], "600");
    assert_eq!(lease["domain"], "hubnat.test");
    assert!(
        console.contains("HUBNAT-PING-OK"),
        "the guest could not ping {GW}:\n{console}"
    );

    let security = read(&dir.path().join("state/security.log"));
    assert!(
        security.lines().any(|l| l.contains("DHCP lease created")
            && l.contains(&format!("mac={GUEST_MAC}"))
            && l.contains(&format!("ip={ip} "))
            && l.contains("hostname=\"qemu-guest\"")),
        "{security}"
    );
    // The guest was one peer, which came and went.
    wait_until(
        Duration::from_secs(5),
        "the peer's disconnection in the log",
        || read(&log).contains("hub socket: peer disconnected"),
    );
    assert!(read(&log).contains("hub socket: peer connected"));
    let status = hubnat.stop();
    assert!(
        status.success(),
        "hubnat exit status {status}:\n{}",
        read(&log)
    );
    assert!(!sock.exists(), "the socket file is removed on exit");
    let _ = gw;
}

/// Through the NAT: the guest downloads a file from the test server namespace and checks its
/// SHA-256.
#[test]
fn qemu_guest_downloads_through_the_nat() {
    if !require_qemu("qemu_guest_downloads_through_the_nat") {
        return;
    }
    let guest_ready = std::thread::spawn(guest);
    let size = 2 << 20;
    let mut topo = Topology::new(Options {
        files: vec![("blob".into(), size)],
        ..Options::default()
    });
    let sock = topo.path("hub.sock");
    topo.start_hubnat(&format!(
        "[backend]\nkind = \"hub\"\n[backend.hub]\nlisten = \"unix:{}\"\n",
        sock.display()
    ));
    let log = topo.hubnat_log.clone();
    wait_until(Duration::from_secs(15), "hubnat's hub socket", || {
        assert!(
            topo.hubnat_running(),
            "hubnat exited early:\n{}",
            read(&log)
        );
        sock.exists()
    });
    guest_ready.join().expect("the guest builds");
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/files/blob");
    let console = run_guest(
        &topo.client,
        &sock,
        &format!("hubnat.url={url}"),
        &topo.path("qemu.log"),
    );
    assert!(console.contains("HUBNAT-PING-OK"), "{console}");
    let line = console
        .lines()
        .find(|l| l.starts_with("HUBNAT-SHA256 "))
        .unwrap_or_else(|| panic!("the guest's download failed:\n{console}"));
    let got = line.split_whitespace().nth(1).unwrap();
    assert_eq!(
        got,
        sha256(&topo.www.join("blob")),
        "the guest downloaded something else"
    );
}
