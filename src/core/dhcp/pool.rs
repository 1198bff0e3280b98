//! The lease pool: which address belongs to which client, until when.
//!
//! # Theory of operation
//!
//! The pool manages the addresses of the dynamic range and of the static reservations (by
//! MAC), minus the server's own address. It holds at most one record per address and at most
//! one record per client, so its size is bounded by the number of addresses it manages plus the
//! bindings left over from an earlier range (see *Reconfiguration*). A client is known by its
//! [`ClientKey`]: the client identifier (option 61) when it sends one, else the hardware type
//! and address, which is what RFC 2132 recommends clients send anyway, so both forms of the
//! same Ethernet client compare equal.
//!
//! A record is in one of these states:
//!
//! | state      | the address is          | ends                                               |
//! |------------|-------------------------|----------------------------------------------------|
//! | `Offered`  | held for the client     | REQUEST → `Bound`; after [`OFFER_HOLD`] → removed (or back to `Expired` if it was bound before) |
//! | `Bound`    | the client's            | RELEASE (by the client or the operator) → `Released`; expiry → `Expired`; DECLINE → `Declined`; refused renewal → removed ([`revoke`](LeasePool::revoke)) |
//! | `Released` | free, remembered        | taken by another client only when no address without a record is left |
//! | `Expired`  | free, remembered        | as `Released`                                      |
//! | `Declined` | quarantined (in use by an unknown host) | after [`DECLINE_QUARANTINE`] → removed |
//!
//! Remembered records make addresses sticky: a returning client is offered its previous address
//! when it is still free, and new clients get addresses that nobody held before as long as there
//! are any.
//!
//! Which addresses a client may have: its static reservation if it has one; an address of the
//! range that is nobody's reservation otherwise, and also while its reservation is held by
//! another client's live record (so a new reservation on a busy address does not leave the
//! client without any). Once its reservation is free, a client with a reservation may no longer
//! keep a dynamic address: its renewal is refused and it moves to the reserved one. A reserved
//! address is never given to anyone else.
//!
//! # Reconfiguration
//!
//! [`reconfigure`](LeasePool::reconfigure) swaps in a new range, reservations and server
//! address and keeps every record that still means something:
//!
//! - a `Bound` record the new settings no longer give its client (outside the range, reserved
//!   for another MAC, or the client's reservation is now elsewhere) stays bound: the client
//!   keeps its address until it renews, when [`bind`](LeasePool::bind) refuses it (the server
//!   answers NAK and calls [`revoke`](LeasePool::revoke)), or until it expires, when the record
//!   is removed rather than remembered. It is never offered again;
//! - `Declined` records stay until their quarantine ends: the address is in use on the wire
//!   whatever the settings say;
//! - `Offered`, `Released` and `Expired` records for addresses the pool no longer manages for
//!   their client are removed.
//!
//! New records are only made for managed addresses, so the records left over from an earlier
//! range can only shrink, and the bound above holds across any number of changes.
//!
//! All times are seconds passed in by the caller; the pool reads no clock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// How long an offered address is held for the client that was offered it.
pub const OFFER_HOLD_SECS: u64 = 60;
/// How long an address a client declined (RFC 2131 §4.3.3: it found the address in use) stays
/// out of the pool.
pub const DECLINE_QUARANTINE_SECS: u64 = 600;

/// [`OFFER_HOLD_SECS`] under its documented name.
pub const OFFER_HOLD: std::time::Duration = std::time::Duration::from_secs(OFFER_HOLD_SECS);
/// [`DECLINE_QUARANTINE_SECS`] under its documented name.
pub const DECLINE_QUARANTINE: std::time::Duration =
    std::time::Duration::from_secs(DECLINE_QUARANTINE_SECS);

/// A lease's stable identity, shown in the lease table and the security log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub u32);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a client is known: option 61 when present, else `[htype, chaddr…]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientKey(#[serde(with = "hex_bytes")] pub Vec<u8>);

impl ClientKey {
    /// The key of an Ethernet client that sent no client identifier.
    pub fn from_mac(mac: [u8; 6]) -> Self {
        let mut v = Vec::with_capacity(7);
        v.push(1);
        v.extend_from_slice(&mac);
        ClientKey(v)
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text.join(":"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(':')
            .map(|p| {
                u8::from_str_radix(p, 16)
                    .map_err(|_| D::Error::custom(format!("bad hex byte {p:?}")))
            })
            .collect()
    }
}

/// The state of a lease record; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Offered, waiting for the client's REQUEST.
    Offered,
    /// Acknowledged and not expired.
    Bound,
    /// Given back by the client; remembered for stickiness.
    Released,
    /// Ran out; remembered for stickiness.
    Expired,
    /// Declined by the client: quarantined.
    Declined,
}

/// One record of the lease table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Stable identity.
    pub id: LeaseId,
    /// The client's key (see [`ClientKey`]).
    pub client: ClientKey,
    /// The client's hardware address.
    pub mac: [u8; 6],
    /// The address.
    pub ip: Ipv4Addr,
    /// The host name the client sent (option 12), if any.
    pub hostname: Option<String>,
    /// The state.
    pub state: LeaseState,
    /// When the current binding started (Unix seconds).
    pub start: u64,
    /// When the current state ends (Unix seconds): lease expiry, offer timeout, quarantine end.
    pub expires: u64,
    /// Whether the record was ever bound (decides what an unanswered offer falls back to).
    #[serde(default)]
    pub was_bound: bool,
}

impl Lease {
    /// True when the address is free for a client other than the record's own.
    fn frees_address(&self) -> bool {
        matches!(self.state, LeaseState::Released | LeaseState::Expired)
    }
}

/// What a [`LeasePool::bind`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindOutcome {
    /// A new binding.
    Created,
    /// The client's binding was extended.
    Renewed,
}

/// A change to the lease table that the caller reports (security log, persistence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created or renewed by REQUEST.
    Bound(BindOutcome),
    /// Given back by RELEASE.
    Released,
    /// Declined by the client.
    Declined,
    /// Ran out.
    Expired,
}

/// Why an address cannot be bound for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The address is not one this server manages for that client.
    #[error("address is outside the pool")]
    NotInPool,
    /// The address belongs to another client (or is quarantined).
    #[error("address is in use by another client")]
    InUse,
    /// The address is reserved for another client's MAC.
    #[error("address is reserved for another client")]
    Reserved,
    /// The client has a static reservation for another address, and that address is free.
    #[error("the client has a reservation for another address")]
    ReservedElsewhere,
}

/// No address is left to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the address pool is exhausted")]
pub struct PoolExhausted;

/// The lease table. See the module documentation.
#[derive(Debug)]
pub struct LeasePool {
    range_start: u32,
    range_end: u32,
    excluded: Ipv4Addr,
    /// Static reservations: MAC → address, and the reverse.
    statics: HashMap<[u8; 6], Ipv4Addr>,
    static_ips: HashMap<Ipv4Addr, [u8; 6]>,
    by_ip: BTreeMap<Ipv4Addr, Lease>,
    by_client: HashMap<ClientKey, Ipv4Addr>,
    next_id: u32,
}

impl LeasePool {
    /// A pool over `range_start..=range_end`, never handing out `excluded` (the host's own
    /// address), with static reservations `(mac, ip)`.
    pub fn new(
        range_start: Ipv4Addr,
        range_end: Ipv4Addr,
        excluded: Ipv4Addr,
        statics: impl IntoIterator<Item = ([u8; 6], Ipv4Addr)>,
    ) -> Self {
        let mut pool = LeasePool {
            range_start: u32::from(range_start),
            range_end: u32::from(range_end),
            excluded,
            statics: HashMap::new(),
            static_ips: HashMap::new(),
            by_ip: BTreeMap::new(),
            by_client: HashMap::new(),
            next_id: 1,
        };
        pool.reconfigure(range_start, range_end, excluded, statics);
        pool
    }

    /// Swaps in a new range, server address and reservations, keeping every record that still
    /// means something and every binding (see *Reconfiguration* in the module documentation).
    /// Returns true when records were removed, i.e. when the records worth saving changed.
    pub fn reconfigure(
        &mut self,
        range_start: Ipv4Addr,
        range_end: Ipv4Addr,
        excluded: Ipv4Addr,
        statics: impl IntoIterator<Item = ([u8; 6], Ipv4Addr)>,
    ) -> bool {
        self.range_start = u32::from(range_start);
        self.range_end = u32::from(range_end);
        self.excluded = excluded;
        self.statics = statics.into_iter().collect();
        self.static_ips = self.statics.iter().map(|(m, ip)| (*ip, *m)).collect();
        let stale: Vec<Ipv4Addr> = self
            .by_ip
            .values()
            .filter(|l| match l.state {
                LeaseState::Bound | LeaseState::Declined => false,
                LeaseState::Offered => self.check_allowed(&l.client, l.mac, l.ip).is_err(),
                LeaseState::Released | LeaseState::Expired => !self.manages(l.mac, l.ip),
            })
            .map(|l| l.ip)
            .collect();
        for ip in &stale {
            self.remove(*ip);
        }
        !stale.is_empty()
    }

    /// Loads records saved earlier. Records for addresses this pool no longer manages (the
    /// range shrank, a reservation moved) and duplicates are skipped; the number skipped is
    /// returned so the caller can log it.
    pub fn restore(&mut self, leases: impl IntoIterator<Item = Lease>) -> usize {
        let mut skipped = 0;
        for lease in leases {
            if !self.manages(lease.mac, lease.ip)
                || self.by_ip.contains_key(&lease.ip)
                || self.by_client.contains_key(&lease.client)
            {
                skipped += 1;
                continue;
            }
            self.next_id = self.next_id.max(lease.id.0.saturating_add(1));
            self.by_client.insert(lease.client.clone(), lease.ip);
            self.by_ip.insert(lease.ip, lease);
        }
        skipped
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        n >= self.range_start && n <= self.range_end && ip != self.excluded
    }

    /// Whether the pool manages `ip` for a client with hardware address `mac` at all: the
    /// client's reservation, or in the range and nobody's reservation; never the server's own
    /// address. Unlike [`check_allowed`](Self::check_allowed), it does not ask whether the
    /// client should rather have its reservation.
    fn manages(&self, mac: [u8; 6], ip: Ipv4Addr) -> bool {
        if ip == self.excluded {
            return false;
        }
        match self.static_ips.get(&ip) {
            Some(owner) => *owner == mac,
            None => self.in_range(ip),
        }
    }

    /// Whether `ip` may be this client's under the current settings: its reservation; else an
    /// address of the range that is nobody's reservation, provided the client's own reservation
    /// (if any) is held by someone else.
    fn check_allowed(
        &self,
        client: &ClientKey,
        mac: [u8; 6],
        ip: Ipv4Addr,
    ) -> Result<(), BindError> {
        if ip == self.excluded {
            return Err(BindError::NotInPool);
        }
        match self.static_ips.get(&ip) {
            Some(owner) if *owner == mac => return Ok(()),
            Some(_) => return Err(BindError::Reserved),
            None if !self.in_range(ip) => return Err(BindError::NotInPool),
            None => {}
        }
        match self.statics.get(&mac) {
            Some(&reserved)
                if reserved != self.excluded && self.check_free(client, reserved).is_ok() =>
            {
                Err(BindError::ReservedElsewhere)
            }
            _ => Ok(()),
        }
    }

    /// Whether `ip` is free for `client` right now.
    fn check_free(&self, client: &ClientKey, ip: Ipv4Addr) -> Result<(), BindError> {
        match self.by_ip.get(&ip) {
            None => Ok(()),
            Some(l) if &l.client == client && l.state != LeaseState::Declined => Ok(()),
            Some(l) if l.frees_address() => Ok(()),
            Some(_) => Err(BindError::InUse),
        }
    }

    /// The record of a client, if any.
    pub fn get(&self, client: &ClientKey) -> Option<&Lease> {
        self.by_client.get(client).and_then(|ip| self.by_ip.get(ip))
    }

    /// The record for an address, if any.
    pub fn get_by_ip(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// Every record, by address.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Chooses the address to offer: the client's reservation; else its current or previous
    /// address while it may have it and it is free; else `requested` if so; else an address
    /// nobody held; else the address remembered longest for another client. A client whose
    /// reservation is held by another client's live record gets a dynamic address meanwhile.
    /// The choice is held for [`OFFER_HOLD`].
    pub fn offer(
        &mut self,
        client: &ClientKey,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        hostname: Option<&str>,
        now: u64,
    ) -> Result<Ipv4Addr, PoolExhausted> {
        let usable = |pool: &Self, ip: Ipv4Addr| {
            pool.check_allowed(client, mac, ip).is_ok() && pool.check_free(client, ip).is_ok()
        };
        let reservation = self.statics.get(&mac).copied();
        let previous = self
            .get(client)
            .filter(|l| l.state != LeaseState::Declined)
            .map(|l| l.ip);
        let ip = if let Some(ip) = reservation.filter(|ip| usable(self, *ip)) {
            ip
        } else if let Some(ip) = previous.filter(|ip| usable(self, *ip)) {
            ip
        } else if let Some(ip) = requested.filter(|ip| usable(self, *ip)) {
            ip
        } else if let Some(ip) = self.never_held() {
            ip
        } else if let Some(ip) = self.oldest_remembered(client) {
            ip
        } else {
            return Err(PoolExhausted);
        };

        if self
            .by_ip
            .get(&ip)
            .is_some_and(|l| l.client == *client && l.state == LeaseState::Bound)
        {
            // Re-offering a live binding: keep it bound; the REQUEST will renew it.
            return Ok(ip);
        }
        let was_bound = self
            .by_ip
            .get(&ip)
            .is_some_and(|l| l.client == *client && l.was_bound);
        let start = now;
        self.put(Lease {
            id: LeaseId(0),
            client: client.clone(),
            mac,
            ip,
            hostname: hostname.map(str::to_owned),
            state: LeaseState::Offered,
            start,
            expires: now + OFFER_HOLD_SECS,
            was_bound,
        });
        Ok(ip)
    }

    fn never_held(&self) -> Option<Ipv4Addr> {
        (self.range_start..=self.range_end)
            .map(Ipv4Addr::from)
            .find(|ip| {
                *ip != self.excluded
                    && !self.static_ips.contains_key(ip)
                    && !self.by_ip.contains_key(ip)
            })
    }

    fn oldest_remembered(&self, client: &ClientKey) -> Option<Ipv4Addr> {
        self.by_ip
            .values()
            .filter(|l| {
                l.frees_address() && l.client != *client && !self.static_ips.contains_key(&l.ip)
            })
            .filter(|l| self.in_range(l.ip))
            .min_by_key(|l| l.expires)
            .map(|l| l.ip)
    }

    /// Inserts a record for `lease.client` at `lease.ip`, dropping the client's other record
    /// and any record another client had for the address. Keeps the id of a record the same
    /// client had for the same address.
    fn put(&mut self, mut lease: Lease) -> &Lease {
        if let Some(old_ip) = self.by_client.get(&lease.client).copied() {
            if old_ip != lease.ip {
                self.by_ip.remove(&old_ip);
            }
        }
        match self.by_ip.get(&lease.ip) {
            Some(old) if old.client == lease.client => lease.id = old.id,
            Some(old) => {
                let old_client = old.client.clone();
                self.by_client.remove(&old_client);
                lease.id = self.allocate_id();
            }
            None => lease.id = self.allocate_id(),
        }
        self.by_client.insert(lease.client.clone(), lease.ip);
        let ip = lease.ip;
        self.by_ip.insert(ip, lease);
        self.by_ip.get(&ip).expect("invariant: just inserted")
    }

    /// Removes the record of `ip` and its client's index entry.
    fn remove(&mut self, ip: Ipv4Addr) -> Option<Lease> {
        let l = self.by_ip.remove(&ip)?;
        if self.by_client.get(&l.client) == Some(&ip) {
            self.by_client.remove(&l.client);
        }
        Some(l)
    }

    fn allocate_id(&mut self) -> LeaseId {
        let id = LeaseId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Binds `ip` to the client for `lease_secs` (REQUEST → ACK). Fails when the address is
    /// not the client's to have; the caller answers NAK (and calls [`revoke`](Self::revoke)).
    pub fn bind(
        &mut self,
        client: &ClientKey,
        mac: [u8; 6],
        ip: Ipv4Addr,
        hostname: Option<&str>,
        lease_secs: u64,
        now: u64,
    ) -> Result<(Lease, BindOutcome), BindError> {
        self.check_allowed(client, mac, ip)?;
        self.check_free(client, ip)?;
        let renewed = self.by_ip.get(&ip).is_some_and(|l| {
            l.client == *client && l.state == LeaseState::Bound && l.expires > now
        });
        let hostname = hostname.map(str::to_owned).or_else(|| {
            self.by_ip
                .get(&ip)
                .filter(|l| l.client == *client)
                .and_then(|l| l.hostname.clone())
        });
        let start = if renewed {
            self.by_ip.get(&ip).map_or(now, |l| l.start)
        } else {
            now
        };
        let lease = self
            .put(Lease {
                id: LeaseId(0),
                client: client.clone(),
                mac,
                ip,
                hostname,
                state: LeaseState::Bound,
                start,
                expires: now.saturating_add(lease_secs),
                was_bound: true,
            })
            .clone();
        Ok((
            lease,
            if renewed {
                BindOutcome::Renewed
            } else {
                BindOutcome::Created
            },
        ))
    }

    /// Ends the client's binding (or offer) when its address is no longer one the client may
    /// have: the settings changed since (see *Reconfiguration*). The record is removed, not
    /// remembered, so the address is not offered to the client again; it is returned when it
    /// was bound. `mac` is the hardware address the client uses now.
    ///
    /// Call it when refusing the client's REQUEST (NAK) and before offering it an address, so
    /// that no binding ends without an event.
    pub fn revoke(&mut self, client: &ClientKey, mac: [u8; 6]) -> Option<Lease> {
        let ip = *self.by_client.get(client)?;
        let l = self.by_ip.get(&ip)?;
        if !matches!(l.state, LeaseState::Bound | LeaseState::Offered)
            || self.check_allowed(client, mac, ip).is_ok()
        {
            return None;
        }
        self.remove(ip).filter(|l| l.state == LeaseState::Bound)
    }

    /// Forgets an offer the client did not take (it chose another server).
    pub fn withdraw_offer(&mut self, client: &ClientKey) {
        if let Some(ip) = self.by_client.get(client).copied() {
            if let Some(l) = self.by_ip.get_mut(&ip) {
                if l.state == LeaseState::Offered {
                    if l.was_bound {
                        l.state = LeaseState::Expired;
                    } else {
                        self.by_ip.remove(&ip);
                        self.by_client.remove(client);
                    }
                }
            }
        }
    }

    /// RELEASE: the client gives `ip` back. Returns the record as it was when bound.
    pub fn release(&mut self, client: &ClientKey, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        if self.by_ip.get(&ip)?.client != *client {
            return None;
        }
        self.release_ip(ip, now)
    }

    /// Ends the binding of `ip`, whoever holds it, as a RELEASE from its client would (the
    /// operator's release). Returns the record as it was when bound; `None` when `ip` is not
    /// bound. The record is remembered as `Released` (or removed when the pool no longer
    /// manages the address for its client).
    pub fn release_ip(&mut self, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        let l = self.by_ip.get(&ip)?;
        if l.state != LeaseState::Bound {
            return None;
        }
        let before = l.clone();
        if self.manages(l.mac, ip) {
            let l = self.by_ip.get_mut(&ip).expect("invariant: looked up above");
            l.state = LeaseState::Released;
            l.expires = now;
        } else {
            self.remove(ip);
        }
        Some(before)
    }

    /// Moves the end of the offer or binding of `ip` to `expires` (a policy changed the lease
    /// time). Returns the record.
    pub fn set_expiry(&mut self, ip: Ipv4Addr, expires: u64) -> Option<&Lease> {
        let l = self.by_ip.get_mut(&ip)?;
        if !matches!(l.state, LeaseState::Bound | LeaseState::Offered) {
            return None;
        }
        l.expires = expires;
        Some(l)
    }

    /// How many addresses clients with hardware address `mac` other than `client` hold now
    /// (offered or bound).
    pub fn held_by_mac(&self, mac: [u8; 6], client: &ClientKey) -> usize {
        self.by_ip
            .values()
            .filter(|l| {
                l.mac == mac
                    && l.client != *client
                    && matches!(l.state, LeaseState::Offered | LeaseState::Bound)
            })
            .count()
    }

    /// The lowest address bound to a client with hardware address `mac`, if any. (A MAC can
    /// hold more than one binding when clients behind it send different client identifiers.)
    pub fn bound_to_mac(&self, mac: [u8; 6]) -> Option<Ipv4Addr> {
        self.by_ip
            .values()
            .find(|l| l.mac == mac && l.state == LeaseState::Bound)
            .map(|l| l.ip)
    }

    /// DECLINE: the client found `ip` in use. The address is quarantined and the client loses
    /// its record, so its next DISCOVER gets another address.
    pub fn decline(&mut self, client: &ClientKey, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        let l = self.by_ip.get_mut(&ip)?;
        if l.client != *client || !matches!(l.state, LeaseState::Offered | LeaseState::Bound) {
            return None;
        }
        let before = l.clone();
        l.state = LeaseState::Declined;
        l.expires = now + DECLINE_QUARANTINE_SECS;
        self.by_client.remove(client);
        Some(before)
    }

    /// Moves every record whose time is up to its next state. Calls `report` with each bound
    /// lease that expired (the record before the change). A record the pool no longer manages
    /// for its client (the settings changed) is removed instead of remembered. Returns true
    /// when the records worth saving changed.
    pub fn expire(&mut self, now: u64, mut report: impl FnMut(&Lease)) -> bool {
        let due: Vec<Ipv4Addr> = self
            .by_ip
            .values()
            .filter(|l| l.expires <= now && !l.frees_address())
            .map(|l| l.ip)
            .collect();
        let mut changed = false;
        for ip in due {
            let Some(l) = self.by_ip.get(&ip) else {
                continue;
            };
            let remembered = self.manages(l.mac, ip);
            match l.state {
                LeaseState::Bound => {
                    report(l);
                    changed = true;
                    self.forget_or_expire(ip, remembered);
                }
                LeaseState::Offered if l.was_bound => {
                    changed = true;
                    self.forget_or_expire(ip, remembered);
                }
                LeaseState::Offered => {
                    self.remove(ip);
                }
                LeaseState::Declined => {
                    self.remove(ip);
                    changed = true;
                }
                LeaseState::Released | LeaseState::Expired => {}
            }
        }
        changed
    }

    fn forget_or_expire(&mut self, ip: Ipv4Addr, remembered: bool) {
        if !remembered {
            self.remove(ip);
        } else if let Some(l) = self.by_ip.get_mut(&ip) {
            l.state = LeaseState::Expired;
        }
    }

    /// The next time [`expire`](Self::expire) has work to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.by_ip
            .values()
            .filter(|l| !matches!(l.state, LeaseState::Released | LeaseState::Expired))
            .map(|l| l.expires)
            .min()
    }

    /// The records worth saving (everything but pending offers).
    pub fn persistent(&self) -> Vec<Lease> {
        self.by_ip
            .values()
            .filter(|l| l.state != LeaseState::Offered || l.was_bound)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const MAC_C: [u8; 6] = [2, 0, 0, 0, 0, 0xc];

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 30, last)
    }

    fn pool() -> LeasePool {
        LeasePool::new(ip(10), ip(12), ip(1), [])
    }

    #[test]
    fn offers_distinct_addresses_then_exhausts() {
        let mut p = pool();
        let (a, b, c) = (
            ClientKey::from_mac(MAC_A),
            ClientKey::from_mac(MAC_B),
            ClientKey::from_mac(MAC_C),
        );
        assert_eq!(p.offer(&a, MAC_A, None, None, 0), Ok(ip(10)));
        assert_eq!(p.offer(&b, MAC_B, None, None, 0), Ok(ip(11)));
        assert_eq!(p.offer(&c, MAC_C, None, None, 0), Ok(ip(12)));
        let d = ClientKey::from_mac([2, 0, 0, 0, 0, 0xd]);
        assert_eq!(
            p.offer(&d, [2, 0, 0, 0, 0, 0xd], None, None, 0),
            Err(PoolExhausted)
        );
        // Offers time out and free their addresses.
        p.expire(OFFER_HOLD_SECS, |_| {});
        assert!(p.is_empty());
        assert_eq!(
            p.offer(&d, [2, 0, 0, 0, 0, 0xd], None, None, OFFER_HOLD_SECS),
            Ok(ip(10))
        );
    }

    #[test]
    fn repeated_discover_gets_the_same_offer() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        assert_eq!(p.offer(&a, MAC_A, None, None, 0), Ok(ip(10)));
        assert_eq!(p.offer(&a, MAC_A, None, None, 1), Ok(ip(10)));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn requested_address_is_honoured_when_free() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        assert_eq!(p.offer(&a, MAC_A, Some(ip(12)), None, 0), Ok(ip(12)));
        let b = ClientKey::from_mac(MAC_B);
        // Taken by a: b gets the first free one instead.
        assert_eq!(p.offer(&b, MAC_B, Some(ip(12)), None, 0), Ok(ip(10)));
        // Out of range requests are ignored.
        let c = ClientKey::from_mac(MAC_C);
        assert_eq!(p.offer(&c, MAC_C, Some(ip(99)), None, 0), Ok(ip(11)));
    }

    #[test]
    fn bind_renew_release_and_sticky_return() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        let b = ClientKey::from_mac(MAC_B);
        p.offer(&a, MAC_A, None, Some("alpha"), 0).unwrap();
        let (l, o) = p.bind(&a, MAC_A, ip(10), Some("alpha"), 100, 1).unwrap();
        assert_eq!(
            (l.state, o, l.expires, l.hostname.as_deref()),
            (LeaseState::Bound, BindOutcome::Created, 101, Some("alpha"))
        );
        let (l2, o) = p.bind(&a, MAC_A, ip(10), None, 100, 50).unwrap();
        assert_eq!(
            (o, l2.id, l2.expires, l2.start),
            (BindOutcome::Renewed, l.id, 150, 1)
        );
        assert_eq!(
            l2.hostname.as_deref(),
            Some("alpha"),
            "host name kept when not resent"
        );
        // Another client cannot bind a's address.
        assert_eq!(
            p.bind(&b, MAC_B, ip(10), None, 100, 60),
            Err(BindError::InUse)
        );
        assert!(p.release(&a, ip(10), 70).is_some());
        // b prefers a never-held address over a's released one.
        assert_eq!(p.offer(&b, MAC_B, None, None, 71), Ok(ip(11)));
        // a comes back and gets its old address.
        assert_eq!(p.offer(&a, MAC_A, None, None, 72), Ok(ip(10)));
    }

    #[test]
    fn released_address_is_reused_when_nothing_else_is_left() {
        let mut p = LeasePool::new(ip(10), ip(10), ip(1), []);
        let a = ClientKey::from_mac(MAC_A);
        let b = ClientKey::from_mac(MAC_B);
        p.offer(&a, MAC_A, None, None, 0).unwrap();
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap();
        assert_eq!(p.offer(&b, MAC_B, None, None, 1), Err(PoolExhausted));
        p.release(&a, ip(10), 2);
        assert_eq!(p.offer(&b, MAC_B, None, None, 3), Ok(ip(10)));
        assert!(p.get(&a).is_none(), "a's remembered record was taken over");
    }

    #[test]
    fn expiry_reports_bound_leases_and_keeps_them_sticky() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        p.bind(&a, MAC_A, ip(11), None, 100, 0).unwrap();
        assert_eq!(p.next_deadline(), Some(100));
        let mut expired = Vec::new();
        assert!(p.expire(100, |l| expired.push(l.ip)));
        assert_eq!(expired, vec![ip(11)]);
        assert_eq!(p.get(&a).map(|l| l.state), Some(LeaseState::Expired));
        assert_eq!(p.next_deadline(), None);
        assert_eq!(p.offer(&a, MAC_A, None, None, 200), Ok(ip(11)));
    }

    #[test]
    fn decline_quarantines_the_address() {
        let mut p = LeasePool::new(ip(10), ip(11), ip(1), []);
        let a = ClientKey::from_mac(MAC_A);
        p.offer(&a, MAC_A, None, None, 0).unwrap();
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap();
        assert!(p.decline(&a, ip(10), 5).is_some());
        assert_eq!(
            p.offer(&a, MAC_A, None, None, 6),
            Ok(ip(11)),
            "declined address is skipped"
        );
        let b = ClientKey::from_mac(MAC_B);
        assert_eq!(
            p.offer(&b, MAC_B, Some(ip(10)), None, 7),
            Err(PoolExhausted)
        );
        assert_eq!(
            p.bind(&b, MAC_B, ip(10), None, 100, 7),
            Err(BindError::InUse)
        );
        p.expire(5 + DECLINE_QUARANTINE_SECS, |_| {});
        assert_eq!(
            p.bind(&b, MAC_B, ip(10), None, 100, 700).map(|(l, _)| l.ip),
            Ok(ip(10))
        );
    }

    #[test]
    fn static_reservations_are_exclusive() {
        let mut p = LeasePool::new(ip(10), ip(12), ip(1), [(MAC_A, ip(50)), (MAC_B, ip(11))]);
        let a = ClientKey::from_mac(MAC_A);
        let c = ClientKey::from_mac(MAC_C);
        assert_eq!(
            p.offer(&a, MAC_A, Some(ip(10)), None, 0),
            Ok(ip(50)),
            "reservation outside the range"
        );
        assert_eq!(
            p.offer(&c, MAC_C, Some(ip(11)), None, 0),
            Ok(ip(10)),
            "b's reservation is skipped"
        );
        assert_eq!(
            p.bind(&c, MAC_C, ip(11), None, 100, 0),
            Err(BindError::Reserved)
        );
        assert_eq!(
            p.bind(&c, MAC_C, ip(50), None, 100, 0),
            Err(BindError::Reserved)
        );
        assert_eq!(
            p.bind(&c, MAC_C, ip(99), None, 100, 0),
            Err(BindError::NotInPool)
        );
        assert_eq!(
            p.bind(&c, MAC_C, ip(1), None, 100, 0),
            Err(BindError::NotInPool)
        );
    }

    #[test]
    fn restore_skips_records_it_no_longer_manages() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        p.bind(&a, MAC_A, ip(10), Some("a"), 100, 0).unwrap();
        let saved = p.persistent();
        let json = serde_json::to_string(&saved).unwrap();
        let back: Vec<Lease> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let mut q = LeasePool::new(ip(10), ip(20), ip(1), []);
        let mut stray = back[0].clone();
        stray.ip = ip(99);
        stray.client = ClientKey::from_mac(MAC_B);
        assert_eq!(q.restore(back.into_iter().chain([stray])), 1);
        assert_eq!(q.get(&a).map(|l| l.ip), Some(ip(10)));
        // Ids continue after the restored ones.
        let b = ClientKey::from_mac(MAC_B);
        q.offer(&b, MAC_B, None, None, 1).unwrap();
        assert!(q.get(&b).unwrap().id.0 > q.get(&a).unwrap().id.0);
    }

    #[test]
    fn reconfigure_keeps_bindings_and_drops_what_it_no_longer_manages() {
        let mut p = LeasePool::new(ip(10), ip(14), ip(1), []);
        let (a, b, c, d) = (
            ClientKey::from_mac(MAC_A),
            ClientKey::from_mac(MAC_B),
            ClientKey::from_mac(MAC_C),
            ClientKey::from_mac([2, 0, 0, 0, 0, 0xd]),
        );
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap(); // bound
        p.bind(&b, MAC_B, ip(11), None, 100, 0).unwrap();
        p.release(&b, ip(11), 1).unwrap(); // remembered
        p.offer(&c, MAC_C, Some(ip(12)), None, 1).unwrap(); // offered
        p.bind(&d, [2, 0, 0, 0, 0, 0xd], ip(13), None, 100, 0)
            .unwrap();
        p.decline(&d, ip(13), 2).unwrap(); // quarantined
        let id_a = p.get(&a).unwrap().id;

        // The range moves away from all of them.
        assert!(p.reconfigure(ip(20), ip(22), ip(1), []), "records dropped");
        assert_eq!(
            p.get(&a).map(|l| (l.state, l.id)),
            Some((LeaseState::Bound, id_a))
        );
        assert!(
            p.get(&b).is_none(),
            "remembered record outside the range dropped"
        );
        assert!(p.get(&c).is_none(), "offer outside the range withdrawn");
        assert_eq!(
            p.get_by_ip(ip(13)).map(|l| l.state),
            Some(LeaseState::Declined)
        );
        // Nothing more to drop the second time.
        assert!(!p.reconfigure(ip(20), ip(22), ip(1), []));

        // a keeps its address until it renews, then it is refused and revoked.
        assert_eq!(
            p.bind(&a, MAC_A, ip(10), None, 100, 50),
            Err(BindError::NotInPool)
        );
        assert_eq!(p.revoke(&a, MAC_A).map(|l| l.ip), Some(ip(10)));
        assert!(p.get(&a).is_none() && p.get_by_ip(ip(10)).is_none());
        assert_eq!(p.revoke(&a, MAC_A), None, "nothing left to revoke");
        // It is not offered its old address again, even when asking for it.
        assert_eq!(p.offer(&a, MAC_A, Some(ip(10)), None, 51), Ok(ip(20)));
        // New ids continue.
        assert!(p.get(&a).unwrap().id.0 > id_a.0);
    }

    #[test]
    fn a_binding_left_outside_the_range_expires_without_being_remembered() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap();
        p.reconfigure(ip(20), ip(22), ip(1), []);
        let mut expired = Vec::new();
        assert!(p.expire(100, |l| expired.push(l.ip)));
        assert_eq!(expired, vec![ip(10)]);
        assert!(p.is_empty());
        // The same within the range: remembered.
        p.bind(&a, MAC_A, ip(20), None, 100, 200).unwrap();
        p.expire(300, |_| {});
        assert_eq!(p.get(&a).map(|l| l.state), Some(LeaseState::Expired));
    }

    #[test]
    fn revoke_leaves_allowed_bindings_alone() {
        let mut p = pool();
        let a = ClientKey::from_mac(MAC_A);
        assert_eq!(p.revoke(&a, MAC_A), None, "no record");
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap();
        assert_eq!(p.revoke(&a, MAC_A), None);
        assert_eq!(p.get(&a).map(|l| l.state), Some(LeaseState::Bound));
        // An offer that is no longer allowed is removed, but it was no lease.
        let b = ClientKey::from_mac(MAC_B);
        p.offer(&b, MAC_B, None, None, 0).unwrap();
        p.reconfigure(ip(10), ip(12), ip(1), [(MAC_C, ip(11))]);
        assert!(
            p.get(&b).is_none(),
            "offer of an address now reserved withdrawn"
        );
    }

    #[test]
    fn a_new_reservation_moves_its_client_and_its_holder_at_renewal() {
        let mut p = pool();
        let (a, b) = (ClientKey::from_mac(MAC_A), ClientKey::from_mac(MAC_B));
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap();
        p.bind(&b, MAC_B, ip(11), None, 100, 0).unwrap();
        // a's address is now reserved for b.
        p.reconfigure(ip(10), ip(12), ip(1), [(MAC_B, ip(10))]);
        // b keeps its dynamic address while its reservation is bound to a.
        assert_eq!(
            p.bind(&b, MAC_B, ip(11), None, 100, 10).map(|(l, _)| l.ip),
            Ok(ip(11))
        );
        // a's renewal is refused; its record goes.
        assert_eq!(
            p.bind(&a, MAC_A, ip(10), None, 100, 20),
            Err(BindError::Reserved)
        );
        assert!(p.revoke(&a, MAC_A).is_some());
        // Now b's reservation is free: b may no longer keep its dynamic address.
        assert_eq!(
            p.bind(&b, MAC_B, ip(11), None, 100, 30),
            Err(BindError::ReservedElsewhere)
        );
        assert_eq!(p.revoke(&b, MAC_B).map(|l| l.ip), Some(ip(11)));
        assert_eq!(p.offer(&b, MAC_B, None, None, 31), Ok(ip(10)));
        // a gets a dynamic address, never b's reservation.
        assert_eq!(p.offer(&a, MAC_A, Some(ip(10)), None, 32), Ok(ip(11)));
    }

    #[test]
    fn a_client_whose_reservation_is_held_gets_a_dynamic_address_meanwhile() {
        let mut p = pool();
        let (a, b) = (ClientKey::from_mac(MAC_A), ClientKey::from_mac(MAC_B));
        p.bind(&a, MAC_A, ip(12), None, 100, 0).unwrap();
        p.reconfigure(ip(10), ip(12), ip(1), [(MAC_B, ip(12))]);
        assert_eq!(p.offer(&b, MAC_B, None, None, 1), Ok(ip(10)));
        assert_eq!(
            p.bind(&b, MAC_B, ip(10), None, 100, 1).map(|(l, _)| l.ip),
            Ok(ip(10))
        );
    }

    #[test]
    fn removed_reservations_free_their_addresses_for_new_offers() {
        let mut p = LeasePool::new(ip(10), ip(11), ip(1), [(MAC_A, ip(11)), (MAC_B, ip(50))]);
        let (a, b, c) = (
            ClientKey::from_mac(MAC_A),
            ClientKey::from_mac(MAC_B),
            ClientKey::from_mac(MAC_C),
        );
        p.bind(&a, MAC_A, ip(11), None, 100, 0).unwrap();
        p.bind(&b, MAC_B, ip(50), None, 100, 0).unwrap();
        p.offer(&c, MAC_C, None, None, 0).unwrap(); // .10
        assert_eq!(
            p.offer(
                &ClientKey::from_mac([2, 0, 0, 0, 0, 0xd]),
                [2, 0, 0, 0, 0, 0xd],
                None,
                None,
                0
            ),
            Err(PoolExhausted)
        );
        p.reconfigure(ip(10), ip(11), ip(1), []);
        // a's address is in the range: a keeps it, as a dynamic one.
        assert_eq!(
            p.bind(&a, MAC_A, ip(11), None, 100, 10).map(|(_, o)| o),
            Ok(BindOutcome::Renewed)
        );
        // b's was outside: refused at renewal.
        assert_eq!(
            p.bind(&b, MAC_B, ip(50), None, 100, 10),
            Err(BindError::NotInPool)
        );
        // Once a releases, its former reservation goes to anyone.
        p.release(&a, ip(11), 20).unwrap();
        assert_eq!(
            p.offer(
                &ClientKey::from_mac([2, 0, 0, 0, 0, 0xd]),
                [2, 0, 0, 0, 0, 0xd],
                None,
                None,
                21
            ),
            Ok(ip(11))
        );
    }

    #[test]
    fn operator_release_by_address_and_by_mac() {
        let mut p = pool();
        let (a, b) = (ClientKey::from_mac(MAC_A), ClientKey::from_mac(MAC_B));
        p.bind(&a, MAC_A, ip(10), None, 100, 0).unwrap();
        p.offer(&b, MAC_B, None, None, 0).unwrap();
        assert_eq!(p.bound_to_mac(MAC_A), Some(ip(10)));
        assert_eq!(p.bound_to_mac(MAC_B), None, "an offer is not a binding");
        assert_eq!(p.release_ip(ip(11), 5), None, "offers are left alone");
        assert_eq!(p.release_ip(ip(99), 5), None);
        let before = p.release_ip(ip(10), 5).expect("bound");
        assert_eq!((before.state, before.expires), (LeaseState::Bound, 100));
        assert_eq!(p.get(&a).map(|l| l.state), Some(LeaseState::Released));
        assert_eq!(p.bound_to_mac(MAC_A), None);
        assert_eq!(p.release_ip(ip(10), 6), None, "already released");
        // The client may have it back while nobody else took it.
        assert_eq!(
            p.bind(&a, MAC_A, ip(10), None, 100, 7).map(|(_, o)| o),
            Ok(BindOutcome::Created)
        );
    }
}
