//! The DNS forwarder's handling of upstream answers: a client asks the virtual host (UDP to
//! 192.168.30.1:53), the core sends the query upstream, and the input comes back as the
//! answer, with the query's id put in its first two bytes so it matches (the forwarder checks
//! the id and the upstream before it reads further). The answer goes to the client (checked:
//! the client's id restored, the rest unchanged) and its A records into the name cache, which
//! a new session then looks up.
//!
//! Seeds: answers dnsmasq gave to dig (fuzz/corpus/dns_answer, see fuzz/README.md).
#![no_main]

use std::net::Ipv4Addr;

use hubnat::core::testkit;
use hubnat_fuzz::{client_frame, dns_query, udp, Harness};
use libfuzzer_sys::fuzz_target;

const CLIENT_ID: u16 = 0x4242;

fuzz_target!(|data: &[u8]| {
    // A UDP datagram holds at most 65535 - 8 bytes (an IPv6 upstream).
    if data.len() > 65_527 {
        return;
    }
    let mut h = Harness::reference();
    // The client's MAC becomes known, so the answer can go to it.
    h.frame(&testkit::arp_request(testkit::CLIENT_IP, testkit::OUR_IP));
    let query = dns_query(CLIENT_ID, "files.hubnat.test");
    h.frame(&client_frame(
        0,
        testkit::OUR_IP,
        17,
        &udp(40000, 53, &query),
    ));
    let (upstream, sent) = h.dns_sent.pop().expect("the query went upstream");
    let mut answer = data.to_vec();
    if answer.len() >= 2 {
        answer[..2].copy_from_slice(&sent[..2]);
    }
    h.take_sent();
    let now = h.now();
    h.host.nat_dns_answer(upstream, &answer, now);
    h.settle();
    if answer.len() >= 12 {
        // The answer reached the client whole, with the client's id (fragmented when long).
        let sent = h.take_sent();
        assert!(!sent.is_empty(), "the answer was not relayed");
        if 28 + answer.len() <= 1500 {
            let udp_payload = &sent[0][14 + 20 + 8..];
            assert_eq!(&udp_payload[..2], &CLIENT_ID.to_be_bytes());
            assert_eq!(&udp_payload[2..], &answer[2..]);
        }
    }
    // A flow to an address the answer named looks the name up.
    for i in 0..4u8 {
        let dst = Ipv4Addr::new(10, 77, 0, 2 + i);
        h.frame(&client_frame(0, dst, 17, &udp(40001, 9, b"x")));
    }
    let _ = h
        .host
        .nat()
        .table()
        .iter()
        .map(|s| s.remote_name.clone())
        .count();
    h.next_timeout();
});
