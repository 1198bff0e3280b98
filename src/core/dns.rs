//! The DNS redirect: UDP queries to the virtual host's port 53 go to the upstream resolvers.
//!
//! # Theory of operation
//!
//! Each query gets a fresh random 16-bit id (clients' ids may collide, and an off-path spoofer
//! must not guess it: the ids come from the core's [`Rng`], keyed by the driver's seed) and is
//! sent to the first upstream. If no answer comes within [`QUERY_TIMEOUT`], it is sent to the
//! next upstream, and so on; after the last one the client gets SERVFAIL. An answer is
//! accepted only from the upstream the query was last sent to, with the id it was sent with;
//! the client's id is put back and the answer goes out from the virtual host's address.
//!
//! Bounds: at most [`MAX_PENDING`] queries wait at once, and at most
//! [`MAX_PENDING_PER_CLIENT`] (an eighth) of one client, counted by its address and by its MAC
//! alike, so one client cannot take everyone's slots; more are dropped (the client retries).
//! TCP to port 53 is relayed as a TCP session to the upstreams (see the NAT).
//!
//! The queries leave from the driver's DNS socket (one per address family, on a port the
//! kernel picked at random when it was opened): a fresh port per query is not done, so the
//! random id is the only thing a blind spoofer has to guess besides the query itself.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::time::{Duration, Instant};

use super::rng::Rng;

/// How long an upstream gets to answer before the next one is tried.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries waiting for an answer at once.
pub const MAX_PENDING: usize = 1024;
/// Queries of one client (address, or MAC) waiting for an answer at once.
pub const MAX_PENDING_PER_CLIENT: usize = MAX_PENDING / 8;
/// The [`Rng`] stream of the query ids.
const ID_STREAM: u64 = 0x646e_735f_6964; // "dns_id"
const HEADER_LEN: usize = 12;

/// How many address → name entries the forwarder remembers from answers it relayed.
pub const NAME_CACHE: usize = 4096;

/// Addresses learnt from relayed answers, so the session table can show which name a client
/// looked up for the address it then connects to. Bounded: the oldest entry goes first.
#[derive(Debug, Default)]
pub struct NameCache {
    map: HashMap<std::net::Ipv4Addr, String>,
    order: std::collections::VecDeque<std::net::Ipv4Addr>,
}

impl NameCache {
    /// The name a client looked up for `ip`, if an answer for it passed through.
    pub fn lookup(&self, ip: std::net::Ipv4Addr) -> Option<&str> {
        self.map.get(&ip).map(String::as_str)
    }

    fn insert(&mut self, ip: std::net::Ipv4Addr, name: String) {
        if self.map.insert(ip, name).is_none() {
            self.order.push_back(ip);
            if self.order.len() > NAME_CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Learns the A records of a DNS answer: each address maps to the question's name.
    /// Anything malformed is ignored.
    pub fn learn(&mut self, answer: &[u8]) {
        let _ = self.try_learn(answer);
    }

    fn try_learn(&mut self, msg: &[u8]) -> Option<()> {
        let count = |at: usize| Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]));
        let (qd, an) = (count(4)?, count(6)?);
        if qd != 1 || msg.get(3)? & 0x0f != 0 {
            return None;
        }
        let (qname, mut at) = read_name(msg, HEADER_LEN)?;
        at += 4; // qtype, qclass
        for _ in 0..an {
            let (_, after) = read_name(msg, at)?;
            let rtype = count(after)?;
            let rclass = count(after + 2)?;
            let rdlen = usize::from(count(after + 8)?);
            let rdata = msg.get(after + 10..after + 10 + rdlen)?;
            if rtype == 1 && rclass == 1 && rdlen == 4 {
                let ip = std::net::Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]);
                self.insert(ip, qname.clone());
            }
            at = after + 10 + rdlen;
        }
        Some(())
    }
}

/// Reads a (possibly compressed) name at `at`; returns it and the offset after it.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(at)?;
        match len {
            0 => {
                return Some((
                    if name.is_empty() { ".".into() } else { name },
                    end.unwrap_or(at + 1),
                ));
            }
            l if l & 0xc0 == 0xc0 => {
                let ptr = usize::from(u16::from_be_bytes([l & 0x3f, *msg.get(at + 1)?]));
                end.get_or_insert(at + 2);
                at = ptr;
            }
            l => {
                let label = msg.get(at + 1..at + 1 + usize::from(l))?;
                if !label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
                {
                    return None;
                }
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(std::str::from_utf8(label).ok()?);
                at += 1 + usize::from(l);
            }
        }
    }
    None
}

#[derive(Debug)]
struct Pending {
    client: SocketAddrV4,
    client_mac: [u8; 6],
    client_id: u16,
    /// The resolvers this query may go to, in order (the settings' upstreams when it was
    /// asked, or the one a policy redirected it to), and the one it went to last.
    upstreams: Vec<SocketAddr>,
    upstream: usize,
    deadline: Instant,
    query: Vec<u8>,
}

/// Counters of the DNS redirect.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DnsCounters {
    /// Queries received from clients.
    pub queries: u64,
    /// Answers returned to clients.
    pub answers: u64,
    /// Queries re-sent to the next upstream after a timeout.
    pub failovers: u64,
    /// Queries answered with SERVFAIL after every upstream timed out (or none is configured).
    pub servfails: u64,
    /// Queries dropped: malformed, or [`MAX_PENDING`] waiting.
    pub dropped: u64,
    /// Queries dropped because their client had [`MAX_PENDING_PER_CLIENT`] waiting.
    pub client_limit: u64,
    /// Answers that matched no query (late, spoofed, from the wrong server).
    pub stray_answers: u64,
}

/// What to do after a DNS event.
#[derive(Debug, PartialEq, Eq)]
pub enum DnsAction<'a> {
    /// Send `payload` to `upstream`.
    Send {
        /// The resolver.
        upstream: SocketAddr,
        /// The query, with the id rewritten.
        payload: &'a [u8],
    },
    /// Give `payload` to `client` (from the virtual host's port 53).
    Answer {
        /// The client.
        client: SocketAddrV4,
        /// The answer, with the client's id.
        payload: &'a [u8],
    },
}

/// The UDP DNS forwarder.
#[derive(Debug)]
pub struct DnsForwarder {
    pending: HashMap<u16, Pending>,
    per_client: HashMap<Ipv4Addr, usize>,
    per_mac: HashMap<[u8; 6], usize>,
    ids: Rng,
    buf: Vec<u8>,
    /// Counters.
    pub counters: DnsCounters,
    /// Names of addresses seen in answers.
    pub names: NameCache,
}

impl DnsForwarder {
    /// A forwarder; `seed` keys its query ids (take it from a real random source).
    pub fn new(seed: u64) -> Self {
        DnsForwarder {
            pending: HashMap::new(),
            per_client: HashMap::new(),
            per_mac: HashMap::new(),
            ids: Rng::new(seed, ID_STREAM),
            buf: Vec::new(),
            counters: DnsCounters::default(),
            names: NameCache::default(),
        }
    }

    /// Queries waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A query from `client` (at `client_mac`), to go to `upstreams` in turn. Returns what to
    /// send, if anything.
    pub fn query(
        &mut self,
        client: SocketAddrV4,
        client_mac: [u8; 6],
        payload: &[u8],
        upstreams: &[SocketAddr],
        now: Instant,
    ) -> Option<DnsAction<'_>> {
        self.counters.queries += 1;
        if payload.len() < HEADER_LEN || payload[2] & 0x80 != 0 {
            self.counters.dropped += 1;
            return None;
        }
        if upstreams.is_empty() {
            self.counters.servfails += 1;
            servfail(&mut self.buf, payload);
            return Some(DnsAction::Answer {
                client,
                payload: &self.buf,
            });
        }
        if self.pending.len() >= MAX_PENDING {
            self.counters.dropped += 1;
            return None;
        }
        let count = |n: Option<&usize>| n.copied().unwrap_or(0);
        if count(self.per_client.get(client.ip())) >= MAX_PENDING_PER_CLIENT
            || count(self.per_mac.get(&client_mac)) >= MAX_PENDING_PER_CLIENT
        {
            self.counters.client_limit += 1;
            return None;
        }
        let client_id = u16::from_be_bytes([payload[0], payload[1]]);
        // At most MAX_PENDING of the 65,536 ids are taken: a few draws find a free one.
        let mut id = self.ids.next_u16();
        while self.pending.contains_key(&id) {
            id = self.ids.next_u16();
        }
        *self.per_client.entry(*client.ip()).or_insert(0) += 1;
        *self.per_mac.entry(client_mac).or_insert(0) += 1;
        let mut query = payload.to_vec();
        query[..2].copy_from_slice(&id.to_be_bytes());
        let upstream = upstreams[0];
        self.pending.insert(
            id,
            Pending {
                client,
                client_mac,
                client_id,
                upstreams: upstreams.to_vec(),
                upstream: 0,
                deadline: now + QUERY_TIMEOUT,
                query,
            },
        );
        let p = self.pending.get(&id).expect("invariant: just inserted");
        Some(DnsAction::Send {
            upstream,
            payload: &p.query,
        })
    }

    /// An answer from `from`. Returns the answer for the client, if it matches a query.
    pub fn answer(&mut self, from: SocketAddr, payload: &[u8]) -> Option<DnsAction<'_>> {
        if payload.len() < HEADER_LEN {
            self.counters.stray_answers += 1;
            return None;
        }
        let id = u16::from_be_bytes([payload[0], payload[1]]);
        let matches = self
            .pending
            .get(&id)
            .is_some_and(|p| same_server(p.upstreams[p.upstream], from));
        if !matches {
            self.counters.stray_answers += 1;
            return None;
        }
        let p = self.remove(id).expect("invariant: checked above");
        self.counters.answers += 1;
        self.names.learn(payload);
        self.buf.clear();
        self.buf.extend_from_slice(payload);
        self.buf[..2].copy_from_slice(&p.client_id.to_be_bytes());
        Some(DnsAction::Answer {
            client: p.client,
            payload: &self.buf,
        })
    }

    /// Moves timed-out queries to the next upstream, or answers SERVFAIL after the last one.
    /// Calls `act` for each resulting action.
    pub fn handle_timeout(&mut self, now: Instant, mut act: impl FnMut(DnsAction<'_>)) {
        let due: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            if p.upstream + 1 < p.upstreams.len() {
                p.upstream += 1;
                p.deadline = now + QUERY_TIMEOUT;
                self.counters.failovers += 1;
                tracing::debug!(upstream = %p.upstreams[p.upstream], "dns: upstream timed out, trying the next");
                act(DnsAction::Send {
                    upstream: p.upstreams[p.upstream],
                    payload: &p.query,
                });
            } else {
                let p = self.remove(id).expect("invariant: present");
                self.counters.servfails += 1;
                tracing::debug!(client = %p.client, "dns: every upstream timed out; SERVFAIL");
                let mut query = p.query;
                query[..2].copy_from_slice(&p.client_id.to_be_bytes());
                servfail(&mut self.buf, &query);
                act(DnsAction::Answer {
                    client: p.client,
                    payload: &self.buf,
                });
            }
        }
    }

    /// Takes query `id` out of the table and its client's counts.
    fn remove(&mut self, id: u16) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        uncount(&mut self.per_client, *p.client.ip());
        uncount(&mut self.per_mac, p.client_mac);
        Some(p)
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }
}

/// Takes one off `key`'s count, forgetting it at zero.
fn uncount<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// An IPv4-mapped or plain address compare: a socket bound to `[::]` reports IPv4 senders as
/// mapped addresses.
fn same_server(expected: SocketAddr, from: SocketAddr) -> bool {
    let norm = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        a => a,
    };
    norm(expected) == norm(from)
}

/// Turns `query` into a SERVFAIL answer in `out`.
fn servfail(out: &mut Vec<u8>, query: &[u8]) {
    out.clear();
    out.extend_from_slice(query);
    if out.len() >= HEADER_LEN {
        out[2] = (out[2] & 0x79) | 0x80; // QR=1, keep opcode and RD, clear AA/TC
        out[3] = 0x80 | 2; // RA=1, RCODE=SERVFAIL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_bytes(id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(b"\x05files\x06hubnat\x04test\x00\x00\x01\x00\x01");
        q
    }

    fn client() -> SocketAddrV4 {
        "192.168.30.10:5353".parse().unwrap()
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    /// The id a query went upstream with.
    fn sent_id(action: Option<DnsAction<'_>>) -> u16 {
        match action {
            Some(DnsAction::Send { payload, .. }) => u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_ids_are_random_under_the_seed() {
        let up: Vec<SocketAddr> = vec!["10.77.0.2:53".parse().unwrap()];
        let ids = |seed: u64| {
            let mut f = DnsForwarder::new(seed);
            (0..100u16)
                .map(|i| {
                    let c = SocketAddrV4::new(
                        std::net::Ipv4Addr::new(192, 168, 30, 10 + (i % 8) as u8),
                        5353,
                    );
                    sent_id(f.query(
                        c,
                        [0x52, 0x54, 0, 0, 0, (i % 8) as u8],
                        &query_bytes(7),
                        &up,
                        Instant::from_secs(0),
                    ))
                })
                .collect::<Vec<u16>>()
        };
        let a = ids(1);
        assert_eq!(a, ids(1), "deterministic under the seed");
        assert_ne!(a, ids(2));
        // Not a counter: consecutive ids are not consecutive numbers, and all differ.
        let steps = a
            .windows(2)
            .filter(|w| w[1] == w[0].wrapping_add(1))
            .count();
        assert!(steps < 5, "{steps} sequential steps: {a:?}");
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), a.len(), "ids of pending queries are unique");
    }

    #[test]
    fn one_client_takes_at_most_an_eighth_of_the_pending_queries() {
        let up: Vec<SocketAddr> = vec!["10.77.0.2:53".parse().unwrap()];
        let mut f = DnsForwarder::new(0);
        let now = Instant::from_secs(0);
        let mut sent = 0;
        for i in 0..200u16 {
            if f.query(client(), MAC, &query_bytes(i), &up, now).is_some() {
                sent += 1;
            }
        }
        assert_eq!(sent, MAX_PENDING_PER_CLIENT);
        assert_eq!(MAX_PENDING_PER_CLIENT, MAX_PENDING / 8);
        assert_eq!(f.counters.client_limit, 200 - MAX_PENDING_PER_CLIENT as u64);
        // The same MAC from another address is the same client.
        let other_ip: SocketAddrV4 = "192.168.30.99:5353".parse().unwrap();
        assert!(f.query(other_ip, MAC, &query_bytes(1), &up, now).is_none());
        // Everyone else is still served.
        let other_mac = [0x52, 0x54, 0, 0, 0, 2];
        assert!(f
            .query(other_ip, other_mac, &query_bytes(1), &up, now)
            .is_some());
        // An answer frees the client's slot.
        let id = f
            .pending
            .iter()
            .find(|(_, p)| p.client == client())
            .map(|(id, _)| *id)
            .unwrap();
        let mut answer = query_bytes(0);
        answer[..2].copy_from_slice(&id.to_be_bytes());
        answer[2] |= 0x80;
        assert!(f.answer(up[0], &answer).is_some());
        assert!(f.query(client(), MAC, &query_bytes(1), &up, now).is_some());
    }

    #[test]
    fn answers_return_with_the_clients_id() {
        let up: SocketAddr = "10.77.0.2:53".parse().unwrap();
        let (mut f, ups): (_, Vec<SocketAddr>) = (DnsForwarder::new(100), vec![up]);
        let sent = match f.query(
            client(),
            MAC,
            &query_bytes(0xbeef),
            &ups,
            Instant::from_secs(0),
        ) {
            Some(DnsAction::Send { upstream, payload }) => {
                assert_eq!(upstream, up);
                payload.to_vec()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(f.pending(), 1);
        let mut answer = sent.clone();
        answer[2] |= 0x80;
        // From the wrong server: ignored.
        assert_eq!(f.answer("10.77.0.3:53".parse().unwrap(), &answer), None);
        match f.answer(up, &answer) {
            Some(DnsAction::Answer { client: c, payload }) => {
                assert_eq!(c, client());
                assert_eq!(&payload[..2], &0xbeefu16.to_be_bytes());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.pending(), 0);
        assert_eq!(f.answer(up, &answer), None, "a second answer is stray");
        assert_eq!(f.counters.stray_answers, 2);
    }

    #[test]
    fn fails_over_then_servfails() {
        let a: SocketAddr = "10.77.0.2:53".parse().unwrap();
        let b: SocketAddr = "10.77.0.3:5353".parse().unwrap();
        let (mut f, ups): (_, Vec<SocketAddr>) = (DnsForwarder::new(1), vec![a, b]);
        f.query(client(), MAC, &query_bytes(7), &ups, Instant::from_secs(0))
            .unwrap();
        assert_eq!(f.next_deadline(), Some(Instant::from_secs(2)));
        let mut actions = Vec::new();
        f.handle_timeout(Instant::from_secs(2), |act| {
            actions.push(format!("{act:?}"))
        });
        assert_eq!(actions.len(), 1);
        assert!(actions[0].contains("10.77.0.3:5353"), "{actions:?}");
        let mut answers = Vec::new();
        f.handle_timeout(Instant::from_secs(4), |act| {
            if let DnsAction::Answer { client: c, payload } = act {
                answers.push((c, payload.to_vec()));
            }
        });
        assert_eq!(answers.len(), 1);
        let (c, p) = &answers[0];
        assert_eq!(*c, client());
        assert_eq!(&p[..2], &7u16.to_be_bytes());
        assert_eq!(p[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(f.counters.failovers, 1);
        assert_eq!(f.counters.servfails, 1);
    }

    #[test]
    fn answers_teach_address_names() {
        let mut answer = query_bytes(1);
        answer[2] |= 0x80;
        answer[7] = 2; // two answers: a CNAME-less A record with a compressed name, twice
        for last in [2u8, 3] {
            answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 77, 0, last]);
        }
        let mut cache = NameCache::default();
        cache.learn(&answer);
        assert_eq!(
            cache.lookup("10.77.0.2".parse().unwrap()),
            Some("files.hubnat.test")
        );
        assert_eq!(
            cache.lookup("10.77.0.3".parse().unwrap()),
            Some("files.hubnat.test")
        );
        // A pointer loop or truncation is ignored, not followed forever.
        let mut bad = answer.clone();
        bad[12] = 0xc0;
        bad[13] = 0x0c;
        let mut fresh = NameCache::default();
        fresh.learn(&bad);
        fresh.learn(&answer[..20]);
        assert!(
            fresh.map.is_empty(),
            "nothing learnt from malformed answers"
        );
    }

    #[test]
    fn bounded_and_malformed() {
        let (mut f, ups): (_, Vec<SocketAddr>) =
            (DnsForwarder::new(0), vec!["10.77.0.2:53".parse().unwrap()]);
        assert_eq!(
            f.query(client(), MAC, &[1, 2, 3], &ups, Instant::from_secs(0)),
            None
        );
        // Eight clients fill the table, each with its share.
        for i in 0..MAX_PENDING as u16 {
            let n = (i as usize / MAX_PENDING_PER_CLIENT) as u8;
            let c = SocketAddrV4::new(std::net::Ipv4Addr::new(192, 168, 30, 10 + n), 5353);
            let mac = [0x52, 0x54, 0, 0, 1, n];
            assert!(f
                .query(c, mac, &query_bytes(i), &ups, Instant::from_secs(0))
                .is_some());
        }
        let newcomer: SocketAddrV4 = "192.168.30.99:5353".parse().unwrap();
        assert_eq!(
            f.query(
                newcomer,
                [0x52, 0x54, 0, 0, 2, 0],
                &query_bytes(1),
                &ups,
                Instant::from_secs(0)
            ),
            None
        );
        assert_eq!(f.counters.dropped, 2);
        assert_eq!(f.counters.client_limit, 0);
    }
}
