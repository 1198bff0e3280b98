//! The admission point, the end reasons and the counters, on the shared fixture: the test plays
//! the client (raw frames), the driver (host events) and the policy.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetFrame, Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet, TcpControl,
};

use super::super::testkit::{self, *};
use super::super::{Event, VirtualHost};
use super::admit::{MAX_PENDING_PER_CLIENT, VERDICT_TIMEOUT};
use super::tests::udp_frame;
use super::{
    Decision, EndReason, FlowInfo, FlowTicket, HostEvent, HostOp, NatEvent, PolicyAnswer, Protocol,
    SessionPolicy, Verdict,
};

/// A policy that decides by the remote port, records what it saw, and answers later for
/// port 7000 and up.
#[derive(Default)]
struct PortPolicy {
    seen: Rc<RefCell<Vec<(FlowTicket, FlowInfo)>>>,
}

impl SessionPolicy for PortPolicy {
    fn check(&mut self, ticket: FlowTicket, flow: &FlowInfo) -> PolicyAnswer {
        self.seen.borrow_mut().push((ticket, flow.clone()));
        let verdict = match flow.remote.port() {
            25 => Verdict::Reject,
            26 => Verdict::Drop,
            27 => Verdict::Redirect("10.77.0.3:8080".parse().unwrap()),
            28 => Verdict::Redirect("127.0.0.1:22".parse().unwrap()),
            p if p >= 7000 => return PolicyAnswer::Later,
            _ => Verdict::Allow,
        };
        PolicyAnswer::Decided(Decision {
            verdict,
            by: Some("ports".into()),
        })
    }
}

type Seen = Rc<RefCell<Vec<(FlowTicket, FlowInfo)>>>;

fn with_policy() -> (VirtualHost, Seen) {
    let mut h = testkit::host(testkit::settings());
    let policy = PortPolicy::default();
    let seen = policy.seen.clone();
    h.set_session_policy(Some(Box::new(policy)));
    (h, seen)
}

fn syn(port: u16, sport: u16) -> Vec<u8> {
    tcp_frame(
        SocketAddrV4::new(REMOTE, port),
        sport,
        TcpControl::Syn,
        100,
        None,
        &[],
    )
}

/// (NAT events other than Created/Connected).
fn nat_events(h: &mut VirtualHost) -> Vec<NatEvent> {
    let mut out = Vec::new();
    while let Some(e) = h.poll_event() {
        if let Event::Nat(e) = e {
            out.push(e);
        }
    }
    out
}

fn refusals(events: &[NatEvent]) -> Vec<(EndReason, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            NatEvent::Refused { reason, detail, .. } => Some((*reason, detail.clone())),
            _ => None,
        })
        .collect()
}

fn ended(events: &[NatEvent]) -> Vec<EndReason> {
    events
        .iter()
        .filter_map(|e| match e {
            NatEvent::Ended { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

/// ICMP (type, code, source) of the frames sent.
fn icmp_sent(frames: &[Vec<u8>]) -> Vec<(Icmpv4Message, u8, Ipv4Addr)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Icmp {
                return None;
            }
            let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
            Some((icmp.msg_type(), icmp.msg_code(), ip.src_addr()))
        })
        .collect()
}

#[test]
fn policy_verdicts_reject_drop_redirect_and_allow() {
    let (mut h, seen) = with_policy();
    // Reject: a RST for TCP, ICMP administratively prohibited for UDP.
    h.handle_frame(t(0), &syn(25, 40000));
    h.handle_frame(t(0), &udp_frame(SocketAddrV4::new(REMOTE, 25), 41000, b"x"));
    assert!(ops(&mut h).is_empty(), "no socket for a rejected flow");
    let frames = sent(&mut h, t(0));
    assert!(tcp_segments(&frames)
        .iter()
        .any(|s| s.2 == TcpControl::Rst && s.1.port() == 40000));
    assert_eq!(
        icmp_sent(&frames),
        [(Icmpv4Message::DstUnreachable, 13, OUR_IP)]
    );
    // Drop: nothing at all.
    h.handle_frame(t(1), &syn(26, 40001));
    assert!(ops(&mut h).is_empty());
    assert!(sent(&mut h, t(1)).is_empty(), "a dropped flow is silent");
    // Redirect: the connect goes to the policy's endpoint.
    h.handle_frame(t(2), &syn(27, 40002));
    let o = ops(&mut h);
    assert_eq!(o.len(), 1);
    assert!(
        o[0].contains("TcpConnect") && o[0].contains("10.77.0.3:8080"),
        "{o:?}"
    );
    // Allow.
    h.handle_frame(t(3), &syn(80, 40003));
    assert!(ops(&mut h)[0].contains("10.77.0.2:80"));
    let events = nat_events(&mut h);
    let r = refusals(&events);
    assert_eq!(r.len(), 1, "refusals in one second are rate-limited: {r:?}");
    assert_eq!(r[0].0, EndReason::DeniedByPolicy);
    assert!(r[0].1.contains("rejected by policy ports"), "{r:?}");
    assert!(events.iter().any(|e| matches!(
        e,
        NatEvent::Created { redirected_by: Some(p), target, .. }
            if p == "ports" && *target == "10.77.0.3:8080".parse::<SocketAddr>().unwrap()
    )));
    assert_eq!(h.nat().counters().refused_policy, 3);
    assert_eq!(h.nat().counters().created[Protocol::Tcp.index()], 2);
    // What the policy saw.
    let seen = seen.borrow();
    let (_, first) = &seen[0];
    assert_eq!(first.protocol, Protocol::Tcp);
    assert_eq!(first.client_mac, CLIENT_MAC.0);
    assert_eq!(first.client, SocketAddrV4::new(CLIENT_IP, 40000));
    assert_eq!(first.remote, SocketAddrV4::new(REMOTE, 25));
}

#[test]
fn safety_rules_run_before_the_policy_and_limits_after_it() {
    let mut s = testkit::settings();
    s.nat.max_sessions_per_client = 1;
    let mut h = testkit::host(s);
    let policy = PortPolicy::default();
    let seen = policy.seen.clone();
    h.set_session_policy(Some(Box::new(policy)));
    // Loopback: refused by the rules; the policy is not asked.
    h.handle_frame(
        t(0),
        &tcp_frame(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 22),
            40000,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    );
    assert!(seen.borrow().is_empty());
    assert_eq!(h.nat().counters().refused_rules, 1);
    // A redirect to the loopback fails the rules too.
    h.handle_frame(t(0), &syn(28, 40001));
    assert_eq!(h.nat().counters().refused_rules, 2);
    assert_eq!(seen.borrow().len(), 1);
    // Allowed by the policy, then the per-client limit: the second one is refused.
    h.handle_frame(t(0), &syn(80, 40002));
    h.handle_frame(t(0), &syn(81, 40003));
    assert_eq!(seen.borrow().len(), 3, "the policy saw both");
    assert_eq!(ops(&mut h).len(), 1);
    assert_eq!(h.nat().counters().refused_limits, 1);
    let segs = tcp_segments(&sent(&mut h, t(0)));
    let rsts: Vec<u16> = segs
        .iter()
        .filter(|s| s.2 == TcpControl::Rst)
        .map(|s| s.1.port())
        .collect();
    assert_eq!(rsts, [40000, 40001, 40003]);
}

#[test]
fn flows_wait_for_a_late_verdict_with_their_datagrams() {
    let (mut h, seen) = with_policy();
    let remote = SocketAddrV4::new(REMOTE, 7000);
    for payload in [b"one".as_slice(), b"two", b"three"] {
        h.handle_frame(t(0), &udp_frame(remote, 41000, payload));
    }
    // One TCP flow too; its retransmitted SYN is not a second flow.
    h.handle_frame(t(0), &syn(7001, 40000));
    h.handle_frame(t(500), &syn(7001, 40000));
    assert!(ops(&mut h).is_empty(), "nothing before the verdict");
    assert_eq!(seen.borrow().len(), 2, "one policy call per flow");
    assert_eq!(h.nat().pending_verdicts(), 2);
    let (udp_ticket, tcp_ticket) = (seen.borrow()[0].0, seen.borrow()[1].0);
    h.handle_verdict(udp_ticket, Decision::allow(), t(600));
    let mut got = Vec::new();
    h.drain_host_ops(|op| match op {
        HostOp::UdpOpen { target, .. } => got.push(format!("open {target}")),
        HostOp::UdpSend { payload, .. } => got.push(String::from_utf8_lossy(payload).into()),
        other => panic!("{other:?}"),
    });
    assert_eq!(got, ["open 10.77.0.2:7000", "one", "two", "three"]);
    h.handle_verdict(
        tcp_ticket,
        Decision {
            verdict: Verdict::Reject,
            by: Some("ports".into()),
        },
        t(700),
    );
    assert!(ops(&mut h).is_empty());
    assert!(tcp_segments(&sent(&mut h, t(700)))
        .iter()
        .any(|s| s.2 == TcpControl::Rst));
    assert_eq!(h.nat().pending_verdicts(), 0);
}

#[test]
fn a_verdict_that_never_comes_drops_the_flow_and_a_late_one_is_ignored() {
    let (mut h, seen) = with_policy();
    h.handle_frame(t(0), &syn(7000, 40000));
    let ticket = seen.borrow()[0].0;
    assert!(h
        .poll_timeout()
        .is_some_and(|d| d <= t(0) + VERDICT_TIMEOUT));
    h.handle_timeout(t(0) + VERDICT_TIMEOUT);
    assert_eq!(h.nat().pending_verdicts(), 0);
    let r = refusals(&nat_events(&mut h));
    assert_eq!(r[0].0, EndReason::DeniedByPolicy);
    assert!(r[0].1.contains("no verdict"), "{r:?}");
    h.handle_verdict(ticket, Decision::allow(), t(6000));
    assert!(ops(&mut h).is_empty(), "too late: ignored");
}

#[test]
fn flows_waiting_for_verdicts_are_bounded_per_client() {
    let (mut h, _) = with_policy();
    for i in 0..=MAX_PENDING_PER_CLIENT as u16 {
        h.handle_frame(t(0), &syn(7000, 40000 + i));
    }
    assert_eq!(h.nat().pending_verdicts(), MAX_PENDING_PER_CLIENT);
    assert_eq!(h.nat().counters().refused_limits, 1);
}

fn connect(h: &mut VirtualHost, port: u16, sport: u16, now: Instant) -> super::SessionId {
    h.handle_frame(now, &syn(port, sport));
    let mut id = None;
    h.drain_host_ops(|op| {
        if let HostOp::TcpConnect { id: got, .. } = op {
            id = Some(got);
        }
    });
    let id = id.expect("a connect");
    h.nat_host_event(id, HostEvent::Connected, now);
    let _ = sent(h, now);
    id
}

#[test]
fn nat_disabled_and_operator_end_sessions_with_their_reasons() {
    let mut h = testkit::host(testkit::settings());
    let a = connect(&mut h, 80, 40000, t(0));
    assert!(h.end_session_by_operator(a, t(1)));
    assert!(!h.end_session_by_operator(a, t(1)), "gone already");
    assert_eq!(ops(&mut h), [format!("Close {{ id: {a:?}, abort: true }}")]);
    assert!(tcp_segments(&sent(&mut h, t(1)))
        .iter()
        .any(|s| s.2 == TcpControl::Rst));
    let _b = connect(&mut h, 80, 40001, t(2));
    h.handle_frame(t(2), &udp_frame(SocketAddrV4::new(REMOTE, 53), 41000, b"q"));
    let mut off = h.settings().clone();
    off.nat.enabled = false;
    h.apply_settings(off, t(3));
    assert!(h.nat().table().is_empty());
    let events = nat_events(&mut h);
    assert_eq!(
        ended(&events),
        [
            EndReason::EndedByOperator,
            EndReason::NatDisabled,
            EndReason::NatDisabled
        ]
    );
    let c = h.nat().counters();
    assert_eq!(c.ended[EndReason::EndedByOperator.index()], 1);
    assert_eq!(c.ended[EndReason::NatDisabled.index()], 2);
}

#[test]
fn a_connect_that_runs_out_of_files_ends_with_limit() {
    let mut h = testkit::host(testkit::settings());
    h.handle_frame(t(0), &syn(80, 40000));
    let mut id = None;
    h.drain_host_ops(|op| {
        if let HostOp::TcpConnect { id: got, .. } = op {
            id = Some(got);
        }
    });
    let e = io::Error::from_raw_os_error(libc::EMFILE);
    h.nat_host_event(id.unwrap(), HostEvent::ConnectFailed(&e), t(1));
    let events = nat_events(&mut h);
    assert_eq!(ended(&events), [EndReason::Limit]);
    assert!(events.iter().any(|e| matches!(
        e,
        NatEvent::Failed { reason, .. } if reason.contains("Too many open files")
    )));
}

#[test]
fn udp_socket_errors_reach_the_client_as_icmp_errors() {
    let mut h = testkit::host(testkit::settings());
    let remote = SocketAddrV4::new(REMOTE, 9999);
    h.handle_frame(t(0), &udp_frame(remote, 41000, b"hello"));
    let mut id = None;
    h.drain_host_ops(|op| {
        if let HostOp::UdpOpen { id: got, .. } = op {
            id = Some(got);
        }
    });
    let id = id.unwrap();
    let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
    h.nat_host_event(id, HostEvent::Error(&refused), t(1));
    let unreachable = io::Error::from_raw_os_error(libc::ENETUNREACH);
    h.nat_host_event(id, HostEvent::SendFailed(&unreachable), t(2));
    let frames = sent(&mut h, t(2));
    assert_eq!(
        icmp_sent(&frames),
        [
            (Icmpv4Message::DstUnreachable, 3, REMOTE),
            (Icmpv4Message::DstUnreachable, 0, OUR_IP)
        ]
    );
    // The error quotes the client's datagram: its header and its UDP ports.
    let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    let quoted = Ipv4Packet::new_unchecked(icmp.data());
    assert_eq!((quoted.src_addr(), quoted.dst_addr()), (CLIENT_IP, REMOTE));
    assert_eq!(&icmp.data()[20..24], &[0xa0, 0x28, 0x27, 0x0f]);
    assert_eq!(h.nat().counters().icmp_errors, 2);
    assert_eq!(
        h.nat().table().len(),
        1,
        "the flow stays, as a kernel's would"
    );
    // A socket that cannot be opened at all: the session ends, unreachable.
    h.handle_frame(
        t(3),
        &udp_frame(SocketAddrV4::new(REMOTE, 9998), 41001, b"x"),
    );
    let mut id2 = None;
    h.drain_host_ops(|op| {
        if let HostOp::UdpOpen { id: got, .. } = op {
            id2 = Some(got);
        }
    });
    let host_down = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
    h.nat_host_event(id2.unwrap(), HostEvent::OpenFailed(&host_down), t(3));
    assert_eq!(
        icmp_sent(&sent(&mut h, t(3))),
        [(Icmpv4Message::DstUnreachable, 1, OUR_IP)]
    );
    assert_eq!(ended(&nat_events(&mut h)), [EndReason::Unreachable]);
}

#[test]
fn counters_count_frames_once() {
    let mut h = testkit::host(testkit::settings());
    // More ARP requests than the transmit queue holds, without taking it: the rest are
    // counted as dropped for a full queue, once each.
    let arp = arp_request(CLIENT_IP, OUR_IP);
    for _ in 0..300 {
        h.handle_frame(t(0), &arp);
    }
    h.handle_frame(t(0), &[0u8; 10]);
    let out = sent(&mut h, t(0));
    let c = *h.counters();
    assert_eq!(c.frames_in, 301);
    assert_eq!(c.arp_replies, 256);
    assert_eq!(h.link_counters().tx_queue_full, 44);
    assert_eq!(c.malformed, 1);
    assert_eq!(c.frames_out, out.len() as u64);
    assert_eq!(out.len(), 256);
    // The whole function off: frames are counted and dropped, nothing answers.
    let mut off = h.settings().clone();
    off.enabled = false;
    h.apply_settings(off, t(1));
    h.handle_frame(t(1), &arp);
    assert!(sent(&mut h, t(1)).is_empty());
    assert_eq!(h.counters().disabled, 1);
}

#[test]
fn new_timeouts_apply_to_open_sessions_at_once() {
    let mut h = testkit::host(testkit::settings());
    h.handle_frame(
        t(0),
        &udp_frame(SocketAddrV4::new(REMOTE, 5000), 41000, b"x"),
    );
    let _ = ops(&mut h);
    let mut s = h.settings().clone();
    s.nat.udp_timeout = Duration::from_secs(30);
    h.apply_settings(s, t(1000));
    assert!(h.poll_timeout().is_some_and(|d| d <= t(1000)));
    h.handle_timeout(t(1000));
    assert_eq!(h.nat().table().len(), 1, "not idle for 30 s yet");
    h.handle_timeout(t(30_000));
    assert!(h.nat().table().is_empty());
    assert_eq!(ended(&nat_events(&mut h)), [EndReason::IdleTimeout]);
}

#[test]
fn tcp_to_or_from_port_zero_is_malformed_and_creates_nothing() {
    let mut h = testkit::host(testkit::settings());
    h.handle_frame(t(0), &syn(0, 40000));
    h.handle_frame(t(0), &syn(80, 0));
    assert!(ops(&mut h).is_empty());
    assert!(h.nat().table().is_empty());
    assert_eq!(h.counters().malformed, 2);
}
