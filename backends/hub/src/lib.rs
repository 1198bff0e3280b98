//! hubnat's hub backends: frames switched between several peers by a learning switch.
//!
//! * [`switch`] — the learning switch itself ([`Switch`], [`LearningTable`]): plain data with
//!   time passed in, shared by every hub backend.
//! * [`memory`] — the in-memory hub ([`MemoryHub`], [`MemoryPort`]): ports are objects in this
//!   process, for embedding hubnat and for tests. Needs no privilege.
//!
//! The hub *socket* backend (peers on Unix or TCP stream sockets in QEMU's `-netdev stream`
//! framing: a 4-byte big-endian length, then the frame) will join them here and reuse
//! [`Switch`] for its peers.

pub mod memory;
pub mod switch;

pub use memory::{HubStats, MemoryHub, MemoryHubConfig, MemoryPort, DEFAULT_QUEUE_FRAMES};
pub use switch::{
    Forward, LearningTable, MacAddr, PortId, Switch, SwitchLimits, DEFAULT_MAX_AGE,
    DEFAULT_MAX_ENTRIES,
};
