//! The DHCP policy hook: a [`DhcpPolicy`] sees each OFFER, ACK (and INFORM answer) before it
//! leaves, with what the client asked, and may change its options and lease time, or withhold
//! it.
//!
//! # Theory of operation
//!
//! When the server has built a reply to a DISCOVER, a REQUEST or an INFORM, the core gives the
//! policy a [`DhcpClientInfo`] (from the client's message) and a [`DhcpReplyInfo`] (the reply's
//! address, lease time and options, without 53 and 54). The policy decides now or later
//! ([`DhcpAnswer::Later`]; the reply waits in the core, at most [`MAX_PENDING_REPLIES`] of them
//! and none longer than [`DECISION_TIMEOUT`], then it is dropped and the client retries). The
//! [`DhcpDecision`] is applied by [`apply`]: options set (replacing one of the same code) and
//! removed, the lease time changed (with T1 and T2, and in the lease table, so the client and
//! the stored expiry agree), or no reply at all (an ACK withheld also ends the binding it
//! made). Options 53 (message type) and 54 (server identifier) are the server's and never
//! change.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode, UnknownOption};
use dhcproto::{Encodable, Encoder};
use smoltcp::time::{Duration, Instant};

use super::server::{DhcpEvent, Reply};
use crate::core::{secs, Event, VirtualHost};

/// Replies waiting for a decision at once, at most.
pub const MAX_PENDING_REPLIES: usize = 256;
/// How long a reply waits for its decision before it is dropped.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(5);

/// The client message a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpMessageKind {
    /// DISCOVER (the reply is an OFFER).
    Discover,
    /// REQUEST (an ACK).
    Request,
    /// INFORM (an ACK without an address).
    Inform,
}

/// One option of a reply: its code and its value's bytes, as on the wire (at most 255).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionBytes {
    /// The option code (1 to 254).
    pub code: u8,
    /// The value.
    pub value: Vec<u8>,
}

/// What the policy sees of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpClientInfo {
    /// The client's message.
    pub message_type: DhcpMessageKind,
    /// Its hardware address.
    pub mac: [u8; 6],
    /// Option 61, if sent.
    pub client_id: Option<Vec<u8>>,
    /// Option 12, if sent.
    pub hostname: Option<String>,
    /// Option 60, if sent (as text, lossily).
    pub vendor_class: Option<String>,
    /// Option 55: the options the client asked for.
    pub requested_options: Vec<u8>,
}

/// What the policy sees of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpReplyInfo {
    /// The address offered or acknowledged (0.0.0.0 for INFORM).
    pub your_address: Ipv4Addr,
    /// Option 51, if present.
    pub lease_seconds: Option<u32>,
    /// The options as they would be sent, by code, without 53 and 54.
    pub options: Vec<OptionBytes>,
}

/// A policy's changes to a reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpChanges {
    /// Options added, or replacing the option of the same code.
    pub set_options: Vec<(u8, Vec<u8>)>,
    /// Option codes removed.
    pub remove_options: Vec<u8>,
    /// A new lease time.
    pub lease_seconds: Option<u32>,
}

/// What to do with a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpDecision {
    /// Send it as built.
    Unchanged,
    /// Send it with these changes.
    Change(DhcpChanges),
    /// Do not answer the client.
    NoReply,
}

/// A reply waiting for a decision, named in [`DhcpPolicy::customize`] and
/// [`VirtualHost::handle_dhcp_decision`](crate::core::VirtualHost::handle_dhcp_decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DhcpTicket(pub u64);

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpAnswer {
    /// Decided at once, by the named policy (if any).
    Decided(DhcpDecision, Option<String>),
    /// The decision comes later, through `handle_dhcp_decision` with the ticket.
    Later,
}

/// The DHCP step of the policies. Called once per reply, on the core's thread: it must not
/// block (a policy that needs time answers [`DhcpAnswer::Later`]).
pub trait DhcpPolicy {
    /// Decides about `reply` to `client`, now or later (naming `ticket`).
    fn customize(
        &mut self,
        ticket: DhcpTicket,
        client: &DhcpClientInfo,
        reply: &DhcpReplyInfo,
    ) -> DhcpAnswer;
}

/// What the policy is told about the client of `msg`; `None` for messages the hook does not
/// see (RELEASE, DECLINE).
pub fn client_info(msg: &Message, mac: [u8; 6]) -> Option<DhcpClientInfo> {
    let opts = msg.opts();
    let message_type = match opts.msg_type()? {
        MessageType::Discover => DhcpMessageKind::Discover,
        MessageType::Request => DhcpMessageKind::Request,
        MessageType::Inform => DhcpMessageKind::Inform,
        _ => return None,
    };
    Some(DhcpClientInfo {
        message_type,
        mac,
        client_id: match opts.get(OptionCode::ClientIdentifier) {
            Some(DhcpOption::ClientIdentifier(id)) => Some(id.clone()),
            _ => None,
        },
        hostname: match opts.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.clone()),
            _ => None,
        },
        vendor_class: match opts.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        },
        requested_options: match opts.get(OptionCode::ParameterRequestList) {
            Some(DhcpOption::ParameterRequestList(list)) => {
                list.iter().map(|c| u8::from(*c)).collect()
            }
            _ => Vec::new(),
        },
    })
}

/// What the policy is told about `reply`.
pub fn reply_info(reply: &Message) -> DhcpReplyInfo {
    let mut options: Vec<OptionBytes> = reply
        .opts()
        .iter()
        .filter(|(code, _)| !matches!(code, OptionCode::MessageType | OptionCode::ServerIdentifier))
        .filter_map(|(code, opt)| {
            Some(OptionBytes {
                code: u8::from(*code),
                value: option_data(opt)?,
            })
        })
        .collect();
    options.sort_by_key(|o| o.code);
    DhcpReplyInfo {
        your_address: reply.yiaddr(),
        lease_seconds: match reply.opts().get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(s)) => Some(*s),
            _ => None,
        },
        options,
    }
}

/// An option's data, as it goes on the wire (long options' chunks joined).
fn option_data(opt: &DhcpOption) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    opt.encode(&mut Encoder::new(&mut buf)).ok()?;
    let mut data = Vec::new();
    let mut at = 0;
    while at + 2 <= buf.len() {
        let len = usize::from(buf[at + 1]);
        data.extend_from_slice(buf.get(at + 2..at + 2 + len)?);
        at += 2 + len;
    }
    Some(data)
}

/// Applies `changes` to `reply`. Returns the new lease time when it changed. Options 53 and
/// 54, and options longer than 255 bytes, are left alone.
pub fn apply(changes: &DhcpChanges, reply: &mut Message) -> Option<u32> {
    let opts = reply.opts_mut();
    let ours = |code: u8| matches!(code, 53 | 54);
    for &code in &changes.remove_options {
        if !ours(code) {
            opts.remove(OptionCode::from(code));
        }
    }
    for (code, data) in &changes.set_options {
        if ours(*code) || data.len() > 255 {
            continue;
        }
        opts.insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(*code),
            data.clone(),
        )));
    }
    let secs = changes.lease_seconds?;
    // An INFORM answer carries no lease: nothing to change.
    opts.get(OptionCode::AddressLeaseTime)?;
    opts.insert(DhcpOption::AddressLeaseTime(secs));
    opts.insert(DhcpOption::Renewal(secs / 2));
    opts.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
    Some(secs)
}

/// The policy and the replies waiting for its decision.
#[derive(Default)]
pub(crate) struct HookState {
    policy: Option<Box<dyn DhcpPolicy>>,
    pending: HashMap<DhcpTicket, (Reply, Instant)>,
    next_ticket: u64,
    /// Replies dropped: the wait was full, or no decision came in time.
    pub(crate) dropped: u64,
}

impl std::fmt::Debug for HookState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookState")
            .field("policy", &self.policy.is_some())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl HookState {
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|(_, at)| *at).min()
    }
}

impl VirtualHost {
    /// Installs the DHCP policy consulted for every OFFER and ACK; `None` sends replies as
    /// the server builds them.
    pub fn set_dhcp_policy(&mut self, policy: Option<Box<dyn DhcpPolicy>>) {
        self.dhcp_hook.policy = policy;
    }

    /// Replies dropped by the hook (the wait was full, or no decision came in time).
    pub fn dhcp_policy_dropped(&self) -> u64 {
        self.dhcp_hook.dropped
    }

    /// The server's `reply` to `msg` from `mac`: to the policy first, if there is one.
    pub(crate) fn dhcp_reply(&mut self, msg: &Message, mac: [u8; 6], reply: Reply, now: Instant) {
        let hook = &mut self.dhcp_hook;
        let (Some(policy), Some(client)) = (hook.policy.as_mut(), client_info(msg, mac)) else {
            self.send_dhcp_reply(&reply, now);
            return;
        };
        if hook.pending.len() >= MAX_PENDING_REPLIES {
            hook.dropped += 1;
            return;
        }
        hook.next_ticket += 1;
        let ticket = DhcpTicket(hook.next_ticket);
        match policy.customize(ticket, &client, &reply_info(&reply.msg)) {
            DhcpAnswer::Decided(decision, by) => self.finish_dhcp_reply(reply, decision, by, now),
            DhcpAnswer::Later => {
                hook.pending.insert(ticket, (reply, now + DECISION_TIMEOUT));
            }
        }
    }

    /// The decision about a reply the policy answered [`DhcpAnswer::Later`] about; `by` names
    /// the policy. A decision for a reply no longer waiting is ignored.
    pub fn handle_dhcp_decision(
        &mut self,
        ticket: DhcpTicket,
        decision: DhcpDecision,
        by: Option<String>,
        now: Instant,
    ) {
        self.now = now;
        if let Some((reply, _)) = self.dhcp_hook.pending.remove(&ticket) {
            self.finish_dhcp_reply(reply, decision, by, now);
        }
    }

    /// Replies waiting too long for their decision are dropped (the client retries).
    pub(crate) fn expire_dhcp_decisions(&mut self, now: Instant) {
        let hook = &mut self.dhcp_hook;
        let before = hook.pending.len();
        hook.pending.retain(|_, (_, at)| *at > now);
        hook.dropped += (before - hook.pending.len()) as u64;
    }

    fn finish_dhcp_reply(
        &mut self,
        mut reply: Reply,
        decision: DhcpDecision,
        by: Option<String>,
        now: Instant,
    ) {
        let ip = reply.msg.yiaddr();
        let mut client_mac = [0u8; 6];
        client_mac.copy_from_slice(&reply.msg.chaddr()[..6.min(reply.msg.chaddr().len())]);
        let is_ack = reply.msg.opts().msg_type() == Some(MessageType::Ack);
        let what = match &decision {
            DhcpDecision::Unchanged => None,
            DhcpDecision::NoReply => {
                if is_ack && !ip.is_unspecified() && self.dhcp.withhold(ip, secs(now)).is_some() {
                    self.events.push_back(Event::LeasesChanged);
                }
                Some("no reply".to_owned())
            }
            DhcpDecision::Change(changes) => {
                if let Some(lease) = apply(changes, &mut reply.msg) {
                    self.dhcp.set_lease_time(ip, lease, secs(now));
                    self.events.push_back(Event::LeasesChanged);
                }
                Some(format!(
                    "set_options={:?} remove_options={:?} lease_seconds={:?}",
                    changes
                        .set_options
                        .iter()
                        .map(|(c, _)| *c)
                        .collect::<Vec<_>>(),
                    changes.remove_options,
                    changes.lease_seconds
                ))
            }
        };
        if let Some(what) = what {
            self.events.push_back(Event::Dhcp(DhcpEvent::Customized {
                mac: client_mac,
                ip,
                policy: by,
                what,
            }));
        }
        if decision != DhcpDecision::NoReply {
            self.send_dhcp_reply(&reply, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Opcode;

    fn reply() -> Message {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_yiaddr(Ipv4Addr::new(192, 168, 30, 10));
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Ack));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 30, 1)));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            192, 168, 30, 1,
        )]));
        o.insert(DhcpOption::AddressLeaseTime(7200));
        o.insert(DhcpOption::Renewal(3600));
        o.insert(DhcpOption::Rebinding(6300));
        m
    }

    #[test]
    fn the_reply_is_shown_without_the_servers_own_options() {
        let info = reply_info(&reply());
        assert_eq!(info.lease_seconds, Some(7200));
        let codes: Vec<u8> = info.options.iter().map(|o| o.code).collect();
        assert_eq!(codes, [6, 51, 58, 59]);
        assert_eq!(info.options[0].value, [192, 168, 30, 1]);
    }

    #[test]
    fn changes_replace_remove_and_set_the_lease_time_with_t1_and_t2() {
        let mut m = reply();
        let changes = DhcpChanges {
            set_options: vec![
                (6, vec![10, 0, 0, 53]),
                (15, b"lab.test".to_vec()),
                (53, vec![5]),
            ],
            remove_options: vec![3, 54],
            lease_seconds: Some(600),
        };
        assert_eq!(apply(&changes, &mut m), Some(600));
        // Encoded and decoded again, as the client sees it.
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        let back =
            <Message as dhcproto::Decodable>::decode(&mut dhcproto::Decoder::new(&buf)).unwrap();
        let o = back.opts();
        assert_eq!(
            o.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                10, 0, 0, 53
            )]))
        );
        assert_eq!(
            o.get(OptionCode::DomainName),
            Some(&DhcpOption::DomainName("lab.test".into()))
        );
        assert_eq!(o.msg_type(), Some(MessageType::Ack), "53 is the server's");
        assert!(
            o.get(OptionCode::ServerIdentifier).is_some(),
            "54 is the server's"
        );
        assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(300)));
        assert_eq!(
            o.get(OptionCode::Rebinding),
            Some(&DhcpOption::Rebinding(525))
        );
    }
}
