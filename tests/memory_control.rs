//! The control surface of a running gateway, in process: the real driver on the in-memory hub,
//! a smoltcp client on another port, a real `TcpListener` on 127.0.0.1 as the remote (reached
//! with `nat.allow_host_loopback`), and the [`GatewayHandle`](hubnat::driver::GatewayHandle)
//! to read the status and the tables, end sessions, release leases and change settings. Also:
//! a step of the wall clock changes nothing but the times shown. No namespaces, no root.

mod common;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use common::inproc::{start, start_with, Running};
use common::smol_client::{acquire, try_acquire, Got, SmolClient};
use hubnat::config::Config;
use hubnat::core::nat::{EndReason, Protocol, SessionState};
use hubnat::core::LeaseTarget;
use hubnat::driver::{HandleError, LeaseRow, SessionRow, Status, WallClock};
use hubnat_backend::Backend;
use hubnat_hub::MemoryHub;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::time::Instant;

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
const MAC_C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0c];
/// How long any one thing may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

fn config(state: &Path) -> Config {
    let mut c = Config::default();
    c.state.dir = state.to_owned();
    c.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    c.nat.allow_host_loopback = true;
    c.dns.upstream = vec![];
    c
}

fn security_log(state: &Path) -> String {
    std::fs::read_to_string(state.join("security.log")).unwrap_or_default()
}

fn mac_text(mac: [u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// Waits for the answer of a handle call on a running gateway.
fn ask<T>(call: impl std::future::Future<Output = Result<T, HandleError>>) -> T {
    async_io::block_on(call).expect("the running gateway answers")
}

fn status(gw: &Running) -> Status {
    ask(gw.handle.status())
}

fn sessions(gw: &Running) -> Vec<SessionRow> {
    ask(gw.handle.sessions())
}

fn lease_of(gw: &Running, mac: [u8; 6]) -> LeaseRow {
    let mac = mac_text(mac);
    ask(gw.handle.leases())
        .into_iter()
        .find(|l| l.mac == mac)
        .unwrap_or_else(|| panic!("no lease row for {mac}"))
}

/// A wall clock at the system's time plus `offset` seconds (which the test steps).
fn stepped_wall(offset: &Arc<AtomicI64>) -> WallClock {
    let offset = offset.clone();
    Arc::new(move || shifted(SystemTime::now(), offset.load(Ordering::SeqCst)))
}

fn shifted(t: SystemTime, secs: i64) -> SystemTime {
    let by = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        t + by
    } else {
        t - by
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A host-side server for one connection: sends back what it reads. At EOF it closes its side
/// and returns the byte count; a read or write error (a RST) is returned as such.
fn echo_server(listener: TcpListener) -> JoinHandle<io::Result<usize>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 16384];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            s.write_all(&buf[..n])?;
            total += n;
        }
    })
}

/// A listener on the host's loopback and its port.
fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// Polls `client` until `done` holds; panics naming `what` after [`PATIENCE`].
fn poll_until(client: &mut SmolClient, what: &str, mut done: impl FnMut(&mut SmolClient) -> bool) {
    let deadline = StdInstant::now() + PATIENCE;
    loop {
        client.poll(Instant::now());
        if done(client) {
            return;
        }
        assert!(
            StdInstant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls `client` for `period`.
fn poll_for(client: &mut SmolClient, period: Duration) {
    let until = StdInstant::now() + period;
    while StdInstant::now() < until {
        client.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Opens a TCP connection from `client` to 127.0.0.1:`port` and waits until it is established.
fn connect(client: &mut SmolClient, port: u16, local_port: u16) -> SocketHandle {
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), local_port);
    poll_until(client, "the connection is established", |c| {
        c.tcp(h).state() == State::Established
    });
    h
}

/// Sends `data` on `h` and reads as many bytes back (the remote echoes).
fn echo(client: &mut SmolClient, h: SocketHandle, data: &[u8]) -> Vec<u8> {
    let (mut sent, mut got) = (0, Vec::new());
    poll_until(client, "the echo comes back", |c| {
        let s = c.tcp(h);
        if sent < data.len() && s.can_send() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() >= data.len()
    });
    got
}

/// Closes `h` from the client and polls until both sides are done and the gateway's session
/// is gone (the client's last ACK ends it there).
fn close(client: &mut SmolClient, gw: &Running, h: SocketHandle) {
    client.tcp(h).close();
    poll_until(client, "the connection closes", |c| {
        matches!(c.tcp(h).state(), State::TimeWait | State::Closed)
    });
    poll_until(client, "the session leaves the table", |_| {
        sessions(gw).is_empty()
    });
}

/// Waits until the gateway's TCP session for `h` ended with a RST to the client.
fn wait_reset(client: &mut SmolClient, h: SocketHandle) {
    poll_until(client, "the client's connection is reset", |c| {
        c.tcp(h).state() == State::Closed
    });
}

/// The host-side server's end: it must have seen a RST, not an EOF.
fn assert_reset(server: JoinHandle<io::Result<usize>>) {
    match server.join().unwrap() {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the server saw an EOF after {n} bytes, not a reset"),
    }
}

/// Item a: a step of the wall clock (NTP, a suspend) reaches no timer. The session lives on
/// and carries data, the lease stays bound with the same address; only the times shown (and
/// saved) move with the wall clock.
#[test]
fn wall_clock_steps_change_nothing_but_the_times_shown() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut cfg = config(state.path());
    // Short enough that a step read as elapsed time would expire them in a mass.
    cfg.dhcp.lease = Duration::from_secs(60);
    cfg.nat.tcp_timeout = Duration::from_secs(30);
    let offset = Arc::new(AtomicI64::new(0));
    let wall = stepped_wall(&offset);
    let gw = start_with(cfg.clone(), &hub, Some(wall.clone()));

    let (l, port) = listener();
    let server = echo_server(l);
    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    let got = acquire(&mut client, PATIENCE);
    let ip = got.address.address();
    let h = connect(&mut client, port, 50000);
    assert_eq!(echo(&mut client, h, b"before any step"), b"before any step");
    let [session]: [SessionRow; 1] = sessions(&gw).try_into().unwrap();
    let lease = lease_of(&gw, MAC_A);
    assert_eq!((lease.ip, lease.state.as_str()), (ip, "bound"));
    let remaining = lease.expires.duration_since(wall()).unwrap();
    assert!(
        (Duration::from_secs(50)..=Duration::from_secs(61)).contains(&remaining),
        "{remaining:?}"
    );

    for (step, newcomer) in [(5 * 3600, MAC_B), (-10 * 3600, MAC_C)] {
        offset.fetch_add(step, Ordering::SeqCst);
        let what = format!("after a step of {step} s");

        // The session is still there, and data flows both ways.
        let rows = sessions(&gw);
        let row = rows
            .iter()
            .find(|s| s.id == session.id)
            .unwrap_or_else(|| panic!("{what}: the session is gone: {rows:?}"));
        assert_eq!(row.state, SessionState::Established, "{what}");
        // Its times are shown on the stepped clock.
        let age = wall().duration_since(row.created).unwrap();
        assert!(age < Duration::from_secs(60), "{what}: created {age:?} ago");
        let msg = format!("data {what}");
        assert_eq!(
            echo(&mut client, h, msg.as_bytes()),
            msg.as_bytes(),
            "{what}"
        );
        assert!(client.tcp(h).is_active(), "{what}");

        // The lease is still bound to the same address; its expiry moved with the wall clock.
        let lease = lease_of(&gw, MAC_A);
        assert_eq!((lease.ip, lease.state.as_str()), (ip, "bound"), "{what}");
        let now_remaining = lease
            .expires
            .duration_since(wall())
            .unwrap_or_else(|_| panic!("{what}: the lease shows as expired"));
        let drift = remaining.abs_diff(now_remaining);
        assert!(
            drift < Duration::from_secs(5),
            "{what}: expiry moved by {drift:?}"
        );

        // A change saves the lease table: the file has times on the stepped wall clock.
        let mut other = SmolClient::new(hub.connect(), newcomer, Instant::now());
        acquire(&mut other, PATIENCE);
        let saved = hubnat::state::load_leases(state.path()).unwrap();
        let record = saved
            .iter()
            .find(|l| l.mac == MAC_A)
            .expect("the lease is saved");
        let wall_now = unix_secs(wall());
        let expected = wall_now + now_remaining.as_secs();
        assert!(
            record.expires.abs_diff(expected) <= 3,
            "{what}: saved expiry {} differs from {expected}",
            record.expires
        );
        assert!(
            record.start <= wall_now && wall_now - record.start < 60,
            "{what}: saved start {} is not a few seconds before {wall_now}",
            record.start
        );
    }
    let s = status(&gw);
    assert_eq!(s.sessions.tcp, 1);
    assert_eq!(s.nat.ended.iter().sum::<u64>(), 0, "no session ended");
    assert_eq!(s.leases, 3, "every lease is still bound");

    close(&mut client, &gw, h);
    server.join().unwrap().unwrap();
    gw.stop();
    let log = security_log(state.path());
    assert!(!log.contains("DHCP lease expired"), "{log}");
    assert!(log.contains("reason=\"closed by client\""), "{log}");

    // A restart on the same (stepped) wall clock reads the saved times back: the lease is
    // still bound with the time it had left, and saved again with the same start.
    let saved = hubnat::state::load_leases(state.path()).unwrap();
    let before = saved.iter().find(|l| l.mac == MAC_A).unwrap().clone();
    let gw = start_with(cfg, &hub, Some(wall.clone()));
    let lease = lease_of(&gw, MAC_A);
    assert_eq!((lease.ip, lease.state.as_str()), (ip, "bound"));
    let left = lease.expires.duration_since(wall()).unwrap();
    assert!(
        remaining.abs_diff(left) < Duration::from_secs(5),
        "{left:?}"
    );
    gw.stop();
    let saved = hubnat::state::load_leases(state.path()).unwrap();
    let after = saved.iter().find(|l| l.mac == MAC_A).unwrap();
    assert!(
        after.start.abs_diff(before.start) <= 1,
        "{after:?} / {before:?}"
    );
    assert!(
        after.expires.abs_diff(before.expires) <= 1,
        "{after:?} / {before:?}"
    );
}

/// Item b: the status counts what happened, exactly.
#[test]
fn status_counts_frames_sessions_bytes_and_dhcp_messages() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    // Authoritative: no probes for another DHCP server, so every frame out is the client's.
    let mut c = config(state.path());
    c.dhcp.authoritative = true;
    let gw = start(c, &hub);
    let s0 = status(&gw);
    assert!(s0.enabled && s0.nat_enabled && s0.dhcp_enabled);
    assert_eq!(
        (s0.counters.frames_in, s0.sessions.tcp, s0.leases),
        (0, 0, 0)
    );
    assert_eq!(s0.pool_size, 191);

    let (l, port) = listener();
    let server = echo_server(l);
    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    acquire(&mut client, PATIENCE);
    let s1 = status(&gw);
    assert!(s1.counters.frames_in >= 2, "{:?}", s1.counters);
    assert!(s1.counters.frames_out >= 2, "{:?}", s1.counters);
    assert_eq!(s1.leases, 1);

    let h = connect(&mut client, port, 50000);
    let data = pattern(300_000);
    assert!(echo(&mut client, h, &data) == data, "the echo differs");
    let s2 = status(&gw);
    assert!(s2.counters.frames_in > s1.counters.frames_in + 200);
    assert!(s2.counters.frames_out > s1.counters.frames_out + 200);
    assert_eq!(s2.sessions.tcp, 1);
    assert_eq!(s2.nat.created, [1, 0, 0]);
    assert_eq!(s2.bytes_to_remote, data.len() as u64);
    assert_eq!(s2.bytes_to_client, data.len() as u64);

    close(&mut client, &gw, h);
    assert_eq!(server.join().unwrap().unwrap(), data.len());
    // Quiet now: every frame the client sent is in frames_in, every frame it received in
    // frames_out (nobody else is on the hub).
    let stats = client.device.port.stats();
    let s3 = status(&gw);
    assert_eq!(s3.counters.frames_in, stats.tx_frames, "{:?}", s3.counters);
    assert_eq!(
        s3.counters.frames_out,
        stats.rx_frames + client.device.port.queued() as u64,
        "{:?}",
        s3.counters
    );
    assert_eq!(s3.sessions.tcp, 0);
    assert_eq!(s3.nat.created, [1, 0, 0]);
    let mut ended = [0; EndReason::ALL.len()];
    ended[EndReason::ClosedByClient.index()] = 1;
    assert_eq!(s3.nat.ended, ended);
    assert_eq!(s3.bytes_to_remote, data.len() as u64);
    assert_eq!(s3.bytes_to_client, data.len() as u64);
    let d = s3.dhcp;
    assert_eq!(
        (d.discovers, d.requests, d.offers, d.acks, d.naks),
        (1, 1, 1, 1, 0),
        "{d:?}"
    );
    assert_eq!(s3.leases, 1);
    assert_eq!(s3.counters.malformed, 0);
    gw.stop();
}

/// Item c: the session table shows the session as it moves data; an operator can end it, and
/// both ends see a reset.
#[test]
fn session_table_and_ending_a_session() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    let (l, port) = listener();
    let server = echo_server(l);
    let mut client = SmolClient::new(hub.connect(), MAC_C, Instant::now());
    let ip = acquire(&mut client, PATIENCE).address.address();
    let h = connect(&mut client, port, 50123);
    echo(&mut client, h, &pattern(1000));

    let [row]: [SessionRow; 1] = sessions(&gw).try_into().unwrap();
    assert_eq!(row.protocol, Protocol::Tcp);
    assert_eq!(row.client, SocketAddrV4::new(ip, 50123));
    assert_eq!(row.remote, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    assert_eq!(row.target, SocketAddr::V4(row.remote));
    assert_eq!(row.client_mac, mac_text(MAC_C));
    assert_eq!(row.state, SessionState::Established);
    assert_eq!((row.bytes_to_remote, row.bytes_to_client), (1000, 1000));
    assert!(row.last_activity >= row.created);

    echo(&mut client, h, &pattern(5000));
    let [later]: [SessionRow; 1] = sessions(&gw).try_into().unwrap();
    assert_eq!(later.id, row.id);
    assert_eq!((later.bytes_to_remote, later.bytes_to_client), (6000, 6000));
    assert!(later.last_activity >= row.last_activity);

    assert!(
        ask(gw.handle.end_session(row.id, "the test")),
        "the session was there"
    );
    wait_reset(&mut client, h);
    assert_reset(server);
    assert!(sessions(&gw).is_empty());
    assert!(
        !ask(gw.handle.end_session(row.id, "the test")),
        "the session is gone"
    );
    let s = status(&gw);
    assert_eq!(s.nat.ended[EndReason::EndedByOperator.index()], 1);
    gw.stop();
    let log = security_log(state.path());
    assert!(
        log.contains(&format!(
            "NAT session deleted: id={} proto=tcp client={ip}:50123 remote=127.0.0.1:{port} bytes_out=6000 bytes_in=6000",
            row.id
        )),
        "{log}"
    );
    assert!(log.contains("reason=\"ended by operator\""), "{log}");
}

/// Item d: an operator releases a lease.
#[test]
fn releasing_a_lease() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    let ip = acquire(&mut client, PATIENCE).address.address();
    assert_eq!(status(&gw).leases, 1);

    let row = ask(gw.handle.release_lease(LeaseTarget::Mac(MAC_A), "the test"))
        .expect("a lease released");
    assert_eq!((row.mac.as_str(), row.ip), (mac_text(MAC_A).as_str(), ip));
    let shown = lease_of(&gw, MAC_A);
    assert_eq!((shown.ip, shown.state.as_str()), (ip, "released"));
    assert_eq!(status(&gw).leases, 0);
    let saved = hubnat::state::load_leases(state.path()).unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!(format!("{:?}", saved[0].state), "Released");

    let unknown = [0x52, 0x54, 0, 0, 0, 0xee];
    assert!(ask(gw
        .handle
        .release_lease(LeaseTarget::Mac(unknown), "the test"))
    .is_none());
    assert!(ask(gw
        .handle
        .release_lease(LeaseTarget::Ip(Ipv4Addr::new(192, 168, 30, 99)), "the test"))
    .is_none());
    // Released already: nothing more to release.
    assert!(ask(gw.handle.release_lease(LeaseTarget::Ip(ip), "the test")).is_none());
    gw.stop();
    let log = security_log(state.path());
    assert!(
        log.contains(&format!(
            "DHCP lease released by operator: id={} mac={} ip={ip}",
            row.id,
            mac_text(MAC_A)
        )),
        "{log}"
    );
}

/// Item e, DHCP: a new range and lease time apply to new clients; turning the server off and
/// on keeps its counters; a DISCOVER while it is off gets no answer and is counted.
#[test]
fn live_dhcp_settings() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let cfg = config(state.path());
    let gw = start(cfg.clone(), &hub);
    let mut a = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    let got_a = acquire(&mut a, PATIENCE);
    assert_eq!(got_a.lease_secs, Some(7200));

    let mut cfg = cfg;
    cfg.dhcp.range_start = Ipv4Addr::new(192, 168, 30, 100);
    cfg.dhcp.range_end = Ipv4Addr::new(192, 168, 30, 120);
    cfg.dhcp.lease = Duration::from_secs(600);
    ask(gw.handle.apply_config(cfg.clone(), "test"));
    let s = status(&gw);
    assert_eq!(s.pool_size, 21);
    let mut b = SmolClient::new(hub.connect(), MAC_B, Instant::now());
    let got_b = acquire(&mut b, PATIENCE);
    let in_new_range = |g: &Got| {
        (u32::from(Ipv4Addr::new(192, 168, 30, 100))..=u32::from(Ipv4Addr::new(192, 168, 30, 120)))
            .contains(&u32::from(g.address.address()))
    };
    assert!(in_new_range(&got_b), "{got_b:?}");
    assert_eq!(got_b.lease_secs, Some(600));
    let before = status(&gw).dhcp;
    assert!(before.discovers >= 2 && before.acks >= 2, "{before:?}");

    cfg.dhcp.enabled = false;
    ask(gw.handle.apply_config(cfg.clone(), "test"));
    let s = status(&gw);
    assert!(!s.dhcp_enabled);
    let mut c = SmolClient::new(hub.connect(), MAC_C, Instant::now());
    assert_eq!(
        try_acquire(&mut c, Duration::from_secs(1)),
        None,
        "no answer while off"
    );
    let s = status(&gw);
    assert!(s.counters.dhcp_disabled >= 1, "{:?}", s.counters);
    assert_eq!(s.dhcp, before, "nothing reaches the server while it is off");

    cfg.dhcp.enabled = true;
    ask(gw.handle.apply_config(cfg, "test"));
    let got_c = acquire(&mut c, PATIENCE);
    assert!(in_new_range(&got_c), "{got_c:?}");
    let after = status(&gw).dhcp;
    assert!(after.discovers > before.discovers, "{after:?}");
    assert!(after.acks > before.acks, "{after:?}");
    assert!(after.offers > before.offers, "counters kept: {after:?}");
    gw.stop();
    let log = security_log(state.path());
    assert!(
        log.contains("GATEWAY setting changed: key=dhcp.range_start old=\"192.168.30.10\" new=\"192.168.30.100\" by=\"test\""),
        "{log}"
    );
}

/// Item e, NAT: turning the NAT off ends the open session and carries nothing new; turning it
/// on carries new connections again.
#[test]
fn live_nat_enable_and_disable() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut cfg = config(state.path());
    let gw = start(cfg.clone(), &hub);
    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    acquire(&mut client, PATIENCE);
    let (l, port) = listener();
    let server = echo_server(l);
    let h1 = connect(&mut client, port, 50001);
    assert_eq!(echo(&mut client, h1, b"one"), b"one");

    cfg.nat.enabled = false;
    ask(gw.handle.apply_config(cfg.clone(), "test"));
    wait_reset(&mut client, h1);
    assert_reset(server);
    let s = status(&gw);
    assert!(!s.nat_enabled);
    assert_eq!(s.sessions.tcp, 0);
    assert_eq!(s.nat.ended[EndReason::NatDisabled.index()], 1);

    // A new connection gets no answer at all, and costs nothing.
    let (l2, port2) = listener();
    l2.set_nonblocking(true).unwrap();
    let h2 = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port2), 50002);
    poll_for(&mut client, Duration::from_millis(1500));
    assert_eq!(
        client.tcp(h2).state(),
        State::SynSent,
        "no answer while the NAT is off"
    );
    assert_eq!(
        l2.accept().map(|_| ()).unwrap_err().kind(),
        io::ErrorKind::WouldBlock,
        "nothing reached the remote"
    );
    let s = status(&gw);
    assert_eq!((s.sessions.tcp, s.nat.created[0]), (0, 1));
    assert!(s.nat.disabled >= 1, "{:?}", s.nat);
    client.tcp(h2).abort();
    client.poll(Instant::now());

    cfg.nat.enabled = true;
    ask(gw.handle.apply_config(cfg, "test"));
    l2.set_nonblocking(false).unwrap();
    let server2 = echo_server(l2);
    let h3 = connect(&mut client, port2, 50003);
    assert_eq!(echo(&mut client, h3, b"three"), b"three");
    assert_eq!(status(&gw).nat.created[0], 2);
    close(&mut client, &gw, h3);
    assert_eq!(server2.join().unwrap().unwrap(), 5);
    gw.stop();
    let log = security_log(state.path());
    assert!(
        log.contains("NAT session deleted: id=1 ") && log.contains("reason=\"nat disabled\""),
        "{log}"
    );
    assert_eq!(
        log.matches("GATEWAY setting changed: key=nat.enabled")
            .count(),
        2,
        "{log}"
    );
}

/// Item e, timeouts: a shorter `nat.tcp_timeout` applies to the open session at once.
#[test]
fn a_shorter_tcp_timeout_ends_an_idle_session() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let mut cfg = config(state.path());
    cfg.nat.tcp_timeout = Duration::from_secs(30);
    let gw = start(cfg.clone(), &hub);
    let mut client = SmolClient::new(hub.connect(), MAC_A, Instant::now());
    acquire(&mut client, PATIENCE);
    let (l, port) = listener();
    let server = echo_server(l);
    let h = connect(&mut client, port, 50000);
    echo(&mut client, h, b"ping");

    cfg.nat.tcp_timeout = Duration::from_secs(2);
    ask(gw.handle.apply_config(cfg, "test"));
    let applied = StdInstant::now();
    assert_eq!(sessions(&gw).len(), 1, "not idle for 2 s yet");
    wait_reset(&mut client, h);
    let waited = applied.elapsed();
    assert!(
        waited > Duration::from_millis(500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_reset(server);
    let s = status(&gw);
    assert_eq!(s.nat.ended[EndReason::IdleTimeout.index()], 1);
    gw.stop();
    let log = security_log(state.path());
    assert!(log.contains("reason=\"idle timeout\""), "{log}");
}

/// Item f: a handle outlives its gateway and then says so.
#[test]
fn a_handle_to_a_stopped_gateway_says_stopped() {
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let cfg = config(state.path());
    let gw = start(cfg.clone(), &hub);
    let handle = gw.handle.clone();
    gw.stop();
    let stopped = |r: Result<(), HandleError>| matches!(r, Err(HandleError::Stopped));
    assert!(stopped(async_io::block_on(handle.status()).map(drop)));
    assert!(stopped(async_io::block_on(handle.sessions()).map(drop)));
    assert!(stopped(async_io::block_on(handle.leases()).map(drop)));
    assert!(stopped(
        async_io::block_on(handle.apply_config(cfg, "test")).map(drop)
    ));
    assert!(stopped(
        async_io::block_on(handle.end_session(hubnat::core::nat::SessionId(1), "the test"))
            .map(drop)
    ));
    assert!(stopped(
        async_io::block_on(handle.release_lease(LeaseTarget::Mac(MAC_A), "the test")).map(drop)
    ));
}

/// Live changes through `set`: a valid set applies and reports each changed key; an invalid
/// one (a range outside the subnet, MTU 0, an unknown key, a key that needs a restart, an MTU
/// larger than the backend's frames) is refused with the key and why, and changes nothing.
#[test]
fn set_applies_valid_changes_and_refuses_invalid_ones_whole() {
    use hubnat::config::Override;
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let gw = start(config(state.path()), &hub);
    let set = |changes: &[(&str, &str)]| {
        let changes = changes.iter().map(|(k, v)| Override::new(*k, *v)).collect();
        async_io::block_on(gw.handle.set(changes, "the test"))
    };
    let changed = set(&[("dhcp.lease", "10m"), ("nat.tcp_timeout", "1h")]).expect("valid");
    let keys: Vec<&str> = changed.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["dhcp.lease", "nat.tcp_timeout"]);
    assert!(
        set(&[("dhcp.lease", "10m")]).unwrap().is_empty(),
        "same value: no change"
    );
    let before = status(&gw);
    for (changes, expect) in [
        (
            vec![("dhcp.range_end", "192.168.31.5"), ("dhcp.lease", "20m")],
            "config key dhcp.range_end = 192.168.31.5 (from the test)",
        ),
        (vec![("nat.mtu", "0")], "nat.mtu"),
        (vec![("nat.bogus", "1")], "nat.bogus"),
        (vec![("backend.kind", "raw")], "restart"),
        (
            vec![("nat.mtu", "9000")],
            "larger than the backend's frames",
        ),
    ] {
        let err = set(&changes).expect_err("refused").to_string();
        assert!(err.contains(expect), "{changes:?}: {err}");
    }
    let after = status(&gw);
    assert_eq!(before.dhcp_enabled, after.dhcp_enabled);
    gw.stop();
    let log = security_log(state.path());
    assert_eq!(log.matches("GATEWAY setting changed:").count(), 2, "{log}");
    assert!(
        log.contains(
            "GATEWAY setting changed: key=dhcp.lease old=\"2h\" new=\"10m\" by=\"the test\""
        ),
        "{log}"
    );
    // Nothing of the refused changes was applied: the lease stayed 10 minutes.
    assert!(!log.contains("new=\"20m\""), "{log}");
}
