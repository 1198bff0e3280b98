//! The memory limit, in process: clients that never read make the gateway's buffers fill
//! until `nat.memory_limit` refuses the next session; ending the sessions gives the memory
//! back and lets new ones in. Its own test binary, so that no other test's memory moves the
//! process's resident size it measures. No namespaces, no root.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant as StdInstant};

use common::inproc::start;
use common::smol_client::{acquire, SmolClient};
use hubnat::config::Config;
use hubnat_hub::MemoryHub;
use smoltcp::time::Instant;

/// Polls until the connection from `local_port` to `port` leaves SYN-SENT; its state then.
fn connect(
    client: &mut SmolClient,
    port: u16,
    local_port: u16,
) -> (smoltcp::iface::SocketHandle, smoltcp::socket::tcp::State) {
    use smoltcp::socket::tcp::State;
    let h = client.tcp_connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), local_port);
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while client.tcp(h).state() == State::SynSent {
        assert!(StdInstant::now() < deadline, "no answer to the SYN");
        client.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
    (h, client.tcp(h).state())
}

#[test]
fn clients_that_never_read_meet_the_memory_limit_and_memory_comes_back() {
    use smoltcp::socket::tcp::State;
    // As `hubnat run` does: each TCP buffer a mapping of its own.
    hubnat::host::fix_mmap_threshold();
    let state = tempfile::tempdir().unwrap();
    let hub = MemoryHub::new(1500);
    let baseline = hubnat::host::resident_memory().unwrap();
    let limit = baseline + (48 << 20);
    let mut config = Config::default();
    config.state.dir = state.path().to_owned();
    config.nat.allow_host_loopback = true;
    config.dns.upstream = vec![];
    config.nat.memory_limit = Some(limit);
    let gw = start(config, &hub);

    // A server that sends 4 MiB on every connection and waits: the client never reads, so
    // the data piles up in the gateway's buffers towards it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let chunk = vec![0x42u8; 1 << 20];
                for _ in 0..4 {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
        }
    });

    let mut client = SmolClient::new(hub.connect(), [0x52, 0x54, 0, 0, 0, 0x31], Instant::now());
    acquire(&mut client, Duration::from_secs(10));
    let mut open = Vec::new();
    let refused = loop {
        assert!(
            open.len() < 200,
            "200 sessions of unread data and no refusal"
        );
        let (h, state) = connect(&mut client, port, 40000 + open.len() as u16);
        if state != State::Established {
            break state;
        }
        open.push(h);
        // Let the data arrive (and the gateway measure its memory, every 250 ms).
        let until = StdInstant::now() + Duration::from_millis(300);
        while StdInstant::now() < until {
            client.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    assert_eq!(refused, State::Closed, "refused with a reset");
    assert!(
        open.len() >= 5,
        "refused after only {} sessions",
        open.len()
    );
    eprintln!(
        "refused after {} sessions, {} MiB over the baseline",
        open.len(),
        (hubnat::host::resident_memory().unwrap() - baseline) >> 20
    );
    let grown = hubnat::host::resident_memory().unwrap() - baseline;
    let log = std::fs::read_to_string(state.path().join("security.log")).unwrap();
    assert!(
        log.contains("nat.memory_limit"),
        "the refusal names the limit:\n{log}"
    );
    let status = async_io::block_on(gw.handle.status()).unwrap();
    assert!(status.nat.refused_limits >= 1, "{:?}", status.nat);

    // The sessions end: their memory goes back, and new sessions are let in again.
    let ids: Vec<_> = async_io::block_on(gw.handle.sessions())
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    for id in ids {
        async_io::block_on(gw.handle.end_session(id, "the test")).unwrap();
    }
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        client.poll(Instant::now());
        let now_grown = hubnat::host::resident_memory()
            .unwrap()
            .saturating_sub(baseline);
        if now_grown < grown / 2 {
            break;
        }
        assert!(
            StdInstant::now() < deadline,
            "memory did not come back: {} MiB over the baseline, {} at the peak",
            now_grown >> 20,
            grown >> 20
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, state) = connect(&mut client, port, 45000);
    assert_eq!(
        state,
        State::Established,
        "a new session once memory is back"
    );
    gw.stop();
}
