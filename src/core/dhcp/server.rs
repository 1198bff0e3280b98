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
//!     the client's own or a free address in the pool → ACK; anything else → NAK;
//!   - *renewing/rebinding* (`ciaddr` set): the same test on `ciaddr`.
//! - **RELEASE** → the lease is released (kept for stickiness). No reply.
//! - **DECLINE** → the address is quarantined. No reply.
//! - **INFORM** → ACK with the configuration options, no address and no lease time, to `ciaddr`.
//!
//! Where replies go (RFC 2131 §4.1): to the relay when `giaddr` is set; a NAK is broadcast;
//! to `ciaddr` when set; broadcast when the client set the broadcast flag; else unicast to the
//! offered address and the client's MAC (the client cannot ARP yet, so the frame goes to its
//! hardware address directly).
//!
//! Times are Unix seconds passed in by the caller.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use tracing::{debug, info, warn};

use super::options::{add_config_options, DhcpSettings};
use super::pool::{BindError, BindOutcome, ClientKey, Lease, LeasePool};

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
            LeaseEventKind::Declined => "declined",
            LeaseEventKind::Expired => "expired",
        }
    }
}

/// Events of the DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpEvent {
    /// A lease changed state; `lease` is the record after the change (before, for
    /// released/declined/expired, so its expiry is the one the client had).
    Lease {
        /// What happened.
        kind: LeaseEventKind,
        /// The record.
        lease: Lease,
    },
    /// A client could not be offered an address.
    PoolExhausted {
        /// The client's MAC.
        mac: [u8; 6],
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

/// Counters of the DHCP server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DhcpCounters {
    /// Messages handled (any type).
    pub received: u64,
    /// Messages ignored as malformed or not for a server.
    pub ignored: u64,
    /// OFFERs sent.
    pub offers: u64,
    /// ACKs sent.
    pub acks: u64,
    /// NAKs sent.
    pub naks: u64,
    /// DISCOVERs that found the pool full.
    pub exhausted: u64,
}

const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// The virtual DHCP server.
#[derive(Debug)]
pub struct DhcpServer {
    settings: DhcpSettings,
    server_ip: Ipv4Addr,
    subnet_mask: Ipv4Addr,
    pool: LeasePool,
    static_names: HashMap<[u8; 6], String>,
    counters: DhcpCounters,
    /// The pool's next deadline, recomputed after every change (the driver asks on every
    /// wake-up; the pool answers in O(leases)).
    deadline: Option<u64>,
}

impl DhcpServer {
    /// A server answering as `server_ip` on the subnet `server_ip/subnet_mask`.
    pub fn new(settings: DhcpSettings, server_ip: Ipv4Addr, subnet_mask: Ipv4Addr) -> Self {
        let pool = LeasePool::new(
            settings.range_start,
            settings.range_end,
            server_ip,
            settings.statics.iter().map(|r| (r.mac, r.ip)),
        );
        let static_names = settings
            .statics
            .iter()
            .filter_map(|r| r.hostname.clone().map(|h| (r.mac, h)))
            .collect();
        DhcpServer {
            settings,
            server_ip,
            subnet_mask,
            pool,
            static_names,
            counters: DhcpCounters::default(),
            deadline: None,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &DhcpSettings {
        &self.settings
    }

    /// The lease table.
    pub fn pool(&self) -> &LeasePool {
        &self.pool
    }

    /// Loads saved leases; returns how many were skipped (no longer manageable).
    pub fn restore(&mut self, leases: Vec<Lease>) -> usize {
        let skipped = self.pool.restore(leases);
        self.deadline = self.pool.next_deadline();
        skipped
    }

    /// The counters.
    pub fn counters(&self) -> DhcpCounters {
        self.counters
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.subnet_mask);
        u32::from(ip) & m == u32::from(self.server_ip) & m
    }

    /// Handles one message from a client. Returns the reply to send, if any; pushes events.
    pub fn handle(
        &mut self,
        msg: &Message,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        let reply = self.handle_message(msg, now, events);
        self.deadline = self.pool.next_deadline();
        reply
    }

    fn handle_message(
        &mut self,
        msg: &Message,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        self.counters.received += 1;
        let Some(client) = ClientView::parse(msg) else {
            self.counters.ignored += 1;
            debug!(
                xid = msg.xid(),
                "dhcp: ignored malformed or non-request message"
            );
            return None;
        };
        let span = tracing::debug_span!("dhcp", mac = %fmt_mac(&client.mac), xid = msg.xid());
        let _enter = span.enter();
        match client.msg_type {
            MessageType::Discover => self.discover(msg, &client, now, events),
            MessageType::Request => self.request(msg, &client, now, events),
            MessageType::Release => {
                if client.server_id.is_some_and(|s| s != self.server_ip) {
                    return None;
                }
                if let Some(lease) = self.pool.release(&client.key, msg.ciaddr(), now) {
                    events.push_back(DhcpEvent::Lease {
                        kind: LeaseEventKind::Released,
                        lease,
                    });
                }
                None
            }
            MessageType::Decline => {
                if client.server_id.is_some_and(|s| s != self.server_ip) {
                    return None;
                }
                let ip = client.requested.unwrap_or(msg.ciaddr());
                if let Some(lease) = self.pool.decline(&client.key, ip, now) {
                    warn!(ip = %ip, "dhcp: client declined the address (in use on the segment); quarantined");
                    events.push_back(DhcpEvent::Lease {
                        kind: LeaseEventKind::Declined,
                        lease,
                    });
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
                    &self.settings,
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
        msg: &Message,
        c: &ClientView,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        match self
            .pool
            .offer(&c.key, c.mac, c.requested, c.hostname.as_deref(), now)
        {
            Ok(ip) => {
                let mut reply = self.reply_base(msg, MessageType::Offer);
                reply.set_yiaddr(ip);
                self.add_lease_options(&mut reply, c);
                self.counters.offers += 1;
                debug!(ip = %ip, "dhcp: offer");
                Some(self.address(msg, reply, ip, c))
            }
            Err(e) => {
                self.counters.exhausted += 1;
                warn!(
                    range_start = %self.settings.range_start,
                    range_end = %self.settings.range_end,
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
        msg: &Message,
        c: &ClientView,
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        let ip = if let Some(server_id) = c.server_id {
            if server_id != self.server_ip {
                debug!(server = %server_id, "dhcp: client chose another server");
                self.pool.withdraw_offer(&c.key);
                return None;
            }
            c.requested.unwrap_or(msg.ciaddr())
        } else if !msg.ciaddr().is_unspecified() {
            msg.ciaddr()
        } else if let Some(ip) = c.requested {
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
            return Some(self.nak(msg, c, ip, "the address is not on this segment's subnet"));
        }
        let lease_secs = self.settings.lease.as_secs();
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
                self.add_lease_options(&mut reply, c);
                self.counters.acks += 1;
                Some(self.address(msg, reply, ip, c))
            }
            Err(e) => {
                let reason = match e {
                    BindError::NotInPool => "the address is not in the pool",
                    BindError::InUse => "the address is in use by another client",
                    BindError::Reserved => "the address is reserved for another client",
                };
                Some(self.nak(msg, c, ip, reason))
            }
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

    fn add_lease_options(&self, reply: &mut Message, c: &ClientView) {
        let static_name = self.static_names.get(&c.mac).map(String::as_str);
        add_config_options(
            reply.opts_mut(),
            &self.settings,
            c.prl.as_deref(),
            Some(self.settings.lease),
            static_name,
        );
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
        changed
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work (Unix seconds).
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadline
    }
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
    fn parse(msg: &Message) -> Option<ClientView> {
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
            frame_src: mac,
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

impl DhcpServer {
    /// Handles a message carried in a frame from `frame_src`: like [`handle`](Self::handle),
    /// but replies to a relay go back to the MAC the message came from.
    pub fn handle_from(
        &mut self,
        msg: &Message,
        frame_src: [u8; 6],
        now: u64,
        events: &mut VecDeque<DhcpEvent>,
    ) -> Option<Reply> {
        let mut reply = self.handle(msg, now, events)?;
        if (!msg.giaddr().is_unspecified() || !msg.ciaddr().is_unspecified())
            && reply.to.mac != BROADCAST_MAC
        {
            reply.to.mac = frame_src;
        }
        Some(reply)
    }
}
