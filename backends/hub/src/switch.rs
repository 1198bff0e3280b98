//! The learning switch: which port or ports a frame goes to.
//!
//! This is plain data with time passed in: no channels, no sockets, no clock. The in-memory hub
//! drives it for its ports, and the hub-socket backend will drive it for its peers.
//!
//! # Theory of operation
//!
//! Each frame a port sends is offered to [`Switch::forward`]:
//!
//! 1. A frame shorter than an Ethernet header, or whose *source* MAC is a group address (no
//!    station has one), is dropped.
//! 2. The source MAC is learnt: it now lives behind the sending port. A station that moves to
//!    another port is re-learnt there by its next frame.
//! 3. A group destination (broadcast or multicast: the I/G bit of the first octet) is flooded
//!    to every port but the sender's.
//! 4. A unicast destination learnt behind another port goes to that port only; one learnt
//!    behind the sender's own port is dropped (it already reached its destination); an unknown
//!    one is flooded.
//!
//! The [`LearningTable`] is bounded in size and in time. An entry not refreshed by a frame from
//! its station for [`SwitchLimits::max_age`] is forgotten; when the table holds
//! [`SwitchLimits::max_entries`] stations, learning a new one forgets the one heard from least
//! recently. Entries sit in a list ordered by last refresh (an index-linked list in a slab),
//! so learning, refreshing, ageing and eviction are all O(1): a flood of random source MACs
//! costs a constant amount per frame, and only makes unknown-unicast flooding more frequent.
//! Ports that disconnect are removed with [`Switch::port_gone`].
//!
//! Time must not go backwards between calls (pass a monotonic clock).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hubnat_backend::ETHERNET_HEADER_LEN;

/// An Ethernet MAC address.
pub type MacAddr = [u8; 6];

/// The default bound on learnt stations.
pub const DEFAULT_MAX_ENTRIES: usize = 4096;

/// The default time after which a silent station is forgotten (the usual bridge ageing time).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);

/// A port of a switch: a handle chosen by whoever drives the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u64);

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// To this one port (never the sender's).
    Unicast(PortId),
    /// To every port except the sender's.
    Flood,
    /// Nowhere: the frame is invalid, or its destination is behind the sender's own port.
    Drop,
}

/// The bounds of a [`LearningTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchLimits {
    /// The most stations remembered at once; the least recently heard one is forgotten to
    /// make room. Zero disables learning (everything is flooded).
    pub max_entries: usize,
    /// How long a station is remembered after its last frame.
    pub max_age: Duration,
}

impl Default for SwitchLimits {
    fn default() -> Self {
        SwitchLimits {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// "No slot" in the slab's links.
const NIL: usize = usize::MAX;

#[derive(Debug, Clone)]
struct Slot {
    mac: MacAddr,
    port: PortId,
    last_seen: Instant,
    /// The next older entry, or NIL.
    older: usize,
    /// The next newer entry, or NIL.
    newer: usize,
}

/// The MAC → port table of a learning switch, bounded in size and age. See the module
/// documentation.
#[derive(Debug, Clone)]
pub struct LearningTable {
    limits: SwitchLimits,
    index: HashMap<MacAddr, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The least recently refreshed entry, or NIL.
    oldest: usize,
    /// The most recently refreshed entry, or NIL.
    newest: usize,
}

impl LearningTable {
    /// An empty table with these bounds.
    pub fn new(limits: SwitchLimits) -> Self {
        LearningTable {
            limits,
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            oldest: NIL,
            newest: NIL,
        }
    }

    /// The table's bounds.
    pub fn limits(&self) -> SwitchLimits {
        self.limits
    }

    /// Number of stations remembered (some may have aged out since the last
    /// [`expire`](Self::expire)).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no station is remembered.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Records that `mac` was heard on `port` at `now`, replacing any older record of it.
    pub fn learn(&mut self, mac: MacAddr, port: PortId, now: Instant) {
        if let Some(&i) = self.index.get(&mac) {
            self.unlink(i);
            let slot = &mut self.slots[i];
            slot.port = port;
            slot.last_seen = now;
            self.link_newest(i);
            return;
        }
        if self.limits.max_entries == 0 {
            return;
        }
        if self.index.len() >= self.limits.max_entries {
            self.remove(self.oldest);
        }
        let slot = Slot {
            mac,
            port,
            last_seen: now,
            older: NIL,
            newer: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.index.insert(mac, i);
        self.link_newest(i);
    }

    /// The port `mac` was last heard on, unless that was [`SwitchLimits::max_age`] or more
    /// before `now`.
    pub fn lookup(&self, mac: &MacAddr, now: Instant) -> Option<PortId> {
        let slot = &self.slots[*self.index.get(mac)?];
        (!self.is_aged(slot, now)).then_some(slot.port)
    }

    /// Forgets every station not heard from for [`SwitchLimits::max_age`]. Returns how many.
    /// Costs O(1) per station forgotten.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut forgotten = 0;
        while self.oldest != NIL && self.is_aged(&self.slots[self.oldest], now) {
            self.remove(self.oldest);
            forgotten += 1;
        }
        forgotten
    }

    /// Forgets every station learnt behind `port`. Returns how many. Costs O(table size).
    pub fn forget_port(&mut self, port: PortId) -> usize {
        let mut doomed = Vec::new();
        let mut i = self.oldest;
        while i != NIL {
            if self.slots[i].port == port {
                doomed.push(i);
            }
            i = self.slots[i].newer;
        }
        for &i in &doomed {
            self.remove(i);
        }
        doomed.len()
    }

    /// The stations remembered, least recently heard first: (MAC, port, last heard).
    pub fn iter(&self) -> impl Iterator<Item = (MacAddr, PortId, Instant)> + '_ {
        let mut i = self.oldest;
        std::iter::from_fn(move || {
            let slot = self.slots.get(i)?;
            i = slot.newer;
            Some((slot.mac, slot.port, slot.last_seen))
        })
    }

    fn is_aged(&self, slot: &Slot, now: Instant) -> bool {
        now.saturating_duration_since(slot.last_seen) >= self.limits.max_age
    }

    /// Removes the entry in slot `i` (which must be live) from the list and the index.
    fn remove(&mut self, i: usize) {
        if i == NIL {
            return;
        }
        self.unlink(i);
        let mac = self.slots[i].mac;
        self.index.remove(&mac);
        self.free.push(i);
    }

    /// Takes slot `i` out of the age-ordered list.
    fn unlink(&mut self, i: usize) {
        let (older, newer) = (self.slots[i].older, self.slots[i].newer);
        if older == NIL {
            self.oldest = newer;
        } else {
            self.slots[older].newer = newer;
        }
        if newer == NIL {
            self.newest = older;
        } else {
            self.slots[newer].older = older;
        }
        self.slots[i].older = NIL;
        self.slots[i].newer = NIL;
    }

    /// Puts slot `i` (unlinked) at the newest end of the list.
    fn link_newest(&mut self, i: usize) {
        self.slots[i].older = self.newest;
        self.slots[i].newer = NIL;
        if self.newest == NIL {
            self.oldest = i;
        } else {
            self.slots[self.newest].newer = i;
        }
        self.newest = i;
    }
}

/// True for a group (broadcast or multicast) MAC address.
fn is_group(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 0x01 != 0)
}

/// The forwarding decision of a learning switch. See the module documentation.
#[derive(Debug, Clone)]
pub struct Switch {
    table: LearningTable,
    /// Stations fixed to a port ([`Switch::pin`]): never learnt elsewhere.
    pinned: Vec<(MacAddr, PortId)>,
}

impl Switch {
    /// A switch that has learnt nothing yet.
    pub fn new(limits: SwitchLimits) -> Self {
        Switch {
            table: LearningTable::new(limits),
            pinned: Vec::new(),
        }
    }

    /// Fixes station `mac` to `port` for good (the virtual host's own MAC on its port): frames
    /// to it always go there, and a frame from another port that claims it as its source is
    /// dropped, so no peer can draw the station's traffic to itself.
    pub fn pin(&mut self, mac: MacAddr, port: PortId) {
        self.pinned.retain(|(m, _)| *m != mac);
        self.pinned.push((mac, port));
    }

    fn pinned_port(&self, mac: &[u8]) -> Option<PortId> {
        self.pinned
            .iter()
            .find(|(m, _)| m.as_slice() == mac)
            .map(|(_, port)| *port)
    }

    /// Learns from `frame`, which arrived on `in_port` at `now`, and says where it goes.
    ///
    /// Only the first 12 bytes are looked at; the caller checks the length limits of its
    /// medium. Never returns `Unicast(in_port)`.
    pub fn forward(&mut self, in_port: PortId, frame: &[u8], now: Instant) -> Forward {
        if frame.len() < ETHERNET_HEADER_LEN {
            return Forward::Drop;
        }
        let (dst, src) = (&frame[0..6], &frame[6..12]);
        if is_group(src) {
            return Forward::Drop;
        }
        if self.pinned_port(src).is_some_and(|port| port != in_port) {
            return Forward::Drop;
        }
        self.table.expire(now);
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(src);
        self.table.learn(src_mac, in_port, now);
        if is_group(dst) {
            return Forward::Flood;
        }
        let mut dst_mac = [0u8; 6];
        dst_mac.copy_from_slice(dst);
        match self
            .pinned_port(dst)
            .or_else(|| self.table.lookup(&dst_mac, now))
        {
            Some(port) if port == in_port => Forward::Drop,
            Some(port) => Forward::Unicast(port),
            None => Forward::Flood,
        }
    }

    /// Forgets the stations behind a port that disconnected. Returns how many.
    pub fn port_gone(&mut self, port: PortId) -> usize {
        self.table.forget_port(port)
    }

    /// The learning table, for status and tests.
    pub fn table(&self) -> &LearningTable {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROADCAST: MacAddr = [0xff; 6];

    fn mac(n: u8) -> MacAddr {
        [0x02, 0, 0, 0, 0, n]
    }

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.resize(60, 0);
        f
    }

    const A: PortId = PortId(1);
    const B: PortId = PortId(2);

    #[test]
    fn floods_unknown_then_unicasts_learnt() {
        let t0 = Instant::now();
        let mut sw = Switch::new(SwitchLimits::default());
        assert_eq!(sw.forward(A, &frame(mac(2), mac(1)), t0), Forward::Flood);
        assert_eq!(
            sw.forward(B, &frame(mac(1), mac(2)), t0),
            Forward::Unicast(A)
        );
        assert_eq!(
            sw.forward(A, &frame(mac(2), mac(1)), t0),
            Forward::Unicast(B)
        );
        assert_eq!(sw.table().len(), 2);
    }

    #[test]
    fn group_destinations_flood_and_group_sources_drop() {
        let t0 = Instant::now();
        let mut sw = Switch::new(SwitchLimits::default());
        sw.forward(B, &frame(mac(1), mac(2)), t0);
        assert_eq!(sw.forward(A, &frame(BROADCAST, mac(1)), t0), Forward::Flood);
        let ipv4_multicast = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert_eq!(
            sw.forward(A, &frame(ipv4_multicast, mac(1)), t0),
            Forward::Flood
        );
        assert_eq!(
            sw.forward(A, &frame(mac(2), ipv4_multicast), t0),
            Forward::Drop
        );
        assert_eq!(sw.table().lookup(&ipv4_multicast, t0), None);
        assert_eq!(
            sw.forward(A, &frame(mac(2), mac(1))[..13], t0),
            Forward::Drop
        );
    }

    #[test]
    fn destination_behind_the_sender_is_dropped_and_stations_move() {
        let t0 = Instant::now();
        let mut sw = Switch::new(SwitchLimits::default());
        sw.forward(A, &frame(BROADCAST, mac(1)), t0);
        sw.forward(A, &frame(BROADCAST, mac(3)), t0);
        assert_eq!(sw.forward(A, &frame(mac(3), mac(1)), t0), Forward::Drop);
        // Station 3 moves to port B.
        sw.forward(B, &frame(BROADCAST, mac(3)), t0);
        assert_eq!(
            sw.forward(A, &frame(mac(3), mac(1)), t0),
            Forward::Unicast(B)
        );
    }

    #[test]
    fn entries_age_out_unless_refreshed() {
        let limits = SwitchLimits {
            max_entries: 16,
            max_age: Duration::from_secs(300),
        };
        let t0 = Instant::now();
        let mut sw = Switch::new(limits);
        sw.forward(B, &frame(BROADCAST, mac(2)), t0);
        sw.forward(B, &frame(BROADCAST, mac(3)), t0);
        // Station 3 speaks again at 200 s; station 2 stays silent.
        sw.forward(B, &frame(BROADCAST, mac(3)), t0 + Duration::from_secs(200));
        let t1 = t0 + Duration::from_secs(299);
        assert_eq!(
            sw.forward(A, &frame(mac(2), mac(1)), t1),
            Forward::Unicast(B)
        );
        let t2 = t0 + Duration::from_secs(300);
        assert_eq!(
            sw.table().lookup(&mac(2), t2),
            None,
            "aged lookups miss even before expire"
        );
        assert_eq!(sw.forward(A, &frame(mac(2), mac(1)), t2), Forward::Flood);
        assert_eq!(
            sw.forward(A, &frame(mac(3), mac(1)), t2),
            Forward::Unicast(B)
        );
        let macs: Vec<MacAddr> = sw.table().iter().map(|(m, _, _)| m).collect();
        assert_eq!(
            macs,
            vec![mac(3), mac(1)],
            "station 2 expired, oldest first"
        );
        let t3 = t0 + Duration::from_secs(10_000);
        let mut table = sw.table().clone();
        assert_eq!(table.expire(t3), 2);
        assert!(table.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_least_recently_heard() {
        let limits = SwitchLimits {
            max_entries: 3,
            max_age: DEFAULT_MAX_AGE,
        };
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut table = LearningTable::new(limits);
        table.learn(mac(1), A, s(1));
        table.learn(mac(2), A, s(2));
        table.learn(mac(3), A, s(3));
        table.learn(mac(1), B, s(4)); // refresh (and move) 1: now 2 is the oldest
        table.learn(mac(4), B, s(5));
        assert_eq!(table.len(), 3);
        assert_eq!(table.lookup(&mac(2), s(5)), None);
        assert_eq!(table.lookup(&mac(1), s(5)), Some(B));
        assert_eq!(table.lookup(&mac(3), s(5)), Some(A));
        assert_eq!(table.lookup(&mac(4), s(5)), Some(B));
        // A flood of new sources keeps the table at its bound, reusing slots.
        for n in 10..200u8 {
            table.learn(mac(n), A, s(u64::from(n)));
        }
        assert_eq!(table.len(), 3);
        assert!(table.slots.len() <= 3);
        let macs: Vec<MacAddr> = table.iter().map(|(m, _, _)| m).collect();
        assert_eq!(macs, vec![mac(197), mac(198), mac(199)]);
    }

    #[test]
    fn a_zero_bound_disables_learning() {
        let mut sw = Switch::new(SwitchLimits {
            max_entries: 0,
            max_age: DEFAULT_MAX_AGE,
        });
        let t0 = Instant::now();
        sw.forward(B, &frame(BROADCAST, mac(2)), t0);
        assert_eq!(sw.forward(A, &frame(mac(2), mac(1)), t0), Forward::Flood);
        assert!(sw.table().is_empty());
    }

    #[test]
    fn a_gone_port_is_forgotten() {
        let t0 = Instant::now();
        let mut sw = Switch::new(SwitchLimits::default());
        sw.forward(A, &frame(BROADCAST, mac(1)), t0);
        sw.forward(B, &frame(BROADCAST, mac(2)), t0);
        sw.forward(B, &frame(BROADCAST, mac(3)), t0);
        sw.forward(A, &frame(BROADCAST, mac(4)), t0);
        assert_eq!(sw.port_gone(B), 2);
        let macs: Vec<MacAddr> = sw.table().iter().map(|(m, _, _)| m).collect();
        assert_eq!(macs, vec![mac(1), mac(4)]);
        assert_eq!(sw.forward(A, &frame(mac(2), mac(1)), t0), Forward::Flood);
        // The list stays consistent after removals in the middle.
        sw.forward(B, &frame(BROADCAST, mac(5)), t0);
        let macs: Vec<MacAddr> = sw.table().iter().map(|(m, _, _)| m).collect();
        assert_eq!(macs, vec![mac(4), mac(1), mac(5)]);
    }

    #[test]
    fn a_pinned_station_stays_on_its_port() {
        let mut sw = Switch::new(SwitchLimits::default());
        let now = Instant::now();
        let (host, thief, client) = (PortId(0), PortId(1), PortId(2));
        let host_mac = [0x00, 0xac, 0, 0, 0, 1];
        sw.pin(host_mac, host);
        let mut claimed = [0u8; 60];
        claimed[..6].copy_from_slice(&BROADCAST);
        claimed[6..12].copy_from_slice(&host_mac);
        assert_eq!(sw.forward(thief, &claimed, now), Forward::Drop);
        let mut to_host = [0u8; 60];
        to_host[..6].copy_from_slice(&host_mac);
        to_host[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 7]);
        assert_eq!(sw.forward(client, &to_host, now), Forward::Unicast(host));
        assert_eq!(sw.forward(host, &claimed, now), Forward::Flood);
    }
}
