//! What each policy in force is, and what its calls did: the answer to `hubnat policy list`
//! and the source of the policy metrics.
//!
//! Each loaded policy owns one [`Stats`] behind an `Arc`. The policy thread counts into it
//! with relaxed atomics (one writer; readers only need each counter to be monotonic), and the
//! thread publishes the list of the `Arc`s in force ([`InForce`]) at start and after every
//! reload, so another thread reads a snapshot ([`PolicyInfo`]) without queuing behind calls.
//! A policy that a reload loads anew starts from zero (its `loaded` time says so); one kept
//! because its new module failed keeps its counts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Serialize;

use super::Failure;
use crate::config::{OnError, PolicyConfig};
use crate::core::nat::Verdict;

/// One policy in force: its configuration and what its calls did since it was loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyInfo {
    /// Its configured name.
    pub name: String,
    /// Its component file.
    pub path: PathBuf,
    /// Whether it exports `session-filter`.
    pub session_filter: bool,
    /// Whether it exports `dhcp-customizer`.
    pub dhcp_customizer: bool,
    /// What a failed call means.
    pub on_error: OnError,
    /// The time bound of one call (`"5ms"`).
    pub timeout: String,
    /// The memory bound, bytes.
    pub memory: u64,
    /// When this module was loaded.
    #[serde(serialize_with = "rfc3339")]
    pub loaded: SystemTime,
    /// What its calls did.
    pub calls: PolicyCalls,
}

/// Counts of one policy's calls and their outcomes, since it was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PolicyCalls {
    /// Session checks.
    pub session: u64,
    /// DHCP replies customised.
    pub dhcp: u64,
    /// Session verdicts: reject (a failed call under `on_error = "deny"` included).
    pub rejected: u64,
    /// Session verdicts: drop.
    pub dropped: u64,
    /// Session verdicts: redirect.
    pub redirected: u64,
    /// DHCP answers that changed the reply.
    pub dhcp_changed: u64,
    /// DHCP answers that asked for no reply (a failed call under `on_error = "deny"` included).
    pub dhcp_no_reply: u64,
    /// Calls that ran past the timeout.
    pub timeouts: u64,
    /// Calls that tried to grow memory past the bound.
    pub out_of_memory: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls refused because the instance could not be made afresh.
    pub broken: u64,
}

impl PolicyCalls {
    /// Failed calls of every kind.
    pub fn errors(&self) -> u64 {
        self.timeouts + self.out_of_memory + self.traps + self.broken
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

/// One policy's live counters and fixed description.
#[derive(Debug)]
pub(super) struct Stats {
    name: String,
    path: PathBuf,
    session_filter: bool,
    dhcp_customizer: bool,
    on_error: OnError,
    timeout: String,
    memory: u64,
    loaded: SystemTime,
    session: AtomicU64,
    dhcp: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    redirected: AtomicU64,
    dhcp_changed: AtomicU64,
    dhcp_no_reply: AtomicU64,
    timeouts: AtomicU64,
    out_of_memory: AtomicU64,
    traps: AtomicU64,
    broken: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub(super) fn new(cfg: &PolicyConfig, session_filter: bool, dhcp_customizer: bool) -> Self {
        Stats {
            name: cfg.name.clone(),
            path: cfg.path.clone(),
            session_filter,
            dhcp_customizer,
            on_error: cfg.on_error,
            timeout: humantime::format_duration(cfg.timeout).to_string(),
            memory: cfg.memory,
            loaded: SystemTime::now(),
            session: AtomicU64::new(0),
            dhcp: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            redirected: AtomicU64::new(0),
            dhcp_changed: AtomicU64::new(0),
            dhcp_no_reply: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            out_of_memory: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            broken: AtomicU64::new(0),
        }
    }

    /// A session check ended with `verdict`.
    pub(super) fn session_call(&self, verdict: &Verdict) {
        bump(&self.session);
        match verdict {
            Verdict::Allow => {}
            Verdict::Reject => bump(&self.rejected),
            Verdict::Drop => bump(&self.dropped),
            Verdict::Redirect(_) => bump(&self.redirected),
        }
    }

    /// A DHCP call ended: the reply changed, or no reply is to be sent.
    pub(super) fn dhcp_call(&self, changed: bool, no_reply: bool) {
        bump(&self.dhcp);
        if no_reply {
            bump(&self.dhcp_no_reply);
        } else if changed {
            bump(&self.dhcp_changed);
        }
    }

    /// A call failed.
    pub(super) fn failure(&self, failure: &Failure) {
        bump(match failure {
            Failure::Timeout => &self.timeouts,
            Failure::OutOfMemory => &self.out_of_memory,
            Failure::Trap(_) => &self.traps,
            Failure::Broken(_) => &self.broken,
        });
    }

    pub(super) fn info(&self) -> PolicyInfo {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PolicyInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            session_filter: self.session_filter,
            dhcp_customizer: self.dhcp_customizer,
            on_error: self.on_error,
            timeout: self.timeout.clone(),
            memory: self.memory,
            loaded: self.loaded,
            calls: PolicyCalls {
                session: get(&self.session),
                dhcp: get(&self.dhcp),
                rejected: get(&self.rejected),
                dropped: get(&self.dropped),
                redirected: get(&self.redirected),
                dhcp_changed: get(&self.dhcp_changed),
                dhcp_no_reply: get(&self.dhcp_no_reply),
                timeouts: get(&self.timeouts),
                out_of_memory: get(&self.out_of_memory),
                traps: get(&self.traps),
                broken: get(&self.broken),
            },
        }
    }
}

/// The policies in force, as the policy thread last published them.
#[derive(Debug, Clone, Default)]
pub(super) struct InForce(Arc<RwLock<Vec<Arc<Stats>>>>);

impl InForce {
    pub(super) fn publish(&self, list: Vec<Arc<Stats>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = list;
    }

    pub(super) fn snapshot(&self) -> Vec<PolicyInfo> {
        let list = self.0.read().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|s| s.info()).collect()
    }
}
