//! The admission point: the one decision every new flow passes before it costs a socket.
//!
//! # Theory of operation
//!
//! A packet of a flow that has no session (a TCP SYN, the first UDP datagram of a client
//! endpoint and remote endpoint, the first echo request of an identifier, a DNS query to the
//! virtual host over UDP or TCP) comes here, and three steps run in a fixed order:
//!
//! 0. **Source**: only a client address of the segment (in its subnet; not the virtual host's,
//!    not the subnet's network or broadcast address) may open a flow. Anything else is a
//!    spoofed source: refused silently (nothing to answer: the reply would go to whoever holds
//!    that address) and counted with the safety rules.
//! 1. **Safety rules** ([`safety_rules`]): never the virtual segment itself, broadcast,
//!    multicast, 0.0.0.0/8, 240.0.0.0/4, the host's loopback, link-local addresses (cloud
//!    metadata services answer at 169.254.169.254), the host's own addresses (each unless
//!    allowed) or `nat.deny`.
//!    Flows to the virtual host's own DNS port skip this step (the forwarder is ours).
//! 2. **Policy**: the [`SessionPolicy`], if one is installed, sees a [`FlowInfo`] and answers
//!    now or later. While it has not answered, the flow waits here with its packets (a few
//!    datagrams are queued, retransmitted SYNs are dropped); [`VirtualHost::handle_verdict`]
//!    brings the answer. A redirect must pass the safety rules for its new destination.
//! 3. **Limits**: `nat.max_sessions` and `nat.max_sessions_per_client`, the latter for the
//!    client's address and for its MAC alike (a client that rotates its source address is
//!    still held to its share).
//!
//! The outcome is a [`Verdict`]: *allow* and *redirect* create a session; *reject* answers
//! the client (a RST for TCP, ICMP "administratively prohibited" for UDP and ICMP); *drop* is
//! silent. Every refusal is counted and logged with its [`EndReason`] (rate-limited).
//!
//! Bounds: at most [`MAX_PENDING_VERDICTS`] flows wait at once, [`MAX_PENDING_PER_CLIENT`]
//! per client address and per client MAC, [`MAX_QUEUED_PER_FLOW`] packets each, and none
//! longer than
//! [`VERDICT_TIMEOUT`] (then it is dropped as denied by policy).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{Icmpv4DstUnreachable, Ipv4Packet};

use super::table::{FlowKey, Protocol};
use super::{EndReason, NatSettings, REFUSAL_LOG_INTERVAL};
use crate::core::{HostSettings, VirtualHost};

/// Flows waiting for a verdict at once, at most.
pub const MAX_PENDING_VERDICTS: usize = 1024;
/// Flows of one client (address, or MAC) waiting for a verdict at once, at most.
pub const MAX_PENDING_PER_CLIENT: usize = 64;
/// Packets kept for a flow while it waits for its verdict.
pub const MAX_QUEUED_PER_FLOW: usize = 8;
/// How long a flow waits for a verdict before it is dropped.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a policy sees of a new flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    /// Transport.
    pub protocol: Protocol,
    /// The client's MAC address.
    pub client_mac: [u8; 6],
    /// The client's address and port (ICMP: the echo identifier).
    pub client: SocketAddrV4,
    /// The address and port the client sent to (ICMP: port 0).
    pub remote: SocketAddrV4,
    /// The host name in the client's DHCP lease, if it has one.
    pub client_hostname: Option<String>,
    /// The name the client looked up for the remote address, from relayed DNS answers.
    pub remote_name: Option<String>,
}

/// A flow waiting for a verdict, named in [`SessionPolicy::check`] and
/// [`VirtualHost::handle_verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTicket(pub u64);

/// What to do with a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry it.
    Allow,
    /// Refuse it and tell the client (TCP RST; ICMP administratively prohibited).
    Reject,
    /// Refuse it silently.
    Drop,
    /// Carry it to this endpoint instead (still subject to the safety rules).
    Redirect(SocketAddr),
}

/// A verdict and who gave it (for the security log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// The policy that gave it, when a policy did.
    pub by: Option<String>,
}

impl Decision {
    /// Allow, by nobody in particular.
    pub fn allow() -> Self {
        Decision {
            verdict: Verdict::Allow,
            by: None,
        }
    }
}

/// A policy's answer to [`SessionPolicy::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyAnswer {
    /// Decided at once.
    Decided(Decision),
    /// The decision comes later, through [`VirtualHost::handle_verdict`] with the ticket.
    Later,
}

/// The policy step of the admission point. Called once per new flow, on the core's thread:
/// it must not block. A policy that needs time (a WASM module on its own thread) answers
/// [`PolicyAnswer::Later`] and hands the verdict to the driver, which passes it in with
/// [`VirtualHost::handle_verdict`].
pub trait SessionPolicy {
    /// Decides `flow`, now or later (naming `ticket`).
    fn check(&mut self, ticket: FlowTicket, flow: &FlowInfo) -> PolicyAnswer;
}

const HOST_ADDRESS: &str =
    "destination is one of the host's own addresses (nat.allow_host_addresses = false)";

/// Whether `dst` may be reached from the segment of `host`; `Err` says which rule forbids it.
pub fn safety_rules(
    dst: Ipv4Addr,
    host: &HostSettings,
    nat: &NatSettings,
) -> Result<(), &'static str> {
    let d = u32::from(dst);
    if host.on_segment(dst) {
        return Err("destination is on the virtual segment itself");
    }
    if dst.is_broadcast() || dst.is_multicast() || d >> 28 == 0xf {
        return Err("destination is a broadcast, multicast or reserved address");
    }
    if d >> 24 == 0 {
        return Err("destination is in 0.0.0.0/8");
    }
    if dst.is_loopback() && !nat.allow_host_loopback {
        return Err("destination is the host's loopback (nat.allow_host_loopback = false)");
    }
    if dst.is_link_local() && !nat.allow_link_local {
        return Err("destination is link-local, 169.254.0.0/16 (nat.allow_link_local = false)");
    }
    if !nat.allow_host_addresses && nat.host_addresses.contains(&IpAddr::V4(dst)) {
        return Err(HOST_ADDRESS);
    }
    if nat.deny.iter().any(|net| net.contains(dst)) {
        return Err("destination is in nat.deny");
    }
    Ok(())
}

/// The safety rules for a redirect target, which may be IPv6.
pub(super) fn redirect_rules(
    target: SocketAddr,
    host: &HostSettings,
    nat: &NatSettings,
) -> Result<(), &'static str> {
    match target {
        SocketAddr::V4(v4) => safety_rules(*v4.ip(), host, nat),
        SocketAddr::V6(v6) => {
            let ip = v6.ip();
            if let Some(v4) = ip.to_ipv4_mapped() {
                return safety_rules(v4, host, nat);
            }
            if ip.is_unspecified() || ip.is_multicast() {
                return Err("destination is an unspecified or multicast address");
            }
            if ip.is_loopback() && !nat.allow_host_loopback {
                return Err("destination is the host's loopback (nat.allow_host_loopback = false)");
            }
            if ip.is_unicast_link_local() && !nat.allow_link_local {
                return Err("destination is link-local, fe80::/10 (nat.allow_link_local = false)");
            }
            if !nat.allow_host_addresses && nat.host_addresses.contains(&IpAddr::V6(*ip)) {
                return Err(HOST_ADDRESS);
            }
            Ok(())
        }
    }
}

struct PendingFlow {
    key: FlowKey,
    mac: [u8; 6],
    packets: Vec<Vec<u8>>,
    deadline: Instant,
}

/// Flows waiting for a verdict, the policy, and the refusal log's rate limit.
#[derive(Default)]
pub(super) struct Admission {
    pub(super) policy: Option<Box<dyn SessionPolicy>>,
    pending: HashMap<FlowTicket, PendingFlow>,
    by_key: HashMap<FlowKey, FlowTicket>,
    per_client: HashMap<Ipv4Addr, usize>,
    per_mac: HashMap<[u8; 6], usize>,
    next_ticket: u64,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("policy", &self.policy.is_some())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Admission {
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether a refusal should be logged now; `Some(suppressed)` when it should.
    pub(super) fn log_due(&mut self, now: Instant) -> Option<u64> {
        if self
            .last_log
            .is_none_or(|t| now >= t + REFUSAL_LOG_INTERVAL)
        {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    fn remove(&mut self, ticket: FlowTicket) -> Option<PendingFlow> {
        let p = self.pending.remove(&ticket)?;
        self.by_key.remove(&p.key);
        let client = *p.key.client.ip();
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
        if let Some(n) = self.per_mac.get_mut(&p.mac) {
            *n -= 1;
            if *n == 0 {
                self.per_mac.remove(&p.mac);
            }
        }
        Some(p)
    }
}

/// The packets of a flow being decided.
type Packets<'a> = &'a [&'a [u8]];

impl VirtualHost {
    /// A packet (`p`, a whole IPv4 packet) of flow `key`, which has no session.
    pub(super) fn admit(
        &mut self,
        now: Instant,
        key: FlowKey,
        mac: [u8; 6],
        p: &Ipv4Packet<&[u8]>,
    ) {
        if !self.is_client_address(*key.client.ip()) {
            // A spoofed source: whatever we answered would go to someone else.
            let detail = "source is not a client address of the segment".to_owned();
            self.refuse(key, EndReason::DeniedByRule, detail, now);
            return;
        }
        let adm = &mut self.nat.admission;
        if let Some(ticket) = adm.by_key.get(&key) {
            // Already waiting for its verdict: keep a few datagrams; a retransmitted SYN has
            // nothing new to say.
            let flow = adm
                .pending
                .get_mut(ticket)
                .expect("invariant: by_key follows pending");
            if key.protocol != Protocol::Tcp && flow.packets.len() < MAX_QUEUED_PER_FLOW {
                flow.packets.push(p.as_ref().to_vec());
            } else if key.protocol != Protocol::Tcp {
                self.nat.counters.pending_dropped += 1;
            }
            return;
        }
        let to_us = *key.remote.ip() == self.settings.host.ip;
        if !to_us {
            if let Err(rule) =
                safety_rules(*key.remote.ip(), &self.settings.host, &self.settings.nat)
            {
                self.refuse(key, EndReason::DeniedByRule, rule.to_owned(), now);
                self.answer_refusal(key.protocol, p);
                return;
            }
        }
        if self.nat.admission.policy.is_none() {
            self.decide(now, key, mac, &[p.as_ref()], Decision::allow());
            return;
        }
        let adm = &mut self.nat.admission;
        let client = *key.client.ip();
        if adm.pending.len() >= MAX_PENDING_VERDICTS
            || adm.per_client.get(&client).copied().unwrap_or(0) >= MAX_PENDING_PER_CLIENT
            || adm.per_mac.get(&mac).copied().unwrap_or(0) >= MAX_PENDING_PER_CLIENT
        {
            let detail = "too many flows waiting for a policy verdict".to_owned();
            self.refuse(key, EndReason::Limit, detail, now);
            if key.protocol == Protocol::Tcp {
                self.link.push_rst_for_syn(&self.settings.host, p);
            }
            return;
        }
        adm.next_ticket += 1;
        let ticket = FlowTicket(adm.next_ticket);
        let info = self.flow_info(key, mac);
        let policy = self
            .nat
            .admission
            .policy
            .as_mut()
            .expect("invariant: checked above");
        match policy.check(ticket, &info) {
            PolicyAnswer::Decided(d) => self.decide(now, key, mac, &[p.as_ref()], d),
            PolicyAnswer::Later => {
                let adm = &mut self.nat.admission;
                adm.pending.insert(
                    ticket,
                    PendingFlow {
                        key,
                        mac,
                        packets: vec![p.as_ref().to_vec()],
                        deadline: now + VERDICT_TIMEOUT,
                    },
                );
                adm.by_key.insert(key, ticket);
                *adm.per_client.entry(client).or_insert(0) += 1;
                *adm.per_mac.entry(mac).or_insert(0) += 1;
            }
        }
    }

    /// The verdict for a flow a policy answered [`PolicyAnswer::Later`] about. A verdict for a
    /// flow no longer waiting (it timed out, or the NAT was disabled) is ignored.
    pub fn handle_verdict(&mut self, ticket: FlowTicket, decision: Decision, now: Instant) {
        self.now = now;
        let Some(flow) = self.nat.admission.remove(ticket) else {
            return;
        };
        let packets: Vec<&[u8]> = flow.packets.iter().map(Vec::as_slice).collect();
        self.decide(now, flow.key, flow.mac, &packets, decision);
    }

    /// What a policy is told about a flow.
    pub fn flow_info(&self, key: FlowKey, mac: [u8; 6]) -> FlowInfo {
        FlowInfo {
            protocol: key.protocol,
            client_mac: mac,
            client: key.client,
            remote: key.remote,
            client_hostname: self
                .dhcp
                .pool()
                .get_by_ip(*key.client.ip())
                .and_then(|l| l.hostname.clone()),
            remote_name: self
                .nat
                .dns
                .names
                .lookup(*key.remote.ip())
                .map(str::to_owned),
        }
    }

    /// Flows waiting too long for their verdict are dropped.
    pub(super) fn expire_verdicts(&mut self, now: Instant) {
        let adm = &self.nat.admission;
        if adm.next_deadline().is_none_or(|t| t > now) {
            return;
        }
        let late: Vec<FlowTicket> = adm
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for ticket in late {
            if let Some(flow) = self.nat.admission.remove(ticket) {
                let detail = "no verdict from the session policy in time".to_owned();
                self.refuse(flow.key, EndReason::DeniedByPolicy, detail, now);
            }
        }
    }

    /// Forgets every flow waiting for a verdict (the NAT was disabled).
    pub(super) fn drop_pending_verdicts(&mut self) {
        let adm = &mut self.nat.admission;
        adm.pending.clear();
        adm.by_key.clear();
        adm.per_client.clear();
        adm.per_mac.clear();
    }

    /// Carries out `decision` for a flow: refuse it, or (after the limits) make it a session
    /// and hand it its packets.
    fn decide(
        &mut self,
        now: Instant,
        key: FlowKey,
        mac: [u8; 6],
        packets: Packets<'_>,
        decision: Decision,
    ) {
        let Some(&first) = packets.first() else {
            return;
        };
        let Ok(p) = Ipv4Packet::new_checked(first) else {
            return;
        };
        let by = decision.by.as_deref().unwrap_or("(unnamed)");
        let target = match decision.verdict {
            Verdict::Reject => {
                self.refuse(
                    key,
                    EndReason::DeniedByPolicy,
                    format!("rejected by policy {by}"),
                    now,
                );
                self.answer_refusal(key.protocol, &p);
                return;
            }
            Verdict::Drop => {
                self.refuse(
                    key,
                    EndReason::DeniedByPolicy,
                    format!("dropped by policy {by}"),
                    now,
                );
                return;
            }
            Verdict::Redirect(target) => {
                if let Err(rule) = redirect_rules(target, &self.settings.host, &self.settings.nat) {
                    let detail = format!("redirect by policy {by} to {target}: {rule}");
                    self.refuse(key, EndReason::DeniedByRule, detail, now);
                    self.answer_refusal(key.protocol, &p);
                    return;
                }
                target
            }
            Verdict::Allow => match self.default_target(key) {
                Some(t) => t,
                None => {
                    // TCP to our DNS port with no upstream: nobody to carry it to.
                    self.link.push_rst_for_syn(&self.settings.host, &p);
                    return;
                }
            },
        };
        let redirected_by = matches!(decision.verdict, Verdict::Redirect(_)).then(|| by.to_owned());
        let limits = self.settings.nat.limits();
        let memory = match self.settings.nat.memory_limit {
            Some(limit) if self.nat.memory_use >= limit => Err(super::LimitError::Memory {
                used: self.nat.memory_use,
                limit,
            }),
            _ => Ok(()),
        };
        let inserted = memory.and_then(|()| self.nat.table.insert(key, mac, target, limits, now));
        let id = match inserted {
            Ok(id) => id,
            Err(e) => {
                self.refuse(key, EndReason::Limit, e.to_string(), now);
                if key.protocol == Protocol::Tcp {
                    self.link.push_rst_for_syn(&self.settings.host, &p);
                }
                return;
            }
        };
        self.session_created(id, redirected_by);
        match key.protocol {
            Protocol::Tcp => self.tcp_start(id, first, target),
            Protocol::Udp => self.udp_start(id, packets, now),
            Protocol::Icmp => self.icmp_start(id, packets, now),
        }
    }

    /// Where an allowed flow goes: its own remote, or for the virtual host's DNS port the
    /// first upstream.
    fn default_target(&self, key: FlowKey) -> Option<SocketAddr> {
        if *key.remote.ip() == self.settings.host.ip {
            return match key.protocol {
                Protocol::Tcp => self.settings.nat.dns_upstreams.first().copied(),
                // UDP DNS goes through the forwarder; the target is what the table shows.
                _ => Some(
                    self.settings
                        .nat
                        .dns_upstreams
                        .first()
                        .copied()
                        .unwrap_or(SocketAddr::V4(key.remote)),
                ),
            };
        }
        Some(SocketAddr::V4(key.remote))
    }

    /// Tells the client its flow was refused: a RST for TCP, ICMP "administratively
    /// prohibited" for UDP and ICMP (not for broadcast or multicast).
    fn answer_refusal(&mut self, protocol: Protocol, p: &Ipv4Packet<&[u8]>) {
        let host = self.settings.host;
        if protocol == Protocol::Tcp {
            self.link.push_rst_for_syn(&host, p);
        } else if !(p.dst_addr().is_broadcast() || p.dst_addr().is_multicast()) {
            self.link
                .push_unreachable(&host, host.ip, p, Icmpv4DstUnreachable::CommProhibited);
        }
    }
}
