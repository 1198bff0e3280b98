//! hubnat — a user-mode virtual NAT and virtual DHCP server for a virtual Ethernet segment.
//!
//! hubnat is one ordinary host on a segment: it answers ARP and ping for its own address,
//! hands out addresses with DHCP, forwards DNS, and carries the clients' TCP, UDP and ICMP echo
//! out through the operating system's own sockets. `ARCHITECTURE.md` in the repository is the
//! map of the code; in short:
//!
//! - [`core`] is sans-IO: [`core::VirtualHost`] takes frames, host-socket events and time, and
//!   gives frames and host-socket requests. It is where ARP, DHCP, DNS and the NAT live, and
//!   where every new flow passes the admission point ([`core::nat::admit`]).
//! - [`driver`] runs a core on a frame backend: [`driver::Gateway::run`] is the async loop,
//!   and [`driver::GatewayHandle`] reaches a running gateway from any thread (status, tables,
//!   live settings, ending a session, releasing a lease).
//! - [`config`] loads and validates the configuration and its live changes.
//! - [`control`] serves a running gateway's handle to operators: an HTTP/JSON API on a Unix
//!   socket, Prometheus metrics, and the client the CLI uses.
//! - [`policy`] hosts the WASM policy modules (wasmtime, the component model): a
//!   [`policy::PolicySet`] decides sessions and customises DHCP replies on a
//!   [`policy::PolicyThread`] of its own, off the frame path.
//! - [`state`] keeps leases and the generated MAC; [`seclog`] writes the security log;
//!   [`host`] wraps the OS sockets.
//!
//! Embedding: build a [`config::Config`], make a [`driver::Gateway`], take its handle, and run
//! it on any `hubnat_backend::Backend` — for a program of its own, a port of
//! `hubnat_hub::MemoryHub` — on a thread of its own with [`rt::block_on`] (hubnat's reactor:
//! the gateway's sockets and timers wait there, see [`rt`]). `examples/embed.rs` does exactly
//! that.
pub mod config;
pub mod control;
pub mod core;
pub mod driver;
pub mod host;
pub mod policy;
pub mod privilege;
pub mod seccomp;
pub mod seclog;
pub mod state;

/// hubnat's reactor and `block_on` (from `hubnat_backend`): drive [`driver::Gateway::run`] with
/// [`rt::block_on`].
pub use hubnat_backend::rt;
