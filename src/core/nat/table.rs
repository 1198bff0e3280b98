//! The NAT session table: every flow the NAT carries, bounded globally and per client.
//!
//! # Theory of operation
//!
//! A session is one flow: a TCP connection, a UDP (client endpoint, remote endpoint) pair, or
//! an ICMP echo (client address, identifier, remote address) triple. It is found by its
//! [`FlowKey`] when a packet arrives from a client, and by its [`SessionId`] when the driver
//! reports something about its host socket. Ids are never reused within a process, so a late
//! event about a deleted session finds nothing and is ignored.
//!
//! The table refuses a new session when it holds `nat.max_sessions`, or when the client already
//! has `nat.max_sessions_per_client` (the limits are passed in with each insert: they are live
//! settings, not the table's); the caller refuses the flow (RST, or a dropped datagram). A
//! client is counted both by its address and by its MAC, and the per-client limit applies to
//! each: a client that picks its source address (rotating it, or spoofing others on the
//! segment) is still held to its share by its MAC.
//! Sessions whose time is up (idle, or a handshake not completed) are found by
//! [`SessionTable::sweep`] from the deadline the caller gives each.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::time::Instant;

/// A session's identity in the table, the logs and the driver.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hashes session ids with one multiplication (Fibonacci hashing). Ids are sequential and
/// never chosen by a client, so they need no flood-resistant hash, and SipHash was a
/// measurable share of the per-segment cost (`benches/core_sessions.rs`). Flow keys, which
/// clients choose, keep the standard hasher.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by session id.
pub type IdMap<V> = HashMap<SessionId, V, BuildHasherDefault<IdHasher>>;
/// A set of session ids.
pub type IdSet = HashSet<SessionId, BuildHasherDefault<IdHasher>>;

/// The transport of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, terminated by smoltcp and relayed to a host `TcpStream`.
    Tcp,
    /// UDP, relayed datagram by datagram through a host UDP socket.
    Udp,
    /// ICMP echo, through a host ping socket (or answered by hubnat itself).
    Icmp,
}

impl Protocol {
    /// Every protocol, in the order of [`index`](Self::index).
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp];

    /// A dense index (0, 1, 2) for per-protocol counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The lower-case name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

/// What identifies a flow from the client side. For ICMP the ports are the echo identifier
/// (client side) and 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Transport.
    pub protocol: Protocol,
    /// The client's address and port.
    pub client: SocketAddrV4,
    /// The address and port the client sent to.
    pub remote: SocketAddrV4,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionState {
    /// The outbound connection is being made; the client waits (TCP: in SYN-RECEIVED).
    Connecting,
    /// Carrying data.
    Established,
    /// The client finished sending (TCP FIN from the client); the host side may still send.
    ClientClosed,
    /// The host finished sending; the client may still send.
    HostClosed,
    /// Both sides are done or one reset; the session goes away shortly.
    Closing,
}

impl SessionState {
    /// The lower-case name used in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Connecting => "connecting",
            SessionState::Established => "established",
            SessionState::ClientClosed => "client-closed",
            SessionState::HostClosed => "host-closed",
            SessionState::Closing => "closing",
        }
    }
}

/// How far a TCP connection has closed, as the core has seen it. The core decides from this
/// when the session is over and why ([`EndReason`](super::EndReason)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpProgress {
    /// The client's FIN has arrived (the smoltcp socket left ESTABLISHED that way).
    pub client_fin: bool,
    /// The driver has shut the host socket's write side (the client's FIN was carried).
    pub write_shut: bool,
    /// The remote's EOF arrived; the FIN to the client is queued.
    pub host_eof: bool,
    /// The client sent the first FIN (false: the remote did, or nobody yet).
    pub client_closed_first: bool,
    /// The client reset the connection.
    pub client_reset: bool,
}

/// The head of the last datagram a client sent on a UDP flow (its IPv4 header and 8 bytes of
/// UDP header), quoted in the ICMP error when the host socket reports one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// The bytes.
    pub bytes: [u8; 28],
    /// How many are valid.
    pub len: u8,
}

impl Quote {
    /// The head of `packet` (an IPv4 packet).
    pub fn of(packet: &[u8]) -> Quote {
        let mut bytes = [0u8; 28];
        let len = packet.len().min(28);
        bytes[..len].copy_from_slice(&packet[..len]);
        Quote {
            bytes,
            len: len as u8,
        }
    }

    /// The quoted bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One row of the session table.
#[derive(Debug, Clone)]
pub struct Session {
    /// Identity.
    pub id: SessionId,
    /// The flow.
    pub key: FlowKey,
    /// The client's MAC address.
    pub client_mac: [u8; 6],
    /// Where the host socket actually goes (differs from `key.remote` for the DNS redirect).
    pub target: SocketAddr,
    /// The name the client looked up for the remote address, when a DNS answer for it passed
    /// through the DNS redirect.
    pub remote_name: Option<String>,
    /// Life stage.
    pub state: SessionState,
    /// When it was created.
    pub created: Instant,
    /// The last time a byte or packet moved either way.
    pub last_activity: Instant,
    /// TCP: when the outbound connect succeeded and the SYN-ACK went to the client; the
    /// client has `nat.tcp_handshake_timeout` from then to complete the handshake.
    pub synack_at: Option<Instant>,
    /// Payload bytes from the client to the remote.
    pub bytes_out: u64,
    /// Payload bytes from the remote to the client.
    pub bytes_in: u64,
    /// Packets (TCP: relay operations) from the client.
    pub packets_out: u64,
    /// Packets (TCP: relay operations) to the client.
    pub packets_in: u64,
    /// TCP: how far the connection has closed.
    pub tcp: TcpProgress,
    /// UDP: the head of the client's last datagram.
    pub quote: Option<Quote>,
}

impl Session {
    /// Counts `bytes` sent by the client.
    pub fn count_out(&mut self, bytes: usize, now: Instant) {
        self.bytes_out += bytes as u64;
        self.packets_out += 1;
        self.last_activity = now;
    }

    /// Counts `bytes` sent to the client.
    pub fn count_in(&mut self, bytes: usize, now: Instant) {
        self.bytes_in += bytes as u64;
        self.packets_in += 1;
        self.last_activity = now;
    }
}

/// Why a session could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `nat.max_sessions` reached.
    #[error("the NAT session table is full ({0} sessions, nat.max_sessions)")]
    Global(usize),
    /// `nat.max_sessions_per_client` reached for this client address.
    #[error("client {client} has {limit} sessions (nat.max_sessions_per_client)")]
    PerClient {
        /// The client.
        client: Ipv4Addr,
        /// The limit.
        limit: usize,
    },
    /// The process's memory is at or above `nat.memory_limit`.
    #[error("hubnat holds {used} bytes of memory, at or above nat.memory_limit ({limit} bytes)")]
    Memory {
        /// Resident bytes, as last measured.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// `nat.max_sessions_per_client` reached for this client MAC (over all its addresses).
    #[error("client {} has {limit} sessions (nat.max_sessions_per_client)", crate::core::dhcp::server::fmt_mac(.mac))]
    PerClientMac {
        /// The client's MAC.
        mac: [u8; 6],
        /// The limit.
        limit: usize,
    },
}

/// The session table. See the module documentation.
#[derive(Debug)]
pub struct SessionTable {
    sessions: IdMap<Session>,
    by_key: HashMap<FlowKey, SessionId>,
    per_client: HashMap<Ipv4Addr, usize>,
    per_mac: HashMap<[u8; 6], usize>,
    per_protocol: [usize; 3],
    next_id: u64,
}

/// The limits a new session must fit in (from the live settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions at most.
    pub max_sessions: usize,
    /// Sessions per client address, and per client MAC, at most.
    pub max_per_client: usize,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionTable {
    /// An empty table.
    pub fn new() -> Self {
        SessionTable {
            sessions: IdMap::default(),
            by_key: HashMap::new(),
            per_client: HashMap::new(),
            per_mac: HashMap::new(),
            per_protocol: [0; 3],
            next_id: 1,
        }
    }

    /// Sessions of each protocol, indexed by [`Protocol::index`].
    pub fn count_by_protocol(&self) -> [usize; 3] {
        self.per_protocol
    }

    /// The session of a flow.
    pub fn find(&self, key: &FlowKey) -> Option<SessionId> {
        self.by_key.get(key).copied()
    }

    /// A session by id.
    pub fn get(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// A session by id, to update.
    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.sessions.get_mut(&id)
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Every session, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// Whether a new session of `client` at `mac` fits the limits.
    pub fn check(&self, client: Ipv4Addr, mac: [u8; 6], limits: Limits) -> Result<(), LimitError> {
        if self.sessions.len() >= limits.max_sessions {
            return Err(LimitError::Global(limits.max_sessions));
        }
        if self.count_for(client) >= limits.max_per_client {
            return Err(LimitError::PerClient {
                client,
                limit: limits.max_per_client,
            });
        }
        if self.count_for_mac(mac) >= limits.max_per_client {
            return Err(LimitError::PerClientMac {
                mac,
                limit: limits.max_per_client,
            });
        }
        Ok(())
    }

    /// Adds a session for `key` from the client at `client_mac`, unless a limit says no.
    pub fn insert(
        &mut self,
        key: FlowKey,
        client_mac: [u8; 6],
        target: SocketAddr,
        limits: Limits,
        now: Instant,
    ) -> Result<SessionId, LimitError> {
        let client = *key.client.ip();
        self.check(client, client_mac, limits)?;
        let id = SessionId(self.next_id);
        self.next_id += 1;
        *self.per_client.entry(client).or_insert(0) += 1;
        *self.per_mac.entry(client_mac).or_insert(0) += 1;
        self.per_protocol[key.protocol.index()] += 1;
        self.by_key.insert(key, id);
        self.sessions.insert(
            id,
            Session {
                id,
                key,
                client_mac,
                target,
                remote_name: None,
                state: SessionState::Connecting,
                created: now,
                last_activity: now,
                synack_at: None,
                bytes_out: 0,
                bytes_in: 0,
                packets_out: 0,
                packets_in: 0,
                tcp: TcpProgress::default(),
                quote: None,
            },
        );
        Ok(id)
    }

    /// Removes a session; returns it.
    pub fn remove(&mut self, id: SessionId) -> Option<Session> {
        let s = self.sessions.remove(&id)?;
        if self.by_key.get(&s.key) == Some(&id) {
            self.by_key.remove(&s.key);
        }
        self.per_protocol[s.key.protocol.index()] -= 1;
        let client = *s.key.client.ip();
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
        if let Some(n) = self.per_mac.get_mut(&s.client_mac) {
            *n -= 1;
            if *n == 0 {
                self.per_mac.remove(&s.client_mac);
            }
        }
        Some(s)
    }

    /// One pass over the table at `now`: the sessions whose time is up, and the earliest time
    /// another one's will be. `deadline` gives the time a session ends (its last activity
    /// plus its idle timeout, say), or `None` for a session that is not to be timed out (yet).
    /// The caller runs this when the time it returned last has come, not on every wake-up: it
    /// is O(sessions).
    pub fn sweep(
        &self,
        now: Instant,
        deadline: impl Fn(&Session) -> Option<Instant>,
    ) -> (Vec<SessionId>, Option<Instant>) {
        let mut idle = Vec::new();
        let mut next: Option<Instant> = None;
        for s in self.sessions.values() {
            let Some(at) = deadline(s) else { continue };
            if at <= now {
                idle.push(s.id);
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (idle, next)
    }

    /// Sessions held by `client`.
    pub fn count_for(&self, client: Ipv4Addr) -> usize {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    /// Sessions held by the client at `mac`, over all its addresses.
    pub fn count_for_mac(&self, mac: [u8; 6]) -> usize {
        self.per_mac.get(&mac).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::time::Duration;

    fn key(client_port: u16) -> FlowKey {
        FlowKey {
            protocol: Protocol::Udp,
            client: SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 10), client_port),
            remote: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 53),
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    fn target() -> SocketAddr {
        "10.0.0.1:53".parse().unwrap()
    }

    #[test]
    fn limits_are_enforced_and_released() {
        let mut t = SessionTable::new();
        let l = Limits {
            max_sessions: 3,
            max_per_client: 2,
        };
        let now = Instant::from_secs(0);
        let a = t.insert(key(1), MAC, target(), l, now).unwrap();
        t.insert(key(2), MAC, target(), l, now).unwrap();
        assert!(matches!(
            t.insert(key(3), MAC, target(), l, now),
            Err(LimitError::PerClient { limit: 2, .. })
        ));
        let mut other = key(4);
        other.client = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 11), 4);
        let (mac_b, mac_c) = ([0x52, 0x54, 0, 0, 0, 2], [0x52, 0x54, 0, 0, 0, 3]);
        t.insert(other, mac_b, target(), l, now).unwrap();
        let mut third = key(5);
        third.client = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 12), 5);
        assert_eq!(
            t.insert(third, mac_c, target(), l, now),
            Err(LimitError::Global(3))
        );
        assert_eq!(t.count_by_protocol(), [0, 3, 0]);
        t.remove(a).unwrap();
        assert_eq!(t.count_by_protocol(), [0, 2, 0]);
        assert_eq!(t.find(&key(1)), None);
        assert!(t.insert(key(3), MAC, target(), l, now).is_ok());
        assert_eq!(t.count_for(Ipv4Addr::new(192, 168, 30, 10)), 2);
    }

    #[test]
    fn the_per_client_limit_applies_to_each_mac_too() {
        let mut t = SessionTable::new();
        let l = Limits {
            max_sessions: 10,
            max_per_client: 2,
        };
        let now = Instant::from_secs(0);
        let from = |last: u8| {
            let mut k = key(4000 + u16::from(last));
            k.client = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, last), 4000);
            k
        };
        let a = t.insert(from(10), MAC, target(), l, now).unwrap();
        t.insert(from(11), MAC, target(), l, now).unwrap();
        assert_eq!(
            t.insert(from(12), MAC, target(), l, now),
            Err(LimitError::PerClientMac { mac: MAC, limit: 2 })
        );
        assert_eq!(t.count_for_mac(MAC), 2);
        t.remove(a);
        assert_eq!(t.count_for_mac(MAC), 1);
        assert!(t.insert(from(12), MAC, target(), l, now).is_ok());
    }

    #[test]
    fn idle_sessions_are_found_by_last_activity() {
        let mut t = SessionTable::new();
        let l = Limits {
            max_sessions: 10,
            max_per_client: 10,
        };
        let a = t
            .insert(key(1), MAC, target(), l, Instant::from_secs(0))
            .unwrap();
        let b = t
            .insert(key(2), MAC, target(), l, Instant::from_secs(0))
            .unwrap();
        t.get_mut(b).unwrap().count_out(10, Instant::from_secs(50));
        let udp_only = |s: &Session| {
            (s.key.protocol == Protocol::Udp).then_some(s.last_activity + Duration::from_secs(60))
        };
        assert_eq!(
            t.sweep(Instant::from_secs(59), udp_only),
            (vec![], Some(Instant::from_secs(60)))
        );
        assert_eq!(
            t.sweep(Instant::from_secs(60), udp_only),
            (vec![a], Some(Instant::from_secs(110)))
        );
        let tcp_only = |s: &Session| {
            (s.key.protocol == Protocol::Tcp).then_some(s.last_activity + Duration::from_secs(60))
        };
        assert_eq!(t.sweep(Instant::from_secs(600), tcp_only), (vec![], None));
        // Ids are never reused.
        t.remove(a);
        let c = t
            .insert(key(3), MAC, target(), l, Instant::from_secs(61))
            .unwrap();
        assert!(c.0 > b.0);
    }
}
