//! The DHCP server state machine (RFC 2131), on top of the [lease pool](super::pool).
//!
//! # Theory of operation
//!
//! [`DhcpServer::handle`] takes one parsed client message and returns at most one reply, plus
//! events for the security log and persistence. Per message type:
//!
//! - **DISCOVER** → OFFER of the address [`LeasePool::offer`] picks (held 60 s). A full pool
//!   gets no reply and a [`DhcpEvent::PoolExhausted`].
//! - **REQUEST**, told apart by RFC 2131 §4.3.2:
//!   - *selecting* (server identifier present): ours → bind the requested address, ACK or NAK;
//!     another server's → the client chose it, our offer is withdrawn, no reply;
//!   - *init-reboot* (requested address, no `ciaddr`): an address outside our subnet → NAK;
//!     a client the server has no record of (no lease record, no reservation) → no reply
//!     (RFC 2131 §4.3.2: it "MUST remain silent", so that a server that does not know the
//!     client leaves the answer to one that does); the client's own or a free address that
//!     the settings give the client (see [`LeasePool`]) → ACK; anything else → NAK;
//!   - *renewing/rebinding* (`ciaddr` set): the same test on `ciaddr`.
//! - **RELEASE** → the lease is released (kept for stickiness). No reply.
//! - **DECLINE** → the address is quarantined. No reply.
//!
//! RELEASE and DECLINE of a lease recorded for another MAC are ignored (see *Spoofing*).
//! - **INFORM** → ACK with the configuration options, no address and no lease time, to `ciaddr`.
//!
//! Where replies go (RFC 2131 §4.1): a NAK is broadcast; to `ciaddr` when set; broadcast when
//! the client set the broadcast flag; else unicast to the offered address and the client's
//! MAC (the client cannot ARP yet, so the frame goes to its hardware address directly). (To
//! the relay when `giaddr` is set — but see *Spoofing*: a relayed message comes from the
//! relay's MAC, so it is not served.)
//!
//! # Spoofing
//!
//! On a shared segment anyone can write any `chaddr`. A message that arrives in a frame
//! ([`DhcpServer::handle_from`]) is ignored, counted in [`DhcpCounters::spoofed`] and reported
//! with a [`DhcpEvent::Ignored`] (at most one a second, with the number left out) when:
//!
//! - its `chaddr` is not the frame's Ethernet source MAC. Real clients always send their own
//!   MAC; a relay agent forwards from its own, so relays are not served (hubnat serves the
//!   segment it is on);
//! - its client identifier is a hardware address (type 1, RFC 2132) other than `chaddr`;
//! - it is a RELEASE or DECLINE for a lease recorded for another MAC (a client identifier
//!   learnt from someone else's broadcast DISCOVER).
//!
//! So no client can end, quarantine, renew or take over another client's lease in its name.
//!
//! # Settings
//!
//! The server keeps no copy of its [`DhcpSettings`]: the caller owns them and passes them to
//! every call that answers a client, so a new lease time, router, DNS, domain or route list
//! applies to the very next reply (and a new lease time to every new lease and every renewal,
//! T1 and T2 following it). Whether the server is enabled is the caller's business too: it
//! simply does not call the server while disabled, and nothing is rebuilt either way.
//!
//! What the lease pool must index — the range, the static reservations, and the server's own
//! address and subnet, which never change while the host runs — is set by
//! [`DhcpServer::new`] and changed only by [`DhcpServer::reconfigure`], which keeps every
//! lease and every counter. After a change:
//!
//! - a new range or new reservations apply to new offers at once;
//! - a client bound to an address the settings no longer give it (outside the range, now
//!   reserved for another MAC, or it now has a free reservation elsewhere) keeps the address
//!   until it renews; the renewal gets a NAK and the binding ends with a
//!   [`LeaseEventKind::Revoked`] event, so the client rediscovers and gets an address the new
//!   settings give it. The old address is never offered to it again. A binding that runs out
//!   first just expires;
//! - a client whose new reservation is held by another client's binding gets a dynamic address
//!   until that binding ends.
//!
//! # Operator release
//!
//! [`DhcpServer::release_by_mac`] and [`DhcpServer::release_by_ip`] end a binding as the
//! client's RELEASE would, with a [`LeaseEventKind::ReleasedByOperator`] event. The client is
//! not told (a server cannot push to a client without RFC 3203's FORCERENEW, which needs RFC
//! 3118 authentication that clients rarely do), so it keeps using the address until it renews
//! at T1. The address is free at once but remembered, so new clients take it only when no
//! never-held address is left. When the client renews (or reboots, or rebinds), RFC 2131
//! §4.3.2 has the server NAK a request whose address is *incorrect* for the client (another
//! network, or not the client's to have); a binding that merely ended on the server's side is
//! no such reason while the address is still free, just as after an expiry. So the renewal is
//! ACKed as a new binding ([`LeaseEventKind::Created`]) when the address is still free and
//! still one the settings give the client, and NAKed when another client has it meanwhile (or
//! the settings changed): the client never keeps an address that someone else holds. To take
//! an address away from a client for good, change the settings (a reservation, the range).
//!
//! # Other servers
//!
//! A sidecar shares its segment with whatever else is there. A reply of another DHCP server
//! (UDP from port 67 to port 68, not from the virtual host) that the core sees is handed to
//! [`DhcpServer::saw_reply`]; since a switch (a VPN hub is one) delivers another server's
//! unicast replies only to their client, the core also sends a probe now and then
//! ([`DhcpServer::take_probe`]: a DISCOVER from the virtual host's own MAC every
//! [`PROBE_INTERVAL_SECS`], the first at start; not when authoritative), whose answers come
//! to it. A new server is
//! logged once at `warn` and reported as [`DhcpEvent::OtherServer`]. While one has been seen
//! within [`OTHER_SERVER_HOLD_SECS`], a server that is not authoritative
//! (`dhcp.authoritative = false`, the default) answers no DISCOVER, REQUEST or INFORM
//! (counted in [`DhcpCounters::quiet`]); RELEASE and DECLINE still take effect. Once the other
//! server has been silent for that long, the server answers again (logged at `info`).
//!
//! Clients whose MAC `dhcp.serve_macs` does not list, or `dhcp.ignore_macs` lists, get no
//! answer at all ([`DhcpCounters::not_served`]): the other hosts of a hub keep their own
//! addressing.
//!
//! # Counters
//!
//! [`DhcpCounters`] counts every message handed to the server once by its type (option 53),
//! every reply once by its type, and every message that got no reply and changed no lease
//! once by the reason it was dropped; the RELEASEs and DECLINEs that took effect are the rest
//! (and have their events). Messages that never reach the server (not for us, undecodable,
//! server disabled) are the caller's to count.
//!
//! Times are seconds passed in by the caller (the same clock for every call, since lease
//! expiry times are compared with them); the server reads no clock.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use tracing::{debug, info, warn};

use super::options::{add_config_options, DhcpSettings};
use super::pool::{BindError, BindOutcome, ClientKey, Lease, LeasePool, LeaseState};

/// UDP port of the server.
pub const SERVER_PORT: u16 = 67;
/// UDP port of the client.
pub const CLIENT_PORT: u16 = 68;

/// What happened to a lease, for the security log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEventKind {
    /// A new binding.
    Created,
    /// An existing binding was extended.
    Renewed,
    /// The client gave it back.
    Released,
    /// The operator ended it ([`DhcpServer::release_by_mac`], [`DhcpServer::release_by_ip`]).
    ReleasedByOperator,
    /// The settings no longer give the client this address: the server refused its renewal
    /// (NAK) or offered it another one, and the binding ended.
    Revoked,
    /// The client found the address in use; it is quarantined.
    Declined,
    /// It ran out.
    Expired,
}

impl LeaseEventKind {
    /// The word the security log uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseEventKind::Created => "created",
            LeaseEventKind::Renewed => "renewed",
            LeaseEventKind::Released => "released",
            LeaseEventKind::ReleasedByOperator => "released by operator",
            LeaseEventKind::Revoked => "revoked",
            LeaseEventKind::Declined => "declined",
            LeaseEventKind::Expired => "expired",
        }
    }
}

/// Events of the DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpEvent {
    /// A lease changed state; `lease` is the record after the change (before, for
    /// released/revoked/declined/expired, so its expiry is the one the client had).
    Lease {
        /// What happened.
        kind: LeaseEventKind,
        /// The record.
        lease: Lease,
    },
    /// A message was ignored as spoofed (see *Spoofing* in the module documentation). At most
    /// one a second; `suppressed` counts those left out since the previous one.
    Ignored {
        /// The frame's Ethernet source.
        mac: [u8; 6],
        /// The message's hardware address.
        chaddr: [u8; 6],
        /// Why, in words.
        reason: &'static str,
        /// Messages ignored as spoofed and not reported since the previous event.
        suppressed: u64,
    },
    /// Another DHCP server answers on the segment (reported once, when it is first seen, and
    /// again only if it comes back after it was gone).
    OtherServer {
        /// Its address (option 54, else the IPv4 source of its reply).
        ip: Ipv4Addr,
        /// The Ethernet source of its reply.
        mac: [u8; 6],
        /// Whether this server keeps answering (`dhcp.authoritative`).
        authoritative: bool,
    },
    /// A client could not be offered an address.
    PoolExhausted {
        /// The client's MAC.
        mac: [u8; 6],
    },
    /// A new client was offered nothing: its MAC already holds `dhcp.max_leases_per_mac`
    /// addresses under other client identifiers.
    MacShareFull {
        /// The MAC.
        mac: [u8; 6],
        /// The addresses it holds.
        held: usize,
    },
    /// A DHCP policy changed or withheld a reply.
    Customized {
        /// The client's MAC.
        mac: [u8; 6],
        /// The address of the reply.
        ip: Ipv4Addr,
        /// The policy that decided, if named.
        policy: Option<String>,
        /// What it did, in words.
        what: String,
    },
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTarget {
    /// Destination IP address (255.255.255.255 for broadcast).
    pub ip: Ipv4Addr,
    /// Destination MAC (ff:ff:ff:ff:ff:ff for broadcast).
    pub mac: [u8; 6],
    /// Destination UDP port.
    pub port: u16,
}

/// A reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The message.
    pub msg: Message,
    /// Where it goes.
    pub to: ReplyTarget,
}

/// Counters of the DHCP server; see *Counters* in the module documentation.
///
/// Each message handed to the server is in exactly one of the received counters; each reply
/// in exactly one of the sent counters; each message that got no reply and changed no lease in
/// exactly one of the dropped counters (a REQUEST for another server, which withdraws our
/// offer, is in [`other_server`](Self::other_server)). So `received() == sent() + dropped()`
/// plus the RELEASEs and DECLINEs that took effect.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DhcpCounters {
    /// DHCPDISCOVER received.
    pub discovers: u64,
    /// DHCPREQUEST received.
    pub requests: u64,
    /// DHCPDECLINE received.
    pub declines: u64,
    /// DHCPRELEASE received.
    pub releases: u64,
    /// DHCPINFORM received.
    pub informs: u64,
    /// Messages of any other type received: server messages (OFFER, ACK, NAK), unknown types,
    /// and messages without option 53.
    pub other_types: u64,
    /// DHCPOFFER sent.
    pub offers: u64,
    /// DHCPACK sent (to REQUEST and to INFORM).
    pub acks: u64,
    /// DHCPNAK sent.
    pub naks: u64,
    /// Dropped: not a usable client request — not a BOOTREQUEST, hardware other than
    /// Ethernet, no message type or a type a server does not take, a REQUEST naming no
    /// address, an INFORM without a usable `ciaddr`.
    pub ignored: u64,
    /// Dropped: a REQUEST, RELEASE or DECLINE naming another server in option 54.
    pub other_server: u64,
    /// Dropped: a RELEASE or DECLINE for an address the client holds no lease (or offer) on.
    pub no_lease: u64,
    /// Dropped: a DISCOVER that found no address to offer.
    pub exhausted: u64,
    /// Dropped: a DISCOVER from a new client identifier whose MAC already holds
    /// `dhcp.max_leases_per_mac` addresses.
    pub mac_share_full: u64,
    /// Dropped: `chaddr` is not the frame's source MAC (a spoofed or relayed message), the
    /// client identifier names another hardware address, or a RELEASE or DECLINE is for a
    /// lease recorded for another MAC. See *Spoofing* in the module documentation.
    pub spoofed: u64,
    /// Dropped: an INIT-REBOOT REQUEST from a client the server has no record of (RFC 2131
    /// §4.3.2: no reply).
    pub unknown_client: u64,
    /// Dropped: the client's MAC is not served (`dhcp.serve_macs`, `dhcp.ignore_macs`).
    pub not_served: u64,
    /// Dropped: another DHCP server answers on the segment and this one is not
    /// authoritative (see *Other servers* in the module documentation).
    pub quiet: u64,
    /// Replies of other DHCP servers seen on the segment (not messages to this server: in
    /// no other counter).
    pub other_server_replies: u64,
    /// Probes (DISCOVERs from the virtual host's own MAC) sent to find other servers.
    pub probes: u64,
}

impl DhcpCounters {
    /// Messages handed to the server, any type.
    pub fn received(&self) -> u64 {
        self.discovers
            + self.requests
            + self.declines
            + self.releases
            + self.informs
            + self.other_types
    }

    /// Replies, any type.
    pub fn sent(&self) -> u64 {
        self.offers + self.acks + self.naks
    }

    /// Messages dropped, any reason.
    pub fn dropped(&self) -> u64 {
        self.ignored
            + self.other_server
            + self.no_lease
            + self.exhausted
            + self.mac_share_full
            + self.spoofed
            + self.unknown_client
            + self.not_served
            + self.quiet
    }
}

const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// The virtual DHCP server. It holds the lease table and the counters, and no settings: see
/// *Settings* in the module documentation.
#[derive(Debug)]
pub struct DhcpServer {
    /// The address the server answers as (option 54), set by `new` and `reconfigure`.
    server_ip: Ipv4Addr,
    /// The mask of the segment's subnet, set by `new` and `reconfigure`.
    subnet_mask: Ipv4Addr,
    pool: LeasePool,
    counters: DhcpCounters,
    /// The pool's next deadline, recomputed after every change (the driver asks on every
    /// wake-up; the pool answers in O(leases)).
    deadline: Option<u64>,
    /// When the last [`DhcpEvent::Ignored`] was reported, and how many were left out since.
    last_ignored: Option<u64>,
    ignored_unreported: u64,
    /// Other DHCP servers seen on the segment, at most [`MAX_OTHER_SERVERS`].
    others: Vec<OtherServer>,
    /// When the next probe for other servers is due (0: at once).
    next_probe: u64,
}

/// How often, in seconds, the server looks for other DHCP servers with a probe.
pub const PROBE_INTERVAL_SECS: u64 = 60;
/// How long, in seconds, another server counts as present after its last reply seen.
pub const OTHER_SERVER_HOLD_SECS: u64 = 150;
/// How many other servers are remembered.
pub const MAX_OTHER_SERVERS: usize = 8;

/// Another DHCP server seen on the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OtherServer {
    /// Its address (option 54 of its reply, else the reply's IPv4 source).
    pub ip: Ipv4Addr,
    /// The Ethernet source of its reply.
    #[serde(serialize_with = "ser_mac")]
    pub mac: [u8; 6],
    /// When its last reply was seen (the caller's seconds).
    pub last_seen: u64,
}

fn ser_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&fmt_mac(mac))
}

impl DhcpServer {
    /// A server answering as `server_ip` on the subnet `server_ip/subnet_mask`, managing the
    /// range and reservations of `settings` (the rest of `settings` is read per call).
    pub fn new(settings: &DhcpSettings, server_ip: Ipv4Addr, subnet_mask: Ipv4Addr) -> Self {
        DhcpServer {
            server_ip,
            subnet_mask,
            pool: LeasePool::new(
                settings.range_start,
                settings.range_end,
                server_ip,
                reservations(settings),
            ),
            counters: DhcpCounters::default(),
            deadline: None,
            last_ignored: None,
            ignored_unreported: 0,
            others: Vec::new(),
            next_probe: 0,
        }
    }

    /// Other DHCP servers seen on the segment and still counted as present.
    pub fn other_servers(&self) -> &[OtherServer] {
        &self.others
    }

    /// Whether the server keeps quiet now: another server was seen within
    /// [`OTHER_SERVER_HOLD_SECS`] and `settings.authoritative` is off.
    pub fn is_quiet(&self, settings: &DhcpSettings) -> bool {
        !settings.authoritative && !self.others.is_empty()
    }

    /// When the next probe for other servers is due: only a server that is enabled and not
    /// authoritative probes (an authoritative one answers anyway, and notices other servers
    /// only by their broadcast replies).
    pub fn probe_deadline(&self, settings: &DhcpSettings) -> Option<u64> {
        (settings.enabled && !settings.authoritative).then_some(self.next_probe)
    }

    /// The probe to send at `now`, if one is due: a DISCOVER from `mac` (the virtual host's)
    /// with transaction id `xid`, asking for broadcast replies. The caller sends it from
    /// 0.0.0.0:68 to 255.255.255.255:67 and hands every server reply it sees to
    /// [`saw_reply`](Self::saw_reply).
    pub fn take_probe(
        &mut self,
        settings: &DhcpSettings,
        mac: [u8; 6],
        xid: u32,
        now: u64,
    ) -> Option<Message> {
        if self.probe_deadline(settings).is_none_or(|due| now < due) {
            return None;
        }
        self.next_probe = now + PROBE_INTERVAL_SECS;
        self.counters.probes += 1;
        let mut msg = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        msg.set_xid(xid).set_flags(Flags::default().set_broadcast());
        msg.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        msg.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
        ]));
        debug!(xid, "dhcp: probing the segment for other DHCP servers");
        Some(msg)
    }

    /// A reply of another DHCP server (`server_ip`, from `mac`) was seen on the segment at
    /// `now`: remembered, and reported once (a warning and a [`DhcpEvent::OtherServer`]) when
    /// it is new.
    pub fn saw_reply(
        &mut self,
        settings: &DhcpSettings,
        server_ip: Ipv4Addr,
        mac: [u8; 6],
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) {
        self.counters.other_server_replies += 1;
        if let Some(o) = self
            .others
            .iter_mut()
            .find(|o| o.ip == server_ip && o.mac == mac)
        {
            o.last_seen = now;
            return;
        }
        if self.others.len() >= MAX_OTHER_SERVERS {
            // Full: refresh the oldest entry's place instead of growing.
            if let Some(oldest) = self.others.iter_mut().min_by_key(|o| o.last_seen) {
                *oldest = OtherServer {
                    ip: server_ip,
                    mac,
                    last_seen: now,
                };
            }
            return;
        }
        self.others.push(OtherServer {
            ip: server_ip,
            mac,
            last_seen: now,
        });
        if settings.authoritative {
            warn!(
                server = %server_ip,
                mac = %fmt_mac(&mac),
                "dhcp: another DHCP server answers on the segment; dhcp.authoritative is on, so \
                 hubnat answers too (clients take whichever offer comes first)"
            );
        } else {
            warn!(
                server = %server_ip,
                mac = %fmt_mac(&mac),
                "dhcp: another DHCP server answers on the segment; hubnat stays quiet while it \
                 does (set dhcp.authoritative = true to answer anyway)"
            );
        }
        events.push_back(DhcpEvent::OtherServer {
            ip: server_ip,
            mac,
            authoritative: settings.authoritative,
        });
    }

    /// Takes a change of the range or the static reservations (and of the server's address,
    /// should it ever change) into account. Every binding, every other record that still means
    /// something, and every counter is kept; see *Settings* in the module documentation for
    /// what changes for clients. Call it after any change of `settings.range_start`,
    /// `range_end` or `statics`; the other settings need no call, they are read per message.
    ///
    /// Returns true when records were dropped (remembered or offered addresses the pool no
    /// longer manages), i.e. when the lease table to save changed.
    pub fn reconfigure(
        &mut self,
        settings: &DhcpSettings,
        server_ip: Ipv4Addr,
        subnet_mask: Ipv4Addr,
    ) -> bool {
        self.server_ip = server_ip;
        self.subnet_mask = subnet_mask;
        let changed = self.pool.reconfigure(
            settings.range_start,
            settings.range_end,
            server_ip,
            reservations(settings),
        );
        self.deadline = self.pool.next_deadline();
        changed
    }

    /// The lease table.
    pub fn pool(&self) -> &LeasePool {
        &self.pool
    }

    /// Every record of the lease table, by address, for the control API: each with its MAC,
    /// address, host name, state, start and expiry. Bound leases are the records in state
    /// [`Bound`](super::pool::LeaseState::Bound); the others are offers, remembered records
    /// and quarantined addresses.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.pool.iter()
    }

    /// Loads saved leases; returns how many were skipped (no longer manageable).
    pub fn restore(&mut self, leases: Vec<Lease>) -> usize {
        let skipped = self.pool.restore(leases);
        self.deadline = self.pool.next_deadline();
        skipped
    }

    /// A policy changed the lease time of the offer or binding of `ip`, which started `now`:
    /// the lease table's expiry follows, so the client and the stored lease agree.
    pub fn set_lease_time(&mut self, ip: Ipv4Addr, secs: u32, now: u64) -> Option<Lease> {
        let lease = self.pool.set_expiry(ip, now + u64::from(secs)).cloned();
        self.deadline = self.pool.next_deadline();
        lease
    }

    /// A policy withheld the ACK for `ip`: the binding it made ends (released, remembered),
    /// as if the client had given it back.
    pub fn withhold(&mut self, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        let lease = self.pool.release_ip(ip, now);
        self.deadline = self.pool.next_deadline();
        lease
    }

    /// The counters.
    pub fn counters(&self) -> DhcpCounters {
        self.counters
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        crate::core::subnet::Subnet::from_mask(self.server_ip, self.subnet_mask)
            .is_ok_and(|s| s.contains(ip))
    }

    /// Handles one message from a client under `settings`, with no frame to check it against
    /// (its sender is taken to be its `chaddr`). Returns the reply to send, if any; pushes
    /// events. The caller checks `settings.enabled` first.
    pub fn handle(
        &mut self,
        settings: &DhcpSettings,
        msg: &Message,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        let reply = self.handle_message(settings, msg, None, now, events);
        self.deadline = self.pool.next_deadline();
        reply
    }

    /// Handles a message carried in a frame from `frame_src`: like [`handle`](Self::handle),
    /// but a message whose `chaddr` is not `frame_src` is ignored (see *Spoofing* in the
    /// module documentation).
    pub fn handle_from(
        &mut self,
        settings: &DhcpSettings,
        msg: &Message,
        frame_src: [u8; 6],
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        let reply = self.handle_message(settings, msg, Some(frame_src), now, events);
        self.deadline = self.pool.next_deadline();
        reply
    }

    /// Why `c` is to be ignored as spoofed, if it is.
    fn spoofing(&self, c: &ClientView, msg: &Message) -> Option<&'static str> {
        if c.frame_src != c.mac {
            return Some("chaddr is not the frame's source MAC");
        }
        if let Some(DhcpOption::ClientIdentifier(id)) = msg.opts().get(OptionCode::ClientIdentifier)
        {
            if id.len() == 7 && id[0] == 1 && id[1..] != c.mac {
                return Some("the client identifier names another hardware address");
            }
        }
        if matches!(c.msg_type, MessageType::Release | MessageType::Decline)
            && self.pool.get(&c.key).is_some_and(|l| l.mac != c.mac)
        {
            return Some("RELEASE or DECLINE of a lease bound to another MAC");
        }
        None
    }

    /// Counts a spoofed message and reports it, at most once a second.
    fn ignore_spoofed(
        &mut self,
        c: &ClientView,
        reason: &'static str,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) {
        self.counters.spoofed += 1;
        debug!(frame_src = %fmt_mac(&c.frame_src), "dhcp: message ignored: {reason}");
        if self.last_ignored.is_some_and(|t| now < t + 1) {
            self.ignored_unreported += 1;
            return;
        }
        self.last_ignored = Some(now);
        warn!(
            mac = %fmt_mac(&c.frame_src),
            chaddr = %fmt_mac(&c.mac),
            "dhcp: message ignored: {reason}"
        );
        events.push_back(DhcpEvent::Ignored {
            mac: c.frame_src,
            chaddr: c.mac,
            reason,
            suppressed: std::mem::take(&mut self.ignored_unreported),
        });
    }

    fn count_received(&mut self, msg: &Message) {
        let c = &mut self.counters;
        match msg.opts().msg_type() {
            Some(MessageType::Discover) => c.discovers += 1,
            Some(MessageType::Request) => c.requests += 1,
            Some(MessageType::Decline) => c.declines += 1,
            Some(MessageType::Release) => c.releases += 1,
            Some(MessageType::Inform) => c.informs += 1,
            _ => c.other_types += 1,
        }
    }

    fn handle_message(
        &mut self,
        settings: &DhcpSettings,
        msg: &Message,
        frame_src: Option<[u8; 6]>,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        self.count_received(msg);
        let Some(client) = ClientView::parse(msg, frame_src) else {
            self.counters.ignored += 1;
            debug!(
                xid = msg.xid(),
                "dhcp: ignored malformed or non-request message"
            );
            return None;
        };
        let span = tracing::debug_span!("dhcp", mac = %fmt_mac(&client.mac), xid = msg.xid());
        let _enter = span.enter();
        if let Some(reason) = self.spoofing(&client, msg) {
            self.ignore_spoofed(&client, reason, now, events);
            return None;
        }
        if !settings.serves(client.mac) {
            self.counters.not_served += 1;
            debug!("dhcp: message ignored: the MAC is not served (dhcp.serve_macs/ignore_macs)");
            return None;
        }
        if self.is_quiet(settings)
            && matches!(
                client.msg_type,
                MessageType::Discover | MessageType::Request | MessageType::Inform
            )
        {
            self.counters.quiet += 1;
            debug!("dhcp: message not answered: another DHCP server answers on the segment");
            return None;
        }
        match client.msg_type {
            MessageType::Discover => self.discover(settings, msg, &client, now, events),
            MessageType::Request => self.request(settings, msg, &client, now, events),
            MessageType::Release => {
                if client.server_id.is_some_and(|s| s != self.server_ip) {
                    self.counters.other_server += 1;
                    return None;
                }
                match self.pool.release(&client.key, msg.ciaddr(), now) {
                    Some(lease) => events.push_back(DhcpEvent::Lease {
                        kind: LeaseEventKind::Released,
                        lease,
                    }),
                    None => self.counters.no_lease += 1,
                }
                None
            }
            MessageType::Decline => {
                if client.server_id.is_some_and(|s| s != self.server_ip) {
                    self.counters.other_server += 1;
                    return None;
                }
                let ip = client.requested.unwrap_or(msg.ciaddr());
                match self.pool.decline(&client.key, ip, now) {
                    Some(lease) => {
                        warn!(ip = %ip, "dhcp: client declined the address (in use on the segment); quarantined");
                        events.push_back(DhcpEvent::Lease {
                            kind: LeaseEventKind::Declined,
                            lease,
                        });
                    }
                    None => self.counters.no_lease += 1,
                }
                None
            }
            MessageType::Inform => {
                let ciaddr = msg.ciaddr();
                if ciaddr.is_unspecified() || !self.in_subnet(ciaddr) {
                    self.counters.ignored += 1;
                    return None;
                }
                let mut reply = self.reply_base(msg, MessageType::Ack);
                add_config_options(
                    reply.opts_mut(),
                    settings,
                    client.prl.as_deref(),
                    None,
                    None,
                );
                self.counters.acks += 1;
                Some(self.address(msg, reply, Ipv4Addr::UNSPECIFIED, &client))
            }
            _ => {
                self.counters.ignored += 1;
                None
            }
        }
    }

    fn discover(
        &mut self,
        settings: &DhcpSettings,
        msg: &Message,
        c: &ClientView,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        // A binding the settings no longer give the client ends here, with an event, before
        // the client is offered another address.
        self.revoke(c, events);
        let own = self
            .pool
            .get(&c.key)
            .is_some_and(|l| matches!(l.state, LeaseState::Offered | LeaseState::Bound));
        let held = self.pool.held_by_mac(c.mac, &c.key);
        if !own && held >= settings.max_leases_per_mac {
            // One machine changing its client identifier would otherwise take address after
            // address: its share is full.
            self.counters.mac_share_full += 1;
            debug!(
                mac = %fmt_mac(&c.mac),
                held,
                "dhcp: no offer: the MAC holds dhcp.max_leases_per_mac addresses"
            );
            events.push_back(DhcpEvent::MacShareFull { mac: c.mac, held });
            return None;
        }
        match self
            .pool
            .offer(&c.key, c.mac, c.requested, c.hostname.as_deref(), now)
        {
            Ok(ip) => {
                let mut reply = self.reply_base(msg, MessageType::Offer);
                reply.set_yiaddr(ip);
                add_lease_options(&mut reply, settings, c);
                self.counters.offers += 1;
                debug!(ip = %ip, "dhcp: offer");
                Some(self.address(msg, reply, ip, c))
            }
            Err(e) => {
                self.counters.exhausted += 1;
                warn!(
                    range_start = %settings.range_start,
                    range_end = %settings.range_end,
                    "dhcp: no address for client {}: {e} (every address is bound, offered or quarantined)",
                    fmt_mac(&c.mac)
                );
                events.push_back(DhcpEvent::PoolExhausted { mac: c.mac });
                None
            }
        }
    }

    fn request(
        &mut self,
        settings: &DhcpSettings,
        msg: &Message,
        c: &ClientView,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        let mut init_reboot = false;
        let ip = if let Some(server_id) = c.server_id {
            if server_id != self.server_ip {
                debug!(server = %server_id, "dhcp: client chose another server");
                self.counters.other_server += 1;
                self.pool.withdraw_offer(&c.key);
                return None;
            }
            c.requested.unwrap_or(msg.ciaddr())
        } else if !msg.ciaddr().is_unspecified() {
            msg.ciaddr()
        } else if let Some(ip) = c.requested {
            init_reboot = true;
            ip
        } else {
            self.counters.ignored += 1;
            return None;
        };
        if ip.is_unspecified() {
            self.counters.ignored += 1;
            return None;
        }
        if !self.in_subnet(ip) {
            self.revoke(c, events);
            return Some(self.nak(msg, c, ip, "the address is not on this segment's subnet"));
        }
        if init_reboot
            && self.pool.get(&c.key).is_none()
            && !settings.statics.iter().any(|r| r.mac == c.mac)
        {
            // RFC 2131 §4.3.2: a server with no record of the client "MUST remain silent".
            debug!(requested = %ip, "dhcp: INIT-REBOOT from a client with no record; no reply");
            self.counters.unknown_client += 1;
            return None;
        }
        let lease_secs = settings.lease.as_secs();
        match self
            .pool
            .bind(&c.key, c.mac, ip, c.hostname.as_deref(), lease_secs, now)
        {
            Ok((lease, outcome)) => {
                let kind = match outcome {
                    BindOutcome::Created => LeaseEventKind::Created,
                    BindOutcome::Renewed => LeaseEventKind::Renewed,
                };
                info!(ip = %ip, hostname = lease.hostname.as_deref().unwrap_or(""), "dhcp: lease {}", kind.as_str());
                events.push_back(DhcpEvent::Lease { kind, lease });
                let mut reply = self.reply_base(msg, MessageType::Ack);
                reply.set_yiaddr(ip);
                reply.set_ciaddr(msg.ciaddr());
                add_lease_options(&mut reply, settings, c);
                self.counters.acks += 1;
                Some(self.address(msg, reply, ip, c))
            }
            Err(e) => {
                let reason = match e {
                    BindError::NotInPool => "the address is not in the pool",
                    BindError::InUse => "the address is in use by another client",
                    BindError::Reserved => "the address is reserved for another client",
                    BindError::ReservedElsewhere => {
                        "the client has a reservation for another address"
                    }
                };
                self.revoke(c, events);
                Some(self.nak(msg, c, ip, reason))
            }
        }
    }

    /// Ends the client's binding if the settings no longer give it its address.
    fn revoke(&mut self, c: &ClientView, events: &mut VecDeque<DhcpEvent>) {
        if let Some(lease) = self.pool.revoke(&c.key, c.mac) {
            info!(ip = %lease.ip, "dhcp: lease revoked: the settings no longer give the client this address");
            events.push_back(DhcpEvent::Lease {
                kind: LeaseEventKind::Revoked,
                lease,
            });
        }
    }

    fn nak(&mut self, msg: &Message, c: &ClientView, ip: Ipv4Addr, reason: &str) -> Reply {
        info!(requested = %ip, "dhcp: NAK: {reason}");
        self.counters.naks += 1;
        let mut reply = self.reply_base(msg, MessageType::Nak);
        reply
            .opts_mut()
            .insert(DhcpOption::Message(reason.to_owned()));
        // RFC 2131 §4.1: a NAK is broadcast unless it goes through a relay, which broadcasts it.
        let mut reply = self.address(msg, reply, Ipv4Addr::UNSPECIFIED, c);
        if msg.giaddr().is_unspecified() {
            reply.to = ReplyTarget {
                ip: Ipv4Addr::BROADCAST,
                mac: BROADCAST_MAC,
                port: CLIENT_PORT,
            };
        } else {
            reply.msg.set_flags(Flags::default().set_broadcast());
        }
        reply
    }

    fn reply_base(&self, req: &Message, kind: MessageType) -> Message {
        let mut m = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            req.giaddr(),
            &req.chaddr()[..usize::from(req.hlen()).min(16)],
        );
        m.set_opcode(Opcode::BootReply);
        m.set_htype(req.htype());
        m.set_flags(req.flags());
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.server_ip));
        // RFC 6842: echo the client identifier.
        if let Some(DhcpOption::ClientIdentifier(id)) = req.opts().get(OptionCode::ClientIdentifier)
        {
            opts.insert(DhcpOption::ClientIdentifier(id.clone()));
        }
        m
    }

    /// Chooses the destination of `reply` per RFC 2131 §4.1.
    fn address(&self, req: &Message, reply: Message, yiaddr: Ipv4Addr, c: &ClientView) -> Reply {
        let to = if !req.giaddr().is_unspecified() {
            ReplyTarget {
                ip: req.giaddr(),
                mac: c.frame_src,
                port: SERVER_PORT,
            }
        } else if !req.ciaddr().is_unspecified() {
            ReplyTarget {
                ip: req.ciaddr(),
                mac: c.frame_src,
                port: CLIENT_PORT,
            }
        } else if req.flags().broadcast() || yiaddr.is_unspecified() {
            ReplyTarget {
                ip: Ipv4Addr::BROADCAST,
                mac: BROADCAST_MAC,
                port: CLIENT_PORT,
            }
        } else {
            ReplyTarget {
                ip: yiaddr,
                mac: c.mac,
                port: CLIENT_PORT,
            }
        };
        Reply { msg: reply, to }
    }

    /// Moves leases whose time is up along; pushes an event per expired binding. Returns true
    /// when the table changed.
    pub fn handle_timeout(&mut self, now: u64, events: &mut VecDeque<DhcpEvent>) -> bool {
        let changed = self.pool.expire(now, |lease| {
            info!(mac = %fmt_mac(&lease.mac), ip = %lease.ip, "dhcp: lease expired");
            events.push_back(DhcpEvent::Lease {
                kind: LeaseEventKind::Expired,
                lease: lease.clone(),
            });
        });
        self.deadline = self.pool.next_deadline();
        self.others.retain(|o| {
            let present = now < o.last_seen + OTHER_SERVER_HOLD_SECS;
            if !present {
                info!(
                    server = %o.ip,
                    mac = %fmt_mac(&o.mac),
                    "dhcp: the other DHCP server has not been seen for a while; answering again"
                );
            }
            present
        });
        changed
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work (seconds, the caller's
    /// clock).
    pub fn next_deadline(&self) -> Option<u64> {
        let others = self
            .others
            .iter()
            .map(|o| o.last_seen + OTHER_SERVER_HOLD_SECS)
            .min();
        [self.deadline, others].into_iter().flatten().min()
    }

    /// The operator's release of the lease bound to `mac` (the control API's
    /// `dhcp release MAC`): ends it as a client RELEASE would and pushes a
    /// [`LeaseEventKind::ReleasedByOperator`] event; see *Operator release* in the module
    /// documentation for what the client sees. Returns the lease as it was, or `None` when
    /// `mac` holds no bound lease (offers, remembered and quarantined records are left alone).
    ///
    /// A MAC holds more than one binding only when clients behind it send different client
    /// identifiers; each call then releases the one with the lowest address: call again until
    /// `None` to release them all.
    pub fn release_by_mac(
        &mut self,
        mac: [u8; 6],
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Lease> {
        let ip = self.pool.bound_to_mac(mac)?;
        self.release_by_ip(ip, now, events)
    }

    /// The operator's release of the lease bound at `ip` (the control API's
    /// `dhcp release IP`); otherwise as [`release_by_mac`](Self::release_by_mac).
    pub fn release_by_ip(
        &mut self,
        ip: Ipv4Addr,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Lease> {
        let lease = self.pool.release_ip(ip, now)?;
        info!(mac = %fmt_mac(&lease.mac), ip = %ip, "dhcp: lease released by operator");
        events.push_back(DhcpEvent::Lease {
            kind: LeaseEventKind::ReleasedByOperator,
            lease: lease.clone(),
        });
        self.deadline = self.pool.next_deadline();
        Some(lease)
    }
}

/// The static reservations of `settings` as the pool indexes them.
fn reservations(settings: &DhcpSettings) -> impl Iterator<Item = ([u8; 6], Ipv4Addr)> + '_ {
    settings.statics.iter().map(|r| (r.mac, r.ip))
}

/// Adds the options of an OFFER or ACK: the configuration under `settings`, its lease time,
/// and the host name of the client's static reservation, if any.
fn add_lease_options(reply: &mut Message, settings: &DhcpSettings, c: &ClientView) {
    let static_name = settings
        .statics
        .iter()
        .find(|r| r.mac == c.mac)
        .and_then(|r| r.hostname.as_deref());
    add_config_options(
        reply.opts_mut(),
        settings,
        c.prl.as_deref(),
        Some(settings.lease),
        static_name,
    );
}

/// What the server needs from a client message, validated.
struct ClientView {
    msg_type: MessageType,
    key: ClientKey,
    mac: [u8; 6],
    /// The Ethernet source of the frame that carried the message (the relay, or the client).
    frame_src: [u8; 6],
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    hostname: Option<String>,
    prl: Option<Vec<OptionCode>>,
}

impl ClientView {
    /// The view of `msg`, which came in a frame from `frame_src` (`None`: from its `chaddr`).
    fn parse(msg: &Message, frame_src: Option<[u8; 6]>) -> Option<ClientView> {
        if msg.opcode() != Opcode::BootRequest || msg.htype() != HType::Eth || msg.hlen() != 6 {
            return None;
        }
        let msg_type = msg.opts().msg_type()?;
        let mac: [u8; 6] = msg.chaddr().get(..6)?.try_into().ok()?;
        let opts = msg.opts();
        let key = match opts.get(OptionCode::ClientIdentifier) {
            Some(DhcpOption::ClientIdentifier(id)) if !id.is_empty() => ClientKey(id.clone()),
            _ => ClientKey::from_mac(mac),
        };
        let requested = match opts.get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match opts.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let hostname = match opts.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => sanitize_hostname(h),
            _ => None,
        };
        let prl = match opts.get(OptionCode::ParameterRequestList) {
            Some(DhcpOption::ParameterRequestList(list)) => Some(list.clone()),
            _ => None,
        };
        Some(ClientView {
            msg_type,
            key,
            mac,
            frame_src: frame_src.unwrap_or(mac),
            requested,
            server_id,
            hostname,
            prl,
        })
    }
}

/// Keeps a client's host name only if it is a plausible DNS label sequence, at most 63 bytes;
/// it goes into logs and tables, so nothing else is let through.
fn sanitize_hostname(name: &str) -> Option<String> {
    let name = name.trim_end_matches('\0').trim();
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then(|| name.to_owned())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}
