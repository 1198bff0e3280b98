//! Hostile clients on the segment, with real tools in network namespaces (issue 12): a SYN
//! flood and a UDP flood from spoofed sources to many destinations, downloads held at a zero
//! window, and malformed frames of every kind. Each test ends the same way: the gateway is
//! alive, a new client (a namespace of its own) gets a lease and downloads a file intact, and
//! the sessions, descriptors and memory of the gateway are back near where they were before.
//!
//! The spoofed and malformed frames are made with scapy (Debian's python3-scapy, run by
//! Debian's own `/usr/bin/python3`) and sent on the client's TAP device: they reach hubnat and
//! nothing else (DESIGN.md safety rules).

mod common;

use std::path::Path;
use std::time::Duration;

use common::cli::json;
use common::netns::{read, require_programs, require_root, unique, wait_until, Netns};
use common::topology::{fixture, sha256, Options, Topology, HOST_MAC, HTTP_PORT, SERVER_IP};
use serde_json::Value;

/// Debian's Python, which has python3-scapy (another `python3` may come first on PATH).
const SCAPY_PYTHON: &str = "/usr/bin/python3";

/// What the gateway holds: sessions (from `hubnat status`), open descriptors and resident
/// memory (from /proc).
#[derive(Clone, Copy, Debug)]
struct Gauges {
    tcp: u64,
    udp: u64,
    fds: usize,
    rss_kib: u64,
}

fn status(topo: &Topology) -> Value {
    json(
        &topo.path("state").join("control.sock"),
        &["status", "--json"],
    )
}

fn gauges(topo: &Topology) -> Gauges {
    let s = status(topo);
    let pid = topo.hubnat_pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("hubnat's descriptors")
        .count();
    let rss_kib = read(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    Gauges {
        tcp: s["sessions"]["tcp"].as_u64().unwrap(),
        udp: s["sessions"]["udp"].as_u64().unwrap(),
        fds,
        rss_kib,
    }
}

/// Waits until the sessions and descriptors are back to `base` (a few descriptors of slack:
/// the control connection of the status call itself, a DNS socket) and checks that resident
/// memory is within `rss_slack_mib` of it.
fn back_to_baseline(topo: &Topology, base: Gauges, rss_slack_mib: u64, limit: Duration) -> Gauges {
    let deadline = std::time::Instant::now() + limit;
    let mut now = gauges(topo);
    while !(now.tcp <= base.tcp && now.udp <= base.udp && now.fds <= base.fds + 3) {
        assert!(
            std::time::Instant::now() < deadline,
            "after {limit:?}, sessions and descriptors are not back to the baseline: {now:?}, \
             baseline {base:?}; sessions: {}",
            json(
                &topo.path("state").join("control.sock"),
                &["nat", "table", "--json"]
            )
        );
        std::thread::sleep(Duration::from_millis(100));
        now = gauges(topo);
    }
    eprintln!("baseline {base:?}\nafter    {now:?}");
    assert!(
        now.rss_kib <= base.rss_kib + rss_slack_mib * 1024,
        "resident memory {} KiB, baseline {} KiB (+{rss_slack_mib} MiB allowed)",
        now.rss_kib,
        base.rss_kib
    );
    now
}

/// A new client: a macvlan on the client's TAP device with MAC `mac`, moved into a namespace of
/// its own, takes a lease with udhcpc (address and default route configured) and downloads
/// `/files/NAME`, whose SHA-256 must match. Returns its address.
fn new_client_downloads(topo: &Topology, mac: &str, name: &str) -> String {
    let ns = Netns::new("hnhc");
    let dev = unique("hnhm");
    let tap = topo.client_dev.clone().unwrap();
    topo.client.exec_ok(&[
        "ip", "link", "add", "link", &tap, "name", &dev, "address", mac, "type", "macvlan", "mode",
        "bridge",
    ]);
    topo.client
        .exec_ok(&["ip", "link", "set", &dev, "netns", &ns.name]);
    ns.exec_ok(&["ip", "link", "set", &dev, "up"]);
    let events = topo.path(&format!("new-client-{dev}.log"));
    let out = ns
        .command("udhcpc")
        .env("TEST_HUBNAT_EVENTS", &events)
        .args(["-f", "-q", "-n", "-i", &dev, "-t", "10", "-T", "1", "-s"])
        .arg(fixture("udhcpc-script.sh"))
        .output()
        .unwrap();
    let text = read(&events);
    let ip = text
        .lines()
        .find(|l| l.starts_with("event=bound"))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("ip=")))
        .unwrap_or_else(|| {
            panic!(
                "the new client got no lease: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_owned();
    let file = topo.path(&format!("new-client-{dev}.bin"));
    let out = ns
        .command("curl")
        .args(["-sS", "--fail", "--noproxy", "*", "--max-time", "60", "-o"])
        .arg(&file)
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/files/{name}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the new client's download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&file), sha256(&topo.www.join(name)));
    eprintln!("new client {mac}: lease {ip}, /files/{name} downloaded intact");
    ip
}

/// Runs a scapy script in the client namespace with `args`; returns its stdout.
fn scapy(topo: &Topology, script: &str, args: &[&str]) -> String {
    let out = topo
        .client
        .command(SCAPY_PYTHON)
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scapy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_scapy() {
    require_programs(&["udhcpc", "curl", SCAPY_PYTHON]);
    let ok = std::process::Command::new(SCAPY_PYTHON)
        .args(["-c", "import scapy.all"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3-scapy is not installed (scripts/test.sh installs it)"
    );
}

/// Frames from forged sources: `on` of them from random addresses of the segment (each with a
/// random MAC), `off` from addresses off it. argv: iface, host MAC, the real client's address,
/// protocol (tcp|udp), on, off.
const SPOOF_FLOOD: &str = r#"
import random, sys
from scapy.all import Ether, IP, TCP, UDP, sendp
iface, host_mac, client_ip, proto, on, off = sys.argv[1:7]
rnd = random.Random(12)
def mac():
    return "02:" + ":".join("%02x" % rnd.randrange(256) for _ in range(5))
def l4(dport):
    if proto == "tcp":
        return TCP(sport=rnd.randrange(1024, 65536), dport=dport, flags="S", seq=rnd.randrange(2**32))
    return UDP(sport=rnd.randrange(1024, 65536), dport=dport) / b"flood"
def destination():
    r = rnd.random()
    if r < 0.4:
        return "10.77.0.2", 8080                      # the HTTP server: a real handshake upstream
    if r < 0.8:
        return "10.77.0.2", rnd.randrange(1, 65536)   # its closed ports
    if r < 0.9:
        return "10.77.0.%d" % rnd.randrange(100, 200), rnd.randrange(1, 65536)  # nobody
    return "198.51.100.%d" % rnd.randrange(1, 255), 80  # no route from the gateway
frames = []
addrs = ["192.168.30.%d" % i for i in range(2, 255) if "192.168.30.%d" % i != client_ip]
for _ in range(int(on)):
    dst, dport = destination()
    frames.append(Ether(src=mac(), dst=host_mac) / IP(src=rnd.choice(addrs), dst=dst) / l4(dport))
for _ in range(int(off)):
    dst, dport = destination()
    src = rnd.choice(["203.0.113.%d" % rnd.randrange(1, 255), "10.77.0.2", "10.77.0.1"])
    frames.append(Ether(src=mac(), dst=host_mac) / IP(src=src, dst=dst) / l4(dport))
sendp(frames, iface=iface, verbose=False)
print("sent", len(frames))
"#;

fn spoofed_flood(test: &str, proto: &str, extra_config: &str) {
    if !require_root(test) {
        return;
    }
    require_scapy();
    const ON: u32 = 3000;
    const OFF: u32 = 1000;
    let topo = Topology::tap(Options {
        files: vec![("file".into(), 2_000_000)],
        config: format!("[nat]\ntcp_handshake_timeout = \"5s\"\n{extra_config}"),
        ..Options::default()
    });
    let before = status(&topo);
    let base = gauges(&topo);
    let dev = topo.client_dev.clone().unwrap();
    let client_ip = topo.client_ip.clone().unwrap();
    let out = scapy(
        &topo,
        SPOOF_FLOOD,
        &[
            &dev,
            HOST_MAC,
            &client_ip,
            proto,
            &ON.to_string(),
            &OFF.to_string(),
        ],
    );
    eprintln!("{}: {}", test, out.trim());
    let frames = |s: &Value| s["counters"]["frames_in"].as_u64().unwrap();
    let mut after_flood = status(&topo);
    wait_until(
        Duration::from_secs(60),
        "the gateway to read every forged frame",
        || {
            after_flood = status(&topo);
            frames(&after_flood) >= frames(&before) + u64::from(ON + OFF)
        },
    );
    let during = gauges(&topo);
    eprintln!("during the flood: {during:?}");
    let delta = |v: &Value, w: &Value| v.as_u64().unwrap() - w.as_u64().unwrap();
    // Every frame from off the segment is refused without a session; the ones from the
    // segment open sessions (one per distinct flow).
    assert!(
        delta(
            &after_flood["nat"]["refused_rules"],
            &before["nat"]["refused_rules"]
        ) >= u64::from(OFF),
        "{}",
        after_flood["nat"]
    );
    let index = if proto == "tcp" { 0 } else { 1 };
    let created = delta(
        &after_flood["nat"]["created"][index],
        &before["nat"]["created"][index],
    );
    assert!(
        created > u64::from(ON) / 2 && created <= u64::from(ON),
        "{created} sessions from {ON} spoofed flows"
    );
    // The real client is served during the aftermath of the flood.
    let file = topo.path("during.bin");
    let out = topo
        .curl(&["--fail", "-o", file.to_str().unwrap()])
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/files/file"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&file), sha256(&topo.www.join("file")));
    // The half-open and unanswered sessions end by themselves (the handshake timeout, the UDP
    // timeout, the remote's refusals); what they held goes back.
    back_to_baseline(&topo, base, 32, Duration::from_secs(90));
    new_client_downloads(&topo, "02:aa:00:00:00:01", "file");
    topo.finish();
}

#[test]
fn a_spoofed_syn_flood_to_many_destinations_leaves_nothing_behind() {
    spoofed_flood(
        "a_spoofed_syn_flood_to_many_destinations_leaves_nothing_behind",
        "tcp",
        "",
    );
}

#[test]
fn a_spoofed_udp_flood_to_many_ports_leaves_nothing_behind() {
    spoofed_flood(
        "a_spoofed_udp_flood_to_many_ports_leaves_nothing_behind",
        "udp",
        "udp_timeout = \"5s\"\n",
    );
}

/// argv: server, port, count, stop-file. Opens `count` downloads of /files/big with a tiny
/// receive buffer and never reads them: the client's window closes and stays closed. Prints
/// `open=N` once every request is sent, then holds until the stop file exists.
const ZERO_WINDOW_HOLD: &str = r#"
import os, socket, sys, time
server, port, count, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
socks = []
for _ in range(count):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((server, port))
    s.sendall(b"GET /files/big HTTP/1.0\r\nHost: x\r\n\r\n")
    socks.append(s)
print("open=%d" % len(socks), flush=True)
while not os.path.exists(stop):
    time.sleep(0.1)
"#;

#[test]
fn downloads_held_at_a_zero_window_pin_no_more_than_their_buffers() {
    if !require_root("downloads_held_at_a_zero_window_pin_no_more_than_their_buffers") {
        return;
    }
    require_programs(&["udhcpc", "curl", "python3"]);
    const HOLDERS: u64 = 32;
    const BIG: u64 = 16_000_000;
    let topo = Topology::tap(Options {
        files: vec![("big".into(), BIG), ("file".into(), 2_000_000)],
        config: "[nat]\ntcp_buffer = \"256KiB\"\n".into(),
        ..Options::default()
    });
    let base = gauges(&topo);
    let stop = topo.path("hold.stop");
    let log = topo.path("hold.log");
    let mut cmd = topo.client_cmd("python3");
    cmd.args(["-c", ZERO_WINDOW_HOLD, SERVER_IP])
        .arg(HTTP_PORT.to_string())
        .arg(HOLDERS.to_string())
        .arg(&stop);
    let mut holder = common::netns::Proc::spawn(cmd, "zero-window holder", &log);
    wait_until(Duration::from_secs(60), "the held downloads", || {
        assert!(holder.is_running(), "{}", read(&log));
        read(&log).contains("open=")
    });
    // Everything the windows let through is in flight: the gateway's buffers fill and stop.
    let mut held = gauges(&topo);
    let mut last = u64::MAX;
    wait_until(
        Duration::from_secs(60),
        "the gateway's memory to settle",
        || {
            std::thread::sleep(Duration::from_millis(500));
            held = gauges(&topo);
            let settled = held.rss_kib == last;
            last = held.rss_kib;
            settled
        },
    );
    eprintln!("held: {held:?}");
    assert_eq!(held.tcp, base.tcp + HOLDERS);
    // Each held session pins at most its two buffers (256 KiB each way), not the 16 MB it was
    // asked for: 32 sessions may hold 16 MiB, the files 512 MB.
    let bound = HOLDERS * 2 * 256 + 16 * 1024;
    assert!(
        held.rss_kib <= base.rss_kib + bound,
        "{} KiB resident while {HOLDERS} downloads are held, baseline {} KiB, bound +{bound} KiB",
        held.rss_kib,
        base.rss_kib
    );
    // Meanwhile the others are served.
    let d = topo.start_download("file", "50M");
    d.finish(Duration::from_secs(60));
    std::fs::write(&stop, b"").unwrap();
    drop(holder);
    back_to_baseline(&topo, base, 16, Duration::from_secs(60));
    new_client_downloads(&topo, "02:aa:00:00:00:02", "file");
    topo.finish();
}

/// Malformed frames of every kind, and each frame of the fuzzing corpus. argv: iface, host MAC,
/// client MAC, client IP, corpus directory. Prints the number of frames sent.
const MALFORMED: &str = r#"
import os, random, struct, sys
from scapy.all import Ether, Dot1Q, ARP, IP, TCP, UDP, ICMP, BOOTP, DHCP, Raw, IPv6, sendp, raw
iface, host_mac, mac, ip, corpus = sys.argv[1:6]
host_ip = "192.168.30.1"
rnd = random.Random(5)
e = Ether(src=mac, dst=host_mac)
b = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
frames = [
    raw(e)[:10],                                                     # runt
    raw(e / IP(dst=host_ip))[:20],                                   # IPv4 header cut short
    raw(e / IP(dst=host_ip, ihl=15) / ICMP()),                       # IHL past the packet
    raw(e / IP(dst=host_ip, ihl=2) / ICMP()),                        # IHL below 5
    raw(e / IP(dst=host_ip, len=2000) / ICMP()),                     # total length past the frame
    raw(e / IP(dst=host_ip, len=10) / ICMP()),                       # total length below the header
    raw(e / IP(dst=host_ip, chksum=0x1234) / ICMP()),                # bad header checksum
    raw(e / IP(dst=host_ip, version=6) / ICMP()),                    # version 6 in an IPv4 frame
    raw(e / IP(src=ip, dst="10.77.0.2") / TCP(dport=8080, dataofs=15)),  # TCP offset past the end
    raw(e / IP(src=ip, dst="10.77.0.2") / TCP(dport=8080, dataofs=2)),   # TCP offset below 5
    raw(e / IP(src=ip, dst="10.77.0.2") / TCP(dport=8080, chksum=1)),    # bad TCP checksum
    raw(e / IP(src=ip, dst="10.77.0.2") / TCP(dport=0, flags="S")),      # port 0
    raw(e / IP(src=ip, dst="10.77.0.2") / TCP(dport=8080, flags="SF")),  # SYN+FIN
    raw(e / IP(src=ip, dst="10.77.0.2") / TCP(dport=8080, flags="SR")),  # SYN+RST
    raw(e / IP(src=ip, dst="10.77.0.2") / UDP(dport=7777, len=200) / b"x"),  # UDP length past the end
    raw(e / IP(src=ip, dst="10.77.0.2") / UDP(dport=7777, len=3)),       # UDP length below 8
    raw(e / IP(src=ip, dst="10.77.0.2") / UDP(dport=0) / b"x"),          # port 0
    raw(e / IP(src=ip, dst=host_ip) / ICMP(type=8, chksum=7) / b"ping"),  # bad ICMP checksum
    raw(e / IP(src=ip, dst="10.77.0.2", flags="MF", frag=0) / UDP(dport=7777) / (b"a" * 64)),  # a first fragment alone
    raw(e / IP(src=ip, dst="10.77.0.2", frag=8185) / (b"z" * 64)),       # a fragment past 65535
    raw(e / IP(src=ip, dst="10.77.0.2", proto=200) / b"unknown protocol"),
    raw(e / IP(src=ip, dst="10.77.0.2", options=b"\x44\x28" + b"\x00" * 38) / ICMP()),  # options
    raw(e / IPv6(dst="fe80::1") / (b"\x00" * 8)),                      # IPv6
    raw(Ether(src=mac, dst=host_mac, type=0x88b5) / (b"\x00" * 46)),  # unknown EtherType
    raw(e / Dot1Q(vlan=5) / IP(dst=host_ip) / ICMP()),               # a VLAN tag
    raw(b / ARP(op=1, hwsrc=mac, psrc=ip, pdst=host_ip))[:30],       # ARP cut short
    raw(b / ARP(op=1, hwlen=4, hwsrc=mac, psrc=ip, pdst=host_ip)),   # odd ARP lengths
    raw(b / ARP(op=9, hwsrc=mac, psrc=ip, pdst=host_ip)),            # unknown ARP operation
    raw(b / ARP(op=2, hwsrc="02:66:66:66:66:66", psrc=host_ip, pdst=ip)),  # ARP claiming the host's address
    raw(Ether(src=host_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=host_mac, psrc=ip, pdst=host_ip)),  # the host's own MAC
    raw(b / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / (b"\x01\x01\x06" + b"\xff" * 200)),  # BOOTP garbage
    raw(b / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), xid=7)
        / DHCP(options=[("message-type", "discover"), (61, b""), (12, b"\xff" * 255), "end"])),  # odd options
    raw(b / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / BOOTP(chaddr=b"\x02\x77\x77\x77\x77\x77", xid=8)
        / DHCP(options=[("message-type", "release"), ("server_id", host_ip), "end"])),  # chaddr not the frame's MAC
    raw(e / IP(src=ip, dst=host_ip) / UDP(dport=53) / b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c"),  # DNS: a pointer loop
    raw(e / IP(src=ip, dst=host_ip) / UDP(dport=53) / b"\x00"),      # DNS: one byte
]
# Random bytes after a valid Ethernet header, of each EtherType the host reads.
for ethertype in (0x0800, 0x0806):
    for _ in range(50):
        n = rnd.randrange(0, 200)
        frames.append(raw(Ether(src=mac, dst=host_mac, type=ethertype)) + bytes(rnd.randrange(256) for _ in range(n)))
# Every frame of the fuzzing corpus, with the client's own MAC as source.
for name in sorted(os.listdir(corpus)):
    data = open(os.path.join(corpus, name), "rb").read()
    if len(data) >= 14:
        frames.append(data[:6] + bytes.fromhex(mac.replace(":", "")) + data[12:1514])
frames = [f if len(f) >= 14 else f + b"\x00" * (14 - len(f)) for f in frames]
sendp([Raw(f) for f in frames], iface=iface, verbose=False)
print("sent", len(frames))
"#;

#[test]
fn malformed_frames_of_every_kind_are_dropped_and_counted() {
    if !require_root("malformed_frames_of_every_kind_are_dropped_and_counted") {
        return;
    }
    require_scapy();
    let topo = Topology::tap(Options {
        files: vec![("file".into(), 2_000_000)],
        // The well-formed flows among the frames (a SYN+FIN, a lone fragment's datagram, a
        // DNS query) end within seconds, not the defaults' minutes.
        config: "[nat]\ntcp_handshake_timeout = \"5s\"\nudp_timeout = \"5s\"\n".into(),
        ..Options::default()
    });
    let before = status(&topo);
    let base = gauges(&topo);
    let dev = topo.client_dev.clone().unwrap();
    // `ip netns exec` mounts the namespace's own /sys.
    let mac = topo
        .client
        .exec_ok(&["cat", &format!("/sys/class/net/{dev}/address")]);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame");
    let out = scapy(
        &topo,
        MALFORMED,
        &[
            &dev,
            HOST_MAC,
            mac.trim(),
            topo.client_ip.as_deref().unwrap(),
            corpus.to_str().unwrap(),
        ],
    );
    eprintln!("{}", out.trim());
    let sent: u64 = out
        .trim()
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .expect("the number of frames sent");
    // The gateway reads them all and is still there.
    let frames = |s: &Value| s["counters"]["frames_in"].as_u64().unwrap();
    let mut after = status(&topo);
    wait_until(
        Duration::from_secs(60),
        "the gateway to read every frame",
        || {
            after = status(&topo);
            frames(&after) >= frames(&before) + sent
        },
    );
    let grew = |key: &str| {
        after["counters"][key].as_u64().unwrap() - before["counters"][key].as_u64().unwrap()
    };
    eprintln!("counters after: {}", after["counters"]);
    assert!(grew("malformed") >= 20, "{}", after["counters"]);
    assert!(
        grew("own_mac") >= 1 && grew("arp_spoofed") >= 1,
        "{}",
        after["counters"]
    );
    back_to_baseline(&topo, base, 16, Duration::from_secs(60));
    new_client_downloads(&topo, "02:aa:00:00:00:03", "file");
    topo.finish();
}

/// argv: address, port. Sends 1 MiB on each connection it accepts, then holds it open until
/// the peer closes.
const SEND_AND_HOLD_SERVER: &str = r#"
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(256)
print("listening", flush=True)
def serve(c):
    c.sendall(bytes(range(256)) * 4096)
    while c.recv(65536):
        pass
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// argv: server, port, count, stop-file. Opens `count` connections, reads 1 MiB from each,
/// prints `drained=N`, then keeps them open, quiet, until the stop file exists.
const DRAIN_AND_IDLE: &str = r#"
import os, socket, sys, time
server, port, count, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
socks = [socket.create_connection((server, port)) for _ in range(count)]
want = bytes(range(256)) * 4096
for s in socks:
    got = bytearray()
    while len(got) < len(want):
        b = s.recv(1 << 20)
        if not b:
            sys.exit("closed early")
        got += b
    if got != want:
        sys.exit("corrupt")
print("drained=%d" % len(socks), flush=True)
while not os.path.exists(stop):
    time.sleep(0.1)
"#;

#[test]
fn quiet_sessions_give_their_buffer_memory_back() {
    if !require_root("quiet_sessions_give_their_buffer_memory_back") {
        return;
    }
    require_programs(&["udhcpc", "curl", "python3"]);
    const SESSIONS: u64 = 64;
    const PORT: &str = "9100";
    let topo = Topology::tap(Options {
        files: vec![("file".into(), 2_000_000)],
        ..Options::default()
    });
    let mut server = topo.server.command("python3");
    server.args(["-c", SEND_AND_HOLD_SERVER, SERVER_IP, PORT]);
    let server_log = topo.path("hold-server.log");
    let _server = common::netns::Proc::spawn(server, "send-and-hold server", &server_log);
    wait_until(Duration::from_secs(10), "the server to listen", || {
        read(&server_log).contains("listening")
    });
    let base = gauges(&topo);
    let released_before = status(&topo)["nat"]["buffer_bytes_released"]
        .as_u64()
        .unwrap();
    let stop = topo.path("idle.stop");
    let log = topo.path("idle.log");
    let mut cmd = topo.client_cmd("python3");
    cmd.args(["-c", DRAIN_AND_IDLE, SERVER_IP, PORT])
        .arg(SESSIONS.to_string())
        .arg(&stop);
    let mut client = common::netns::Proc::spawn(cmd, "drain-and-idle client", &log);
    wait_until(Duration::from_secs(120), "1 MiB on each session", || {
        assert!(client.is_running(), "{}", read(&log));
        read(&log).contains("drained=")
    });
    // Quiet for two periods of nat's quiet check (1 s each), and a generous margin.
    std::thread::sleep(Duration::from_secs(6));
    let quiet = gauges(&topo);
    let released = status(&topo)["nat"]["buffer_bytes_released"]
        .as_u64()
        .unwrap()
        - released_before;
    eprintln!("quiet: {quiet:?}; released {} KiB", released / 1024);
    assert_eq!(quiet.tcp, base.tcp + SESSIONS, "the sessions stay open");
    // Each session moved 1 MiB through its 1 MiB send buffer, touching most of its pages.
    assert!(
        released >= SESSIONS * 512 * 1024,
        "{released} bytes released"
    );
    assert!(
        quiet.rss_kib <= base.rss_kib + 16 * 1024,
        "{} KiB resident with {SESSIONS} quiet sessions, baseline {} KiB",
        quiet.rss_kib,
        base.rss_kib
    );
    std::fs::write(&stop, b"").unwrap();
    drop(client);
    back_to_baseline(&topo, base, 16, Duration::from_secs(60));
    new_client_downloads(&topo, "02:aa:00:00:00:04", "file");
    drop(_server);
    topo.finish();
}
