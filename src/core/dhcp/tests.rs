//! DHCP state machine tests on a virtual clock: client messages built with dhcproto, replies
//! and events checked field by field.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};

use super::options::{DhcpSettings, Reservation, StaticRoute};
use super::server::{DhcpEvent, DhcpServer, LeaseEventKind, Reply, CLIENT_PORT};

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
const MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const BCAST: [u8; 6] = [0xff; 6];

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 30, last)
}

fn settings() -> DhcpSettings {
    DhcpSettings {
        enabled: true,
        range_start: ip(10),
        range_end: ip(12),
        mask: MASK,
        lease: Duration::from_secs(7200),
        gateway: Some(SERVER),
        dns: vec![SERVER],
        domain: Some("example.test".into()),
        routes: vec![],
        statics: vec![],
        max_leases_per_mac: 4,
        serve_macs: vec![],
        ignore_macs: vec![],
        // The core's other tests send no probe frames: see the other-servers tests.
        authoritative: true,
    }
}

struct Harness {
    /// The settings in force: the caller's, as in the core.
    settings: DhcpSettings,
    server: DhcpServer,
    events: VecDeque<DhcpEvent>,
    now: u64,
}

impl Harness {
    fn new(settings: DhcpSettings) -> Self {
        Harness {
            server: DhcpServer::new(&settings, SERVER, MASK),
            settings,
            events: VecDeque::new(),
            now: 1_000_000,
        }
    }

    fn send(&mut self, msg: &Message, from: [u8; 6]) -> Option<Reply> {
        self.server
            .handle_from(&self.settings, msg, from, self.now, &mut self.events)
    }

    /// Changes the settings as the core does: edit, then reconfigure.
    fn change(&mut self, f: impl FnOnce(&mut DhcpSettings)) -> bool {
        f(&mut self.settings);
        self.server.reconfigure(&self.settings, SERVER, MASK)
    }

    fn lease_events(&mut self) -> Vec<(LeaseEventKind, Ipv4Addr)> {
        self.events
            .drain(..)
            .filter_map(|e| match e {
                DhcpEvent::Lease { kind, lease } => Some((kind, lease.ip)),
                _ => None,
            })
            .collect()
    }
}

fn msg(kind: MessageType, mac: [u8; 6]) -> Message {
    let mut m = Message::new_with_id(
        0x1234,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

fn with(mut m: Message, opt: DhcpOption) -> Message {
    m.opts_mut().insert(opt);
    m
}

fn msg_type(r: &Reply) -> MessageType {
    r.msg.opts().msg_type().expect("reply has a type")
}

fn opt(r: &Reply, code: OptionCode) -> Option<&DhcpOption> {
    r.msg.opts().get(code)
}

fn request_selecting(mac: [u8; 6], requested: Ipv4Addr) -> Message {
    with(
        with(
            msg(MessageType::Request, mac),
            DhcpOption::ServerIdentifier(SERVER),
        ),
        DhcpOption::RequestedIpAddress(requested),
    )
}

#[test]
fn discover_offer_request_ack_with_all_options() {
    let mut s = settings();
    s.routes = vec![StaticRoute {
        dest: Ipv4Addr::new(10, 0, 0, 0),
        prefix_len: 8,
        gateway: ip(2),
    }];
    let mut h = Harness::new(s);
    let offer = h
        .send(&msg(MessageType::Discover, MAC_A), MAC_A)
        .expect("offer");
    assert_eq!(msg_type(&offer), MessageType::Offer);
    assert_eq!(offer.msg.opcode(), Opcode::BootReply);
    assert_eq!(offer.msg.xid(), 0x1234);
    assert_eq!(offer.msg.yiaddr(), ip(10));
    // Unicast to the offered address and the client's MAC (no broadcast flag).
    assert_eq!(
        (offer.to.ip, offer.to.mac, offer.to.port),
        (ip(10), MAC_A, CLIENT_PORT)
    );
    assert_eq!(
        opt(&offer, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        opt(&offer, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(MASK))
    );
    assert_eq!(
        opt(&offer, OptionCode::Router),
        Some(&DhcpOption::Router(vec![SERVER]))
    );
    assert_eq!(
        opt(&offer, OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![SERVER]))
    );
    assert_eq!(
        opt(&offer, OptionCode::DomainName),
        Some(&DhcpOption::DomainName("example.test".into()))
    );
    assert_eq!(
        opt(&offer, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(7200))
    );
    assert_eq!(
        opt(&offer, OptionCode::Renewal),
        Some(&DhcpOption::Renewal(3600))
    );
    assert_eq!(
        opt(&offer, OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(6300))
    );
    match opt(&offer, OptionCode::ClasslessStaticRoute) {
        Some(DhcpOption::ClasslessStaticRoute(routes)) => {
            assert_eq!(
                routes.len(),
                2,
                "configured route + default via the router: {routes:?}"
            );
            assert_eq!(routes[1].0.prefix_len(), 0);
            assert_eq!(routes[1].1, SERVER);
        }
        other => panic!("no option 121: {other:?}"),
    }
    assert!(
        opt(&offer, OptionCode::Unknown(249)).is_some(),
        "option 249 sent"
    );
    assert!(h.events.is_empty(), "an offer is not a lease");

    let ack = h
        .send(&request_selecting(MAC_A, ip(10)), MAC_A)
        .expect("ack");
    assert_eq!(msg_type(&ack), MessageType::Ack);
    assert_eq!(ack.msg.yiaddr(), ip(10));
    assert_eq!(
        opt(&ack, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(7200))
    );
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Created, ip(10))]);
}

#[test]
fn parameter_request_list_is_honoured_and_empty_settings_send_nothing() {
    let mut s = settings();
    s.gateway = None;
    s.dns = vec![];
    let mut h = Harness::new(s);
    let discover = with(
        msg(MessageType::Discover, MAC_A),
        DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
        ]),
    );
    let offer = h.send(&discover, MAC_A).unwrap();
    assert!(
        opt(&offer, OptionCode::Router).is_none(),
        "no router configured"
    );
    assert!(
        opt(&offer, OptionCode::DomainNameServer).is_none(),
        "no DNS configured"
    );
    assert!(
        opt(&offer, OptionCode::DomainName).is_none(),
        "domain not requested"
    );
    assert!(opt(&offer, OptionCode::SubnetMask).is_some());
    assert!(
        opt(&offer, OptionCode::AddressLeaseTime).is_some(),
        "lease time always sent"
    );
}

#[test]
fn broadcast_flag_makes_replies_broadcast() {
    let mut h = Harness::new(settings());
    let mut d = msg(MessageType::Discover, MAC_A);
    d.set_flags(Flags::default().set_broadcast());
    let offer = h.send(&d, MAC_A).unwrap();
    assert_eq!((offer.to.ip, offer.to.mac), (Ipv4Addr::BROADCAST, BCAST));
    assert!(offer.msg.flags().broadcast());
}

#[test]
fn two_clients_get_different_addresses_and_host_names_are_recorded() {
    let mut h = Harness::new(settings());
    let a = h
        .send(&msg(MessageType::Discover, MAC_A), MAC_A)
        .unwrap()
        .msg
        .yiaddr();
    let b = h
        .send(&msg(MessageType::Discover, MAC_B), MAC_B)
        .unwrap()
        .msg
        .yiaddr();
    assert_ne!(a, b);
    let req = with(
        request_selecting(MAC_B, b),
        DhcpOption::Hostname("bee".into()),
    );
    h.send(&req, MAC_B).unwrap();
    let lease = h.server.pool().get_by_ip(b).unwrap();
    assert_eq!(lease.hostname.as_deref(), Some("bee"));
    // A host name that is not a name is not recorded.
    let req = with(
        request_selecting(MAC_A, a),
        DhcpOption::Hostname("evil\nname".into()),
    );
    h.send(&req, MAC_A).unwrap();
    assert_eq!(h.server.pool().get_by_ip(a).unwrap().hostname, None);
}

#[test]
fn request_for_another_server_withdraws_the_offer() {
    let mut h = Harness::new(settings());
    h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    let other = with(
        with(
            msg(MessageType::Request, MAC_A),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 30, 254)),
        ),
        DhcpOption::RequestedIpAddress(ip(10)),
    );
    assert!(h.send(&other, MAC_A).is_none());
    assert!(h.server.pool().is_empty());
}

#[test]
fn init_reboot_acks_own_address_and_naks_foreign_ones() {
    let mut h = Harness::new(settings());
    h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    h.send(&request_selecting(MAC_A, ip(10)), MAC_A).unwrap();
    h.lease_events();
    let reboot = |mac, ipaddr| {
        with(
            msg(MessageType::Request, mac),
            DhcpOption::RequestedIpAddress(ipaddr),
        )
    };
    let ack = h.send(&reboot(MAC_A, ip(10)), MAC_A).unwrap();
    assert_eq!(msg_type(&ack), MessageType::Ack);
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Renewed, ip(10))]);
    // Outside the subnet: NAK, broadcast, whoever asks.
    for mac in [MAC_A, MAC_B] {
        let nak = h
            .send(&reboot(mac, Ipv4Addr::new(10, 1, 2, 3)), mac)
            .unwrap();
        assert_eq!(msg_type(&nak), MessageType::Nak);
        assert_eq!((nak.to.ip, nak.to.mac), (Ipv4Addr::BROADCAST, BCAST));
    }
    // A client with a record asking for an address the settings do not give it: NAK.
    assert_eq!(
        msg_type(&h.send(&reboot(MAC_A, ip(100)), MAC_A).unwrap()),
        MessageType::Nak
    );
}

#[test]
fn init_reboot_from_a_client_without_a_record_gets_silence() {
    // RFC 2131 §4.3.2: "If the DHCP server has no record of this client, then it MUST remain
    // silent". B never talked to this server: whatever it asks for in the subnet (A's
    // address, an address outside the range, a free one), nothing is bound and nothing sent.
    let mut s = settings();
    let mac_c = [0x52, 0x54, 0, 0, 0, 0xc];
    s.statics = vec![Reservation {
        mac: mac_c,
        ip: ip(50),
        hostname: None,
    }];
    let mut h = Harness::new(s);
    bind(&mut h, MAC_A);
    h.lease_events();
    for asked in [ip(10), ip(100), ip(12)] {
        let reboot = with(
            msg(MessageType::Request, MAC_B),
            DhcpOption::RequestedIpAddress(asked),
        );
        assert!(h.send(&reboot, MAC_B).is_none(), "{asked}");
    }
    assert!(h.lease_events().is_empty());
    assert!(h.server.pool().get_by_ip(ip(12)).is_none(), "nothing bound");
    assert_eq!(h.server.counters().unknown_client, 3);
    // A client with a static reservation is known by it: its own address is ACKed.
    let reboot = with(
        msg(MessageType::Request, mac_c),
        DhcpOption::RequestedIpAddress(ip(50)),
    );
    assert_eq!(msg_type(&h.send(&reboot, mac_c).unwrap()), MessageType::Ack);
    // After a restart with the lease table restored, A is known again.
    let saved = h.server.pool().persistent();
    let mut h2 = Harness::new(settings());
    h2.server.restore(saved);
    let reboot = with(
        msg(MessageType::Request, MAC_A),
        DhcpOption::RequestedIpAddress(ip(10)),
    );
    assert_eq!(
        msg_type(&h2.send(&reboot, MAC_A).unwrap()),
        MessageType::Ack
    );
}

#[test]
fn messages_from_another_mac_than_their_chaddr_are_ignored_and_logged() {
    let mut h = Harness::new(settings());
    let a = bind(&mut h, MAC_A);
    h.events.clear();
    // B (frame source) sends a RELEASE and a DECLINE in A's name (chaddr A).
    let mut release = with(
        msg(MessageType::Release, MAC_A),
        DhcpOption::ServerIdentifier(SERVER),
    );
    release.set_ciaddr(a);
    let decline = with(
        with(
            msg(MessageType::Decline, MAC_A),
            DhcpOption::ServerIdentifier(SERVER),
        ),
        DhcpOption::RequestedIpAddress(a),
    );
    assert!(h.send(&release, MAC_B).is_none());
    assert!(h.send(&decline, MAC_B).is_none());
    // Nor may B take A's address by renewing it in A's name.
    let mut renew_a = msg(MessageType::Request, MAC_A);
    renew_a.set_ciaddr(a);
    assert!(h.send(&renew_a, MAC_B).is_none());
    // A client identifier that names A's hardware address, from B's own chaddr: spoofed too.
    let mut as_a = with(
        msg(MessageType::Release, MAC_B),
        DhcpOption::ServerIdentifier(SERVER),
    );
    as_a.set_ciaddr(a);
    let mut id = vec![1u8];
    id.extend_from_slice(&MAC_A);
    let as_a = with(as_a, DhcpOption::ClientIdentifier(id));
    assert!(h.send(&as_a, MAC_B).is_none());
    let lease = h.server.pool().get_by_ip(a).expect("A keeps its lease");
    assert_eq!((lease.state, lease.mac), (super::LeaseState::Bound, MAC_A));
    let c = h.server.counters();
    assert_eq!((c.releases, c.declines, c.requests), (2, 1, 2));
    assert_eq!(c.spoofed, 4);
    assert_eq!(c.received(), c.sent() + c.dropped());
    // One line for the security log; the rest of the same second are counted in the next.
    let ignored: Vec<DhcpEvent> = h.events.drain(..).collect();
    assert_eq!(
        ignored,
        [DhcpEvent::Ignored {
            mac: MAC_B,
            chaddr: MAC_A,
            reason: "chaddr is not the frame's source MAC",
            suppressed: 0,
        }]
    );
    h.now += 1;
    assert!(h.send(&as_a, MAC_B).is_none());
    assert_eq!(
        h.events.pop_front(),
        Some(DhcpEvent::Ignored {
            mac: MAC_B,
            chaddr: MAC_B,
            reason: "the client identifier names another hardware address",
            suppressed: 3,
        })
    );
    // A's own RELEASE still works.
    assert!(h.send(&release, MAC_A).is_none());
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Released, a)]);
}

#[test]
fn release_and_decline_of_a_lease_bound_to_another_mac_are_ignored() {
    // B learnt A's client identifier (it is broadcast in every DISCOVER) and sends it with
    // its own chaddr: the lease's MAC is not B's.
    let mut h = Harness::new(settings());
    let id = DhcpOption::ClientIdentifier(b"\x00duid-of-a".to_vec());
    h.send(&with(msg(MessageType::Discover, MAC_A), id.clone()), MAC_A)
        .unwrap();
    h.send(&with(request_selecting(MAC_A, ip(10)), id.clone()), MAC_A)
        .unwrap();
    h.events.clear();
    let mut release = with(
        with(msg(MessageType::Release, MAC_B), id.clone()),
        DhcpOption::ServerIdentifier(SERVER),
    );
    release.set_ciaddr(ip(10));
    assert!(h.send(&release, MAC_B).is_none());
    assert_eq!(
        h.server.pool().get_by_ip(ip(10)).map(|l| l.state),
        Some(super::LeaseState::Bound)
    );
    assert_eq!(h.server.counters().spoofed, 1);
    assert!(matches!(
        h.events.pop_front(),
        Some(DhcpEvent::Ignored {
            reason: "RELEASE or DECLINE of a lease bound to another MAC",
            ..
        })
    ));
}

#[test]
fn renewing_and_rebinding_extend_the_lease_by_unicast() {
    let mut h = Harness::new(settings());
    h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    h.send(&request_selecting(MAC_A, ip(10)), MAC_A).unwrap();
    h.lease_events();
    h.now += 3600;
    let mut renew = msg(MessageType::Request, MAC_A);
    renew.set_ciaddr(ip(10));
    let ack = h.send(&renew, MAC_A).unwrap();
    assert_eq!(msg_type(&ack), MessageType::Ack);
    assert_eq!(
        (ack.to.ip, ack.to.mac, ack.msg.ciaddr()),
        (ip(10), MAC_A, ip(10))
    );
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Renewed, ip(10))]);
    assert_eq!(
        h.server.pool().get_by_ip(ip(10)).unwrap().expires,
        h.now + 7200
    );
    // Renewing an address that is someone else's: NAK.
    let mut wrong = msg(MessageType::Request, MAC_B);
    wrong.set_ciaddr(ip(10));
    assert_eq!(msg_type(&h.send(&wrong, MAC_B).unwrap()), MessageType::Nak);
}

#[test]
fn release_frees_and_expiry_expires() {
    let mut h = Harness::new(settings());
    h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    h.send(&request_selecting(MAC_A, ip(10)), MAC_A).unwrap();
    let mut rel = with(
        msg(MessageType::Release, MAC_A),
        DhcpOption::ServerIdentifier(SERVER),
    );
    rel.set_ciaddr(ip(10));
    assert!(h.send(&rel, MAC_A).is_none());
    assert_eq!(
        h.lease_events(),
        vec![
            (LeaseEventKind::Created, ip(10)),
            (LeaseEventKind::Released, ip(10))
        ]
    );

    h.send(&msg(MessageType::Discover, MAC_B), MAC_B).unwrap();
    h.send(&request_selecting(MAC_B, ip(11)), MAC_B).unwrap();
    h.lease_events();
    assert_eq!(h.server.next_deadline(), Some(h.now + 7200));
    assert!(h.server.handle_timeout(h.now + 7200, &mut h.events));
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Expired, ip(11))]);
}

#[test]
fn decline_quarantines_and_the_client_gets_another_address() {
    let mut h = Harness::new(settings());
    h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    h.send(&request_selecting(MAC_A, ip(10)), MAC_A).unwrap();
    let decline = with(
        with(
            msg(MessageType::Decline, MAC_A),
            DhcpOption::ServerIdentifier(SERVER),
        ),
        DhcpOption::RequestedIpAddress(ip(10)),
    );
    assert!(h.send(&decline, MAC_A).is_none());
    assert_eq!(
        h.lease_events(),
        vec![
            (LeaseEventKind::Created, ip(10)),
            (LeaseEventKind::Declined, ip(10))
        ]
    );
    let offer = h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    assert_eq!(offer.msg.yiaddr(), ip(11));
}

#[test]
fn full_pool_gets_no_offer_and_an_event() {
    let mut s = settings();
    s.range_end = ip(10);
    let mut h = Harness::new(s);
    assert!(h.send(&msg(MessageType::Discover, MAC_A), MAC_A).is_some());
    assert!(h.send(&msg(MessageType::Discover, MAC_B), MAC_B).is_none());
    assert_eq!(
        h.events.pop_front(),
        Some(DhcpEvent::PoolExhausted { mac: MAC_B })
    );
    assert_eq!(h.server.counters().exhausted, 1);
}

#[test]
fn inform_gets_options_without_a_lease() {
    let mut h = Harness::new(settings());
    let mut inform = msg(MessageType::Inform, MAC_A);
    inform.set_ciaddr(ip(99));
    let ack = h.send(&inform, MAC_A).unwrap();
    assert_eq!(msg_type(&ack), MessageType::Ack);
    assert_eq!(ack.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&ack, OptionCode::AddressLeaseTime).is_none());
    assert!(opt(&ack, OptionCode::Router).is_some());
    assert_eq!((ack.to.ip, ack.to.mac), (ip(99), MAC_A));
    assert!(h.server.pool().is_empty());
}

#[test]
fn client_identifier_is_the_key_and_is_echoed() {
    let mut h = Harness::new(settings());
    let id = DhcpOption::ClientIdentifier(b"\x00my-client".to_vec());
    let offer = h
        .send(&with(msg(MessageType::Discover, MAC_A), id.clone()), MAC_A)
        .unwrap();
    assert_eq!(opt(&offer, OptionCode::ClientIdentifier), Some(&id));
    h.send(&with(request_selecting(MAC_A, ip(10)), id.clone()), MAC_A)
        .unwrap();
    // The same client id from another MAC (a moved VM) keeps its address.
    let offer = h
        .send(&with(msg(MessageType::Discover, MAC_B), id), MAC_B)
        .unwrap();
    assert_eq!(offer.msg.yiaddr(), ip(10));
}

#[test]
fn static_reservation_with_host_name() {
    let mut s = settings();
    s.statics = vec![Reservation {
        mac: MAC_B,
        ip: ip(50),
        hostname: Some("printer".into()),
    }];
    let mut h = Harness::new(s);
    let offer = h.send(&msg(MessageType::Discover, MAC_B), MAC_B).unwrap();
    assert_eq!(offer.msg.yiaddr(), ip(50));
    assert_eq!(
        opt(&offer, OptionCode::Hostname),
        Some(&DhcpOption::Hostname("printer".into()))
    );
    // Someone else asking for it is NAKed (once the server knows it: a client without a
    // record gets no answer at all to an INIT-REBOOT).
    let steal = with(
        msg(MessageType::Request, MAC_A),
        DhcpOption::RequestedIpAddress(ip(50)),
    );
    assert!(h.send(&steal, MAC_A).is_none());
    bind(&mut h, MAC_A);
    assert_eq!(msg_type(&h.send(&steal, MAC_A).unwrap()), MessageType::Nak);
}

#[test]
fn relayed_messages_are_not_served() {
    // A relay forwards the client's message from its own MAC: hubnat serves its own segment
    // only, and such a message looks like any other whose chaddr is not its sender.
    let mut h = Harness::new(settings());
    let relay_mac = [0x52, 0x54, 0, 0, 0, 0x99];
    let mut d = msg(MessageType::Discover, MAC_A);
    d.set_giaddr(ip(254));
    assert!(h.send(&d, relay_mac).is_none());
    assert_eq!(h.server.counters().spoofed, 1);
}

#[test]
fn non_requests_and_bad_hardware_are_ignored() {
    let mut h = Harness::new(settings());
    let mut reply = msg(MessageType::Offer, MAC_A);
    reply.set_opcode(Opcode::BootReply);
    assert!(h.send(&reply, MAC_A).is_none());
    let mut odd = msg(MessageType::Discover, MAC_A);
    odd.set_chaddr(&[1, 2, 3]);
    assert!(h.send(&odd, MAC_A).is_none());
    let no_type = Message::new_with_id(
        1,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &MAC_A,
    );
    assert!(h.send(&no_type, MAC_A).is_none());
    assert_eq!(h.server.counters().ignored, 3);
}

// ---- live settings ----------------------------------------------------------------------

/// DISCOVER then selecting REQUEST; returns the bound address.
fn bind(h: &mut Harness, mac: [u8; 6]) -> Ipv4Addr {
    let offered = h
        .send(&msg(MessageType::Discover, mac), mac)
        .expect("offer")
        .msg
        .yiaddr();
    let ack = h.send(&request_selecting(mac, offered), mac).expect("ack");
    assert_eq!(msg_type(&ack), MessageType::Ack);
    offered
}

fn renew(mac: [u8; 6], ciaddr: Ipv4Addr) -> Message {
    let mut m = msg(MessageType::Request, mac);
    m.set_ciaddr(ciaddr);
    m
}

#[test]
fn a_new_range_applies_to_new_leases_and_old_ones_are_naked_at_renewal() {
    let mut h = Harness::new(settings());
    assert_eq!(bind(&mut h, MAC_A), ip(10));
    h.lease_events();
    let counters = h.server.counters();
    assert!(!h.change(|s| {
        s.range_start = ip(20);
        s.range_end = ip(22);
    }));
    assert_eq!(h.server.counters(), counters, "counters kept");
    // A's binding is still there and still A's.
    let lease = h.server.pool().get_by_ip(ip(10)).expect("kept");
    assert_eq!(lease.state, super::LeaseState::Bound);
    // A new client gets an address in the new range.
    assert_eq!(bind(&mut h, MAC_B), ip(20));
    h.lease_events();
    // A renews: NAK, and its binding ends with an event.
    h.now += 3600;
    let nak = h.send(&renew(MAC_A, ip(10)), MAC_A).expect("nak");
    assert_eq!(msg_type(&nak), MessageType::Nak);
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Revoked, ip(10))]);
    assert!(h.server.pool().get_by_ip(ip(10)).is_none());
    // A rediscovers, asking for its old address: it is not offered again.
    let discover = with(
        msg(MessageType::Discover, MAC_A),
        DhcpOption::RequestedIpAddress(ip(10)),
    );
    assert_eq!(h.send(&discover, MAC_A).unwrap().msg.yiaddr(), ip(21));
    // Nor is it ACKed on an init-reboot.
    let reboot = with(
        msg(MessageType::Request, MAC_A),
        DhcpOption::RequestedIpAddress(ip(10)),
    );
    assert_eq!(msg_type(&h.send(&reboot, MAC_A).unwrap()), MessageType::Nak);
}

#[test]
fn a_client_outside_the_new_range_that_rediscovers_gets_a_new_address_and_an_event() {
    let mut h = Harness::new(settings());
    bind(&mut h, MAC_A);
    h.lease_events();
    h.change(|s| {
        s.range_start = ip(20);
        s.range_end = ip(22);
    });
    // A rebooted and forgot its lease.
    assert_eq!(bind(&mut h, MAC_A), ip(20));
    assert_eq!(
        h.lease_events(),
        vec![
            (LeaseEventKind::Revoked, ip(10)),
            (LeaseEventKind::Created, ip(20))
        ]
    );
}

#[test]
fn an_address_now_reserved_for_another_mac_is_naked_at_renewal() {
    let mut h = Harness::new(settings());
    assert_eq!(bind(&mut h, MAC_A), ip(10));
    h.lease_events();
    h.change(|s| {
        s.statics = vec![Reservation {
            mac: MAC_B,
            ip: ip(10),
            hostname: None,
        }]
    });
    // B's reservation is A's binding for now: B gets a dynamic address meanwhile.
    assert_eq!(bind(&mut h, MAC_B), ip(11));
    h.lease_events();
    // A renews: NAK; the address is free for B.
    let nak = h.send(&renew(MAC_A, ip(10)), MAC_A).unwrap();
    assert_eq!(msg_type(&nak), MessageType::Nak);
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Revoked, ip(10))]);
    // B renews its dynamic address: NAK, it has a free reservation now; it moves there.
    let nak = h.send(&renew(MAC_B, ip(11)), MAC_B).unwrap();
    assert_eq!(msg_type(&nak), MessageType::Nak);
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Revoked, ip(11))]);
    assert_eq!(bind(&mut h, MAC_B), ip(10));
    // A rediscovers and gets another address.
    assert_eq!(bind(&mut h, MAC_A), ip(11));
}

#[test]
fn a_new_lease_time_applies_to_new_leases_and_renewals() {
    let mut h = Harness::new(settings());
    bind(&mut h, MAC_A);
    assert!(!h.change(|s| s.lease = Duration::from_secs(600)));
    let check = |r: &Reply| {
        assert_eq!(
            (
                opt(r, OptionCode::AddressLeaseTime),
                opt(r, OptionCode::Renewal),
                opt(r, OptionCode::Rebinding)
            ),
            (
                Some(&DhcpOption::AddressLeaseTime(600)),
                Some(&DhcpOption::Renewal(300)),
                Some(&DhcpOption::Rebinding(525))
            )
        );
    };
    // A renewal.
    h.now += 100;
    let ack = h.send(&renew(MAC_A, ip(10)), MAC_A).unwrap();
    check(&ack);
    assert_eq!(
        h.server.pool().get_by_ip(ip(10)).unwrap().expires,
        h.now + 600
    );
    // A new lease.
    let offer = h.send(&msg(MessageType::Discover, MAC_B), MAC_B).unwrap();
    check(&offer);
    let ack = h.send(&request_selecting(MAC_B, ip(11)), MAC_B).unwrap();
    check(&ack);
    assert_eq!(
        h.server.pool().get_by_ip(ip(11)).unwrap().expires,
        h.now + 600
    );
    assert_eq!(h.server.next_deadline(), Some(h.now + 600));
}

#[test]
fn new_and_removed_reservations_apply_to_new_offers_at_once() {
    let mut h = Harness::new(settings());
    h.change(|s| {
        s.statics = vec![Reservation {
            mac: MAC_A,
            ip: ip(50),
            hostname: Some("nas".into()),
        }]
    });
    let offer = h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    assert_eq!(offer.msg.yiaddr(), ip(50));
    assert_eq!(
        opt(&offer, OptionCode::Hostname),
        Some(&DhcpOption::Hostname("nas".into()))
    );
    h.send(&request_selecting(MAC_A, ip(50)), MAC_A).unwrap();
    h.lease_events();
    // Removed: the next offer is dynamic, without the host name; the binding outside the
    // range is refused at renewal.
    h.change(|s| s.statics.clear());
    let nak = h.send(&renew(MAC_A, ip(50)), MAC_A).unwrap();
    assert_eq!(msg_type(&nak), MessageType::Nak);
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Revoked, ip(50))]);
    let offer = h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    assert_eq!(offer.msg.yiaddr(), ip(10));
    assert!(opt(&offer, OptionCode::Hostname).is_none());
    // Another (known) client asking for the former reservation is refused: outside the range.
    bind(&mut h, MAC_B);
    let steal = with(
        msg(MessageType::Request, MAC_B),
        DhcpOption::RequestedIpAddress(ip(50)),
    );
    assert_eq!(msg_type(&h.send(&steal, MAC_B).unwrap()), MessageType::Nak);
}

#[test]
fn new_options_apply_to_the_next_reply() {
    let mut h = Harness::new(settings());
    bind(&mut h, MAC_A);
    // No reconfigure: options are read per message.
    h.settings.gateway = Some(ip(254));
    h.settings.dns = vec![ip(2), ip(3)];
    h.settings.domain = Some("new.test".into());
    h.settings.routes = vec![StaticRoute {
        dest: Ipv4Addr::new(10, 0, 0, 0),
        prefix_len: 8,
        gateway: ip(253),
    }];
    let ack = h.send(&renew(MAC_A, ip(10)), MAC_A).unwrap();
    assert_eq!(
        opt(&ack, OptionCode::Router),
        Some(&DhcpOption::Router(vec![ip(254)]))
    );
    assert_eq!(
        opt(&ack, OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![ip(2), ip(3)]))
    );
    assert_eq!(
        opt(&ack, OptionCode::DomainName),
        Some(&DhcpOption::DomainName("new.test".into()))
    );
    match opt(&ack, OptionCode::ClasslessStaticRoute) {
        Some(DhcpOption::ClasslessStaticRoute(routes)) => {
            assert_eq!(routes.len(), 2, "route + default via the new router");
            assert_eq!(routes[0].1, ip(253));
            assert_eq!(routes[1].1, ip(254));
        }
        other => panic!("no option 121: {other:?}"),
    }
    // Emptied: not sent any more, to INFORM either.
    h.settings.gateway = None;
    h.settings.dns.clear();
    h.settings.domain = None;
    h.settings.routes.clear();
    let mut inform = msg(MessageType::Inform, MAC_A);
    inform.set_ciaddr(ip(10));
    let ack = h.send(&inform, MAC_A).unwrap();
    for code in [
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::ClasslessStaticRoute,
    ] {
        assert!(opt(&ack, code).is_none(), "{code:?} still sent");
    }
}

#[test]
fn reconfigure_keeps_leases_counters_and_ids() {
    let mut h = Harness::new(settings());
    bind(&mut h, MAC_A);
    bind(&mut h, MAC_B);
    let leases: Vec<_> = h.server.leases().cloned().collect();
    let counters = h.server.counters();
    // Growing the range keeps everything as it was.
    assert!(!h.change(|s| s.range_end = ip(200)));
    assert_eq!(h.server.leases().cloned().collect::<Vec<_>>(), leases);
    assert_eq!(h.server.counters(), counters);
    assert_eq!(h.server.next_deadline(), Some(h.now + 7200));
}

// ---- counters ---------------------------------------------------------------------------

#[test]
fn every_message_is_counted_once_by_type_and_outcome() {
    let mut s = settings();
    s.range_end = ip(11);
    let mut h = Harness::new(s);
    let other = Ipv4Addr::new(192, 168, 30, 254);
    let expect = |h: &Harness, f: &dyn Fn(&mut super::DhcpCounters)| {
        let mut want = super::DhcpCounters::default();
        f(&mut want);
        assert_eq!(h.server.counters(), want);
    };

    // DISCOVER → OFFER.
    h.send(&msg(MessageType::Discover, MAC_A), MAC_A).unwrap();
    expect(&h, &|c| {
        c.discovers = 1;
        c.offers = 1;
    });
    // REQUEST → ACK.
    h.send(&request_selecting(MAC_A, ip(10)), MAC_A).unwrap();
    // REQUEST → NAK (outside the range).
    h.send(&renew(MAC_B, ip(99)), MAC_B).unwrap();
    // REQUEST for another server: dropped, offer withdrawn.
    let to_other = with(
        with(
            msg(MessageType::Request, MAC_B),
            DhcpOption::ServerIdentifier(other),
        ),
        DhcpOption::RequestedIpAddress(ip(11)),
    );
    assert!(h.send(&to_other, MAC_B).is_none());
    // REQUEST naming no address: ignored.
    assert!(h.send(&msg(MessageType::Request, MAC_B), MAC_B).is_none());
    expect(&h, &|c| {
        c.discovers = 1;
        c.offers = 1;
        c.requests = 4;
        c.acks = 1;
        c.naks = 1;
        c.other_server = 1;
        c.ignored = 1;
    });

    // INFORM → ACK; INFORM without ciaddr: ignored.
    let mut inform = msg(MessageType::Inform, MAC_A);
    inform.set_ciaddr(ip(10));
    h.send(&inform, MAC_A).unwrap();
    assert!(h.send(&msg(MessageType::Inform, MAC_A), MAC_A).is_none());
    // RELEASE of nothing; RELEASE for another server; RELEASE that takes effect.
    let release = |mac, server, ciaddr| {
        let mut m = with(
            msg(MessageType::Release, mac),
            DhcpOption::ServerIdentifier(server),
        );
        m.set_ciaddr(ciaddr);
        m
    };
    assert!(h.send(&release(MAC_B, SERVER, ip(11)), MAC_B).is_none());
    assert!(h.send(&release(MAC_A, other, ip(10)), MAC_A).is_none());
    assert!(h.send(&release(MAC_A, SERVER, ip(10)), MAC_A).is_none());
    // DECLINE of nothing; DECLINE for another server; DECLINE that takes effect.
    let decline = |mac, server, requested| {
        with(
            with(
                msg(MessageType::Decline, mac),
                DhcpOption::ServerIdentifier(server),
            ),
            DhcpOption::RequestedIpAddress(requested),
        )
    };
    assert!(h.send(&decline(MAC_B, SERVER, ip(11)), MAC_B).is_none());
    assert!(h.send(&decline(MAC_A, other, ip(10)), MAC_A).is_none());
    h.send(&msg(MessageType::Discover, MAC_B), MAC_B).unwrap(); // offer .11 to B
    assert!(h.send(&decline(MAC_B, SERVER, ip(11)), MAC_B).is_none());
    // Other types: a server's message, no type at all, a bad hardware address.
    let mut offer = msg(MessageType::Offer, MAC_A);
    offer.set_opcode(Opcode::BootReply);
    assert!(h.send(&offer, MAC_A).is_none());
    let no_type = Message::new_with_id(
        1,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &MAC_A,
    );
    assert!(h.send(&no_type, MAC_A).is_none());
    // A DISCOVER that is not from Ethernet hardware counts as a DISCOVER, then is ignored.
    let mut odd = msg(MessageType::Discover, MAC_A);
    odd.set_chaddr(&[1, 2, 3]);
    assert!(h.send(&odd, MAC_A).is_none());
    // A full pool: .10 released by A is taken by C, .11 is quarantined; D gets nothing.
    let mac_c = [0x52, 0x54, 0, 0, 0, 0xc];
    let mac_d = [0x52, 0x54, 0, 0, 0, 0xd];
    h.send(&msg(MessageType::Discover, mac_c), mac_c).unwrap();
    assert!(h.send(&msg(MessageType::Discover, mac_d), mac_d).is_none());

    let want = super::DhcpCounters {
        discovers: 5,
        requests: 4,
        declines: 3,
        releases: 3,
        informs: 2,
        other_types: 2,
        offers: 3,
        acks: 2,
        naks: 1,
        ignored: 5,
        other_server: 3,
        no_lease: 2,
        exhausted: 1,
        mac_share_full: 0,
        spoofed: 0,
        unknown_client: 0,
        not_served: 0,
        quiet: 0,
        other_server_replies: 0,
        probes: 0,
    };
    assert_eq!(h.server.counters(), want);
    assert_eq!(want.received(), 19);
    assert_eq!(want.sent(), 6);
    assert_eq!(want.dropped(), 11);
    // Every message is accounted for: replies, drops, and the RELEASE and DECLINE that took
    // effect.
    assert_eq!(want.received(), want.sent() + want.dropped() + 2);
}

// ---- operator release and the lease table -----------------------------------------------

#[test]
fn operator_release_frees_the_lease_with_its_own_event() {
    let mut h = Harness::new(settings());
    let a = bind_named(&mut h, MAC_A, "alpha");
    let b = bind(&mut h, MAC_B);
    h.lease_events();
    let counters = h.server.counters();

    // By MAC.
    let lease = h
        .server
        .release_by_mac(MAC_A, h.now + 10, &mut h.events)
        .expect("bound");
    assert_eq!(
        (lease.ip, lease.mac, lease.state),
        (a, MAC_A, super::LeaseState::Bound)
    );
    match h.events.pop_front() {
        Some(DhcpEvent::Lease { kind, lease }) => {
            assert_eq!(kind, LeaseEventKind::ReleasedByOperator);
            assert_eq!(kind.as_str(), "released by operator");
            assert_eq!((lease.ip, lease.hostname.as_deref()), (a, Some("alpha")));
        }
        other => panic!("no event: {other:?}"),
    }
    assert_eq!(
        h.server.pool().get_by_ip(a).map(|l| l.state),
        Some(super::LeaseState::Released)
    );
    assert!(h
        .server
        .release_by_mac(MAC_A, h.now, &mut h.events)
        .is_none());
    assert!(h.events.is_empty());

    // By address.
    assert_eq!(
        h.server
            .release_by_ip(b, h.now + 20, &mut h.events)
            .map(|l| l.mac),
        Some(MAC_B)
    );
    assert_eq!(
        h.lease_events(),
        vec![(LeaseEventKind::ReleasedByOperator, b)]
    );
    assert!(h
        .server
        .release_by_ip(ip(12), h.now, &mut h.events)
        .is_none());
    assert_eq!(h.server.counters(), counters, "not a message");
    assert_eq!(h.server.next_deadline(), None, "nothing bound");
}

#[test]
fn after_an_operator_release_a_renewal_is_acked_while_the_address_is_free_and_naked_after() {
    let mut s = settings();
    s.range_end = ip(10); // one address
    let mut h = Harness::new(s);
    bind(&mut h, MAC_A);
    h.server.release_by_ip(ip(10), h.now, &mut h.events);
    h.lease_events();
    // Still free: the client's renewal makes a new binding.
    h.now += 100;
    let ack = h.send(&renew(MAC_A, ip(10)), MAC_A).unwrap();
    assert_eq!(msg_type(&ack), MessageType::Ack);
    assert_eq!(h.lease_events(), vec![(LeaseEventKind::Created, ip(10))]);
    // Released again, and given to B meanwhile: A's renewal is refused.
    h.server.release_by_mac(MAC_A, h.now, &mut h.events);
    assert_eq!(bind(&mut h, MAC_B), ip(10));
    h.lease_events();
    let nak = h.send(&renew(MAC_A, ip(10)), MAC_A).unwrap();
    assert_eq!(msg_type(&nak), MessageType::Nak);
    assert!(h.lease_events().is_empty(), "B's lease is untouched");
    assert_eq!(
        h.server.pool().get_by_ip(ip(10)).map(|l| l.mac),
        Some(MAC_B)
    );
}

#[test]
fn an_address_released_by_the_operator_goes_to_new_clients_last() {
    let mut h = Harness::new(settings());
    bind(&mut h, MAC_A);
    h.server.release_by_mac(MAC_A, h.now, &mut h.events);
    assert_eq!(bind(&mut h, MAC_B), ip(11), "a never-held address first");
}

#[test]
fn the_lease_table_shows_every_record() {
    let mut h = Harness::new(settings());
    let start = h.now;
    bind_named(&mut h, MAC_A, "alpha");
    h.now += 5;
    h.send(&msg(MessageType::Discover, MAC_B), MAC_B).unwrap();
    let table: Vec<_> = h
        .server
        .leases()
        .map(|l| (l.mac, l.ip, l.hostname.clone(), l.state, l.start, l.expires))
        .collect();
    assert_eq!(
        table,
        vec![
            (
                MAC_A,
                ip(10),
                Some("alpha".to_owned()),
                super::LeaseState::Bound,
                start,
                start + 7200
            ),
            (
                MAC_B,
                ip(11),
                None,
                super::LeaseState::Offered,
                start + 5,
                start + 5 + super::pool::OFFER_HOLD_SECS
            ),
        ]
    );
}

fn bind_named(h: &mut Harness, mac: [u8; 6], name: &str) -> Ipv4Addr {
    let offered = h
        .send(&msg(MessageType::Discover, mac), mac)
        .unwrap()
        .msg
        .yiaddr();
    let req = with(
        request_selecting(mac, offered),
        DhcpOption::Hostname(name.into()),
    );
    assert_eq!(msg_type(&h.send(&req, mac).unwrap()), MessageType::Ack);
    offered
}

#[test]
fn serve_macs_and_ignore_macs_choose_who_is_answered() {
    use super::options::MacPattern;
    let mut s = settings();
    s.serve_macs = vec![MacPattern {
        mac: [0x52, 0x54, 0, 0, 0, 0],
        prefix_len: 24,
    }];
    s.ignore_macs = vec![MacPattern {
        mac: MAC_B,
        prefix_len: 48,
    }];
    let mut h = Harness::new(s);
    let other: [u8; 6] = [0x5e, 1, 2, 3, 4, 5];
    assert!(h.send(&msg(MessageType::Discover, MAC_A), MAC_A).is_some());
    // In serve_macs but also in ignore_macs: ignored; outside serve_macs: ignored.
    assert!(h.send(&msg(MessageType::Discover, MAC_B), MAC_B).is_none());
    assert!(h.send(&msg(MessageType::Discover, other), other).is_none());
    assert!(h.send(&request_selecting(other, ip(10)), other).is_none());
    let c = h.server.counters();
    assert_eq!((c.offers, c.not_served), (1, 3));
    assert_eq!(c.received(), c.sent() + c.dropped());
}

#[test]
fn another_server_makes_a_non_authoritative_server_quiet_until_it_is_gone() {
    use super::server::OTHER_SERVER_HOLD_SECS;
    let mut s = settings();
    s.authoritative = false;
    let mut h = Harness::new(s);
    let (other_ip, other_mac) = (Ipv4Addr::new(192, 168, 30, 254), [0x5e, 9, 9, 9, 9, 9]);
    // The first probe is due at once, then every interval.
    assert_eq!(h.server.probe_deadline(&h.settings), Some(0));
    let probe = h
        .server
        .take_probe(&h.settings, [0, 0xac, 1, 2, 3, 4], 7, h.now)
        .expect("a probe");
    assert_eq!(probe.opts().msg_type(), Some(MessageType::Discover));
    assert_eq!(probe.chaddr()[..6], [0, 0xac, 1, 2, 3, 4]);
    assert!(h.server.take_probe(&h.settings, [0; 6], 8, h.now).is_none());
    // A reply of another server: reported once, then quiet.
    for _ in 0..3 {
        let (settings, now) = (h.settings.clone(), h.now);
        h.server
            .saw_reply(&settings, other_ip, other_mac, now, &mut h.events);
    }
    let reported: Vec<_> = h
        .events
        .drain(..)
        .filter(|e| matches!(e, DhcpEvent::OtherServer { .. }))
        .collect();
    assert_eq!(
        reported,
        [DhcpEvent::OtherServer {
            ip: other_ip,
            mac: other_mac,
            authoritative: false
        }]
    );
    assert!(h.send(&msg(MessageType::Discover, MAC_A), MAC_A).is_none());
    assert!(h.send(&request_selecting(MAC_A, ip(10)), MAC_A).is_none());
    assert_eq!(h.server.counters().quiet, 2);
    assert_eq!(h.server.counters().other_server_replies, 3);
    // Silent for the hold time: answering again.
    assert_eq!(
        h.server.next_deadline(),
        Some(h.now + OTHER_SERVER_HOLD_SECS)
    );
    h.now += OTHER_SERVER_HOLD_SECS;
    let now = h.now;
    h.server.handle_timeout(now, &mut h.events);
    assert!(h.server.other_servers().is_empty());
    assert!(h.send(&msg(MessageType::Discover, MAC_A), MAC_A).is_some());
}

#[test]
fn an_authoritative_server_answers_beside_another_and_does_not_probe() {
    let mut s = settings();
    s.authoritative = true;
    let mut h = Harness::new(s);
    assert_eq!(h.server.probe_deadline(&h.settings), None);
    assert!(h.server.take_probe(&h.settings, [0; 6], 1, h.now).is_none());
    let (settings, now) = (h.settings.clone(), h.now);
    h.server.saw_reply(
        &settings,
        Ipv4Addr::new(192, 168, 30, 254),
        [0x5e, 9, 9, 9, 9, 9],
        now,
        &mut h.events,
    );
    assert!(h.events.iter().any(|e| matches!(
        e,
        DhcpEvent::OtherServer {
            authoritative: true,
            ..
        }
    )));
    assert!(h.send(&msg(MessageType::Discover, MAC_A), MAC_A).is_some());
    assert_eq!(h.server.counters().quiet, 0);
}

#[test]
fn one_mac_holds_at_most_its_share_of_addresses_whatever_its_client_identifiers() {
    let mut s = settings();
    s.range_end = ip(40);
    s.max_leases_per_mac = 2;
    let mut h = Harness::new(s);
    let id = |n: u8| DhcpOption::ClientIdentifier(vec![0, b'c', n]);
    // Two identifiers behind MAC_A: one bound, one offered. Both count.
    let first = h
        .send(&with(msg(MessageType::Discover, MAC_A), id(1)), MAC_A)
        .unwrap();
    let ack = h
        .send(
            &with(request_selecting(MAC_A, first.msg.yiaddr()), id(1)),
            MAC_A,
        )
        .unwrap();
    assert_eq!(msg_type(&ack), MessageType::Ack);
    assert!(h
        .send(&with(msg(MessageType::Discover, MAC_A), id(2)), MAC_A)
        .is_some());
    h.events.clear();
    // A third identifier gets nothing, counted and reported.
    assert!(h
        .send(&with(msg(MessageType::Discover, MAC_A), id(3)), MAC_A)
        .is_none());
    assert_eq!(h.server.counters().mac_share_full, 1);
    assert!(matches!(
        h.events.pop_front(),
        Some(DhcpEvent::MacShareFull {
            mac: MAC_A,
            held: 2
        })
    ));
    // The identifiers that hold an address are still served; so is another MAC.
    let again = h
        .send(&with(msg(MessageType::Discover, MAC_A), id(1)), MAC_A)
        .unwrap();
    assert_eq!(again.msg.yiaddr(), first.msg.yiaddr());
    assert!(h.send(&msg(MessageType::Discover, MAC_B), MAC_B).is_some());
    // Once one gives its address back, there is room again.
    let release = with(
        with(
            {
                let mut m = msg(MessageType::Release, MAC_A);
                m.set_ciaddr(first.msg.yiaddr());
                m
            },
            DhcpOption::ServerIdentifier(SERVER),
        ),
        id(1),
    );
    assert!(h.send(&release, MAC_A).is_none());
    assert!(h
        .send(&with(msg(MessageType::Discover, MAC_A), id(3)), MAC_A)
        .is_some());
}
