//! The in-memory hub through its public API: switching, limits, and the backend contract.

use std::time::Duration;

use futures_lite::future;
use hubnat_backend::{Backend, FrameBatch};
use hubnat_hub::{MacAddr, MemoryHub, MemoryHubConfig, MemoryPort, SwitchLimits};

const BROADCAST: MacAddr = [0xff; 6];

fn mac(n: u8) -> MacAddr {
    [0x02, 0, 0, 0, 0, n]
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

/// Every frame queued for `port`, as (source station number, tag).
fn drain(port: &mut MemoryPort) -> Vec<(u8, u8)> {
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while port.try_recv(&mut buf) {
        got.push((buf[11], buf[14]));
    }
    got
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<MemoryHub>();
    send_sync::<MemoryPort>();
}

#[test]
fn floods_until_learnt_then_switches() {
    let hub = MemoryHub::new(1500);
    let (mut a, mut b, mut c) = (hub.connect(), hub.connect(), hub.connect());
    assert_eq!(b.describe(), "memory port 1");
    assert_eq!(a.max_frame_len(), 1514);

    // Station 2 (behind b) is unknown: a's frame floods to b and c.
    assert!(a.try_send(&frame(mac(2), mac(1), 1)));
    assert_eq!(drain(&mut b), vec![(1, 1)]);
    assert_eq!(drain(&mut c), vec![(1, 1)]);
    // Station 1 was learnt behind a: b's answer goes to a only.
    assert!(b.try_send(&frame(mac(1), mac(2), 2)));
    assert_eq!(drain(&mut a), vec![(2, 2)]);
    assert_eq!(drain(&mut c), vec![]);
    // And now station 2 is known too.
    assert!(a.try_send(&frame(mac(2), mac(1), 3)));
    assert_eq!(drain(&mut b), vec![(1, 3)]);
    assert_eq!(drain(&mut c), vec![]);

    let stats = hub.stats();
    assert_eq!(
        (
            stats.flooded,
            stats.switched,
            stats.dropped,
            stats.queue_full
        ),
        (1, 2, 0, 0)
    );
    assert_eq!((stats.ports, stats.stations), (3, 2));
    let a_stats = a.stats();
    assert_eq!(
        (
            a_stats.tx_frames,
            a_stats.tx_bytes,
            a_stats.rx_frames,
            a_stats.rx_bytes
        ),
        (2, 120, 1, 60)
    );
}

#[test]
fn broadcast_and_multicast_reach_every_port_but_the_sender() {
    let hub = MemoryHub::new(1500);
    let mut ports: Vec<MemoryPort> = (0..4).map(|_| hub.connect()).collect();
    // Even once every station is learnt, group frames flood.
    for (i, p) in ports.iter().enumerate() {
        assert!(p.try_send(&frame(BROADCAST, mac(i as u8), 0)));
    }
    for p in ports.iter_mut() {
        drain(p);
    }
    assert!(ports[2].try_send(&frame(BROADCAST, mac(2), 7)));
    assert!(ports[2].try_send(&frame([0x01, 0x00, 0x5e, 0, 0, 1], mac(2), 8)));
    for (i, p) in ports.iter_mut().enumerate() {
        let expected = if i == 2 { vec![] } else { vec![(2, 7), (2, 8)] };
        assert_eq!(drain(p), expected, "port {i}");
    }
}

#[test]
fn learnt_stations_age_out() {
    let config = MemoryHubConfig {
        switch: SwitchLimits {
            max_entries: 16,
            max_age: Duration::from_millis(200),
        },
        ..MemoryHubConfig::new(1500)
    };
    let hub = MemoryHub::with_config(config);
    let (a, mut b, mut c) = (hub.connect(), hub.connect(), hub.connect());
    assert!(b.try_send(&frame(BROADCAST, mac(2), 0)));
    assert_eq!(drain(&mut c), vec![(2, 0)]);
    assert!(a.try_send(&frame(mac(2), mac(1), 1)));
    assert_eq!(drain(&mut c), vec![], "station 2 known: not flooded");
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.try_send(&frame(mac(2), mac(1), 2)));
    assert_eq!(drain(&mut c), vec![(1, 2)], "station 2 aged out: flooded");
    assert_eq!(drain(&mut b), vec![(1, 1), (1, 2)]);
    assert_eq!(
        hub.stats().stations,
        1,
        "only station 1, just refreshed, remains"
    );
}

#[test]
fn the_learning_table_is_bounded() {
    let config = MemoryHubConfig {
        switch: SwitchLimits {
            max_entries: 8,
            max_age: Duration::from_secs(300),
        },
        ..MemoryHubConfig::new(1500)
    };
    let hub = MemoryHub::with_config(config);
    let (a, mut b) = (hub.connect(), hub.connect());
    for n in 0..100u8 {
        assert!(a.try_send(&frame(BROADCAST, mac(n), n)));
    }
    assert_eq!(hub.stats().stations, 8);
    assert_eq!(drain(&mut b).len(), 100);
}

#[test]
fn a_full_queue_drops_for_that_port_only() {
    let config = MemoryHubConfig {
        queue_frames: 4,
        ..MemoryHubConfig::new(1500)
    };
    let hub = MemoryHub::with_config(config);
    let (a, mut slow, mut fast) = (hub.connect(), hub.connect(), hub.connect());
    for tag in 0..6u8 {
        assert!(
            a.try_send(&frame(BROADCAST, mac(1), tag)),
            "the sender is never blocked"
        );
        assert_eq!(drain(&mut fast), vec![(1, tag)]);
    }
    assert_eq!(slow.queued(), 4);
    assert_eq!(drain(&mut slow), vec![(1, 0), (1, 1), (1, 2), (1, 3)]);
    assert_eq!(slow.rx_dropped(), 2);
    assert_eq!(fast.rx_dropped(), 0);
    assert_eq!(a.stats().tx_dropped, 0);
    assert_eq!(a.stats().tx_frames, 6);
    let stats = hub.stats();
    assert_eq!((stats.flooded, stats.queue_full), (6, 2));
    // The slow port drained: it receives again.
    assert!(a.try_send(&frame(BROADCAST, mac(1), 9)));
    assert_eq!(drain(&mut slow), vec![(1, 9)]);
}

#[test]
fn a_dropped_port_is_forgotten() {
    let hub = MemoryHub::new(1500);
    let (a, b, mut c) = (hub.connect(), hub.connect(), hub.connect());
    assert!(b.try_send(&frame(BROADCAST, mac(2), 0)));
    assert!(a.try_send(&frame(mac(2), mac(1), 1)));
    assert_eq!(drain(&mut c), vec![(2, 0)], "unicast to 2 went to b only");
    assert_eq!(hub.stats().stations, 2);
    drop(b);
    let stats = hub.stats();
    assert_eq!((stats.ports, stats.stations), (2, 1));
    // Station 2 is unknown again: flooded to the ports that remain.
    assert!(a.try_send(&frame(mac(2), mac(1), 2)));
    assert_eq!(drain(&mut c), vec![(1, 2)]);
    // A new port gets a fresh number.
    assert_eq!(hub.connect().id().0, 3);
}

#[test]
fn invalid_lengths_are_dropped_and_counted() {
    let hub = MemoryHub::new(1500);
    let (mut a, mut b) = (hub.connect(), hub.connect());
    let mut big = frame(BROADCAST, mac(1), 0);
    big.resize(1515, 0);
    assert!(!a.try_send(&big));
    assert!(!a.try_send(&big[..13]));
    big.truncate(1514);
    assert!(a.try_send(&big), "mtu + 14 is carried");
    let mut batch = FrameBatch::new(4, 1514);
    batch.push(&big[..10]);
    batch.push(&[0u8; 2000]);
    future::block_on(a.send_batch(&batch)).expect("send_batch");
    assert_eq!(a.stats().tx_dropped, 4);
    assert_eq!(a.stats().tx_frames, 1);
    assert_eq!(hub.stats().dropped, 4);
    assert_eq!(drain(&mut b).len(), 1);
    // A group source address is not a station: dropped, not learnt.
    assert!(a.try_send(&frame(BROADCAST, BROADCAST, 0)));
    assert_eq!(drain(&mut b), vec![]);
    assert_eq!(hub.stats().dropped, 5);
}

#[test]
fn recv_batch_takes_every_queued_frame_in_one_call() {
    let hub = MemoryHub::new(1500);
    let (mut a, mut b) = (hub.connect(), hub.connect());
    let mut out = FrameBatch::new(8, 1514);
    for tag in 0..5u8 {
        out.push(&frame(BROADCAST, mac(1), tag));
    }
    future::block_on(a.send_batch(&out)).expect("send_batch");
    let mut batch = FrameBatch::new(3, 1514);
    future::block_on(b.recv_batch(&mut batch)).expect("recv_batch");
    let tags: Vec<u8> = batch.iter().map(|f| f[14]).collect();
    assert_eq!(tags, vec![0, 1, 2], "stops at the batch's capacity");
    batch.clear();
    future::block_on(b.recv_batch(&mut batch)).expect("recv_batch");
    let tags: Vec<u8> = batch.iter().map(|f| f[14]).collect();
    assert_eq!(tags, vec![3, 4]);
    assert_eq!(b.stats().rx_frames, 5);
    assert_eq!(b.stats().rx_bytes, 300);
    // A full batch returns at once.
    assert!(a.try_send(&frame(BROADCAST, mac(1), 5)));
    let mut full = FrameBatch::new(1, 64);
    full.push(&[0; 14]);
    future::block_on(b.recv_batch(&mut full)).expect("recv_batch");
    assert_eq!(full.len(), 1);
    assert_eq!(b.queued(), 1);
}

#[test]
fn a_cancelled_recv_batch_loses_no_frame() {
    let hub = MemoryHub::new(1500);
    let (a, mut b) = (hub.connect(), hub.connect());
    let mut batch = FrameBatch::new(8, 1514);
    {
        // Start a receive: it registers for a wake-up and is pending.
        let mut recv = Box::pin(b.recv_batch(&mut batch));
        assert!(future::block_on(future::poll_once(&mut recv)).is_none());
        // The frame arrives and wakes it; the receive is dropped before it runs again.
        assert!(a.try_send(&frame(BROADCAST, mac(1), 42)));
    }
    assert!(batch.is_empty());
    assert_eq!(b.queued(), 1);
    future::block_on(b.recv_batch(&mut batch)).expect("recv_batch");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch.get(0).map(|f| f[14]), Some(42));
}

#[test]
fn a_receiver_on_another_thread_is_woken() {
    let hub = MemoryHub::new(1500);
    let a = hub.connect();
    let mut b = hub.connect();
    let receiver = std::thread::spawn(move || {
        let mut batch = FrameBatch::new(8, b.max_frame_len());
        let mut tags = Vec::new();
        while tags.len() < 3 {
            batch.clear();
            future::block_on(b.recv_batch(&mut batch)).expect("recv_batch");
            tags.extend(batch.iter().map(|f| f[14]));
        }
        tags
    });
    for tag in 0..3u8 {
        std::thread::sleep(Duration::from_millis(10));
        assert!(a.try_send(&frame(BROADCAST, mac(1), tag)));
    }
    assert_eq!(receiver.join().expect("receiver thread"), vec![0, 1, 2]);
}

#[test]
fn try_recv_swaps_buffers_and_leaves_buf_alone_when_empty() {
    let hub = MemoryHub::new(1500);
    let (a, b) = (hub.connect(), hub.connect());
    let mut buf = vec![9u8; 3];
    assert!(!b.try_recv(&mut buf));
    assert_eq!(buf, vec![9, 9, 9]);
    let sent = frame(BROADCAST, mac(1), 5);
    assert!(a.try_send(&sent));
    assert!(b.try_recv(&mut buf));
    assert_eq!(buf, sent);
    // Reusing buffers keeps working frame after frame.
    for tag in 0..2000u32 {
        assert!(a.try_send(&frame(BROADCAST, mac(1), tag as u8)));
        assert!(b.try_recv(&mut buf));
        assert_eq!(buf[14], tag as u8);
        assert_eq!(buf.len(), 60);
    }
}
