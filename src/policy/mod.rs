//! The policy host: WebAssembly components that decide when a NAT session is about to be
//! created and when a DHCP reply is being built.
//!
//! # Theory of operation
//!
//! A policy is a WebAssembly component written against `policies/wit/policy.wit` (package
//! `hubnat:policy@0.1.0`). It imports the `host` interface (a log, and its own
//! `[policy.config]` table) and exports `session-filter`, `dhcp-customizer`, or both; hubnat
//! calls what it finds. Nothing else is given to it: no files, no network, no clock, no random
//! numbers. A component that imports WASI interfaces (Rust's standard library does, for
//! printing a panic message) still loads, but every WASI function traps when called, and the
//! call fails like any other trap.
//!
//! - **Load** ([`PolicySet::load`]): each configured module is read and compiled once (by
//!   Cranelift; compiling takes milliseconds to a second, so it happens at start-up and on a
//!   reload, never per call), checked against the contract (it must export at least one of the
//!   two interfaces with the exact types, and import nothing but `hubnat:policy/*` and WASI),
//!   and instantiated once. Errors name the policy, its file and what is wrong.
//! - **Call**: each call gets a fresh deadline of `timeout` from one shared ticker thread
//!   (epoch interruption, [`TICK`] resolution; the ticker sleeps while no call runs) and runs
//!   under a memory bound of `memory` bytes of linear memory. A trap, a timeout or a refused
//!   memory growth ends the call; the policy's `on_error` says what it means (allow: the
//!   session goes on, the reply is unchanged; deny: the session is rejected, the reply is not
//!   sent), a [`PolicyNote`] reports it, and the instance is thrown away and made afresh from
//!   the compiled component, so the next call starts clean.
//! - **Chain**: policies run in the configured order. For a session the first verdict other
//!   than allow wins ([`PolicySet::check_session`]); for a DHCP reply each policy sees the
//!   reply as the ones before it changed it, and the first "no reply" ends the chain
//!   ([`PolicySet::customize_dhcp`]).
//! - **Thread** ([`PolicyThread`]): the calls run on a thread of their own, off the frame path.
//!   [`PolicyClient`] implements the core's [`SessionPolicy`] by queuing the flow and
//!   answering [`PolicyAnswer::Later`]; answers come back on an `async_channel` the driver
//!   awaits ([`PolicyResponse`]). A reload ([`PolicyReload`]) is compiled off that thread and
//!   swapped in between two calls; a module that fails to load keeps the previous module of
//!   the same name in force, and the report says why.
//!
//! The types here ([`DhcpClient`], [`DhcpReply`], [`DhcpOutcome`], …) are plain Rust: the core
//! and the driver never see wasmtime's.
//!
//! DoS notes: a policy costs one call per new flow and per DHCP reply, each bounded by its
//! timeout; the request queue holds at most [`MAX_QUEUED_REQUESTS`]; a policy's log lines are
//! capped at [`MAX_LOG_LINES_PER_CALL`] per call and [`MAX_LOG_LINE`] bytes each.
//!
//! [`SessionPolicy`]: crate::core::nat::SessionPolicy
//! [`PolicyAnswer::Later`]: crate::core::nat::PolicyAnswer::Later

mod runtime;
mod stats;
mod thread;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

pub use runtime::{PolicyReload, PolicySet, ReloadReport, TICK};
pub use stats::{PolicyCalls, PolicyInfo};
pub use thread::{
    DhcpRequestId, PolicyBusy, PolicyClient, PolicyResponse, PolicyThread, ReloadId,
    MAX_QUEUED_REQUESTS,
};

/// Log lines a policy may write in one call; more are counted and left out.
pub const MAX_LOG_LINES_PER_CALL: usize = 16;
/// Bytes kept of one log line.
pub const MAX_LOG_LINE: usize = 1024;

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error, serde::Serialize)]
#[error("policy {name:?} ({}): {reason}", path.display())]
pub struct PolicyError {
    /// The policy's configured name.
    pub name: String,
    /// Its component file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Something a policy call reported, for the caller to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyNote {
    /// The policy's name.
    pub policy: String,
    /// What happened.
    pub kind: NoteKind,
}

/// What a [`PolicyNote`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteKind {
    /// The policy wrote a log line through the host's `log`.
    Log {
        /// Its level.
        level: LogLevel,
        /// Its text (at most [`MAX_LOG_LINE`] bytes).
        message: String,
    },
    /// The call failed and `on_error` was applied.
    Failed {
        /// How it failed.
        failure: Failure,
        /// What `on_error` made of it.
        on_error: crate::config::OnError,
    },
    /// The policy answered something the contract does not allow (an option code hubnat
    /// owns, an over-long option); that part of the answer was ignored.
    Ignored(String),
    /// More log lines than [`MAX_LOG_LINES_PER_CALL`] were left out.
    LogLinesDropped(usize),
    /// The policy changed the DHCP reply (the security log names it).
    ChangedReply,
}

/// How a policy call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It ran past its `timeout`.
    Timeout,
    /// It tried to grow its memory past `memory`.
    OutOfMemory,
    /// It trapped (the message is wasmtime's).
    Trap(String),
    /// Its instance could not be made afresh after an earlier failure.
    Broken(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("ran past its timeout"),
            Failure::OutOfMemory => f.write_str("tried to grow its memory past its limit"),
            Failure::Trap(why) => write!(f, "trapped: {why}"),
            Failure::Broken(why) => write!(f, "cannot be instantiated: {why}"),
        }
    }
}

/// The level of a policy's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `debug`.
    Debug,
    /// `info`.
    Info,
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

impl PolicyNote {
    /// Writes the note to the diagnostic log (`tracing`), with the policy's name as a field.
    pub fn emit(&self) {
        let policy = self.policy.as_str();
        match &self.kind {
            NoteKind::Log { level, message } => match level {
                LogLevel::Debug => tracing::debug!(policy, "{message}"),
                LogLevel::Info => tracing::info!(policy, "{message}"),
                LogLevel::Warn => tracing::warn!(policy, "{message}"),
                LogLevel::Error => tracing::error!(policy, "{message}"),
            },
            NoteKind::Failed { failure, on_error } => {
                tracing::warn!(policy, %on_error, "policy call failed: {failure}; on_error = {on_error} applied")
            }
            NoteKind::Ignored(what) => tracing::warn!(policy, "policy answer ignored: {what}"),
            NoteKind::LogLinesDropped(n) => {
                tracing::warn!(policy, "{n} log lines of one call left out")
            }
            NoteKind::ChangedReply => tracing::debug!(policy, "changed a DHCP reply"),
        }
    }
}

/// The built component `name` (`target/policies/NAME.wasm`, from `scripts/build-policies.sh`),
/// or a panic that says how to build it. For tests and benches.
#[doc(hidden)]
pub fn built_component(name: &str) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/policies")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-policies.sh first (it builds the policies for \
         wasm32-wasip2; scripts/test.sh runs it)",
        path.display()
    );
    path
}

/// The policies see a DHCP exchange in the core's terms (`src/core/dhcp/hook.rs`).
pub use crate::core::dhcp::{DhcpClientInfo, DhcpMessageKind, DhcpReplyInfo, OptionBytes};

/// What becomes of a DHCP reply after the policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpOutcome {
    /// Send this reply (unchanged, or as the policies changed it).
    Reply(DhcpReplyInfo),
    /// Send nothing.
    NoReply {
        /// The policy that said so (by its answer, or by its `on_error = "deny"`).
        by: String,
    },
}

/// Option codes a policy may not set or remove: pad, end, the message type, the server id,
/// and the lease time (which a policy changes with `lease-seconds`).
pub const RESERVED_OPTIONS: [u8; 5] = [0, 51, 53, 54, 255];
