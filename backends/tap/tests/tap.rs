//! The TAP backend against the real kernel, inside throw-away network namespaces.
//!
//! Each test runs its body on a fresh std thread that first calls `unshare(CLONE_NEWNET)`: the
//! network namespace is per thread, so the TAP device, the sockets and the `ip` commands the
//! thread spawns (children inherit the spawning thread's namespaces) all live in a namespace
//! that holds nothing but a loopback interface and the test's device. Nothing touches the
//! machine's real network, and the namespace dies with the thread.
//!
//! The tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `unshare`). They run in CI as root;
//! run by an ordinary user they print a message and return.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_lite::FutureExt;
use hubnat_backend::rt::{block_on, Timer};
use hubnat_backend::{Backend, FrameBatch};
use hubnat_tap::{TapBackend, TapError};

/// The MAC address the test plays on the segment.
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x99, 0x00, 0x02];
/// The kernel's address on the test segment.
const KERNEL_IP: [u8; 4] = [10, 99, 0, 1];
/// The address the test plays on the segment.
const PEER_IP: [u8; 4] = [10, 99, 0, 2];
/// How long to wait for the kernel to do something before failing.
const PATIENCE: Duration = Duration::from_secs(5);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True (after a message) when the test cannot run here.
fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("{test}: skipped: needs root (CAP_NET_ADMIN and network namespaces)");
    true
}

/// A device name unique to this test process and call: `hntt<pid % 10000><n>`, at most 15 bytes.
fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("hntt{}x{}", std::process::id() % 10000, n)
}

/// Runs `f` on a new thread inside a new network namespace; re-raises its panic.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) has no memory-safety preconditions; CLONE_NEWNET only affects the
        // calling thread (allowed in a multi-threaded process).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    });
    match thread.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `ip args…` (in the calling thread's namespace) and returns its stdout; panics on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when `ip link show dev NAME` finds the device in the calling thread's namespace.
fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Deletes a device on drop, even when the test panics.
struct DeleteOnDrop(String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .output();
    }
}

/// Runs `fut`, failing the test if it takes longer than [`PATIENCE`].
fn with_patience<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    block_on(async { Some(fut.await) }.or(async {
        Timer::after(PATIENCE).await;
        None
    }))
    .unwrap_or_else(|| panic!("timed out: {what}"))
}

/// Receives frames until `pick` accepts one; returns it.
fn recv_until(tap: &mut TapBackend, what: &str, pick: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    with_patience(what, async {
        let mut batch = FrameBatch::new(16, tap.max_frame_len());
        loop {
            batch.clear();
            tap.recv_batch(&mut batch).await.expect("recv_batch");
            assert!(!batch.is_empty(), "recv_batch returned without a frame");
            if let Some(frame) = batch.iter().find(|f| pick(f)) {
                return frame.to_vec();
            }
        }
    })
}

fn is_arp_request_for(frame: &[u8], target: [u8; 4]) -> bool {
    frame.len() >= 42
        && frame[0..6] == [0xff; 6]
        && frame[12..14] == [0x08, 0x06] // ARP
        && frame[14..22] == [0, 1, 0x08, 0x00, 6, 4, 0, 1] // Ethernet/IPv4, request
        && frame[38..42] == target
}

fn arp_reply(to_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]); // Ethernet/IPv4, reply
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&PEER_IP);
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&KERNEL_IP);
    f.resize(60, 0); // minimum Ethernet payload
    f
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP frame from the peer to the kernel (UDP checksum 0: none).
fn udp_frame(to_mac: [u8; 6], src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]); // id 1, DF, TTL 64, UDP, checksum 0
    f.extend_from_slice(&PEER_IP);
    f.extend_from_slice(&KERNEL_IP);
    let sum = ipv4_checksum(&f[ip_start..ip_start + 20]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

#[test]
fn arp_exchange_and_udp_both_ways_with_the_kernel() {
    if skip_unless_root("arp_exchange_and_udp_both_ways_with_the_kernel") {
        return;
    }
    let name = unique_name();
    let main_ns_name = name.clone();
    in_fresh_netns(move || {
        let mut tap = TapBackend::open(&name, 9000).expect("open TAP");
        let _guard = DeleteOnDrop(name.clone());
        assert_eq!(tap.name(), name);
        assert_eq!(tap.describe(), format!("tap {name}"));
        assert_eq!(tap.max_frame_len(), 9014);

        // The device is in this thread's namespace, configured, and `ip` sees it here.
        let link = ip(&["link", "show", "dev", &name]);
        assert!(link.contains("mtu 9000"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        let links = ip(&["-o", "link", "show"]);
        assert_eq!(
            links.lines().count(),
            2,
            "only lo and the TAP device expected: {links}"
        );
        ip(&["addr", "add", "10.99.0.1/24", "dev", &name]);

        // The kernel wants to send a datagram to 10.99.0.2: it asks the segment by ARP.
        let sock = UdpSocket::bind("10.99.0.1:0").expect("bind UDP socket");
        sock.set_read_timeout(Some(PATIENCE))
            .expect("set_read_timeout");
        sock.send_to(b"hello segment", "10.99.0.2:9")
            .expect("send_to");
        let request = recv_until(&mut tap, "ARP request for 10.99.0.2", |f| {
            is_arp_request_for(f, PEER_IP)
        });
        let mut kernel_mac = [0u8; 6];
        kernel_mac.copy_from_slice(&request[6..12]);
        assert_eq!(request[22..28], kernel_mac, "sender hardware address");
        assert_eq!(request[28..32], KERNEL_IP, "sender protocol address");

        // Answer it; the kernel then releases the datagram it held, addressed to our MAC.
        let mut out = FrameBatch::new(4, tap.max_frame_len());
        out.push(&arp_reply(kernel_mac));
        block_on(tap.send_batch(&out)).expect("send ARP reply");
        let datagram = recv_until(&mut tap, "the queued UDP datagram", |f| {
            f.len() >= 42 && f[0..6] == PEER_MAC && f[12..14] == [0x08, 0x00] && f[23] == 17
        });
        assert_eq!(datagram[30..34], PEER_IP, "destination address");
        assert_eq!(&datagram[42..], b"hello segment");

        // A frame sent the other way is accepted: the socket receives its payload.
        let port = sock.local_addr().expect("local_addr").port();
        out.clear();
        out.push(&udp_frame(kernel_mac, 4242, port, b"hello kernel"));
        block_on(tap.send_batch(&out)).expect("send UDP frame");
        let mut buf = [0u8; 64];
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("the kernel delivers the datagram");
        assert_eq!(&buf[..n], b"hello kernel");
        assert_eq!(from.to_string(), "10.99.0.2:4242");

        // And the kernel's neighbour table holds the MAC we announced.
        let neigh = ip(&["neigh", "show", "dev", &name]);
        assert!(
            neigh.contains("10.99.0.2 lladdr 02:00:00:99:00:02"),
            "{neigh}"
        );
        assert!(
            ["REACHABLE", "STALE", "DELAY", "PROBE"]
                .iter()
                .any(|s| neigh.contains(s)),
            "{neigh}"
        );

        let stats = tap.stats();
        assert_eq!(stats.tx_frames, 2);
        assert_eq!(stats.tx_bytes, (60 + 14 + 20 + 8 + 12) as u64);
        assert_eq!(stats.tx_dropped, 0);
        assert!(stats.rx_frames >= 2, "{stats:?}");
        assert!(stats.rx_bytes >= 42 + 42 + 13, "{stats:?}");
    });
    // Nothing leaked into the test process's own namespace.
    assert!(!link_exists(&main_ns_name));
}

#[test]
fn oversized_and_runt_frames_are_dropped_and_counted() {
    if skip_unless_root("oversized_and_runt_frames_are_dropped_and_counted") {
        return;
    }
    let name = unique_name();
    in_fresh_netns(move || {
        let mut tap = TapBackend::open(&name, 1500).expect("open TAP");
        let _guard = DeleteOnDrop(name.clone());
        let mut out = FrameBatch::new(4, 2000);
        out.push(&[0u8; 1515]); // one byte over mtu + 14
        out.push(&[0u8; 13]); // shorter than an Ethernet header
        let mut ok = vec![0xffu8; 6];
        ok.extend_from_slice(&PEER_MAC);
        ok.extend_from_slice(&[0x88, 0xb5]); // local experimental EtherType
        ok.resize(1514, 0);
        out.push(&ok);
        block_on(tap.send_batch(&out)).expect("send_batch");
        let stats = tap.stats();
        assert_eq!(stats.tx_dropped, 2);
        assert_eq!(stats.tx_frames, 1);
        assert_eq!(stats.tx_bytes, 1514);
    });
}

#[test]
fn reopens_an_existing_persistent_tap() {
    if skip_unless_root("reopens_an_existing_persistent_tap") {
        return;
    }
    let name = unique_name();
    in_fresh_netns(move || {
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let _guard = DeleteOnDrop(name.clone());
        for round in 0..2 {
            let tap = TapBackend::open(&name, 1400)
                .unwrap_or_else(|e| panic!("open persistent TAP (round {round}): {e}"));
            assert_eq!(tap.name(), name);
            assert_eq!(tap.mtu(), 1400);
            assert_eq!(tap.max_frame_len(), 1414);
            let link = ip(&["link", "show", "dev", &name]);
            assert!(link.contains("mtu 1400"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            drop(tap);
            // Persistent: it outlives the backend.
            assert!(
                link_exists(&name),
                "persistent device vanished after round {round}"
            );
        }
        ip(&["tuntap", "del", "dev", &name, "mode", "tap"]);
        assert!(!link_exists(&name));
    });
}

#[test]
fn a_deleted_device_is_an_error_in_both_directions() {
    if skip_unless_root("a_deleted_device_is_an_error_in_both_directions") {
        return;
    }
    let name = unique_name();
    in_fresh_netns(move || {
        let mut tap = TapBackend::open(&name, 1500).expect("open TAP");
        let _guard = DeleteOnDrop(name.clone());
        ip(&["link", "del", "dev", &name]);
        let mut batch = FrameBatch::new(8, tap.max_frame_len());
        let err = with_patience("recv_batch on a deleted device", tap.recv_batch(&mut batch))
            .expect_err("recv_batch must fail once the device is gone");
        assert!(err.to_string().contains(&name), "{err}");
        assert!(batch.is_empty());
        let mut out = FrameBatch::new(1, 64);
        out.push(&[0xffu8; 60]);
        let err = block_on(tap.send_batch(&out))
            .expect_err("send_batch must fail once the device is gone");
        assert!(err.to_string().contains(&name), "{err}");
    });
}

/// A link that is down (here: taken down after the open, as moving the device to another
/// namespace does) drops what is sent, counted, and is no error; once it is up, frames go out.
#[test]
fn a_link_that_is_down_drops_frames_until_it_is_up() {
    if skip_unless_root("a_link_that_is_down_drops_frames_until_it_is_up") {
        return;
    }
    let name = unique_name();
    in_fresh_netns(move || {
        let mut tap = TapBackend::open(&name, 1500).expect("open TAP");
        let _guard = DeleteOnDrop(name.clone());
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&PEER_MAC);
        frame.extend_from_slice(&[0x88, 0xb5]); // local experimental EtherType
        frame.resize(60, 0);
        let mut out = FrameBatch::new(2, 64);
        out.push(&frame);
        out.push(&frame);
        ip(&["link", "set", "dev", &name, "down"]);
        block_on(tap.send_batch(&out)).expect("a down link is no error");
        assert_eq!((tap.stats().tx_dropped, tap.stats().tx_frames), (2, 0));
        ip(&["link", "set", "dev", &name, "up"]);
        block_on(tap.send_batch(&out)).expect("send_batch once up");
        assert_eq!((tap.stats().tx_dropped, tap.stats().tx_frames), (2, 2));
    });
}

#[test]
fn a_bad_name_or_mtu_is_refused_with_a_clear_message() {
    // No privilege needed: the checks happen before the kernel is asked.
    let long = "hntt-name-too-long-for-linux";
    match TapBackend::open(long, 1500) {
        Err(e @ TapError::InvalidName { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(long) && msg.contains("15 bytes"), "{msg}");
        }
        other => panic!("expected InvalidName, got {other:?}"),
    }
    assert!(matches!(
        TapBackend::open("a/b", 1500),
        Err(TapError::InvalidName { .. })
    ));
    assert!(matches!(
        TapBackend::open("", 1500),
        Err(TapError::InvalidName { .. })
    ));
    match TapBackend::open("hnttmtu", 70000) {
        Err(e @ TapError::InvalidMtu { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("hnttmtu") && msg.contains("70000") && msg.contains("65521"),
                "{msg}"
            );
        }
        other => panic!("expected InvalidMtu, got {other:?}"),
    }
    assert!(matches!(
        TapBackend::open("hnttmtu", 67),
        Err(TapError::InvalidMtu { .. })
    ));
}

/// Removes CAP_NET_ADMIN from the calling thread's effective capabilities (capabilities are
/// per thread too).
fn drop_cap_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header read/write two Data structs.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0
        );
    }
}

#[test]
fn missing_cap_net_admin_is_explained() {
    if skip_unless_root("missing_cap_net_admin_is_explained") {
        return;
    }
    let name = unique_name();
    in_fresh_netns(move || {
        drop_cap_net_admin();
        let err = TapBackend::open(&name, 1500).expect_err("open without CAP_NET_ADMIN must fail");
        let _guard = DeleteOnDrop(name.clone());
        let msg = err.to_string();
        assert!(matches!(err, TapError::Open { .. }), "{msg}");
        assert_eq!(
            err.io_error().and_then(|e| e.raw_os_error()),
            Some(libc::EPERM),
            "{msg}"
        );
        assert!(
            msg.contains(&name) && msg.contains("CAP_NET_ADMIN"),
            "{msg}"
        );
    });
}

fn is_udp_broadcast_to_port_9(frame: &[u8]) -> bool {
    frame.len() >= 42
        && frame[0..6] == [0xff; 6]
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 17
        && frame[36..38] == [0, 9]
}

#[test]
fn one_wake_up_reads_many_frames_and_a_cancelled_recv_loses_none() {
    if skip_unless_root("one_wake_up_reads_many_frames_and_a_cancelled_recv_loses_none") {
        return;
    }
    let name = unique_name();
    in_fresh_netns(move || {
        // The kernel's own IPv6 traffic on link-up (MLD reports, neighbour solicitations for
        // duplicate address detection) would land in the "nothing there yet" check below.
        for key in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1")
                .expect("disable IPv6 in the test's namespace");
        }
        let mut tap = TapBackend::open(&name, 1500).expect("open TAP");
        let _guard = DeleteOnDrop(name.clone());
        ip(&["addr", "add", "10.99.0.1/24", "dev", &name]);
        let mut batch = FrameBatch::new(2, tap.max_frame_len());

        // A receive started and dropped while nothing is there takes nothing.
        {
            let pending = block_on(futures_lite::future::poll_once(tap.recv_batch(&mut batch)));
            assert!(pending.is_none(), "no frame yet");
        }
        assert!(batch.is_empty());

        // Broadcasts need no ARP: six datagrams go straight to the segment.
        let sock = UdpSocket::bind("10.99.0.1:0").expect("bind UDP socket");
        sock.set_broadcast(true).expect("SO_BROADCAST");
        for i in 0..6u8 {
            sock.send_to(&[i; 8], "10.99.0.255:9").expect("send_to");
        }
        std::thread::sleep(Duration::from_millis(100));

        // A batch of two stops at two; the rest wait for the next call, in order.
        let mut seen = Vec::new();
        while seen.len() < 6 {
            batch.clear();
            with_patience("broadcast frames", tap.recv_batch(&mut batch)).expect("recv_batch");
            assert!((1..=2).contains(&batch.len()), "batch of {}", batch.len());
            seen.extend(
                batch
                    .iter()
                    .filter(|f| is_udp_broadcast_to_port_9(f))
                    .map(|f| f[42]),
            );
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);

        // A larger batch takes everything ready in one call.
        for i in 10..16u8 {
            sock.send_to(&[i; 8], "10.99.0.255:9").expect("send_to");
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut big = FrameBatch::new(64, tap.max_frame_len());
        with_patience("broadcast frames", tap.recv_batch(&mut big)).expect("recv_batch");
        let got: Vec<u8> = big
            .iter()
            .filter(|f| is_udp_broadcast_to_port_9(f))
            .map(|f| f[42])
            .collect();
        assert_eq!(got, vec![10, 11, 12, 13, 14, 15]);
        assert_eq!(tap.rx_dropped(), 0);
    });
}

#[test]
fn the_backend_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<TapBackend>();
    send::<TapError>();
}
