//! Configuration: the layered settings of one hubnat instance, and their validation.
//!
//! # Theory of operation
//!
//! A [`Config`] is built from six layers with [figment]; a later layer wins key by key:
//!
//! 1. **built-in defaults** — [`Config::default()`]: the reference behaviour (192.168.30.1/24,
//!    DHCP range .10–.200, 2 h leases, MTU 1500, …), the same on every machine except for
//!    `state.dir` (per user or system-wide); `host.mac` is unset (generated elsewhere and kept
//!    in the state directory), and so are `dns.upstream` and `dhcp.domain`;
//! 2. **host defaults** ([`Sources::host`], [`HostDefaults`]): `dns.upstream` from the
//!    nameservers of `/etc/resolv.conf`, `dhcp.domain` from the host's domain; an error about
//!    one of them says where it was found ("from /etc/resolv.conf");
//! 3. **the TOML file** given with `--config FILE` ([`Sources::file`]); it must exist;
//! 4. **environment variables** `HUBNAT_…` ([`Sources::env`]); `__` separates the levels, so
//!    `HUBNAT_DHCP__RANGE_START=192.168.30.50` sets `dhcp.range_start`. Values are parsed the
//!    way figment parses them (`1500` is a number, `true` a boolean, `[1.1.1.1, 9.9.9.9]` a
//!    list). `HUBNAT_CONFIG` is not a key: it is left to the CLI, which may use it for the path
//!    of the file;
//! 5. **changes made at run time** through the control API, kept in `overrides.toml` in the
//!    state directory ([`Sources::persisted`], see [`persist_changes`]); named "the state
//!    directory" in errors;
//! 6. **command-line overrides** `--set KEY=VALUE` ([`Override`]): VALUE is read as a TOML
//!    value when it is one (`1400`, `true`, `"text"`, `["1.1.1.1"]`), else like an environment
//!    value, else as a plain string.
//!
//! Every table rejects unknown keys, and every key may be left out. An empty string means
//! "not set" for the optional values (`dhcp.gateway = ""` sends no router option,
//! `dhcp.domain = ""` no domain), so a higher layer can unset what a lower one set.
//! Durations are written the humantime way: `"90s"`, `"10m"`, `"2h"`, `"1day"`.
//!
//! [`Config::load`] extracts the layers and then [`Config::validate`]s the result. Every
//! error, from either step, names the key, the offending value, where that value came from (the
//! file path, the environment variable's name, the command line, the host or the built-in
//! defaults) and what is wrong, e.g.
//!
//! ```text
//! config key dhcp.range_end = 192.168.31.5 (from file ./x.toml): outside the subnet 192.168.30.0/24 given by host.ip and host.mask
//! ```
//!
//! Validation reports every problem it finds, not only the first; figment's own type errors
//! stop at the first one. What the loader notices without refusing (a `HUBNAT_…` variable
//! that names no setting, perhaps set by a wrapper script) comes back as warnings in
//! [`Loaded`].
//!
//! A running gateway changes its settings through [`Config::with_changes`]: `KEY=VALUE`
//! changes read like `--set`, layered over the running configuration, validated as a whole,
//! and either all applied (with the list of [`Change`]s) or none. Only `host.*`, `dhcp.*`,
//! `nat.*` and `dns.*` change at run time, less `host.mac` and `nat.mtu`; the rest needs a
//! restart.
//!
//! ## Where each part lives
//!
//! - `types.rs`: [`Config`] and one struct per table, with their defaults;
//! - `values.rs`: the value types ([`MacAddr`], [`Route`], [`SocketMode`]) and how every value
//!   is written in the file (durations, sizes, optional values, lists);
//! - `layers.rs`: the layers ([`Sources`], [`Override`]), the loader ([`Config::load`]) and
//!   [`Origins`], which says where each value came from;
//! - `validate.rs`: the checks, a pure function of a configuration and its origins, and the
//!   bounds they enforce (with the reasons for each);
//! - `render.rs`: [`ConfigError`], [`ConfigWarning`], and keys and values written for people;
//! - `live.rs`: live changes ([`Config::with_changes`]) and a section's settings for display;
//! - `host.rs`: the defaults taken from the host (`/etc/resolv.conf`, the host name, the state
//!   directory), read only when asked.

mod host;
mod layers;
mod live;
mod persisted;
mod render;
mod types;
mod validate;
mod values;

#[cfg(test)]
mod testing;

pub use host::{HostDefaults, HostDomain, RESOLV_CONF};
pub use layers::{Loaded, Origins, Override, Sources, ENV_PREFIX, ENV_SEPARATOR};
pub use live::{Change, Setting, LIVE_SECTIONS, RESTART_ONLY};
pub use persisted::{
    overrides_path, persist_changes, Overridden, PersistError, ORIGIN_PERSISTED, OVERRIDES_FILE,
};
pub use render::{ConfigError, ConfigWarning};
pub use types::{
    BackendConfig, BackendKind, CaptureConfig, Config, ControlConfig, DhcpConfig, DnsConfig,
    HostConfig, HubConfig, LogConfig, LogFormat, NatConfig, OnError, PolicyConfig, ProcessConfig,
    RawConfig, SeccompMode, StateConfig, StaticLease, TapConfig, DEFAULT_SECURITY_MAX_FILES,
    DEFAULT_SECURITY_MAX_SIZE, DEFAULT_TCP_BUFFER,
};
pub use validate::{
    MAX_CAPTURE_FILES, MAX_HUB_PEERS, MAX_LEASE, MAX_MTU, MAX_NAT_SESSIONS, MAX_NAT_TIMEOUT,
    MAX_POLICY_MEMORY, MAX_POLICY_TIMEOUT, MAX_RANGE_SIZE, MAX_TAP_NAME_LEN, MAX_TCP_BUFFER,
    MIN_CAPTURE_SIZE, MIN_LEASE, MIN_MTU, MIN_NAT_TIMEOUT, MIN_POLICY_MEMORY, MIN_POLICY_TIMEOUT,
    MIN_TCP_BUFFER,
};
pub use values::{MacAddr, MacPrefix, ParseError, Route, SocketMode};
