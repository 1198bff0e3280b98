//! The policy thread: policy calls off the frame path, requests in, answers out.
//!
//! [`PolicyThread::spawn`] moves a [`PolicySet`] onto a thread of its own and gives back a
//! [`PolicyClient`] (cheap to clone) and the receiving end of the answers. The thread takes
//! requests in order from one bounded queue ([`MAX_QUEUED_REQUESTS`]): a session check, a DHCP
//! reply to customise, or a reload, which swaps the set between two calls. It ends when every
//! `PolicyClient` is gone, or when nobody receives the answers any more.
//!
//! As the core's [`SessionPolicy`], a `PolicyClient` queues the flow and answers
//! [`PolicyAnswer::Later`]; the driver receives [`PolicyResponse::Verdict`] and passes the
//! decision to `VirtualHost::handle_verdict`. When no policy in force has a session filter it
//! answers allow at once, and when the queue is full (or the thread has stopped) it answers
//! drop at once, by "policy-queue": under such a load a new flow waits no better.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use super::ReloadReport;
use super::{DhcpClientInfo, DhcpOutcome, DhcpReplyInfo, PolicyNote, PolicyReload, PolicySet};
use crate::config::PolicyConfig;
use crate::core::nat::{Decision, FlowInfo, FlowTicket, PolicyAnswer, SessionPolicy, Verdict};

/// Requests queued for the policy thread at once, at most.
pub const MAX_QUEUED_REQUESTS: usize = 2048;

/// The name a decision carries when the policy thread could not take the flow.
const BUSY: &str = "policy-queue";

/// The driver's name for one DHCP reply waiting for the policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DhcpRequestId(pub u64);

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
    Reload(PolicyReload),
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
    Reloaded(ReloadReport),
}

/// The way to the policy thread. Clones share the thread.
#[derive(Debug, Clone)]
pub struct PolicyClient {
    requests: async_channel::Sender<Request>,
    /// Whether a policy in force filters sessions (kept by the thread).
    filters_sessions: Arc<AtomicBool>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Session { ticket, .. } => write!(f, "Session({ticket:?})"),
            Request::Dhcp { id, .. } => write!(f, "Dhcp({id:?})"),
            Request::Reload(r) => write!(f, "Reload({r:?})"),
        }
    }
}

impl PolicyClient {
    /// Queues a DHCP reply for the customizers; the answer is a [`PolicyResponse::Dhcp`] with
    /// `id`. Does not block. `Err` when the queue is full or the thread has stopped (send the
    /// reply unchanged, or not at all, as the caller sees fit).
    pub fn customize_dhcp(
        &self,
        id: DhcpRequestId,
        client: DhcpClientInfo,
        reply: DhcpReplyInfo,
    ) -> Result<(), PolicyBusy> {
        self.requests
            .try_send(Request::Dhcp { id, client, reply })
            .map_err(|_| PolicyBusy)
    }

    /// Queues a reload, waiting for room in the queue; the answer is a
    /// [`PolicyResponse::Reloaded`]. `Err` only when the thread has stopped.
    pub async fn reload(&self, reload: PolicyReload) -> Result<(), PolicyBusy> {
        self.requests
            .send(Request::Reload(reload))
            .await
            .map_err(|_| PolicyBusy)
    }

    /// [`reload`](Self::reload), blocking the calling thread.
    pub fn reload_blocking(&self, reload: PolicyReload) -> Result<(), PolicyBusy> {
        self.requests
            .send_blocking(Request::Reload(reload))
            .map_err(|_| PolicyBusy)
    }

    /// Loads `configs` on a new thread (compiling takes time) and then queues the reload; the
    /// answer is a [`PolicyResponse::Reloaded`]. `Err` if the thread cannot be started.
    pub fn reload_from(&self, configs: Vec<PolicyConfig>) -> io::Result<()> {
        let client = self.clone();
        thread::Builder::new()
            .name("hubnat-policy-load".into())
            .spawn(move || {
                let reload = PolicyReload::load(&configs);
                // The thread has stopped if this fails; nobody is left to tell.
                let _ = client.reload_blocking(reload);
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
        let (answers, responses) = async_channel::bounded(MAX_QUEUED_REQUESTS);
        let filters_sessions = Arc::new(AtomicBool::new(set.has_session_filter()));
        let flag = filters_sessions.clone();
        let handle = thread::Builder::new()
            .name("hubnat-policy".into())
            .spawn(move || serve(set, &queue, &answers, &flag))?;
        let client = PolicyClient {
            requests,
            filters_sessions,
        };
        Ok((client, responses, PolicyThread { handle }))
    }

    /// Waits for the thread to end (drop every [`PolicyClient`] first).
    pub fn join(self) -> thread::Result<()> {
        self.handle.join()
    }
}

fn serve(
    mut set: PolicySet,
    queue: &async_channel::Receiver<Request>,
    answers: &async_channel::Sender<PolicyResponse>,
    filters_sessions: &AtomicBool,
) {
    while let Ok(request) = queue.recv_blocking() {
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
            Request::Reload(reload) => {
                let report = set.apply_reload(reload);
                filters_sessions.store(set.has_session_filter(), Ordering::Release);
                PolicyResponse::Reloaded(report)
            }
        };
        if answers.send_blocking(response).is_err() {
            return;
        }
    }
}
