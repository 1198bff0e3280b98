//! A sequence of inputs against one virtual host on a fake clock, as a hostile segment and a
//! misbehaving outside world would give them: frames from several clients (raw bytes, or
//! TCP, UDP, ICMP, ARP, DHCP and fragments with correct checksums around fuzzed fields, with
//! TCP sequence numbers that can follow the core's so handshakes complete), what the host
//! sockets do (connect succeeded or failed, data, EOF, resets, errors, datagrams, ping
//! replies, DNS answers), the clock moving and the timers running, live settings changes,
//! policy verdicts now or later, operator commands, and restarts with the saved leases.
//!
//! Inputs are `arbitrary`-structured; the corpus grows from nothing (fuzz/corpus/frames holds
//! a few inputs from earlier runs).
#![no_main]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration as StdDuration;

use arbitrary::Arbitrary;
use hubnat::core::dhcp::hook::{
    DhcpAnswer, DhcpChanges, DhcpClientInfo, DhcpDecision, DhcpPolicy, DhcpReplyInfo, DhcpTicket,
};
use hubnat::core::nat::{
    Decision, FlowInfo, FlowTicket, HostEvent, IcmpMode, PolicyAnswer, SessionPolicy, Verdict,
};
use hubnat::core::subnet::Subnet;
use hubnat::core::{testkit, LeaseTarget, VirtualHost};
use hubnat_fuzz::{client, client_frame, ethernet, ipv4, tcp, udp, Harness, Ip, Kind, Tcp};
use libfuzzer_sys::fuzz_target;
use smoltcp::time::Duration;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Dst {
    Remote(u8),
    Us,
    SubnetBroadcast,
    Broadcast,
    Loopback,
    LinkLocal,
    Multicast,
    Client(u8),
    Any(u32),
}

impl Dst {
    fn ip(self) -> Ipv4Addr {
        match self {
            Dst::Remote(i) => Ipv4Addr::new(10, 77, 0, 2 + i % 4),
            Dst::Us => testkit::OUR_IP,
            Dst::SubnetBroadcast => Ipv4Addr::new(192, 168, 30, 255),
            Dst::Broadcast => Ipv4Addr::BROADCAST,
            Dst::Loopback => Ipv4Addr::LOCALHOST,
            Dst::LinkLocal => Ipv4Addr::new(169, 254, 169, 254),
            Dst::Multicast => Ipv4Addr::new(224, 0, 0, 251),
            Dst::Client(i) => client(i).1,
            Dst::Any(a) => Ipv4Addr::from(a),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    Dns,
    Dhcp,
    Http,
    Zero,
    Any(u16),
}

impl Port {
    fn get(self) -> u16 {
        match self {
            Port::Dns => 53,
            Port::Dhcp => 67,
            Port::Http => 80,
            Port::Zero => 0,
            Port::Any(p) => p,
        }
    }
}

/// A sequence or acknowledgement number: a literal, or where the connection is (what the core
/// acknowledged last, or what it sent last), moved by a little.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Raw(u32),
    Track(i16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Errno {
    Refused,
    HostUnreachable,
    NetUnreachable,
    Access,
    TimedOut,
    Reset,
    Files,
    Invalid,
}

impl Errno {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Errno::Refused => libc::ECONNREFUSED,
            Errno::HostUnreachable => libc::EHOSTUNREACH,
            Errno::NetUnreachable => libc::ENETUNREACH,
            Errno::Access => libc::EACCES,
            Errno::TimedOut => libc::ETIMEDOUT,
            Errno::Reset => libc::ECONNRESET,
            Errno::Files => libc::EMFILE,
            Errno::Invalid => libc::EINVAL,
        })
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ev {
    Connected,
    ConnectFailed(Errno),
    OpenFailed(Errno),
    EndOfStream,
    WriteShut,
    Reset,
    Error(Errno),
    SendFailed(Errno),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum V {
    Allow,
    Reject,
    Drop,
    Redirect(Dst, Port),
}

impl V {
    fn decision(self) -> Decision {
        let verdict = match self {
            V::Allow => Verdict::Allow,
            V::Reject => Verdict::Reject,
            V::Drop => Verdict::Drop,
            V::Redirect(d, p) => Verdict::Redirect(SocketAddr::from((d.ip(), p.get()))),
        };
        Decision {
            verdict,
            by: Some("fuzz".into()),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum D {
    Unchanged,
    NoReply,
    Change {
        set: Vec<(u8, Vec<u8>)>,
        remove: Vec<u8>,
        lease: Option<u32>,
    },
}

impl D {
    fn decision(&self) -> DhcpDecision {
        match self {
            D::Unchanged => DhcpDecision::Unchanged,
            D::NoReply => DhcpDecision::NoReply,
            D::Change { set, remove, lease } => DhcpDecision::Change(DhcpChanges {
                set_options: set.clone(),
                remove_options: remove.clone(),
                lease_seconds: *lease,
            }),
        }
    }
}

/// A live settings change, within what the configuration accepts.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Change {
    Enabled(bool),
    Nat(bool),
    Dhcp(bool),
    Mtu(u8),
    TcpTimeout(u16),
    UdpTimeout(u16),
    MaxSessions(u8),
    PerClient(u8),
    Upstreams(u8),
    Deny(bool),
    HostIp(bool),
    Range(bool),
    Lease(u16),
    Loopback(bool),
    TcpBuffer(u8),
    Statics(bool),
}

#[derive(Arbitrary, Debug, Clone)]
enum Step {
    Raw(Vec<u8>),
    Tcp {
        client: u8,
        spoof: Option<u32>,
        dst: Dst,
        dport: Port,
        sport: u8,
        seq: Num,
        ack: Num,
        flags: u8,
        window: u16,
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    /// A whole TCP handshake in one step: the SYN (MSS, window scale, SACK permitted), the
    /// host's connect succeeding, and the client's ACK of the SYN-ACK.
    Connect {
        client: u8,
        dst: Dst,
        dport: Port,
        sport: u8,
        isn: u32,
    },
    /// Data (and a FIN) from the client on a connection an earlier `Connect` opened, with
    /// the right sequence and acknowledgement numbers.
    Send {
        conn: u8,
        payload: Vec<u8>,
        fin: bool,
    },
    /// The client acknowledges everything the core sent on a connection, with a window.
    Ack {
        conn: u8,
        window: u16,
    },
    Udp {
        client: u8,
        dst: Dst,
        dport: Port,
        sport: u8,
        payload: Vec<u8>,
    },
    Icmp {
        client: u8,
        dst: Dst,
        kind: u8,
        code: u8,
        rest: Vec<u8>,
    },
    Arp {
        client: u8,
        op: u8,
        sender: Dst,
        target: Dst,
        broadcast: bool,
    },
    Dhcp {
        client: u8,
        kind: u8,
        requested: Option<Dst>,
        server: Option<Dst>,
        ciaddr: Option<Dst>,
        client_id: Option<Vec<u8>>,
        options: Vec<(u8, Vec<u8>)>,
        unicast: bool,
    },
    Fragments {
        client: u8,
        dst: Dst,
        protocol: u8,
        ident: u16,
        payload: Vec<u8>,
        chunk: u8,
        order: u8,
    },
    Advance(u16),
    AdvanceMinutes(u8),
    Timeout,
    Host {
        session: u8,
        event: Ev,
    },
    Relay {
        session: u8,
        take: u16,
        give: Vec<u8>,
    },
    UdpReceive {
        session: u8,
        data: Vec<u8>,
        fail: Option<Errno>,
    },
    IcmpReceive {
        session: u8,
        data: Vec<u8>,
    },
    DnsAnswer {
        which: u8,
        data: Vec<u8>,
        keep_id: bool,
        wrong_server: bool,
    },
    Settings(Change),
    EndSession(u8),
    Release {
        client: u8,
        by_ip: bool,
    },
    Verdict {
        which: u8,
        verdict: V,
    },
    DhcpDecision {
        which: u8,
        decision: D,
    },
    Restart,
}

#[derive(Arbitrary, Debug)]
struct Input {
    synthesized_icmp: bool,
    /// Answers the session policy gives, in turn (`None`: later); none installed if empty.
    session_answers: Vec<Option<V>>,
    /// Answers the DHCP policy gives, in turn (`None`: later); none installed if empty.
    dhcp_answers: Vec<Option<D>>,
    steps: Vec<Step>,
}

struct FuzzSessionPolicy {
    answers: VecDeque<Option<V>>,
    tickets: Rc<RefCell<Vec<FlowTicket>>>,
}

impl SessionPolicy for FuzzSessionPolicy {
    fn check(&mut self, ticket: FlowTicket, _flow: &FlowInfo) -> PolicyAnswer {
        let answer = self.answers.pop_front().unwrap_or(Some(V::Allow));
        self.answers.push_back(answer);
        match answer {
            Some(v) => PolicyAnswer::Decided(v.decision()),
            None => {
                let mut t = self.tickets.borrow_mut();
                if t.len() < 256 {
                    t.push(ticket);
                }
                PolicyAnswer::Later
            }
        }
    }
}

struct FuzzDhcpPolicy {
    answers: VecDeque<Option<D>>,
    tickets: Rc<RefCell<Vec<DhcpTicket>>>,
}

impl DhcpPolicy for FuzzDhcpPolicy {
    fn customize(
        &mut self,
        ticket: DhcpTicket,
        _client: &DhcpClientInfo,
        _reply: &DhcpReplyInfo,
    ) -> DhcpAnswer {
        let answer = self.answers.pop_front().unwrap_or(Some(D::Unchanged));
        self.answers.push_back(answer.clone());
        match answer {
            Some(d) => DhcpAnswer::Decided(d.decision(), Some("fuzz".into())),
            None => {
                let mut t = self.tickets.borrow_mut();
                if t.len() < 256 {
                    t.push(ticket);
                }
                DhcpAnswer::Later
            }
        }
    }
}

/// A connection a `Connect` step opened, and the client's next sequence number on it.
struct Conn {
    client: u8,
    dst: Dst,
    dport: Port,
    sport: u8,
    next_seq: u32,
}

struct World {
    h: Harness,
    conns: Vec<Conn>,
    /// Per client TCP endpoint: (the next sequence number the core sent, what it acknowledged).
    tcp: HashMap<(Ipv4Addr, u16), (u32, u32)>,
    flow_tickets: Rc<RefCell<Vec<FlowTicket>>>,
    dhcp_tickets: Rc<RefCell<Vec<DhcpTicket>>>,
    session_answers: Vec<Option<V>>,
    dhcp_answers: Vec<Option<D>>,
    icmp_mode: IcmpMode,
}

impl World {
    fn install(&mut self) {
        self.h.host.set_icmp_mode(self.icmp_mode);
        if !self.session_answers.is_empty() {
            self.h
                .host
                .set_session_policy(Some(Box::new(FuzzSessionPolicy {
                    answers: self.session_answers.iter().cloned().collect(),
                    tickets: self.flow_tickets.clone(),
                })));
        }
        if !self.dhcp_answers.is_empty() {
            self.h.host.set_dhcp_policy(Some(Box::new(FuzzDhcpPolicy {
                answers: self.dhcp_answers.iter().cloned().collect(),
                tickets: self.dhcp_tickets.clone(),
            })));
        }
    }

    /// Learns where each TCP connection is from the segments the core sent.
    fn track(&mut self) {
        for f in self.h.take_sent() {
            if f.len() < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                continue;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
            let Some(seg) = f.get(14 + ihl..14 + total) else {
                continue;
            };
            if seg.len() < 20 {
                continue;
            }
            let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
            let dport = u16::from_be_bytes([seg[2], seg[3]]);
            let seq = u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]);
            let ack = u32::from_be_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let data_off = usize::from(seg[12] >> 4) * 4;
            let flags = seg[13];
            let len = seg.len().saturating_sub(data_off) as u32
                + u32::from(flags & 0x02 != 0)
                + u32::from(flags & 0x01 != 0);
            self.tcp.insert((dst, dport), (seq.wrapping_add(len), ack));
            if self.tcp.len() > 256 {
                self.tcp.clear();
            }
        }
    }

    fn num(&self, n: Num, key: (Ipv4Addr, u16), seq: bool) -> u32 {
        match n {
            Num::Raw(v) => v,
            Num::Track(d) => {
                let (next, acked) = self.tcp.get(&key).copied().unwrap_or((0, 0));
                let base = if seq { acked } else { next };
                base.wrapping_add(d as i32 as u32)
            }
        }
    }

    fn settings_change(&mut self, c: Change) {
        let mut s = self.h.host.settings().clone();
        match c {
            Change::Enabled(b) => s.enabled = b,
            Change::Nat(b) => s.nat.enabled = b,
            Change::Dhcp(b) => s.dhcp.enabled = b,
            Change::Mtu(m) => s.host.mtu = [576, 1280, 1500, 9000, 65520][usize::from(m % 5)],
            Change::TcpTimeout(t) => s.nat.tcp_timeout = Duration::from_secs(u64::from(t.max(1))),
            Change::UdpTimeout(t) => s.nat.udp_timeout = Duration::from_secs(u64::from(t.max(1))),
            Change::MaxSessions(n) => s.nat.max_sessions = usize::from(n) + 1,
            Change::PerClient(n) => s.nat.max_sessions_per_client = usize::from(n) + 1,
            Change::Upstreams(n) => {
                s.nat.dns_upstreams = (0..n % 3)
                    .map(|i| SocketAddr::from((Ipv4Addr::new(10, 77, 0, 53 + i), 53)))
                    .collect()
            }
            Change::Deny(b) => {
                s.nat.deny = if b {
                    vec![Subnet::new(Ipv4Addr::new(10, 77, 0, 0), 24).expect("a subnet")]
                } else {
                    vec![]
                }
            }
            Change::HostIp(b) => {
                s.host.ip = Ipv4Addr::new(192, 168, 30, if b { 254 } else { 1 });
            }
            Change::Range(b) => {
                (s.dhcp.range_start, s.dhcp.range_end) = if b {
                    (
                        Ipv4Addr::new(192, 168, 30, 100),
                        Ipv4Addr::new(192, 168, 30, 102),
                    )
                } else {
                    (
                        Ipv4Addr::new(192, 168, 30, 10),
                        Ipv4Addr::new(192, 168, 30, 200),
                    )
                }
            }
            Change::Lease(l) => s.dhcp.lease = StdDuration::from_secs(u64::from(l.max(10))),
            Change::Loopback(b) => s.nat.allow_host_loopback = b,
            Change::TcpBuffer(n) => s.nat.tcp_buffer = (16 << 10) << (n % 7),
            Change::Statics(b) => {
                s.dhcp.statics = if b {
                    vec![hubnat::core::dhcp::Reservation {
                        mac: client(1).0,
                        ip: Ipv4Addr::new(192, 168, 30, 5),
                        hostname: Some("one".into()),
                    }]
                } else {
                    vec![]
                }
            }
        }
        self.h.apply_settings(s);
    }

    fn step(&mut self, step: Step) {
        let our_mac = testkit::OUR_MAC.0;
        match step {
            Step::Raw(bytes) => self.h.frame(&bytes),
            Step::Tcp {
                client: c,
                spoof,
                dst,
                dport,
                sport,
                seq,
                ack,
                flags,
                window,
                options,
                payload,
            } => {
                let (mac, ip) = client(c);
                let src = spoof.map_or(ip, Ipv4Addr::from);
                let sport = 40000 + u16::from(sport % 4);
                let key = (src, sport);
                let segment = tcp(
                    Tcp {
                        sport,
                        dport: dport.get(),
                        seq: self.num(seq, key, true),
                        ack: self.num(ack, key, false),
                        flags,
                        window,
                    },
                    &options,
                    &payload[..payload.len().min(1400)],
                );
                let packet = ipv4(
                    Ip {
                        src,
                        dst: dst.ip(),
                        protocol: 6,
                        ident: 7,
                        frag: 0x4000,
                        ttl: 64,
                    },
                    &segment,
                );
                self.h.frame(&ethernet(mac, our_mac, 0x0800, &packet));
            }
            Step::Connect {
                client: c,
                dst,
                dport,
                sport,
                isn,
            } => {
                let before = self.h.sessions.len();
                let syn = Step::Tcp {
                    client: c,
                    spoof: None,
                    dst,
                    dport,
                    sport,
                    seq: Num::Raw(isn),
                    ack: Num::Raw(0),
                    flags: 0x02,
                    window: 65535,
                    options: vec![2, 4, 0x05, 0xb4, 3, 3, 7, 4, 2, 0],
                    payload: vec![],
                };
                self.step(syn);
                let Some(&(id, Kind::Tcp, true)) = self.h.sessions[before..].last() else {
                    return;
                };
                let now = self.h.now();
                self.h.host.nat_host_event(id, HostEvent::Connected, now);
                self.h.settle();
                self.track();
                self.step(Step::Tcp {
                    client: c,
                    spoof: None,
                    dst,
                    dport,
                    sport,
                    seq: Num::Raw(isn.wrapping_add(1)),
                    ack: Num::Track(0),
                    flags: 0x10,
                    window: 65535,
                    options: vec![],
                    payload: vec![],
                });
                if self.conns.len() >= 16 {
                    self.conns.remove(0);
                }
                self.conns.push(Conn {
                    client: c,
                    dst,
                    dport,
                    sport,
                    next_seq: isn.wrapping_add(1),
                });
            }
            Step::Send { conn, payload, fin } => {
                if self.conns.is_empty() {
                    return;
                }
                let i = usize::from(conn) % self.conns.len();
                let c = &mut self.conns[i];
                let payload = &payload[..payload.len().min(1400)];
                let seq = c.next_seq;
                c.next_seq = seq.wrapping_add(payload.len() as u32 + u32::from(fin));
                let (client, dst, dport, sport) = (c.client, c.dst, c.dport, c.sport);
                self.step(Step::Tcp {
                    client,
                    spoof: None,
                    dst,
                    dport,
                    sport,
                    seq: Num::Raw(seq),
                    ack: Num::Track(0),
                    flags: 0x18 | u8::from(fin),
                    window: 65535,
                    options: vec![],
                    payload: payload.to_vec(),
                });
            }
            Step::Ack { conn, window } => {
                if self.conns.is_empty() {
                    return;
                }
                let c = &self.conns[usize::from(conn) % self.conns.len()];
                let (client, dst, dport, sport, seq) =
                    (c.client, c.dst, c.dport, c.sport, c.next_seq);
                self.step(Step::Tcp {
                    client,
                    spoof: None,
                    dst,
                    dport,
                    sport,
                    seq: Num::Raw(seq),
                    ack: Num::Track(0),
                    flags: 0x10,
                    window,
                    options: vec![],
                    payload: vec![],
                });
            }
            Step::Udp {
                client: c,
                dst,
                dport,
                sport,
                payload,
            } => {
                let sport = 40000 + u16::from(sport % 4);
                let datagram = udp(sport, dport.get(), &payload[..payload.len().min(1400)]);
                self.h.frame(&client_frame(c, dst.ip(), 17, &datagram));
            }
            Step::Icmp {
                client: c,
                dst,
                kind,
                code,
                rest,
            } => {
                let mut m = vec![kind, code, 0, 0];
                m.extend_from_slice(&rest[..rest.len().min(1400)]);
                if m.len() < 8 {
                    m.resize(8, 0);
                }
                self.h.frame(&client_frame(c, dst.ip(), 1, &m));
            }
            Step::Arp {
                client: c,
                op,
                sender,
                target,
                broadcast,
            } => {
                let (mac, _) = client(c);
                let mut a = vec![0, 1, 8, 0, 6, 4, 0, op % 3];
                a.extend_from_slice(&mac);
                a.extend_from_slice(&sender.ip().octets());
                a.extend_from_slice(&[0; 6]);
                a.extend_from_slice(&target.ip().octets());
                let dst = if broadcast { [0xff; 6] } else { our_mac };
                self.h.frame(&ethernet(mac, dst, 0x0806, &a));
            }
            Step::Dhcp {
                client: c,
                kind,
                requested,
                server,
                ciaddr,
                client_id,
                options,
                unicast,
            } => {
                let (mac, ip) = client(c);
                let mut m = vec![0u8; 240];
                m[..4].copy_from_slice(&[1, 1, 6, 0]);
                m[4..8].copy_from_slice(&[0xd, 0xe, 0xa, c]);
                if let Some(ci) = ciaddr {
                    m[12..16].copy_from_slice(&ci.ip().octets());
                }
                m[28..34].copy_from_slice(&mac);
                m[236..240].copy_from_slice(&[99, 130, 83, 99]);
                m.extend_from_slice(&[53, 1, kind % 9]);
                if let Some(r) = requested {
                    m.extend_from_slice(&[50, 4]);
                    m.extend_from_slice(&r.ip().octets());
                }
                if let Some(s) = server {
                    m.extend_from_slice(&[54, 4]);
                    m.extend_from_slice(&s.ip().octets());
                }
                if let Some(id) = client_id {
                    let id = &id[..id.len().min(255)];
                    m.extend_from_slice(&[61, id.len() as u8]);
                    m.extend_from_slice(id);
                }
                for (code, value) in options.iter().take(16) {
                    let value = &value[..value.len().min(255)];
                    m.extend_from_slice(&[*code, value.len() as u8]);
                    m.extend_from_slice(value);
                }
                m.push(255);
                let (src, dst, dst_mac) = if unicast {
                    (ip, testkit::OUR_IP, our_mac)
                } else {
                    (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, [0xff; 6])
                };
                let packet = ipv4(
                    Ip {
                        src,
                        dst,
                        protocol: 17,
                        ident: 0,
                        frag: 0,
                        ttl: 64,
                    },
                    &udp(68, 67, &m),
                );
                self.h.frame(&ethernet(mac, dst_mac, 0x0800, &packet));
            }
            Step::Fragments {
                client: c,
                dst,
                protocol,
                ident,
                payload,
                chunk,
                order,
            } => {
                let (mac, ip) = client(c);
                let protocol = [6, 17, 1, protocol][usize::from(protocol % 4)];
                let l4 = match protocol {
                    17 => udp(40000, 7, &payload),
                    _ => payload.clone(),
                };
                // A whole packet first, for its transport checksum; then cut.
                let whole = ipv4(
                    Ip {
                        src: ip,
                        dst: dst.ip(),
                        protocol,
                        ident,
                        frag: 0,
                        ttl: 64,
                    },
                    &l4,
                );
                let body = &whole[20..];
                let chunk = (usize::from(chunk % 32) + 1) * 8;
                let mut parts: Vec<Vec<u8>> = Vec::new();
                let mut offset = 0;
                while offset < body.len() && parts.len() < 64 {
                    let end = (offset + chunk).min(body.len());
                    let more = end < body.len();
                    let frag = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
                    let packet = ipv4(
                        Ip {
                            src: ip,
                            dst: dst.ip(),
                            protocol,
                            ident,
                            frag,
                            ttl: 64,
                        },
                        &body[offset..end],
                    );
                    parts.push(ethernet(mac, our_mac, 0x0800, &packet));
                    offset = end;
                }
                if order & 1 != 0 {
                    parts.reverse();
                }
                if order & 2 != 0 && !parts.is_empty() {
                    let p = parts[0].clone();
                    parts.push(p);
                }
                if order & 4 != 0 && parts.len() > 1 {
                    parts.remove(parts.len() / 2);
                }
                for p in &parts {
                    self.h.frame(p);
                }
            }
            Step::Advance(ms) => self.h.advance(u32::from(ms)),
            Step::AdvanceMinutes(m) => self.h.advance(u32::from(m) * 60_000),
            Step::Timeout => self.h.next_timeout(),
            Step::Host { session, event } => {
                let Some((id, _, _)) = self.h.session(session) else {
                    return;
                };
                let now = self.h.now();
                let e;
                let event = match event {
                    Ev::Connected => HostEvent::Connected,
                    Ev::ConnectFailed(n) => {
                        e = n.error();
                        HostEvent::ConnectFailed(&e)
                    }
                    Ev::OpenFailed(n) => {
                        e = n.error();
                        HostEvent::OpenFailed(&e)
                    }
                    Ev::EndOfStream => HostEvent::EndOfStream,
                    Ev::WriteShut => HostEvent::WriteShut,
                    Ev::Reset => HostEvent::Reset,
                    Ev::Error(n) => {
                        e = n.error();
                        HostEvent::Error(&e)
                    }
                    Ev::SendFailed(n) => {
                        e = n.error();
                        HostEvent::SendFailed(&e)
                    }
                };
                self.h.host.nat_host_event(id, event, now);
                self.h.settle();
            }
            Step::Relay {
                session,
                take,
                give,
            } => {
                let Some((id, Kind::Tcp, _)) = self.h.session(session) else {
                    return;
                };
                let now = self.h.now();
                let mut finished = false;
                if let Some(mut relay) = self.h.host.nat_tcp_relay(id, now) {
                    let _ = relay.has_client_data();
                    let _ = relay.take_client_data(|d| Ok(d.len().min(usize::from(take))));
                    if !give.is_empty() && relay.has_room() && relay.may_send() {
                        let _ = relay.fill_from_host(|buf| {
                            let n = buf.len().min(give.len());
                            buf[..n].copy_from_slice(&give[..n]);
                            Ok(n)
                        });
                    }
                    finished = relay.client_finished();
                }
                if finished {
                    self.h.host.nat_host_event(id, HostEvent::WriteShut, now);
                }
                self.h.settle();
            }
            Step::UdpReceive {
                session,
                data,
                fail,
            } => {
                let Some((id, _, _)) = self.h.session(session) else {
                    return;
                };
                let now = self.h.now();
                let _ = self.h.host.nat_udp_receive(id, now, |buf| match fail {
                    Some(n) => Err(n.error()),
                    None => {
                        let n = buf.len().min(data.len());
                        buf[..n].copy_from_slice(&data[..n]);
                        Ok(n)
                    }
                });
                self.h.settle();
            }
            Step::IcmpReceive { session, data } => {
                let Some((id, _, _)) = self.h.session(session) else {
                    return;
                };
                let now = self.h.now();
                self.h.host.nat_icmp_receive(id, now, &data);
                self.h.settle();
            }
            Step::DnsAnswer {
                which,
                data,
                keep_id,
                wrong_server,
            } => {
                if self.h.dns_sent.is_empty() {
                    return;
                }
                let i = usize::from(which) % self.h.dns_sent.len();
                let (upstream, query) = self.h.dns_sent[i].clone();
                let mut answer = data;
                if keep_id && answer.len() >= 2 {
                    answer[..2].copy_from_slice(&query[..2]);
                }
                let from = if wrong_server {
                    SocketAddr::from((Ipv4Addr::new(10, 77, 0, 66), 53))
                } else {
                    upstream
                };
                let now = self.h.now();
                self.h.host.nat_dns_answer(from, &answer, now);
                self.h.settle();
            }
            Step::Settings(c) => self.settings_change(c),
            Step::EndSession(i) => {
                let Some((id, _, _)) = self.h.session(i) else {
                    return;
                };
                let now = self.h.now();
                self.h.host.end_session_by_operator(id, now);
                self.h.settle();
            }
            Step::Release { client: c, by_ip } => {
                let (mac, ip) = client(c);
                let target = if by_ip {
                    LeaseTarget::Ip(ip)
                } else {
                    LeaseTarget::Mac(mac)
                };
                let now = self.h.now();
                self.h.host.release_lease(target, now);
                self.h.settle();
            }
            Step::Verdict { which, verdict } => {
                let ticket = {
                    let t = self.flow_tickets.borrow();
                    if t.is_empty() {
                        return;
                    }
                    t[usize::from(which) % t.len()]
                };
                let now = self.h.now();
                self.h.host.handle_verdict(ticket, verdict.decision(), now);
                self.h.settle();
            }
            Step::DhcpDecision { which, decision } => {
                let ticket = {
                    let t = self.dhcp_tickets.borrow();
                    if t.is_empty() {
                        return;
                    }
                    t[usize::from(which) % t.len()]
                };
                let now = self.h.now();
                self.h.host.handle_dhcp_decision(
                    ticket,
                    decision.decision(),
                    Some("fuzz".into()),
                    now,
                );
                self.h.settle();
            }
            Step::Restart => {
                let now = self.h.now();
                let leases = self.h.host.leases_to_save();
                let settings = self.h.host.settings().clone();
                self.h.host = VirtualHost::new(settings, leases, 42, now);
                self.h.sessions.clear();
                self.h.dns_sent.clear();
                self.conns.clear();
                self.install();
                self.h.settle();
            }
        }
        self.track();
    }
}

fuzz_target!(|input: Input| {
    if input.steps.len() > 256 {
        return;
    }
    let mut world = World {
        h: Harness::reference(),
        tcp: HashMap::new(),
        conns: Vec::new(),
        flow_tickets: Rc::default(),
        dhcp_tickets: Rc::default(),
        session_answers: input.session_answers.into_iter().take(16).collect(),
        dhcp_answers: input.dhcp_answers.into_iter().take(16).collect(),
        icmp_mode: if input.synthesized_icmp {
            IcmpMode::Synthesized
        } else {
            IcmpMode::Real
        },
    };
    world.install();
    for step in input.steps {
        world.step(step);
    }
    world.h.next_timeout();
    world.h.report();
});
