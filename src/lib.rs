//! hubnat — a user-mode virtual NAT and virtual DHCP server for a virtual Ethernet segment.
pub mod config;
pub mod core;
pub mod driver;
pub mod host;
pub mod seclog;
pub mod state;
