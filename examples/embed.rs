//! Embedding hubnat in a Rust program: the gateway runs on an in-memory hub, and this program
//! joins the same segment as one more host through another port of the hub.
//!
//! Here the program asks, by ARP, who has 192.168.30.1 and prints the virtual host's answer.
//! Then it asks the running gateway, through its [`GatewayHandle`](hubnat::driver::GatewayHandle),
//! for its status (frames in and out, whether DHCP and the NAT are on) and its lease table
//! (empty: this program asked for no address). The handle works from any thread; its calls
//! are `async`, and a plain thread waits for them with `async_io::block_on`; the gateway itself
//! runs on a thread of its own under `hubnat::rt::block_on`, hubnat's reactor.
//!
//! A real embedder hands its port to a user-mode stack instead (a smoltcp `phy::Device` built
//! on `MemoryPort::try_send` / `try_recv`, as `tests/common/smol_client.rs` does), or bridges it
//! to whatever carries its frames.
//!
//! Run with `cargo run --example embed`. Needs no privilege.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hubnat::config::Config;
use hubnat::driver::Gateway;
use hubnat_hub::MemoryHub;

const MY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];
const MY_IP: [u8; 4] = [192, 168, 30, 99];

fn main() -> Result<()> {
    // Any configuration works; the state directory keeps the leases and the generated MAC.
    let mut config = Config::default();
    let state = std::env::temp_dir().join(format!("hubnat-embed-{}", std::process::id()));
    config.state.dir = state.clone();
    config.dns.upstream = Vec::new();

    // The hub, the gateway on one port of it, on its own thread.
    let hub = MemoryHub::new(config.nat.mtu);
    let gateway = Gateway::new(config).context("starting the gateway")?;
    // Commands to the gateway once it runs: status, tables, settings.
    let handle = gateway.handle();
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let port = hub.connect();
    let thread = std::thread::spawn(move || {
        hubnat::rt::block_on(gateway.run(port, async move {
            let _ = stopped.recv().await;
        }))
    });

    // This program's own port: send frames with try_send, take them with try_recv (or use
    // the port as a hubnat_backend::Backend from async code).
    let me = hub.connect();
    me.try_send(&arp_request(MY_MAC, MY_IP, [192, 168, 30, 1]));
    let mut frame = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let answer = loop {
        if me.try_recv(&mut frame)
            && frame.len() >= 42
            && frame[12..14] == [0x08, 0x06]
            && frame[21] == 2
        {
            break frame[22..28].to_vec();
        }
        if Instant::now() > deadline {
            bail!("no ARP reply from the virtual host");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mac: Vec<String> = answer.iter().map(|b| format!("{b:02x}")).collect();
    println!("192.168.30.1 is at {}", mac.join(":"));

    // Ask the running gateway about itself.
    let status = async_io::block_on(handle.status())?;
    let on = |b: bool| if b { "on" } else { "off" };
    println!(
        "gateway {} on {}: {} frames in, {} frames out, {} ARP replies; DHCP {}, NAT {}",
        status.ip,
        status.backend,
        status.counters.frames_in,
        status.counters.frames_out,
        status.counters.arp_replies,
        on(status.dhcp_enabled),
        on(status.nat_enabled),
    );
    let leases = async_io::block_on(handle.leases())?;
    println!(
        "lease table: {} records; {} of {} addresses bound",
        leases.len(),
        status.leases,
        status.pool_size
    );
    for l in &leases {
        println!(
            "  {} {} {} expires {}",
            l.mac,
            l.ip,
            l.state,
            humantime::format_rfc3339_seconds(l.expires)
        );
    }

    // Stop the gateway: it saves its leases and returns.
    stop.send_blocking(())?;
    thread.join().expect("the gateway thread panicked")?;
    std::fs::remove_dir_all(&state)?;
    Ok(())
}

/// A broadcast ARP request from `mac`/`ip` for `target`.
fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}
