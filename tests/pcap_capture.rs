//! Packet capture: the real gateway on the in-memory hub, its backend wrapped in `Capture`, and
//! smoltcp's DHCP client as the other host. The capture must open in `tshark -r` (and
//! `tcpdump -r`) and show the DISCOVER/OFFER/REQUEST/ACK exchange, both directions; a rotating
//! capture's files must each open too.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant as StdInstant};

use common::netns::{require_programs, tshark};
use common::smol_client::{acquire, SmolClient};
use hubnat::config::Config;
use hubnat::driver::Gateway;
use hubnat_backend::capture::{rotated_path, Capture, CaptureOptions, PcapWriter};
use hubnat_hub::MemoryHub;
use smoltcp::time::Instant;

const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x42];

/// Runs the gateway on the memory hub with its port captured by `options`, lets a smoltcp
/// client get a lease and ping the virtual host, then stops the gateway.
fn lease_with_capture(state: &Path, options: CaptureOptions) {
    let mut config = Config::default();
    config.state.dir = state.to_owned();
    config.host.mac = Some("00:ac:00:00:00:01".parse().unwrap());
    config.dns.upstream = Vec::new();
    // Authoritative: no DHCP probes for another server in the capture, only the exchange.
    config.dhcp.authoritative = true;
    let hub = MemoryHub::new(1500);
    let port = Capture::new(
        hub.connect(),
        PcapWriter::create(options).expect("capture file"),
    );
    let gateway = Gateway::new(config).expect("gateway");
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let thread = std::thread::spawn(move || {
        hubnat::rt::block_on(gateway.run(port, async move {
            let _ = stopped.recv().await;
        }))
    });
    let mut client = SmolClient::new(hub.connect(), CLIENT_MAC, Instant::now());
    acquire(&mut client, Duration::from_secs(10));
    let gw = smoltcp::wire::Ipv4Address::new(192, 168, 30, 1);
    for seq in 1..=3 {
        client.send_ping(gw, seq);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        while client.take_pong().is_none() {
            assert!(StdInstant::now() < deadline, "no echo reply");
            client.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    stop.send_blocking(()).unwrap();
    thread.join().unwrap().expect("the gateway ran cleanly");
}

#[test]
fn a_dhcp_exchange_captured_opens_in_tshark() {
    require_programs(&["tshark"]);
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("dhcp.pcap");
    lease_with_capture(&dir.path().join("state"), CaptureOptions::new(&pcap));

    // The DHCP message types in order: DISCOVER, OFFER, REQUEST, ACK.
    let types = tshark(
        &pcap,
        &["-Y", "dhcp", "-T", "fields", "-e", "dhcp.option.dhcp"],
    );
    let types: Vec<&str> = types.lines().collect();
    assert_eq!(
        types,
        ["1", "2", "3", "5"],
        "DHCP message types in the capture"
    );
    // tshark's own summary names them, with both directions' addresses.
    let summary = tshark(&pcap, &["-Y", "dhcp"]);
    for what in ["DHCP Discover", "DHCP Offer", "DHCP Request", "DHCP ACK"] {
        assert!(summary.contains(what), "{what} missing from:\n{summary}");
    }
    let client = "52:54:00:00:00:42";
    let server = "00:ac:00:00:00:01";
    let macs = tshark(&pcap, &["-Y", "dhcp", "-T", "fields", "-e", "eth.src"]);
    assert_eq!(
        macs.lines().collect::<Vec<_>>(),
        [client, server, client, server]
    );
    // The pings are there too, request and reply.
    let icmp = tshark(&pcap, &["-Y", "icmp", "-T", "fields", "-e", "icmp.type"]);
    assert_eq!(icmp.lines().filter(|t| *t == "8").count(), 3, "{icmp}");
    assert_eq!(icmp.lines().filter(|t| *t == "0").count(), 3, "{icmp}");
    // Whole frames: nothing was cut at the default snap length.
    let lens = tshark(
        &pcap,
        &["-T", "fields", "-e", "frame.len", "-e", "frame.cap_len"],
    );
    assert!(
        lens.lines().all(|l| {
            let mut f = l.split_whitespace();
            f.next() == f.next()
        }),
        "{lens}"
    );

    // tcpdump reads it as well.
    if Command::new("tcpdump").arg("--version").output().is_ok() {
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&pcap)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tcpdump -r: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("BOOTP/DHCP, Request") && text.contains("BOOTP/DHCP, Reply"),
            "{text}"
        );
    }
}

#[test]
fn a_rotating_capture_keeps_its_files_readable_and_bounded() {
    require_programs(&["tshark"]);
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("rot.pcap");
    // About two DHCP frames per file; small snap length.
    let options = CaptureOptions {
        snaplen: 300,
        max_size: Some(700),
        max_files: 3,
        ..CaptureOptions::new(&pcap)
    };
    lease_with_capture(&dir.path().join("state"), options);
    let files = [pcap.clone(), rotated_path(&pcap, 1), rotated_path(&pcap, 2)];
    let mut frames = 0;
    for f in &files {
        assert!(f.exists(), "{} missing", f.display());
        assert!(
            std::fs::metadata(f).unwrap().len() <= 700,
            "{} is over the limit",
            f.display()
        );
        let lens = tshark(f, &["-T", "fields", "-e", "frame.cap_len"]);
        assert!(
            lens.lines().all(|l| l.parse::<u32>().unwrap() <= 300),
            "{lens}"
        );
        frames += lens.lines().count();
    }
    assert!(frames >= 3, "{frames}");
    assert!(!rotated_path(&pcap, 3).exists(), "at most 3 files are kept");
    // The newest file holds the last frames: the final echo reply.
    let last = tshark(&pcap, &["-T", "fields", "-e", "icmp.type"]);
    assert_eq!(last.lines().last(), Some("0"), "{last}");
}
