//! Frame-level tests of the virtual host: fixed frames in, frames out, counters checked.

use std::net::Ipv4Addr;

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
};

use super::testkit::arp_request;
use super::{Instant, VirtualHost};

const OUR_MAC: EthernetAddress = EthernetAddress([0x00, 0xac, 1, 2, 3, 4]);
const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 1]);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);

fn host() -> VirtualHost {
    let mut settings = super::testkit::settings();
    settings.nat.dns_upstreams = vec![];
    let mut h = VirtualHost::new(settings, Vec::new(), 1, now());
    h.set_icmp_mode(super::nat::IcmpMode::Synthesized);
    h
}

fn now() -> Instant {
    Instant::from_secs(1_700_000_000)
}

fn echo_request(dst: Ipv4Addr, dst_mac: EthernetAddress) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 3,
        data: b"abcdefgh",
    };
    let ip = Ipv4Repr {
        src_addr: CLIENT_IP,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + 20 + icmp.buffer_len()];
    EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut frame[14..]),
        &ChecksumCapabilities::default(),
    );
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(&mut frame[34..]),
        &ChecksumCapabilities::default(),
    );
    frame
}

fn sent(h: &mut VirtualHost) -> Vec<Vec<u8>> {
    let mut batch = FrameBatch::new(16, 1514);
    h.take_transmit(&mut batch);
    batch.iter().map(<[u8]>::to_vec).collect()
}

#[test]
fn arp_is_answered_for_our_address_only() {
    let mut h = host();
    h.handle_frame(now(), &arp_request(CLIENT_IP, OUR_IP));
    let out = sent(&mut h);
    assert_eq!(out.len(), 1);
    let eth = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(
        (eth.src_addr(), eth.dst_addr(), eth.ethertype()),
        (OUR_MAC, CLIENT_MAC, EthernetProtocol::Arp)
    );
    match ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap() {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_hardware_addr,
            target_protocol_addr,
        } => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(
                (source_hardware_addr, source_protocol_addr),
                (OUR_MAC, OUR_IP)
            );
            assert_eq!(
                (target_hardware_addr, target_protocol_addr),
                (CLIENT_MAC, CLIENT_IP)
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        h.neighbours().lookup(CLIENT_IP),
        Some(CLIENT_MAC),
        "sender learnt"
    );

    // Another client's address, and a DHCP client's probe of its offered address: silence.
    h.handle_frame(
        now(),
        &arp_request(CLIENT_IP, Ipv4Addr::new(192, 168, 30, 11)),
    );
    h.handle_frame(
        now(),
        &arp_request(Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(192, 168, 30, 12)),
    );
    h.handle_frame(now(), &arp_request(CLIENT_IP, Ipv4Addr::new(8, 8, 8, 8)));
    assert!(sent(&mut h).is_empty());
    assert_eq!(h.counters().arp_replies, 1);
}

#[test]
fn echo_to_us_is_answered_and_echo_elsewhere_is_not() {
    let mut h = host();
    h.handle_frame(now(), &echo_request(OUR_IP, OUR_MAC));
    let out = sent(&mut h);
    assert_eq!(out.len(), 1);
    let eth = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(eth.dst_addr(), CLIENT_MAC);
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!((ip.src_addr(), ip.dst_addr()), (OUR_IP, CLIENT_IP));
    let icmp = Icmpv4Repr::parse(
        &Icmpv4Packet::new_checked(ip.payload()).unwrap(),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    assert_eq!(
        icmp,
        Icmpv4Repr::EchoReply {
            ident: 7,
            seq_no: 3,
            data: b"abcdefgh"
        }
    );
    assert_eq!(h.counters().echo_replies, 1);

    // A frame for another MAC on the hub: ignored.
    h.handle_frame(
        now(),
        &echo_request(OUR_IP, EthernetAddress([0x52, 0x54, 0, 0, 0, 9])),
    );
    assert!(sent(&mut h).is_empty());
    assert_eq!(h.counters().not_for_us, 1);
}

#[test]
fn malformed_frames_are_counted_not_answered() {
    let mut h = host();
    let good = echo_request(OUR_IP, OUR_MAC);
    let mut bad_checksum = good.clone();
    bad_checksum[14 + 10] ^= 0xff;
    let truncated = good[..30].to_vec();
    let mut bad_length = good.clone();
    bad_length[14 + 2] = 0xff; // IPv4 total length beyond the frame
    for f in [
        &bad_checksum[..],
        &truncated[..],
        &bad_length[..],
        &[0u8; 5][..],
        &[][..],
    ] {
        h.handle_frame(now(), f);
    }
    assert!(sent(&mut h).is_empty());
    assert_eq!(h.counters().malformed, 5);
    assert_eq!(h.counters().frames_in, 5);
}

#[test]
fn random_garbage_never_panics() {
    // A fixed-seed xorshift: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut h = host();
    let templates = [
        arp_request(CLIENT_IP, OUR_IP),
        echo_request(OUR_IP, OUR_MAC),
    ];
    for i in 0..20_000 {
        let mut frame = templates[i % 2].clone();
        let flips = (next() % 6) as usize;
        for _ in 0..flips {
            let at = (next() as usize) % frame.len();
            frame[at] = next() as u8;
        }
        frame.truncate((next() as usize) % (frame.len() + 1));
        h.handle_frame(now(), &frame);
        let _ = sent(&mut h);
    }
    assert_eq!(h.counters().frames_in, 20_000);
}

fn dhcp_discover() -> Vec<u8> {
    use dhcproto::v4::{DhcpOption, Message, MessageType};
    use dhcproto::{Encodable, Encoder};
    use smoltcp::wire::{IpAddress, UdpPacket, UdpRepr};
    let mut msg = Message::new_with_id(
        9,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &CLIENT_MAC.0,
    );
    msg.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    let mut body = Vec::new();
    msg.encode(&mut Encoder::new(&mut body)).unwrap();
    let (src, dst) = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: 8 + body.len(),
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + 20 + 8 + body.len()];
    EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut frame[14..]),
        &ChecksumCapabilities::default(),
    );
    UdpRepr {
        src_port: 68,
        dst_port: 67,
    }
    .emit(
        &mut UdpPacket::new_unchecked(&mut frame[34..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        body.len(),
        |b| b.copy_from_slice(&body),
        &ChecksumCapabilities::default(),
    );
    frame
}

#[test]
fn dhcp_can_be_disabled_and_enabled_at_run_time() {
    let mut h = host();
    h.handle_frame(now(), &dhcp_discover());
    assert_eq!(sent(&mut h).len(), 1, "offer while enabled");
    h.set_dhcp_enabled(false);
    h.handle_frame(now(), &dhcp_discover());
    assert!(sent(&mut h).is_empty(), "silent while disabled");
    assert_eq!(h.counters().dhcp_disabled, 1);
    h.set_dhcp_enabled(true);
    h.handle_frame(now(), &dhcp_discover());
    let out = sent(&mut h);
    assert_eq!(out.len(), 1, "answers again");
    // The offer made before the switch is still held: the same address comes back.
    assert_eq!(h.dhcp().pool().len(), 1);
}
