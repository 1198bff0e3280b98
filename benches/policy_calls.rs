//! What one policy call costs: a session check and a DHCP customisation, through wasmtime.
//!
//! `scripts/build-policies.sh && cargo bench --bench policy_calls` loads the example policies
//! (`target/policies/deny-destinations.wasm` with a few ports and networks, and
//! `target/policies/per-mac-dhcp.wasm` with a matching client, so it builds and returns its
//! options), calls each many times, and prints the median, the 99th percentile and the mean in
//! microseconds, with the time the load (compiling, checking, instantiating) took. A call
//! includes converting the request to the component model's values and back, the deadline, and
//! the ticker's wake-up; it is what the policy thread spends per request.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use hubnat::config::PolicyConfig;
use hubnat::core::nat::{FlowInfo, Protocol};
use hubnat::policy::{DhcpClientInfo, DhcpMessageKind, DhcpReplyInfo, OptionBytes, PolicySet};

const WARMUP: usize = 1_000;
const CALLS: usize = 20_000;

use hubnat::policy::built_component as component;

fn policy(name: &str, config: &[(&str, &str)]) -> PolicyConfig {
    PolicyConfig {
        name: name.into(),
        path: component(name),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..PolicyConfig::default()
    }
}

/// Loads `cfg` compiling it (into an empty cache), then again from that cache; prints both
/// times and returns the second set.
fn load(cfg: PolicyConfig) -> PolicySet {
    let cache = tempfile::tempdir().expect("a temporary cache");
    let configs = [cfg];
    let mut took = Vec::new();
    let mut set = None;
    for _ in 0..2 {
        let start = Instant::now();
        set = Some(
            PolicySet::load_cached(&configs, Some(cache.path().to_owned()))
                .unwrap_or_else(|e| panic!("{e}")),
        );
        took.push(start.elapsed());
    }
    let set = set.expect("loaded twice");
    println!(
        "{:<18} loaded in {:?} (compiled), {:?} (from the cache)",
        set.names()[0],
        took[0],
        took[1]
    );
    set
}

/// Median, 99th percentile and mean of `calls` runs of `f`, in µs.
fn measure(label: &str, mut f: impl FnMut(usize)) {
    for i in 0..WARMUP {
        f(i);
    }
    let mut times: Vec<Duration> = (0..CALLS)
        .map(|i| {
            let start = Instant::now();
            f(i);
            start.elapsed()
        })
        .collect();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = times.iter().sum::<Duration>() / CALLS as u32;
    println!(
        "{label:<28} median {:>6.2} µs   p99 {:>6.2} µs   mean {:>6.2} µs   ({CALLS} calls)",
        us(times[CALLS / 2]),
        us(times[CALLS * 99 / 100]),
        us(mean)
    );
}

fn main() {
    let mut sessions = load(policy(
        "deny-destinations",
        &[
            ("ports", "25,465,587,6667"),
            ("cidrs", "10.0.0.0/8,172.16.0.0/12,203.0.113.0/24"),
        ],
    ));
    let flows: Vec<FlowInfo> = (0..64u16)
        .map(|i| FlowInfo {
            protocol: Protocol::Tcp,
            client_mac: [0x52, 0x54, 0, 0, 0, 1],
            client: SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 10), 40000 + i),
            remote: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, i as u8), 440 + i),
            client_hostname: Some("laptop".into()),
            remote_name: Some("www.example.com".into()),
        })
        .collect();
    measure("session check", |i| {
        let (decision, notes) = sessions.check_session(&flows[i % flows.len()]);
        std::hint::black_box((decision, notes));
    });

    let mut dhcp = load(policy(
        "per-mac-dhcp",
        &[
            ("mac_prefix", "52:54:00"),
            ("dns", "10.1.1.1,10.1.1.2"),
            ("domain", "lab.example"),
            ("routes", "10.20.0.0/16 via 192.168.30.254"),
        ],
    ));
    let client = DhcpClientInfo {
        message_type: DhcpMessageKind::Request,
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        client_id: Some(vec![1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        hostname: Some("laptop".into()),
        vendor_class: None,
        requested_options: vec![1, 3, 6, 15, 28, 51, 58, 59, 119, 121],
    };
    let reply = DhcpReplyInfo {
        your_address: Ipv4Addr::new(192, 168, 30, 10),
        lease_seconds: Some(7200),
        options: vec![
            OptionBytes {
                code: 1,
                value: vec![255, 255, 255, 0],
            },
            OptionBytes {
                code: 3,
                value: vec![192, 168, 30, 1],
            },
            OptionBytes {
                code: 6,
                value: vec![192, 168, 30, 1],
            },
        ],
    };
    measure("dhcp customize (matching)", |_| {
        let out = dhcp.customize_dhcp(client.clone(), reply.clone());
        std::hint::black_box(out);
    });
}
