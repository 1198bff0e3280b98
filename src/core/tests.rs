//! Frame-level tests of the virtual host: fixed frames in, frames out, counters checked.

use std::net::Ipv4Addr;

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
};

use super::testkit::{arp_from, arp_request};
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
    super::testkit::dhcp_frame(dhcproto::v4::MessageType::Discover, None)
}

/// A DISCOVER whose options end with `extra` (before the end option).
fn discover_with(extra: &[u8]) -> Vec<u8> {
    use dhcproto::v4::{DhcpOption, Message, MessageType};
    use dhcproto::{Encodable, Encoder};
    let mut msg = Message::new_with_id(
        9,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &super::testkit::CLIENT_MAC.0,
    );
    msg.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    let mut body = Vec::new();
    msg.encode(&mut Encoder::new(&mut body)).unwrap();
    assert_eq!(body.pop(), Some(255), "the end option comes last");
    body.extend_from_slice(extra);
    body.push(255);
    super::testkit::dhcp_payload_frame(&body)
}

#[test]
fn an_option_length_dhcproto_trusts_is_checked_first() {
    let mut h = host();
    // Rapid Commit with a byte in it: a debug assertion in dhcproto (a panic in this build).
    for bad in [&[80u8, 1, 0][..], &[81, 1, 0], &[94, 2, 0, 0], &[151, 0]] {
        h.handle_frame(now(), &discover_with(bad));
        assert!(sent(&mut h).is_empty(), "{bad:?}: no offer");
    }
    assert_eq!(h.counters().malformed, 4);
    // The same options with their proper lengths are fine.
    h.handle_frame(now(), &discover_with(&[80, 0, 94, 3, 1, 2, 0]));
    assert_eq!(sent(&mut h).len(), 1, "an offer");
    assert_eq!(h.counters().malformed, 4);
}

fn set_dhcp(h: &mut VirtualHost, enabled: bool) {
    let mut s = h.settings().clone();
    s.dhcp.enabled = enabled;
    h.apply_settings(s, now());
}

#[test]
fn dhcp_can_be_disabled_and_enabled_at_run_time() {
    let mut h = host();
    h.handle_frame(now(), &dhcp_discover());
    assert_eq!(sent(&mut h).len(), 1, "offer while enabled");
    set_dhcp(&mut h, false);
    h.handle_frame(now(), &dhcp_discover());
    assert!(sent(&mut h).is_empty(), "silent while disabled");
    assert_eq!(h.counters().dhcp_disabled, 1);
    set_dhcp(&mut h, true);
    h.handle_frame(now(), &dhcp_discover());
    let out = sent(&mut h);
    assert_eq!(out.len(), 1, "answers again");
    // The offer made before the switch is still held: the same address comes back.
    assert_eq!(h.dhcp().pool().len(), 1);
}

/// A DHCP policy that answers as told, and records what it saw.
struct TestDhcpPolicy {
    answer: Option<super::dhcp::DhcpDecision>,
    seen: std::rc::Rc<
        std::cell::RefCell<
            Vec<(
                super::dhcp::DhcpTicket,
                super::dhcp::DhcpClientInfo,
                super::dhcp::DhcpReplyInfo,
            )>,
        >,
    >,
}

impl super::dhcp::DhcpPolicy for TestDhcpPolicy {
    fn customize(
        &mut self,
        ticket: super::dhcp::DhcpTicket,
        client: &super::dhcp::DhcpClientInfo,
        reply: &super::dhcp::DhcpReplyInfo,
    ) -> super::dhcp::DhcpAnswer {
        self.seen
            .borrow_mut()
            .push((ticket, client.clone(), reply.clone()));
        match &self.answer {
            Some(d) => super::dhcp::DhcpAnswer::Decided(d.clone(), Some("test".into())),
            None => super::dhcp::DhcpAnswer::Later,
        }
    }
}

type Seen = std::rc::Rc<
    std::cell::RefCell<
        Vec<(
            super::dhcp::DhcpTicket,
            super::dhcp::DhcpClientInfo,
            super::dhcp::DhcpReplyInfo,
        )>,
    >,
>;

fn with_dhcp_policy(answer: Option<super::dhcp::DhcpDecision>) -> (VirtualHost, Seen) {
    let mut h = host();
    let seen = Seen::default();
    h.set_dhcp_policy(Some(Box::new(TestDhcpPolicy {
        answer,
        seen: seen.clone(),
    })));
    (h, seen)
}

/// The DHCP messages among `frames`.
fn dhcp_replies(frames: &[Vec<u8>]) -> Vec<dhcproto::v4::Message> {
    use dhcproto::Decodable;
    frames
        .iter()
        .filter(|f| f.len() > 42 && f[23] == 17 && f[36..38] == [0, 68])
        .filter_map(|f| dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(&f[42..])).ok())
        .collect()
}

#[test]
fn a_dhcp_policy_changes_options_and_the_lease_time_in_the_lease_table_too() {
    use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
    let changes = super::dhcp::DhcpChanges {
        set_options: vec![(6, vec![10, 0, 0, 53])],
        remove_options: vec![15],
        lease_seconds: Some(600),
    };
    let (mut h, seen) = with_dhcp_policy(Some(super::dhcp::DhcpDecision::Change(changes)));
    h.handle_frame(now(), &dhcp_discover());
    let offer = dhcp_replies(&sent(&mut h)).pop().expect("an offer");
    let ip = offer.yiaddr();
    let o = offer.opts();
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 0, 0, 53
        )]))
    );
    assert_eq!(
        o.get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(600))
    );
    assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(300)));
    let request = super::testkit::dhcp_frame(MessageType::Request, Some((ip, OUR_IP)));
    h.handle_frame(now(), &request);
    let ack = dhcp_replies(&sent(&mut h)).pop().expect("an ack");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(
        ack.opts().get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(600))
    );
    let lease = h.dhcp().pool().get_by_ip(ip).expect("bound");
    assert_eq!(
        lease.expires,
        super::secs(now()) + 600,
        "the table agrees with the client"
    );
    let seen = seen.borrow();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].1.message_type,
        super::dhcp::DhcpMessageKind::Discover
    );
    assert_eq!(seen[0].1.mac, CLIENT_MAC.0);
    assert_eq!(seen[1].2.your_address, ip);
    assert_eq!(
        seen[1].2.lease_seconds,
        Some(7200),
        "the policy saw the server's reply"
    );
    let mut logged = 0;
    while let Some(e) = h.poll_event() {
        if let super::Event::Dhcp(super::dhcp::DhcpEvent::Customized { policy, .. }) = e {
            assert_eq!(policy.as_deref(), Some("test"));
            logged += 1;
        }
    }
    assert_eq!(logged, 2);
}

#[test]
fn a_late_dhcp_decision_sends_the_reply_and_no_reply_withholds_the_ack() {
    use dhcproto::v4::MessageType;
    let (mut h, seen) = with_dhcp_policy(None);
    h.handle_frame(now(), &dhcp_discover());
    assert!(sent(&mut h).is_empty(), "the offer waits for the decision");
    let ticket = seen.borrow()[0].0;
    h.handle_dhcp_decision(ticket, super::dhcp::DhcpDecision::Unchanged, None, now());
    let offer = dhcp_replies(&sent(&mut h)).pop().expect("the offer");
    let ip = offer.yiaddr();
    h.handle_frame(
        now(),
        &super::testkit::dhcp_frame(MessageType::Request, Some((ip, OUR_IP))),
    );
    let ticket = seen.borrow()[1].0;
    h.handle_dhcp_decision(
        ticket,
        super::dhcp::DhcpDecision::NoReply,
        Some("test".into()),
        now(),
    );
    assert!(dhcp_replies(&sent(&mut h)).is_empty(), "no ACK");
    assert_ne!(
        h.dhcp().pool().get_by_ip(ip).map(|l| l.state),
        Some(super::dhcp::LeaseState::Bound),
        "the binding the withheld ACK made is gone"
    );
    // A decision that never comes: the reply is dropped after the timeout.
    h.handle_frame(now(), &dhcp_discover());
    let at = h.poll_timeout().expect("a deadline");
    assert!(at <= now() + super::dhcp::hook::DECISION_TIMEOUT);
    h.handle_timeout(now() + super::dhcp::hook::DECISION_TIMEOUT);
    assert_eq!(h.dhcp_policy_dropped(), 1);
    let late = seen.borrow()[2].0;
    h.handle_dhcp_decision(late, super::dhcp::DhcpDecision::Unchanged, None, now());
    assert!(sent(&mut h).is_empty(), "too late: ignored");
}

// ---- the neighbour table and spoofing on the segment -------------------------------------

const INTRUDER_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 0x66]);

/// `frame` (Ethernet + IPv4) with its Ethernet source and IPv4 source replaced.
fn from(mut frame: Vec<u8>, mac: EthernetAddress, ip: Ipv4Addr) -> Vec<u8> {
    EthernetFrame::new_unchecked(&mut frame[..]).set_src_addr(mac);
    let mut p = Ipv4Packet::new_unchecked(&mut frame[14..]);
    p.set_src_addr(ip);
    p.fill_checksum();
    frame
}

fn link_events(h: &mut VirtualHost) -> Vec<super::link::LinkEvent> {
    let mut out = Vec::new();
    while let Some(e) = h.poll_event() {
        if let super::Event::Link(e) = e {
            out.push(e);
        }
    }
    out
}

#[test]
fn only_client_addresses_of_the_segment_are_learnt() {
    let mut h = host();
    let off_segment = Ipv4Addr::new(10, 0, 0, 5);
    let network = Ipv4Addr::new(192, 168, 30, 0);
    let broadcast = Ipv4Addr::new(192, 168, 30, 255);
    for ip in [off_segment, network, broadcast] {
        h.handle_frame(now(), &from(echo_request(OUR_IP, OUR_MAC), CLIENT_MAC, ip));
        h.handle_frame(
            now(),
            &arp_from(ArpOperation::Reply, CLIENT_MAC, ip, OUR_IP),
        );
    }
    assert!(h.neighbours().is_empty(), "nothing learnt");
    h.handle_frame(now(), &echo_request(OUR_IP, OUR_MAC));
    assert_eq!(h.neighbours().lookup(CLIENT_IP), Some(CLIENT_MAC));
    assert_eq!(h.neighbours().len(), 1);
}

#[test]
fn frames_from_the_virtual_hosts_own_mac_are_dropped_counted_and_logged_once() {
    let mut h = host();
    // A peer on the segment sends with the virtual host's MAC (to take its traffic on a
    // learning switch, or to poison the neighbour table).
    for _ in 0..3 {
        h.handle_frame(
            now(),
            &from(echo_request(OUR_IP, OUR_MAC), OUR_MAC, CLIENT_IP),
        );
    }
    h.handle_frame(
        now(),
        &arp_from(ArpOperation::Request, OUR_MAC, CLIENT_IP, OUR_IP),
    );
    assert!(sent(&mut h).is_empty(), "no answer");
    assert_eq!(h.neighbours().lookup(CLIENT_IP), None, "not learnt");
    assert_eq!(h.counters().own_mac, 4);
    assert_eq!(h.counters().echo_replies + h.counters().arp_replies, 0);
    assert_eq!(
        link_events(&mut h),
        [super::link::LinkEvent::OwnMacClaimed { ip: CLIENT_IP }]
    );
}

#[test]
fn arp_claiming_the_virtual_hosts_address_is_dropped_counted_and_logged_once_per_mac() {
    let mut h = host();
    // A gratuitous ARP reply, a request in our name, an announcement: all from another MAC.
    h.handle_frame(
        now(),
        &arp_from(ArpOperation::Reply, INTRUDER_MAC, OUR_IP, OUR_IP),
    );
    h.handle_frame(
        now(),
        &arp_from(ArpOperation::Request, INTRUDER_MAC, OUR_IP, CLIENT_IP),
    );
    h.handle_frame(
        now(),
        &arp_from(ArpOperation::Request, INTRUDER_MAC, OUR_IP, OUR_IP),
    );
    assert!(sent(&mut h).is_empty(), "no answer");
    assert_eq!(
        h.neighbours().lookup(OUR_IP),
        None,
        "our address is never learnt"
    );
    assert_eq!(h.counters().arp_spoofed, 3);
    let other = EthernetAddress([0x52, 0x54, 0, 0, 0, 0x67]);
    h.handle_frame(now(), &arp_from(ArpOperation::Reply, other, OUR_IP, OUR_IP));
    assert_eq!(
        link_events(&mut h),
        [
            super::link::LinkEvent::ArpSpoofed {
                mac: INTRUDER_MAC.0,
                ip: OUR_IP
            },
            super::link::LinkEvent::ArpSpoofed {
                mac: other.0,
                ip: OUR_IP
            },
        ]
    );
    // The real clients are answered as before.
    h.handle_frame(now(), &arp_request(CLIENT_IP, OUR_IP));
    assert_eq!(sent(&mut h).len(), 1);
    assert_eq!(h.counters().arp_spoofed, 4);
}
