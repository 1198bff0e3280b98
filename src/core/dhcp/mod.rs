//! The virtual DHCP server: the state machine ([`server`]), the lease table ([`pool`]) and the
//! options it hands out ([`options`]). Messages are parsed and built with `dhcproto`; the
//! frame-level work (Ethernet, IPv4, UDP) is the core's.

pub(crate) mod guard;
pub mod hook;
pub mod options;
pub mod pool;
pub mod server;

#[cfg(test)]
mod tests;

pub use hook::{
    DhcpAnswer, DhcpChanges, DhcpClientInfo, DhcpDecision, DhcpMessageKind, DhcpPolicy,
    DhcpReplyInfo, DhcpTicket, OptionBytes,
};
pub use options::{DhcpSettings, MacPattern, Reservation, StaticRoute};
pub use pool::{ClientKey, Lease, LeaseId, LeasePool, LeaseState};
pub use server::{
    DhcpCounters, DhcpEvent, DhcpServer, LeaseEventKind, OtherServer, Reply, ReplyTarget,
};
