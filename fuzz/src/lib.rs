//! What the fuzz targets share: a virtual host on a fake clock driven like the driver drives it
//! ([`Harness`]), the checks every frame it sends must pass, and builders of frames from a
//! client (IPv4 with correct checksums around fuzzed payloads, so the input reaches the
//! protocols instead of dying at the checksum).
//!
//! Not a test suite: the targets in `fuzz_targets/` look for panics (and for the few invariants
//! checked here); see `scripts/fuzz.sh`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use hubnat::core::dhcp::{DhcpEvent, LeaseState};
use hubnat::core::nat::{HostOp, NatEvent, SessionId};
use hubnat::core::testkit;
use hubnat::core::{Event, Instant, Settings, VirtualHost, TX_QUEUE_FRAMES};
use hubnat_backend::FrameBatch;

/// What kind of host socket a session asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `HostOp::TcpConnect`.
    Tcp,
    /// `HostOp::UdpOpen`.
    Udp,
    /// `HostOp::IcmpOpen`.
    Icmp,
}

/// A virtual host, its clock, and what the driver would know: the sessions whose host sockets
/// it opened and the DNS queries it sent.
pub struct Harness {
    /// The host.
    pub host: VirtualHost,
    /// Milliseconds since the fixture's epoch ([`testkit::t`]).
    pub now_ms: i64,
    tx: FrameBatch,
    /// Sessions the core asked a socket for, with their kind; closed ones are kept (an event
    /// for a gone session must be ignored).
    pub sessions: Vec<(SessionId, Kind, bool)>,
    /// DNS queries sent upstream: where, and the query (its id first).
    pub dns_sent: Vec<(SocketAddr, Vec<u8>)>,
    /// Frames sent to the segment since the last [`take_sent`](Self::take_sent).
    pub sent: Vec<Vec<u8>>,
    /// What the run reached (session ends by reason, lease events by kind, TCP connections
    /// carried), printed by [`report`](Self::report) when `HUBNAT_FUZZ_REACHED` is set: a
    /// quick look at how deep a corpus goes.
    pub reached: BTreeSet<String>,
    /// The largest MTU in force so far (a frame queued before an MTU change may be larger than
    /// the new one).
    max_mtu: usize,
}

impl Harness {
    /// A host with `settings` at time 0.
    pub fn new(settings: Settings) -> Harness {
        let max_mtu = settings.host.mtu;
        Harness {
            host: testkit::host(settings),
            now_ms: 0,
            tx: FrameBatch::new(TX_QUEUE_FRAMES, 1514),
            sessions: Vec::new(),
            dns_sent: Vec::new(),
            sent: Vec::new(),
            reached: BTreeSet::new(),
            max_mtu,
        }
    }

    /// A host with the reference settings ([`testkit::settings`]).
    pub fn reference() -> Harness {
        Harness::new(testkit::settings())
    }

    /// The clock.
    pub fn now(&self) -> Instant {
        testkit::t(self.now_ms)
    }

    /// One frame from the segment, then what the driver does after a batch.
    pub fn frame(&mut self, frame: &[u8]) {
        let now = self.now();
        self.host.handle_frame(now, frame);
        self.settle();
    }

    /// New settings (the caller keeps them valid, as the configuration would).
    pub fn apply_settings(&mut self, settings: Settings) {
        self.max_mtu = self.max_mtu.max(settings.host.mtu);
        let now = self.now();
        self.host.apply_settings(settings, now);
        self.settle();
    }

    /// Moves the clock on by `ms` and runs the timers if one is due.
    pub fn advance(&mut self, ms: u32) {
        self.now_ms += i64::from(ms);
        let now = self.now();
        if self.host.poll_timeout().is_some_and(|t| t <= now) {
            self.host.handle_timeout(now);
        }
        self.settle();
    }

    /// Jumps to the next timer (if any, and not more than a day away) and runs it; a timer
    /// that stays due after it ran would make the driver spin, so that is a failure.
    pub fn next_timeout(&mut self) {
        let Some(at) = self.host.poll_timeout() else {
            return;
        };
        let now = self.now();
        if at > now {
            let ms = (at - now).total_millis();
            if ms > 86_400_000 {
                return;
            }
            self.now_ms += ms as i64;
        }
        let mut rounds = 0;
        loop {
            let now = self.now();
            self.host.handle_timeout(now);
            self.settle();
            match self.host.poll_timeout() {
                Some(t) if t <= now => {
                    rounds += 1;
                    assert!(
                        rounds < 1000,
                        "a timer stays due at {now} after 1000 rounds"
                    );
                }
                _ => break,
            }
        }
    }

    /// What the driver does after every batch of inputs: poll, take the frames (checking
    /// each), carry out the host requests (remembering sessions and DNS queries), and read
    /// the events.
    pub fn settle(&mut self) {
        let now = self.now();
        // As the driver's loop: poll and send until the core has nothing more to send now. A
        // core that always wants another poll would make the driver spin.
        let mut rounds = 0;
        loop {
            self.host.poll(now);
            self.host.take_transmit(&mut self.tx);
            let mac = self.host.host().mac;
            for frame in self.tx.iter() {
                check_frame(frame, mac, self.max_mtu);
                if self.sent.len() < 1024 {
                    self.sent.push(frame.to_vec());
                }
            }
            self.tx.clear();
            if !self.host.wants_poll() {
                break;
            }
            rounds += 1;
            assert!(
                rounds < 64,
                "the core still wants a poll at {now} after 64 rounds"
            );
        }
        let (sessions, dns) = (&mut self.sessions, &mut self.dns_sent);
        self.host.drain_host_ops(|op| match op {
            HostOp::TcpConnect { id, .. } => sessions.push((id, Kind::Tcp, true)),
            HostOp::UdpOpen { id, .. } => sessions.push((id, Kind::Udp, true)),
            HostOp::IcmpOpen { id, .. } => sessions.push((id, Kind::Icmp, true)),
            HostOp::UdpSend { id, payload } | HostOp::IcmpSend { id, payload, .. } => {
                assert!(payload.len() <= 65_535, "session {id}: datagram too long");
            }
            HostOp::DnsSend { upstream, payload } => {
                assert!(payload.len() >= 12, "a DNS query without a header");
                if dns.len() < 64 {
                    dns.push((upstream, payload.to_vec()));
                }
            }
            HostOp::Close { id, .. } => {
                for s in sessions.iter_mut().filter(|s| s.0 == id) {
                    s.2 = false;
                }
            }
        });
        if self.sessions.len() > 4096 {
            self.sessions.drain(..2048);
        }
        self.check_leases();
        let trace = reach_enabled();
        while let Some(event) = self.host.poll_event() {
            // Render it as the security log would.
            let _ = format!("{event:?}");
            match event {
                Event::LeasesChanged => {
                    let _ = self.host.leases_to_save();
                }
                Event::Nat(NatEvent::Connected { .. }) if trace => {
                    self.reached.insert("nat: tcp connected".into());
                }
                Event::Nat(NatEvent::Ended {
                    session, reason, ..
                }) if trace => {
                    self.reached.insert(format!(
                        "nat: {} ended: {}{}",
                        session.key.protocol.as_str(),
                        reason.as_str(),
                        if session.bytes_out > 0 {
                            " (bytes out)"
                        } else {
                            ""
                        }
                    ));
                }
                Event::Dhcp(DhcpEvent::Lease { kind, .. }) if trace => {
                    self.reached.insert(format!("dhcp: {}", kind.as_str()));
                }
                _ => {}
            }
        }
    }

    /// The lease table never gives one address to two records that hold it (offered, bound or
    /// quarantined), nor the virtual host's own address to anyone.
    pub fn check_leases(&self) {
        let host_ip = self.host.host().ip;
        let mut held = BTreeSet::new();
        for lease in self.host.dhcp().leases() {
            if matches!(
                lease.state,
                LeaseState::Offered | LeaseState::Bound | LeaseState::Declined
            ) {
                assert!(
                    held.insert(lease.ip),
                    "two lease records hold {}: {:?}",
                    lease.ip,
                    self.host
                        .dhcp()
                        .leases()
                        .filter(|l| l.ip == lease.ip)
                        .collect::<Vec<_>>()
                );
                assert!(
                    lease.ip != host_ip || lease.state == LeaseState::Declined,
                    "the host's own address is leased: {lease:?}"
                );
            }
        }
    }

    /// Prints what the run reached, when `HUBNAT_FUZZ_REACHED` is set (run a target on its
    /// corpus with `-runs=0` and count the lines).
    pub fn report(&self) {
        if reach_enabled() {
            for r in &self.reached {
                eprintln!("reached: {r}");
            }
        }
    }

    /// The frames sent since the last call.
    pub fn take_sent(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.sent)
    }

    /// The `i`th known session (modulo), if any.
    pub fn session(&self, i: u8) -> Option<(SessionId, Kind, bool)> {
        if self.sessions.is_empty() {
            return None;
        }
        Some(self.sessions[usize::from(i) % self.sessions.len()])
    }
}

fn reach_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HUBNAT_FUZZ_REACHED").is_some())
}

/// What every frame the core sends must be: from the host's MAC, within the MTU, and, when it
/// is IPv4, with a valid header checksum and a total length that fits the frame.
pub fn check_frame(frame: &[u8], mac: smoltcp::wire::EthernetAddress, mtu: usize) {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, Ipv4Packet};
    assert!(
        frame.len() >= 14 && frame.len() <= 14 + mtu,
        "a frame of {} bytes with MTU {mtu}",
        frame.len()
    );
    let eth = EthernetFrame::new_checked(frame).expect("an Ethernet frame");
    assert_eq!(eth.src_addr(), mac, "a frame from another MAC");
    if eth.ethertype() == EthernetProtocol::Ipv4 {
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("a whole IPv4 packet");
        assert!(ip.verify_checksum(), "a bad IPv4 header checksum");
    }
}

// ---------------------------------------------------------------------------------------------
// Frames from a client
// ---------------------------------------------------------------------------------------------

/// The internet checksum of `data` (with `initial` carried in, e.g. a pseudo-header's sum).
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Test client `i` (0 to 7): MAC 52:54:00:00:00:0i and 192.168.30.(10 + i).
pub fn client(i: u8) -> ([u8; 6], Ipv4Addr) {
    let i = i % 8;
    (
        [0x52, 0x54, 0, 0, 0, i],
        Ipv4Addr::new(192, 168, 30, 10 + i),
    )
}

/// An Ethernet header followed by `payload`.
pub fn ethernet(src: [u8; 6], dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The IPv4 header fields a builder may vary.
#[derive(Debug, Clone, Copy)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ident: u16,
    /// Flags and fragment offset (in 8-byte units), as on the wire.
    pub frag: u16,
    pub ttl: u8,
}

/// An IPv4 packet with a correct header checksum; a TCP or UDP payload that is not a fragment
/// gets its checksum filled in too (`l4` must hold the transport header).
pub fn ipv4(ip: Ip, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total.min(0xffff) as u16).to_be_bytes());
    p.extend_from_slice(&ip.ident.to_be_bytes());
    p.extend_from_slice(&ip.frag.to_be_bytes());
    p.extend_from_slice(&[ip.ttl, ip.protocol, 0, 0]);
    p.extend_from_slice(&ip.src.octets());
    p.extend_from_slice(&ip.dst.octets());
    let sum = checksum(0, &p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(l4);
    let whole = ip.frag & 0x3fff == 0;
    let at = match ip.protocol {
        6 if whole && l4.len() >= 20 => Some(16),
        17 if whole && l4.len() >= 8 => Some(6),
        1 if whole && l4.len() >= 4 => Some(2),
        _ => None,
    };
    if let Some(at) = at {
        let l4 = &mut p[20..];
        l4[at] = 0;
        l4[at + 1] = 0;
        let pseudo = if ip.protocol == 1 {
            0
        } else {
            let s = ip.src.octets();
            let d = ip.dst.octets();
            u32::from(u16::from_be_bytes([s[0], s[1]]))
                + u32::from(u16::from_be_bytes([s[2], s[3]]))
                + u32::from(u16::from_be_bytes([d[0], d[1]]))
                + u32::from(u16::from_be_bytes([d[2], d[3]]))
                + u32::from(ip.protocol)
                + l4.len() as u32
        };
        let sum = checksum(pseudo, l4);
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// A UDP header and `payload` (checksum left to [`ipv4`]).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()).min(0xffff) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// The fields of a TCP header a builder may vary.
#[derive(Debug, Clone, Copy)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// FIN, SYN, RST, PSH, ACK, URG, ECE, CWR.
    pub flags: u8,
    pub window: u16,
}

/// A TCP header with `options` (padded to 4 bytes, at most 40) and `payload`.
pub fn tcp(t: Tcp, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut opts = options[..options.len().min(40)].to_vec();
    while opts.len() % 4 != 0 {
        opts.push(0);
    }
    let mut s = Vec::with_capacity(20 + opts.len() + payload.len());
    s.extend_from_slice(&t.sport.to_be_bytes());
    s.extend_from_slice(&t.dport.to_be_bytes());
    s.extend_from_slice(&t.seq.to_be_bytes());
    s.extend_from_slice(&t.ack.to_be_bytes());
    s.push(((20 + opts.len()) / 4) as u8 * 16);
    s.push(t.flags);
    s.extend_from_slice(&t.window.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(&opts);
    s.extend_from_slice(payload);
    s
}

/// A frame from client `i` to the virtual host's MAC carrying `l4` over IPv4.
pub fn client_frame(i: u8, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let (mac, ip) = client(i);
    let packet = ipv4(
        Ip {
            src: ip,
            dst,
            protocol,
            ident: 1,
            frag: 0x4000,
            ttl: 64,
        },
        l4,
    );
    ethernet(mac, testkit::OUR_MAC.0, 0x0800, &packet)
}

/// A DHCP message `body` from `mac` (0.0.0.0:68 to 255.255.255.255:67, broadcast).
pub fn dhcp_frame(mac: [u8; 6], body: &[u8]) -> Vec<u8> {
    let packet = ipv4(
        Ip {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::BROADCAST,
            protocol: 17,
            ident: 0,
            frag: 0,
            ttl: 64,
        },
        &udp(68, 67, body),
    );
    ethernet(mac, [0xff; 6], 0x0800, &packet)
}

/// A DNS query for `name` (type A), with id `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
