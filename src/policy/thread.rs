//! The policy thread: policy calls off the frame path, requests in, answers out.
//!
//! [`PolicyThread::spawn`] moves a [`PolicySet`] onto a thread of its own and gives back a
//! [`PolicyClient`] (cheap to clone) and the receiving end of the answers. The thread takes
//! requests from two bounded queues: DHCP replies to customise and reloads (which swap the set
//! between two calls) from one, served first, and session checks from the other
//! ([`MAX_QUEUED_REQUESTS`]), each in order. So a storm of new flows, each call using its whole
//! time budget, delays no client's DHCP and no reload by more than one call. The thread ends
//! when every `PolicyClient` is gone (after answering what was queued), or when nobody
//! receives the answers any more.
//!
//! As the core's [`SessionPolicy`], a `PolicyClient` queues the flow and answers
//! [`PolicyAnswer::Later`]; the driver receives [`PolicyResponse::Verdict`] and passes the
//! decision to `VirtualHost::handle_verdict`. When no policy in force has a session filter it
//! answers allow at once, and when the queue is full (or the thread has stopped) it answers
//! drop at once, by "policy-queue": under such a load a new flow waits no better.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use super::stats::InForce;
use super::{DhcpClientInfo, DhcpOutcome, DhcpReplyInfo, PolicyNote, PolicyReload, PolicySet};
use super::{PolicyInfo, ReloadReport};
use crate::config::PolicyConfig;
use crate::core::nat::{Decision, FlowInfo, FlowTicket, PolicyAnswer, SessionPolicy, Verdict};

/// Session checks queued for the policy thread at once, at most.
pub const MAX_QUEUED_REQUESTS: usize = 2048;

/// DHCP replies and reloads queued at once, at most (the core holds at most
/// [`MAX_PENDING_REPLIES`](crate::core::dhcp::hook::MAX_PENDING_REPLIES) replies waiting).
const MAX_QUEUED_URGENT: usize = 512;

/// The name a decision carries when the policy thread could not take the flow.
const BUSY: &str = "policy-queue";

/// The driver's name for one DHCP reply waiting for the policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DhcpRequestId(pub u64);

/// The driver's name for one reload, to match its report to whoever asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReloadId(pub u64);

/// The policy thread's queue is full, or the thread has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the policy thread's queue is full, or the thread has stopped")]
pub struct PolicyBusy;

enum Request {
    Session {
        ticket: FlowTicket,
        flow: FlowInfo,
    },
    Dhcp {
        id: DhcpRequestId,
        client: DhcpClientInfo,
        reply: DhcpReplyInfo,
    },
    Reload(PolicyReload, ReloadId),
}

/// An answer from the policy thread.
#[derive(Debug)]
pub enum PolicyResponse {
    /// The decision on a flow the core is holding (pass it to `VirtualHost::handle_verdict`).
    Verdict {
        /// The flow.
        ticket: FlowTicket,
        /// The decision.
        decision: Decision,
        /// For the log ([`PolicyNote::emit`]).
        notes: Vec<PolicyNote>,
    },
    /// What becomes of a DHCP reply.
    Dhcp {
        /// The reply's request.
        id: DhcpRequestId,
        /// Send it (perhaps changed), or not.
        outcome: DhcpOutcome,
        /// For the log.
        notes: Vec<PolicyNote>,
    },
    /// A reload was applied (or not, for the policies in `errors`).
    Reloaded {
        /// The reload's request.
        id: ReloadId,
        /// What it did.
        report: ReloadReport,
    },
}

/// The way to the policy thread. Clones share the thread.
#[derive(Debug, Clone)]
pub struct PolicyClient {
    /// Session checks.
    requests: async_channel::Sender<Request>,
    /// DHCP replies and reloads, served before any session check.
    urgent: async_channel::Sender<Request>,
    /// Whether a policy in force filters sessions (kept by the thread).
    filters_sessions: Arc<AtomicBool>,
    /// Whether a policy in force customises DHCP replies (kept by the thread).
    customizes_dhcp: Arc<AtomicBool>,
    /// The policies in force and their counters (published by the thread).
    in_force: InForce,
    /// The set's directory of compiled modules, for reloads.
    cache: Option<PathBuf>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Session { ticket, .. } => write!(f, "Session({ticket:?})"),
            Request::Dhcp { id, .. } => write!(f, "Dhcp({id:?})"),
            Request::Reload(r, id) => write!(f, "Reload({r:?}, {id:?})"),
        }
    }
}

impl PolicyClient {
    /// The policies in force, in order, with their counters (a snapshot; does not wait for
    /// the thread).
    pub fn policies(&self) -> Vec<PolicyInfo> {
        self.in_force.snapshot()
    }

    /// Whether a policy in force customises DHCP replies: when not, a reply need not wait.
    pub fn customizes_dhcp(&self) -> bool {
        self.customizes_dhcp.load(Ordering::Acquire)
    }

    /// Queues a DHCP reply for the customizers; the answer is a [`PolicyResponse::Dhcp`] with
    /// `id`. Does not block. `Err` when the queue is full or the thread has stopped (send the
    /// reply unchanged, or not at all, as the caller sees fit).
    pub fn customize_dhcp(
        &self,
        id: DhcpRequestId,
        client: DhcpClientInfo,
        reply: DhcpReplyInfo,
    ) -> Result<(), PolicyBusy> {
        self.urgent
            .try_send(Request::Dhcp { id, client, reply })
            .map_err(|_| PolicyBusy)
    }

    /// Queues a reload, waiting for room in the queue; the answer is a
    /// [`PolicyResponse::Reloaded`] with `id`. `Err` only when the thread has stopped.
    pub async fn reload(&self, reload: PolicyReload, id: ReloadId) -> Result<(), PolicyBusy> {
        self.urgent
            .send(Request::Reload(reload, id))
            .await
            .map_err(|_| PolicyBusy)
    }

    /// [`reload`](Self::reload), blocking the calling thread.
    pub fn reload_blocking(&self, reload: PolicyReload, id: ReloadId) -> Result<(), PolicyBusy> {
        self.urgent
            .send_blocking(Request::Reload(reload, id))
            .map_err(|_| PolicyBusy)
    }

    /// Loads `configs` on a new thread (compiling takes time) and then queues the reload; the
    /// answer is a [`PolicyResponse::Reloaded`] with `id`. `Err` if the thread cannot be
    /// started.
    pub fn reload_from(&self, configs: Vec<PolicyConfig>, id: ReloadId) -> io::Result<()> {
        let client = self.clone();
        thread::Builder::new()
            .name("hubnat-policy-load".into())
            .spawn(move || {
                let reload = PolicyReload::load(&configs, client.cache.as_deref());
                // The thread has stopped if this fails; nobody is left to tell.
                let _ = client.reload_blocking(reload, id);
            })
            .map(|_| ())
    }
}

impl SessionPolicy for PolicyClient {
    fn check(&mut self, ticket: FlowTicket, flow: &FlowInfo) -> PolicyAnswer {
        if !self.filters_sessions.load(Ordering::Acquire) {
            return PolicyAnswer::Decided(Decision::allow());
        }
        let request = Request::Session {
            ticket,
            flow: flow.clone(),
        };
        match self.requests.try_send(request) {
            Ok(()) => PolicyAnswer::Later,
            Err(_) => PolicyAnswer::Decided(Decision {
                verdict: Verdict::Drop,
                by: Some(BUSY.into()),
            }),
        }
    }
}

/// The thread that runs the policies.
#[derive(Debug)]
pub struct PolicyThread {
    handle: thread::JoinHandle<()>,
}

impl PolicyThread {
    /// Starts the thread with `set`. Answers come on the receiver; the thread ends when every
    /// [`PolicyClient`] is dropped (after answering what was queued) or the receiver is.
    pub fn spawn(
        set: PolicySet,
    ) -> io::Result<(
        PolicyClient,
        async_channel::Receiver<PolicyResponse>,
        PolicyThread,
    )> {
        let (requests, queue) = async_channel::bounded(MAX_QUEUED_REQUESTS);
        let (urgent, urgent_queue) = async_channel::bounded(MAX_QUEUED_URGENT);
        let (answers, responses) = async_channel::bounded(MAX_QUEUED_REQUESTS + MAX_QUEUED_URGENT);
        let client = PolicyClient {
            requests,
            urgent,
            filters_sessions: Arc::default(),
            customizes_dhcp: Arc::default(),
            in_force: InForce::default(),
            cache: set.cache().map(Path::to_owned),
        };
        let published = client.clone_flags();
        published.publish(&set);
        let handle = thread::Builder::new()
            .name("hubnat-policy".into())
            .spawn(move || serve(set, &urgent_queue, &queue, &answers, &published))?;
        Ok((client, responses, PolicyThread { handle }))
    }

    /// Waits for the thread to end (drop every [`PolicyClient`] first).
    pub fn join(self) -> thread::Result<()> {
        self.handle.join()
    }
}

/// What the thread publishes about the set in force: a [`PolicyClient`] without the way in
/// (holding one would keep the thread alive).
struct Published {
    filters_sessions: Arc<AtomicBool>,
    customizes_dhcp: Arc<AtomicBool>,
    in_force: InForce,
}

impl PolicyClient {
    fn clone_flags(&self) -> Published {
        Published {
            filters_sessions: self.filters_sessions.clone(),
            customizes_dhcp: self.customizes_dhcp.clone(),
            in_force: self.in_force.clone(),
        }
    }
}

impl Published {
    fn publish(&self, set: &PolicySet) {
        self.filters_sessions
            .store(set.has_session_filter(), Ordering::Release);
        self.customizes_dhcp
            .store(set.has_dhcp_customizer(), Ordering::Release);
        self.in_force.publish(set.stats());
    }
}

/// The next request: a queued DHCP reply or reload before any session check. `None` once
/// both queues are closed (every client gone) and empty.
fn next_request(
    urgent: &async_channel::Receiver<Request>,
    sessions: &async_channel::Receiver<Request>,
) -> Option<Request> {
    use futures_lite::FutureExt;
    if let Ok(request) = urgent.try_recv() {
        return Some(request);
    }
    // `or` polls the urgent queue first, so a DHCP reply ready with a check wins.
    let either = async { urgent.recv().await.ok() }.or(async { sessions.recv().await.ok() });
    futures_lite::future::block_on(either)
        // One queue is closed (the clients are gone); what the other still holds is answered.
        .or_else(|| urgent.try_recv().ok())
        .or_else(|| sessions.try_recv().ok())
}

fn serve(
    mut set: PolicySet,
    urgent: &async_channel::Receiver<Request>,
    sessions: &async_channel::Receiver<Request>,
    answers: &async_channel::Sender<PolicyResponse>,
    published: &Published,
) {
    while let Some(request) = next_request(urgent, sessions) {
        let response = match request {
            Request::Session { ticket, flow } => {
                let (decision, notes) = set.check_session(&flow);
                PolicyResponse::Verdict {
                    ticket,
                    decision,
                    notes,
                }
            }
            Request::Dhcp { id, client, reply } => {
                let (outcome, notes) = set.customize_dhcp(client, reply);
                PolicyResponse::Dhcp { id, outcome, notes }
            }
            Request::Reload(reload, id) => {
                let report = set.apply_reload(reload);
                published.publish(&set);
                PolicyResponse::Reloaded { id, report }
            }
        };
        if answers.send_blocking(response).is_err() {
            return;
        }
    }
}
