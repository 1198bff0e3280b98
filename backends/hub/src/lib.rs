//! hubnat's hub backends: frames switched between several peers by a learning switch.
//!
//! * [`switch`] — the learning switch itself ([`Switch`], [`LearningTable`]): plain data with
//!   time passed in, shared by every hub backend.
//! * [`memory`] — the in-memory hub ([`MemoryHub`], [`MemoryPort`]): ports are objects in this
//!   process, for embedding hubnat and for tests. Needs no privilege.
//! * [`socket`] — the hub socket ([`HubSocket`]): peers on Unix or TCP stream sockets in QEMU's
//!   `-netdev stream` framing (a 4-byte big-endian length, then the frame), each one a port of
//!   a memory hub inside, so that VMs and sidecars share the segment with the virtual host.
//!   Needs no privilege either.

pub mod memory;
pub mod socket;
pub mod switch;

pub use memory::{
    HubStats, MemoryHub, MemoryHubConfig, MemoryPort, DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_FRAMES,
};
pub use socket::{
    Endpoint, EndpointError, HubSocket, HubSocketConfig, HubSocketError, SocketStats,
    DEFAULT_MAX_PEERS, DEFAULT_SOCKET_MODE, MAX_WIRE_FRAME,
};
pub use switch::{
    Forward, LearningTable, MacAddr, PortId, Switch, SwitchLimits, DEFAULT_MAX_AGE,
    DEFAULT_MAX_ENTRIES,
};
