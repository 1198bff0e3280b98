//! The host side of the sessions: each session's OS socket and the task serving it, the DNS
//! queries, and the execution of the core's [`HostOp`]s. Tasks report what happened
//! ([`HostEvent`]); they never end a session. [`HostOp::Close`] drops a session's socket and
//! task, a connect under way included.
//!
//! Each DNS query ([`HostOp::DnsSend`]) goes out on a socket of its own
//! ([`host::dns_query_socket`]: a random source port, connected to the upstream), whose task
//! waits for one answer for [`DNS_ANSWER_WAIT`] and then closes it. The core bounds the
//! queries waiting at once, so these sockets are bounded too.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use async_executor::{LocalExecutor, Task};
use hubnat_backend::rt::{Io, Timer};

use super::Clock;
use crate::core::nat::{HostError, HostEvent, HostOp, SessionId};
use crate::core::{Instant, VirtualHost};
use crate::host;

/// What the main loop and the session tasks share, on one thread.
pub(super) struct Shared {
    pub(super) core: RefCell<VirtualHost>,
    pub(super) clock: Clock,
    /// Wakes the main loop to poll the core and send what it produced.
    pub(super) kick: async_channel::Sender<()>,
    /// Each session's host socket and the task serving it.
    pub(super) sockets: RefCell<HashMap<SessionId, HostSide>>,
    /// When a host socket last failed to open for lack of resources (rate-limited warnings).
    pub(super) last_open_warning: Cell<Option<std::time::Instant>>,
    /// Open failures not warned about since the last warning.
    pub(super) unwarned_open_failures: Cell<u64>,
}

/// How long a DNS query's socket waits for its answer: the core's time for one upstream
/// ([`QUERY_TIMEOUT`](crate::core::dns::QUERY_TIMEOUT); after it the core asks the next
/// upstream, and a late answer would be ignored) and a second for the loop to get there.
pub const DNS_ANSWER_WAIT: Duration = Duration::from_secs(3);

/// A TCP session's stream, once connected (shared by its task and the map, so that an abort
/// can set SO_LINGER before the drop).
type StreamSlot = Rc<RefCell<Option<Rc<Io<TcpStream>>>>>;

/// The host side of one session; dropping it cancels the task and closes the socket. (The
/// tasks are only held, for that drop.)
#[allow(dead_code)]
pub(super) enum HostSide {
    Tcp(StreamSlot, Task<()>),
    Udp(Rc<Io<UdpSocket>>, Task<()>),
    Icmp(Rc<Io<socket2::Socket>>, Task<()>),
}

impl Shared {
    pub(super) fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    pub(super) fn now(&self) -> Instant {
        self.clock.now()
    }

    /// A host socket could not be opened for lack of resources: warn at most once a second,
    /// with the count of the failures in between (a flood must not flood the log too).
    fn warn_open_failure(&self, id: SessionId, e: &io::Error) {
        if HostError::from_io(e) != HostError::Resources {
            tracing::debug!(session = %id, error = %e, "nat: host socket failed");
            return;
        }
        let now = std::time::Instant::now();
        let due = self
            .last_open_warning
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            let more = self.unwarned_open_failures.replace(0);
            self.last_open_warning.set(Some(now));
            tracing::warn!(session = %id, error = %e, more, "nat: cannot open a host socket ({}); session refused", HostError::from_io(e).as_str());
        } else {
            self.unwarned_open_failures
                .set(self.unwarned_open_failures.get() + 1);
        }
    }

    /// Carries out the core's requests: opens sockets, sends datagrams, starts and ends tasks;
    /// then reports what failed.
    pub(super) fn run_host_ops(shared: &Rc<Shared>, ex: &Rc<LocalExecutor<'static>>) {
        enum Failure {
            Open(SessionId, io::Error),
            Send(SessionId, io::Error),
        }
        let mut failed: Vec<Failure> = Vec::new();
        let mut icmp_buf = Vec::new();
        let mut closed = Vec::new();
        {
            let mut core = shared.core.borrow_mut();
            core.drain_host_ops(|op| match op {
                HostOp::TcpConnect { id, target } => {
                    let slot: StreamSlot = Rc::new(RefCell::new(None));
                    let task = ex.spawn(tcp_session(shared.clone(), id, target, slot.clone()));
                    shared
                        .sockets
                        .borrow_mut()
                        .insert(id, HostSide::Tcp(slot, task));
                }
                HostOp::UdpOpen { id, target } => match host::udp_connect(target) {
                    Ok(sock) => {
                        let sock = Rc::new(sock);
                        let task = ex.spawn(udp_replies(shared.clone(), id, sock.clone()));
                        shared
                            .sockets
                            .borrow_mut()
                            .insert(id, HostSide::Udp(sock, task));
                    }
                    Err(e) => failed.push(Failure::Open(id, e)),
                },
                HostOp::UdpSend { id, payload } => {
                    let sockets = shared.sockets.borrow();
                    if let Some(HostSide::Udp(s, _)) = sockets.get(&id) {
                        if let Err(e) = s.get_ref().send(payload) {
                            failed.push(Failure::Send(id, e));
                        }
                    }
                }
                HostOp::IcmpOpen { id, target } => match host::ping_socket(target) {
                    Ok(sock) => {
                        let sock = Rc::new(sock);
                        let task = ex.spawn(icmp_replies(shared.clone(), id, sock.clone()));
                        shared
                            .sockets
                            .borrow_mut()
                            .insert(id, HostSide::Icmp(sock, task));
                    }
                    Err(e) => failed.push(Failure::Open(id, e)),
                },
                HostOp::IcmpSend { id, seq, payload } => {
                    host::echo_request(&mut icmp_buf, seq, payload);
                    let sockets = shared.sockets.borrow();
                    if let Some(HostSide::Icmp(s, _)) = sockets.get(&id) {
                        if let Err(e) = s.get_ref().send(&icmp_buf) {
                            failed.push(Failure::Send(id, e));
                        }
                    }
                }
                HostOp::DnsSend { upstream, payload } => match host::dns_query_socket(upstream) {
                    Ok(sock) => match sock.get_ref().send(payload) {
                        Ok(_) => ex.spawn(dns_answer(shared.clone(), sock)).detach(),
                        Err(e) => {
                            tracing::debug!(%upstream, error = %e, "dns: cannot send the query")
                        }
                    },
                    // The client retries; the core answers SERVFAIL when the upstreams run out.
                    Err(e) => tracing::debug!(error = %e, "dns: cannot open a socket for a query"),
                },
                HostOp::Close { id, abort } => {
                    let side = shared.sockets.borrow_mut().remove(&id);
                    if let Some(HostSide::Tcp(slot, _)) = &side {
                        if abort {
                            if let Some(stream) = slot.borrow().as_ref() {
                                host::set_reset_on_close(stream.get_ref());
                            }
                        }
                    }
                    // Dropped after the core is released: the task's destructor may not
                    // borrow it, but keep the order simple.
                    closed.push(side);
                }
            });
        }
        drop(closed);
        if !failed.is_empty() {
            let now = shared.now();
            let mut core = shared.core.borrow_mut();
            for f in &failed {
                match f {
                    Failure::Open(id, e) => {
                        shared.warn_open_failure(*id, e);
                        core.nat_host_event(*id, HostEvent::OpenFailed(e), now);
                    }
                    Failure::Send(id, e) => core.nat_host_event(*id, HostEvent::SendFailed(e), now),
                }
            }
            drop(core);
            shared.kick();
        }
    }
}

/// One TCP session on the host side: connect, report, then relay until the core closes it
/// (the task is dropped on [`HostOp::Close`], which may come at any point, the connect
/// included).
async fn tcp_session(shared: Rc<Shared>, id: SessionId, target: SocketAddr, slot: StreamSlot) {
    let stream = match host::tcp_connect(target).await {
        Ok(s) => Rc::new(s),
        Err(e) => {
            shared.warn_open_failure(id, &e);
            tracing::debug!(session = %id, %target, error = %e, "nat: connect failed");
            let now = shared.now();
            shared
                .core
                .borrow_mut()
                .nat_host_event(id, HostEvent::ConnectFailed(&e), now);
            shared.kick();
            return;
        }
    };
    *slot.borrow_mut() = Some(stream.clone());
    let now = shared.now();
    shared
        .core
        .borrow_mut()
        .nat_host_event(id, HostEvent::Connected, now);
    shared.kick();
    relay(&shared, id, &stream).await;
}

/// What one relay step learnt about the host socket.
enum Learnt {
    WriteShut,
    EndOfStream,
    Failed(io::Error),
}

/// Moves bytes between the client's connection (in smoltcp) and the host stream, reporting
/// the host side's EOF, errors and write shutdown to the core, until the session is gone.
async fn relay(shared: &Shared, id: SessionId, stream: &Io<TcpStream>) {
    let mut learnt: Vec<Learnt> = Vec::new();
    // What a pass learnt after it had moved bytes to the client: reported on the next pass,
    // once the driver has sent those bytes, so that a remote's data and then its reset reach
    // the client in that order (a reset reported at once would abort smoltcp's socket with the
    // bytes still in it).
    let mut deferred: Vec<Learnt> = Vec::new();
    // How long the client has to acknowledge those bytes before the news goes anyway.
    let mut deferred_until: Option<Timer> = None;
    std::future::poll_fn(|cx| {
        let now = shared.now();
        let mut core = shared.core.borrow_mut();
        if !deferred.is_empty() {
            let all_sent = match core.nat_tcp_relay(id, now) {
                Some(mut relay) => {
                    relay.register_waker(cx.waker());
                    relay.all_sent()
                }
                None => return Poll::Ready(()),
            };
            let timed_out = deferred_until
                .as_mut()
                .is_none_or(|t| std::future::Future::poll(std::pin::Pin::new(t), cx).is_ready());
            if !all_sent && !timed_out {
                return Poll::Pending;
            }
            deferred_until = None;
            for l in deferred.drain(..) {
                report(&mut core, id, l, now);
            }
            drop(core);
            shared.kick();
            return Poll::Pending;
        }
        let mut progress = false;
        let mut filled = false;
        {
            let Some(mut relay) = core.nat_tcp_relay(id, now) else {
                return Poll::Ready(());
            };
            relay.register_waker(cx.waker());
            // Client → host, straight from smoltcp's receive buffer. The write is tried first:
            // a socket is almost always writable, and asking the reactor first would cost an
            // epoll_ctl and a wake-up per write. Only a full socket waits for writability.
            while relay.has_client_data() {
                match relay.take_client_data(|data| (&mut stream.get_ref()).write(data)) {
                    Ok(0) => break,
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match stream.poll_writable(cx) {
                            Poll::Pending => break,
                            Poll::Ready(Err(e)) => {
                                learnt.push(Learnt::Failed(e));
                                break;
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        learnt.push(Learnt::Failed(e));
                        break;
                    }
                }
            }
            if learnt.is_empty() && relay.client_finished() {
                let _ = stream.get_ref().shutdown(Shutdown::Write);
                learnt.push(Learnt::WriteShut);
            }
            // Host → client, straight into smoltcp's send buffer. The read is tried first too;
            // on WouldBlock the reactor is asked to wake the task when bytes come.
            while learnt.iter().all(|l| matches!(l, Learnt::WriteShut))
                && relay.may_send()
                && relay.has_room()
                // Nothing came since the last read said WouldBlock: no read for nothing.
                && !stream.read_would_block(cx)
            {
                let mut room = 0;
                let r = relay.fill_from_host(|buf| {
                    room = buf.len();
                    if room == 0 {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    (&mut stream.get_ref()).read(buf)
                });
                match r {
                    Ok(0) if room > 0 => {
                        learnt.push(Learnt::EndOfStream);
                        break;
                    }
                    Ok(0) => break,
                    Ok(_) => {
                        progress = true;
                        filled = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && room == 0 => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match stream.poll_readable(cx) {
                            Poll::Pending => break,
                            Poll::Ready(Err(e)) => {
                                learnt.push(Learnt::Failed(e));
                                break;
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        learnt.push(Learnt::Failed(e));
                        break;
                    }
                }
            }
        }
        if filled && learnt.iter().any(|l| matches!(l, Learnt::Failed(_))) {
            deferred.append(&mut learnt);
            deferred_until = Some(Timer::after(RESET_AFTER_DATA_WAIT));
            drop(core);
            shared.kick();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let any = !learnt.is_empty();
        for l in learnt.drain(..) {
            report(&mut core, id, l, now);
        }
        drop(core);
        if progress || any {
            shared.kick();
        }
        Poll::Pending
    })
    .await
}

/// How long a remote's reset waits, at most, for the client to acknowledge the bytes the remote
/// sent just before it.
const RESET_AFTER_DATA_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Tells the core what the relay learnt about session `id`'s host socket.
fn report(core: &mut VirtualHost, id: SessionId, learnt: Learnt, now: Instant) {
    match learnt {
        Learnt::WriteShut => core.nat_host_event(id, HostEvent::WriteShut, now),
        Learnt::EndOfStream => core.nat_host_event(id, HostEvent::EndOfStream, now),
        Learnt::Failed(e) if HostError::from_io(&e) == HostError::Reset => {
            core.nat_host_event(id, HostEvent::Reset, now)
        }
        Learnt::Failed(e) => core.nat_host_event(id, HostEvent::Error(&e), now),
    }
}

/// Datagrams from a UDP session's host socket, back to the client; socket errors (ICMP errors
/// for earlier datagrams, one per entry of the socket's error queue) are reported to the core.
async fn udp_replies(shared: Rc<Shared>, id: SessionId, sock: Rc<Io<UdpSocket>>) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let mut any = false;
        // The last error `recv` returned: the socket's pending error, which is also the last
        // entry of its error queue (reported from there), unless the queue is empty.
        let mut pending = None;
        let now = shared.now();
        let mut core = shared.core.borrow_mut();
        loop {
            let r = core.nat_udp_receive(id, now, |buf| sock.get_ref().recv(buf));
            match r {
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The error is consumed by reading it; the socket carries on.
                Err(e) => pending = Some(e),
            }
        }
        // The error queue (IP_RECVERR), when `recv` failed or found nothing (an entry whose
        // pending error a send took already). It must be emptied: the socket stays readable
        // while it holds an entry.
        let mut queued = false;
        if pending.is_some() || !any {
            while let Some(e) = host::udp_take_error(sock.get_ref()) {
                core.nat_host_event(id, HostEvent::Error(&e), now);
                queued = true;
            }
        }
        if let Some(e) = pending.filter(|_| !queued) {
            core.nat_host_event(id, HostEvent::Error(&e), now);
            any = true;
        }
        drop(core);
        if any || queued {
            shared.kick();
        }
    }
}

/// Echo replies from an ICMP session's ping socket, back to the client.
async fn icmp_replies(shared: Rc<Shared>, id: SessionId, sock: Rc<Io<socket2::Socket>>) {
    let mut buf = vec![0u8; 65536];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let mut any = false;
        loop {
            match sock.get_ref().read(&mut buf) {
                Ok(n) => {
                    let now = shared.now();
                    shared
                        .core
                        .borrow_mut()
                        .nat_icmp_receive(id, now, &buf[..n]);
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if any {
            shared.kick();
        }
    }
}

thread_local! {
    /// Where DNS answers are read: one buffer for every query's task (they run on this
    /// thread, and a read never spans an await), large enough for any UDP answer.
    static DNS_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65536]);
}

/// The answer to one DNS query, on the query's own socket: the first datagram goes to the
/// core, then the socket closes; so does it after [`DNS_ANSWER_WAIT`] or an error (an ICMP
/// port unreachable from the upstream: the core moves on when its timer runs out).
async fn dns_answer(shared: Rc<Shared>, sock: Io<UdpSocket>) {
    let answer = async {
        loop {
            sock.readable().await?;
            let read = DNS_BUF.with_borrow_mut(|buf| match sock.get_ref().recv_from(buf) {
                Ok((n, from)) => {
                    let now = shared.now();
                    shared
                        .core
                        .borrow_mut()
                        .nat_dns_answer(from, &buf[..n], now);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(e),
            });
            if read? {
                shared.kick();
                return Ok(());
            }
        }
    };
    let timeout = async {
        Timer::after(DNS_ANSWER_WAIT).await;
        Ok(())
    };
    let result: io::Result<()> = futures_lite::FutureExt::or(answer, timeout).await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "dns: no answer on the query's socket");
    }
}
