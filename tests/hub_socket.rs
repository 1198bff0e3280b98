//! The hub socket backend with in-process peers speaking QEMU's `-netdev stream` framing (a
//! 4-byte big-endian length, then the frame) over Unix and TCP sockets: learning-hub switching
//! with the virtual host, bad and slow peers, the peer limit, socket files, connect mode, and
//! the real gateway handing out leases to smoltcp clients behind socket peers.
//!
//! Everything stays in this process and on loopback; no privilege is needed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use common::netns::wait_until;
use common::smol_client::{acquire_all, Got, SmolClient};
use futures_lite::FutureExt;
use hubnat::config::Config;
use hubnat::driver::{Gateway, GatewayError};
use hubnat_backend::{Backend, FrameBatch};
use hubnat_hub::{Endpoint, HubSocket, HubSocketConfig, HubSocketError, MacAddr, MemoryHub};
use smoltcp::time::Instant;
use smoltcp::wire::IpAddress;

const BROADCAST: MacAddr = [0xff; 6];
/// The virtual host's MAC in these tests (the test plays the virtual host's side).
const HOST: MacAddr = [0x00, 0xac, 0, 0, 0, 1];

fn mac(n: u8) -> MacAddr {
    [0x52, 0x54, 0, 0, 0, n]
}

/// A 60-byte frame from `src` to `dst` whose first payload byte is `tag`.
fn frame(dst: MacAddr, src: MacAddr, tag: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5, tag]);
    f.resize(60, 0);
    f
}

/// A peer's socket, Unix or TCP.
trait Stream: Read + Write + Send {
    fn set_timeout(&self, t: Option<Duration>);
}

impl Stream for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) {
        self.set_read_timeout(t).unwrap();
    }
}

impl Stream for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) {
        self.set_read_timeout(t).unwrap();
    }
}

/// An in-process peer speaking the framing.
struct Peer(Box<dyn Stream>);

impl Peer {
    fn unix(path: &Path) -> Peer {
        Peer(Box::new(
            UnixStream::connect(path).expect("connect to the hub socket"),
        ))
    }

    fn tcp(endpoint: &Endpoint) -> Peer {
        let Endpoint::Tcp(addr) = endpoint else {
            panic!("{endpoint} is not TCP")
        };
        let s = TcpStream::connect(addr).expect("connect to the hub socket");
        s.set_nodelay(true).unwrap();
        Peer(Box::new(s))
    }

    fn send(&mut self, frame: &[u8]) {
        self.0
            .write_all(&(frame.len() as u32).to_be_bytes())
            .unwrap();
        self.0.write_all(frame).unwrap();
    }

    /// The next frame, or None after `timeout` without one.
    fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        self.0.set_timeout(Some(timeout));
        let mut len = [0u8; 4];
        match self.0.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("peer read failed: {e}"),
        }
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut f).unwrap();
        Some(f)
    }

    /// Every frame that arrives within `quiet` of the previous one: (source number, tag).
    fn drain(&mut self, quiet: Duration) -> Vec<(u8, u8)> {
        let mut got = Vec::new();
        while let Some(f) = self.recv(quiet) {
            got.push((f[11], f[14]));
        }
        got
    }

    /// True once the hub has closed this connection (frames still queued are read and
    /// thrown away); false if it is still open after `within`.
    fn closed_by_hub(&mut self, within: Duration) -> bool {
        self.0.set_timeout(Some(within));
        let mut b = [0u8; 4096];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// The virtual host's side: frames the hub delivered to it within `quiet`, as (source, tag).
fn host_drain(hub: &mut HubSocket, quiet: Duration) -> Vec<(u8, u8)> {
    let mut got = Vec::new();
    let mut batch = FrameBatch::new(64, 1514);
    loop {
        batch.clear();
        let received = futures_lite::future::block_on(
            async { hub.recv_batch(&mut batch).await.map(|()| true) }.or(async {
                async_io::Timer::after(quiet).await;
                Ok(false)
            }),
        )
        .expect("recv_batch");
        if !received {
            return got;
        }
        got.extend(batch.iter().map(|f| (f[11], f[14])));
    }
}

fn host_send(hub: &mut HubSocket, frames: &[Vec<u8>]) {
    let mut batch = FrameBatch::new(frames.len().max(1), 1514);
    for f in frames {
        assert!(batch.push(f));
    }
    futures_lite::future::block_on(hub.send_batch(&batch)).expect("send_batch");
}

fn start(dir: &Path, tcp: bool) -> HubSocket {
    let mut listen = vec![Endpoint::Unix(dir.join("hub.sock"))];
    if tcp {
        listen.push("tcp:127.0.0.1:0".parse().unwrap());
    }
    HubSocket::start(HubSocketConfig::new(1500, listen)).expect("hub socket starts")
}

const QUIET: Duration = Duration::from_millis(300);

#[test]
fn several_peers_and_the_virtual_host_switch_like_a_learning_hub() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = start(dir.path(), true);
    let sock = dir.path().join("hub.sock");
    let tcp = hub.endpoints()[1].clone();
    let (mut a, mut b, mut c) = (Peer::unix(&sock), Peer::unix(&sock), Peer::tcp(&tcp));
    wait_until(
        Duration::from_secs(5),
        "three peers to be connected",
        || hub.socket_stats().peers == 3,
    );

    // Broadcasts reach everyone else, the virtual host included; the hub learns the sources.
    a.send(&frame(BROADCAST, mac(1), 1));
    b.send(&frame(BROADCAST, mac(2), 2));
    c.send(&frame(BROADCAST, mac(3), 3));
    let mut at_host = host_drain(&mut hub, QUIET);
    at_host.sort();
    assert_eq!(at_host, vec![(1, 1), (2, 2), (3, 3)]);
    assert_eq!(a.drain(QUIET), vec![(2, 2), (3, 3)]);
    assert_eq!(b.drain(QUIET), vec![(1, 1), (3, 3)]);
    assert_eq!(c.drain(QUIET), vec![(1, 1), (2, 2)]);

    // Unicast from the virtual host goes to the learnt port only.
    host_send(
        &mut hub,
        &[frame(mac(2), HOST, 10), frame(mac(3), HOST, 11)],
    );
    assert_eq!(b.drain(QUIET), vec![(1, 10)]);
    assert_eq!(c.drain(QUIET), vec![(1, 11)]);
    assert_eq!(a.drain(QUIET), vec![], "a saw unicast meant for others");

    // Now that the host's MAC is learnt, unicast to it reaches only the host, and unicast
    // between peers only the destination.
    a.send(&frame(HOST, mac(1), 20));
    a.send(&frame(mac(3), mac(1), 21));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(1, 20)]);
    assert_eq!(c.drain(QUIET), vec![(1, 21)]);
    assert_eq!(b.drain(QUIET), vec![]);

    // Unknown destinations are flooded.
    b.send(&frame(mac(99), mac(2), 30));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(2, 30)]);
    assert_eq!(a.drain(QUIET), vec![(2, 30)]);
    assert_eq!(c.drain(QUIET), vec![(2, 30)]);

    // A peer that leaves disturbs nobody, and its stations are forgotten (flooded again).
    drop(c);
    wait_until(Duration::from_secs(5), "the peer to be gone", || {
        hub.socket_stats().peers == 2
    });
    a.send(&frame(mac(3), mac(1), 40));
    assert_eq!(
        host_drain(&mut hub, QUIET),
        vec![(1, 40)],
        "mac 3 is unknown again: flooded"
    );
    assert_eq!(b.drain(QUIET), vec![(1, 40)]);
    let stats = hub.socket_stats();
    assert_eq!((stats.connected, stats.bad_length), (3, 0));
    assert!(
        hub.describe().starts_with("hub listen unix:"),
        "{}",
        hub.describe()
    );
}

#[test]
fn a_malformed_length_disconnects_only_that_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = start(dir.path(), false);
    let sock = dir.path().join("hub.sock");
    let (mut good, mut bad, mut huge) = (Peer::unix(&sock), Peer::unix(&sock), Peer::unix(&sock));
    wait_until(Duration::from_secs(5), "three peers", || {
        hub.socket_stats().peers == 3
    });
    good.send(&frame(BROADCAST, mac(1), 1));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(1, 1)]);

    // A length too short for an Ethernet header, after a good frame in the same write.
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&60u32.to_be_bytes());
    bytes.extend_from_slice(&frame(BROADCAST, mac(2), 2));
    bytes.extend_from_slice(&5u32.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 5]);
    bad.0.write_all(&bytes).unwrap();
    assert!(
        bad.closed_by_hub(Duration::from_secs(5)),
        "the bad peer is disconnected"
    );
    // A length no frame can have.
    huge.0.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(
        huge.closed_by_hub(Duration::from_secs(5)),
        "the huge peer is disconnected"
    );
    wait_until(Duration::from_secs(5), "two bad peers counted", || {
        hub.socket_stats().bad_length == 2
    });
    assert_eq!(hub.socket_stats().peers, 1);

    // The good frame before the bad length got through; the good peer carries on.
    assert_eq!(host_drain(&mut hub, QUIET), vec![(2, 2)]);
    assert_eq!(good.drain(QUIET), vec![(2, 2)]);
    good.send(&frame(BROADCAST, mac(1), 3));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(1, 3)]);
    host_send(&mut hub, &[frame(mac(1), HOST, 4)]);
    assert_eq!(good.drain(QUIET), vec![(1, 4)]);

    // A frame longer than the MTU is skipped, not a reason to disconnect.
    let mut big = frame(BROADCAST, mac(1), 5);
    big.resize(1600, 0);
    good.send(&big);
    good.send(&frame(BROADCAST, mac(1), 6));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(1, 6)]);
    assert_eq!(hub.socket_stats().oversized, 1);
}

#[test]
fn a_slow_peer_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = start(dir.path(), false);
    let sock = dir.path().join("hub.sock");
    // `slow` never reads.
    let (_slow, mut fast) = (Peer::unix(&sock), Peer::unix(&sock));
    wait_until(Duration::from_secs(5), "two peers", || {
        hub.socket_stats().peers == 2
    });
    fast.send(&frame(BROADCAST, mac(2), 0));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(2, 0)]);
    // Far more broadcast than the slow peer's socket buffer and queue hold: 20,000 frames of
    // 1514 bytes (30 MB), each one read by the fast peer as it comes.
    let reader = std::thread::spawn(move || {
        let mut n = 0u32;
        while let Some(f) = fast.recv(Duration::from_secs(5)) {
            if f[14] == 0xee {
                break;
            }
            n += 1;
        }
        (n, fast)
    });
    let started = StdInstant::now();
    let mut big = frame(BROADCAST, HOST, 1);
    big.resize(1514, 0);
    for _ in 0..200 {
        let batch: Vec<Vec<u8>> = std::iter::repeat_n(big.clone(), 100).collect();
        host_send(&mut hub, &batch);
        std::thread::sleep(Duration::from_millis(1));
    }
    host_send(&mut hub, &[frame(BROADCAST, HOST, 0xee)]);
    let (n, mut fast) = reader.join().unwrap();
    eprintln!(
        "fast peer got {n} of 20000 frames in {:?}; hub {:?}",
        started.elapsed(),
        hub.hub_stats()
    );
    // Not stalled: the end marker arrived, and most frames did (a busy machine may make the
    // fast peer's own queue overflow now and then, which is allowed).
    assert!(n >= 10_000, "the fast peer got only {n} frames");
    assert!(
        hub.hub_stats().queue_full > 0,
        "the slow peer's queue overflowed: {:?}",
        hub.hub_stats()
    );
    // And the fast peer still talks to the host.
    fast.send(&frame(HOST, mac(2), 9));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(2, 9)]);
}

#[test]
fn peers_beyond_the_limit_are_refused_until_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HubSocketConfig::new(1500, vec![Endpoint::Unix(dir.path().join("hub.sock"))]);
    config.max_peers = 2;
    let mut hub = HubSocket::start(config).unwrap();
    let sock = dir.path().join("hub.sock");
    let (a, mut b) = (Peer::unix(&sock), Peer::unix(&sock));
    wait_until(Duration::from_secs(5), "two peers", || {
        hub.socket_stats().peers == 2
    });
    let mut c = Peer::unix(&sock);
    assert!(
        c.closed_by_hub(Duration::from_secs(5)),
        "the third peer is refused"
    );
    assert_eq!(hub.socket_stats().refused, 1);
    drop(a);
    wait_until(Duration::from_secs(5), "a to leave", || {
        hub.socket_stats().peers == 1
    });
    let mut d = Peer::unix(&sock);
    wait_until(Duration::from_secs(5), "d to join", || {
        hub.socket_stats().peers == 2
    });
    d.send(&frame(BROADCAST, mac(4), 1));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(4, 1)]);
    assert_eq!(b.drain(QUIET), vec![(4, 1)]);
}

#[test]
fn a_peer_cannot_claim_the_virtual_hosts_mac() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HubSocketConfig::new(1500, vec![Endpoint::Unix(dir.path().join("hub.sock"))]);
    config.own_mac = Some(HOST);
    let mut hub = HubSocket::start(config).unwrap();
    let sock = dir.path().join("hub.sock");
    let (mut thief, mut client) = (Peer::unix(&sock), Peer::unix(&sock));
    wait_until(Duration::from_secs(5), "two peers", || {
        hub.socket_stats().peers == 2
    });
    // The thief sends as the virtual host: nothing of it reaches anyone.
    thief.send(&frame(BROADCAST, HOST, 1));
    thief.send(&frame(mac(2), HOST, 2));
    assert_eq!(
        client.drain(QUIET),
        vec![],
        "the claimed frames are dropped"
    );
    assert_eq!(
        host_drain(&mut hub, QUIET),
        vec![],
        "not even looped back to the host"
    );
    // The client's frames to the virtual host still reach it, and only it.
    client.send(&frame(HOST, mac(2), 3));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(2, 3)]);
    assert_eq!(
        thief.drain(QUIET),
        vec![],
        "the thief draws nothing to itself"
    );
}

#[test]
fn a_burst_of_connections_gets_no_more_than_max_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HubSocketConfig::new(1500, vec![Endpoint::Unix(dir.path().join("hub.sock"))]);
    config.max_peers = 2;
    let hub = HubSocket::start(config).unwrap();
    let sock = dir.path().join("hub.sock");
    // Twenty at once, before the hub's thread runs any of their tasks.
    let mut peers: Vec<Peer> = (0..20).map(|_| Peer::unix(&sock)).collect();
    wait_until(Duration::from_secs(5), "every connection answered", || {
        let s = hub.socket_stats();
        s.connected + s.refused == 20
    });
    let stats = hub.socket_stats();
    assert_eq!(
        (stats.connected, stats.refused, stats.peers),
        (2, 18, 2),
        "{stats:?}"
    );
    let open = peers
        .iter_mut()
        .map(|p| p.closed_by_hub(Duration::from_millis(200)))
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 2, "the hub closed all but two");
}

#[test]
fn a_peer_that_writes_without_pause_does_not_starve_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = start(dir.path(), false);
    let sock = dir.path().join("hub.sock");
    let (mut flooder, mut other) = (Peer::unix(&sock), Peer::unix(&sock));
    wait_until(Duration::from_secs(5), "two peers", || {
        hub.socket_stats().peers == 2
    });
    // The hub learns where the host is; the other peer sees its broadcast.
    host_send(&mut hub, &[frame(BROADCAST, HOST, 0x01)]);
    assert_eq!(other.drain(QUIET), vec![(HOST[5], 0x01)]);
    // The flooder writes frames to the host as fast as its socket takes them, without ever
    // reading.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let f = frame(HOST, mac(1), 0);
            let mut framed = Vec::new();
            for _ in 0..64 {
                framed.extend_from_slice(&(f.len() as u32).to_be_bytes());
                framed.extend_from_slice(&f);
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if flooder.0.write_all(&framed).is_err() {
                    break;
                }
            }
        })
    };
    // Meanwhile the other peer's frames reach the host (through a queue the flood keeps
    // full, so some may be dropped and sent again), and the host's reach it.
    let mut batch = FrameBatch::new(64, 1514);
    for tag in 1..=20u8 {
        let until = StdInstant::now() + Duration::from_secs(20);
        let mut sent_at = StdInstant::now();
        other.send(&frame(HOST, mac(2), tag));
        loop {
            assert!(
                StdInstant::now() < until,
                "frame {tag} from the other peer never came"
            );
            batch.clear();
            futures_lite::future::block_on(hub.recv_batch(&mut batch)).expect("recv_batch");
            if batch.iter().any(|f| (f[11], f[14]) == (2, tag)) {
                break;
            }
            if sent_at.elapsed() > Duration::from_millis(50) {
                other.send(&frame(HOST, mac(2), tag));
                sent_at = StdInstant::now();
            }
        }
    }
    host_send(&mut hub, &[frame(mac(2), HOST, 0x55)]);
    assert_eq!(other.drain(QUIET), vec![(HOST[5], 0x55)]);
    // And the hub stops while the flood goes on.
    drop(hub);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooding.join().unwrap();
}

#[test]
fn socket_files_are_owner_only_by_default_stale_ones_replaced_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sock");
    let meta = |p: &Path| std::fs::symlink_metadata(p).expect("socket file");

    // A stale socket file (nobody accepts) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(meta(&path).file_type().is_socket());
    let hub = HubSocket::start(HubSocketConfig::new(
        1500,
        vec![Endpoint::Unix(path.clone())],
    ))
    .expect("replaces the stale file");
    assert_eq!(meta(&path).permissions().mode() & 0o7777, 0o600);

    // A live one is not stolen.
    let err = HubSocket::start(HubSocketConfig::new(
        1500,
        vec![Endpoint::Unix(path.clone())],
    ))
    .expect_err("in use");
    assert!(matches!(err, HubSocketError::InUse(_)), "{err}");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    drop(hub);
    assert!(!path.exists(), "the socket file is removed on drop");

    // A path that is not a socket is refused.
    std::fs::write(&path, "not a socket").unwrap();
    let err = HubSocket::start(HubSocketConfig::new(
        1500,
        vec![Endpoint::Unix(path.clone())],
    ))
    .expect_err("a file");
    assert!(matches!(err, HubSocketError::NotASocket(_)), "{err}");
    std::fs::remove_file(&path).unwrap();

    // The mode is configurable.
    let mut config = HubSocketConfig::new(1500, vec![Endpoint::Unix(path.clone())]);
    config.socket_mode = 0o660;
    let _hub = HubSocket::start(config).unwrap();
    assert_eq!(meta(&path).permissions().mode() & 0o7777, 0o660);

    // A missing directory is created.
    let nested = dir.path().join("run/hubnat/hub.sock");
    let _nested = HubSocket::start(HubSocketConfig::new(
        1500,
        vec![Endpoint::Unix(nested.clone())],
    ))
    .expect("creates the directory");
    assert!(meta(&nested).file_type().is_socket());

    // No endpoint at all is an error, and an unusable one names itself.
    assert!(matches!(
        HubSocket::start(HubSocketConfig::new(1500, vec![])),
        Err(HubSocketError::NoEndpoint)
    ));
    std::fs::write(dir.path().join("file"), "").unwrap();
    let err = HubSocket::start(HubSocketConfig::new(
        1500,
        vec![Endpoint::Unix(dir.path().join("file/x.sock"))],
    ))
    .expect_err("not a dir");
    assert!(err.to_string().contains("file/x.sock"), "{err}");
}

#[test]
fn connect_mode_dials_a_listening_hub_and_dials_again_after_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("vpn-hub.sock");
    let listener = UnixListener::bind(&remote).unwrap();
    let mut config = HubSocketConfig::new(1500, vec![]);
    config.connect = Some(Endpoint::Unix(remote.clone()));
    let mut hub = HubSocket::start(config).unwrap();
    assert_eq!(
        hub.describe(),
        format!("hub connect unix:{}", remote.display())
    );

    let accept = |listener: &UnixListener| {
        listener.set_nonblocking(false).unwrap();
        let (s, _) = listener.accept().unwrap();
        Peer(Box::new(s))
    };
    let mut uplink = accept(&listener);
    uplink.send(&frame(BROADCAST, mac(7), 1));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(7, 1)]);
    host_send(&mut hub, &[frame(mac(7), HOST, 2)]);
    assert_eq!(uplink.drain(QUIET), vec![(1, 2)]);

    // The listening hub drops the connection; hubnat dials again (after 1 s).
    drop(uplink);
    let started = StdInstant::now();
    let mut uplink = accept(&listener);
    assert!(started.elapsed() < Duration::from_secs(5));
    uplink.send(&frame(BROADCAST, mac(7), 3));
    assert_eq!(host_drain(&mut hub, QUIET), vec![(7, 3)]);
    assert_eq!(hub.socket_stats().connected, 2);
}

/// Pumps frames between a memory-hub port (where a smoltcp client sits) and a socket peer.
struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pump {
    fn start(
        port: hubnat_hub::MemoryPort,
        mut stream: Box<dyn Stream>,
        mut reader: Box<dyn Stream>,
    ) -> Pump {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        reader.set_timeout(Some(Duration::from_millis(1)));
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut inbuf: Vec<u8> = Vec::new();
            let mut chunk = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                while port.try_recv(&mut buf) {
                    stream.write_all(&(buf.len() as u32).to_be_bytes()).unwrap();
                    stream.write_all(&buf).unwrap();
                }
                match reader.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("pump read: {e}"),
                }
                while inbuf.len() >= 4 {
                    let len = u32::from_be_bytes(inbuf[..4].try_into().unwrap()) as usize;
                    if inbuf.len() < 4 + len {
                        break;
                    }
                    port.try_send(&inbuf[4..4 + len]);
                    inbuf.drain(..4 + len);
                }
            }
        });
        Pump {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_gateway_gives_leases_to_smoltcp_clients_behind_socket_peers() {
    let dir = tempfile::tempdir().unwrap();
    let gw_ip = Ipv4Addr::new(192, 168, 30, 1);
    let mut config = Config::default();
    config.state.dir = dir.path().join("state");
    config.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    config.dhcp.domain = Some("hubnat.test".into());
    config.dns.upstream = Vec::new();
    config.backend.hub.listen = vec![
        Endpoint::Unix(dir.path().join("hub.sock")),
        "tcp:127.0.0.1:0".parse().unwrap(),
    ];
    let hub = HubSocket::start(config.hub_socket_config()).expect("hub socket");
    let tcp = hub.endpoints()[1].clone();
    let gateway = Gateway::new(config).expect("gateway");
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let gw_thread: JoinHandle<Result<(), GatewayError>> = std::thread::spawn(move || {
        hubnat::rt::block_on(gateway.run(hub, async move {
            let _ = stopped.recv().await;
        }))
    });

    // Two clients, each a smoltcp stack on its own little memory hub, pumped over a socket:
    // one over Unix, one over TCP.
    let unix = UnixStream::connect(dir.path().join("hub.sock")).unwrap();
    let Endpoint::Tcp(addr) = tcp else {
        unreachable!()
    };
    let tcp = TcpStream::connect(addr).unwrap();
    let (la, lb) = (MemoryHub::new(1500), MemoryHub::new(1500));
    let _pa = Pump::start(
        la.connect(),
        Box::new(unix.try_clone().unwrap()),
        Box::new(unix),
    );
    let _pb = Pump::start(
        lb.connect(),
        Box::new(tcp.try_clone().unwrap()),
        Box::new(tcp),
    );
    let mut a = SmolClient::new(la.connect(), [0x52, 0x54, 0, 0, 0, 0xa], Instant::now());
    let mut b = SmolClient::new(lb.connect(), [0x52, 0x54, 0, 0, 0, 0xb], Instant::now());
    let [ga, gb]: [Got; 2] = acquire_all(&mut [&mut a, &mut b], Duration::from_secs(15))
        .try_into()
        .unwrap();
    assert_ne!(ga.address.address(), gb.address.address());
    assert_eq!((ga.router, gb.router), (Some(gw_ip), Some(gw_ip)));
    assert_eq!(ga.domain.as_deref(), Some("hubnat.test"));

    // Both ping the virtual host through the socket.
    a.send_ping(gw_ip, 1);
    b.send_ping(gw_ip, 2);
    let (mut pa, mut pb) = (None, None);
    let deadline = StdInstant::now() + Duration::from_secs(5);
    while (pa.is_none() || pb.is_none()) && StdInstant::now() < deadline {
        a.poll(Instant::now());
        b.poll(Instant::now());
        pa = pa.or_else(|| a.take_pong());
        pb = pb.or_else(|| b.take_pong());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(pa, Some((IpAddress::Ipv4(gw_ip), 1)));
    assert_eq!(pb, Some((IpAddress::Ipv4(gw_ip), 2)));

    stop.send_blocking(()).unwrap();
    gw_thread.join().unwrap().expect("the gateway ran cleanly");
    assert!(
        !dir.path().join("hub.sock").exists(),
        "the socket file is removed when the gateway stops"
    );
}
