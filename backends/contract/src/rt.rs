//! hubnat's reactor: readiness of file descriptors and timers for futures, driven by
//! [`block_on`] on the thread that polls them, with no helper thread.
//!
//! # Why not async-io
//!
//! async-io keeps one reactor for the process, driven by whichever thread is idle in its
//! `block_on`, or by its own "async-io" thread. Under a steady exchange (a TCP request and its
//! response through the gateway) that thread ends up holding the reactor while the gateway's
//! thread parks, so each readiness crosses threads (an eventfd write, a futex wake), and every
//! wait re-arms a one-shot registration (`epoll_ctl`) and a `timerfd`: about 25 system calls a
//! round trip, half of them on the helper thread. Here each thread that calls [`block_on`] has
//! an epoll instance of its own; descriptors are registered once, edge-triggered, and a wait is
//! one `epoll_pwait` with the nearest timer as its timeout.
//!
//! # The contract
//!
//! * [`Io`] wraps a descriptor (made non-blocking). Try the operation first; call
//!   [`Io::poll_readable`] / [`Io::poll_writable`] (or `readable().await`) only after it
//!   returned `WouldBlock`. (Edge-triggered: readiness is reported when it changes, so a wait
//!   that did not follow a `WouldBlock` could wait for bytes that are already there.) An
//!   answer of ready may be stale; the operation then says `WouldBlock` again, and the next
//!   wait is a real one.
//! * An [`Io`] registers with the reactor of the thread that first waits on it, and must be
//!   waited on from that thread only, inside [`block_on`]; it may be created, moved and
//!   dropped anywhere. Waiting outside [`block_on`] (say, under another runtime's executor)
//!   panics with a message that says so: nothing would ever wake it.
//! * [`Timer`] is this thread's timer (not `Send`).
//! * Wakers are ordinary: a future driven here may wait on anything (an async-channel filled
//!   by another thread, a socket of async-io's); a wake from another thread interrupts the
//!   wait through an eventfd.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// The epoll key of the eventfd that wakes a waiting thread.
const NOTIFY_KEY: u64 = u64::MAX;

/// Events taken from the kernel per wait, at most.
const EVENTS_PER_WAIT: usize = 256;

/// Wake-ups in a row that [`block_on`] answers by polling the future again without looking at
/// the descriptors; then it takes their events without waiting, so that a future that keeps
/// waking itself cannot starve the I/O.
const WOKEN_PASSES: u32 = 16;

/// What other threads may touch of a reactor: the epoll instance, the eventfd, the sources.
#[derive(Debug)]
struct Shared {
    epoll: OwnedFd,
    notify: OwnedFd,
    sources: Mutex<HashMap<u64, Arc<Source>>>,
    next_key: AtomicU64,
}

impl Shared {
    fn new() -> io::Result<Shared> {
        // SAFETY: plain system calls; each returned descriptor is checked and then owned.
        let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let notify = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        let notify = unsafe { OwnedFd::from_raw_fd(notify) };
        let shared = Shared {
            epoll,
            notify,
            sources: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(0),
        };
        shared.ctl(
            libc::EPOLL_CTL_ADD,
            shared.notify.as_raw_fd(),
            libc::EPOLLIN | libc::EPOLLET,
            NOTIFY_KEY,
        )?;
        Ok(shared)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: libc::c_int, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: key,
        };
        // SAFETY: `event` lives across the call; the kernel checks the descriptors.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) }).map(|_| ())
    }

    /// Interrupts the thread's wait (or its next one).
    fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`. A full counter (EAGAIN) is a pending wake anyway.
        let _ = unsafe {
            libc::write(
                self.notify.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn clear_notify(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into `count`; EAGAIN when there was nothing to clear.
        let _ = unsafe {
            libc::read(
                self.notify.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// A registered descriptor's readiness and the tasks waiting for it.
#[derive(Debug)]
struct Source {
    fd: RawFd,
    key: u64,
    state: Mutex<Readiness>,
}

#[derive(Debug, Default)]
struct Readiness {
    readable: bool,
    writable: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// `EPOLLOUT` is in the registration. Only while a task waits to write: a TCP socket
    /// reports an `EPOLLOUT` edge for every ACK that frees room, and each would end a wait.
    out_interest: bool,
}

/// The interest of every registration; `EPOLLOUT` is added while a writer waits.
const INTEREST: libc::c_int = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLET;

/// This thread's reactor.
struct Reactor {
    shared: Arc<Shared>,
    /// Timers by deadline (and a number that keeps equal deadlines apart).
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
    next_timer: Cell<u64>,
    /// Nesting depth of [`block_on`] on this thread (0: nobody drives this reactor).
    driving: Cell<u32>,
    /// The wakers a wait's events take, woken once the sources are unlocked (kept to reuse
    /// its allocation).
    to_wake: RefCell<Vec<Waker>>,
    /// How long a wait polls for events before it sleeps ([`set_busy_poll`]).
    busy_poll: Cell<Duration>,
}

thread_local! {
    static REACTOR: Reactor = Reactor {
        shared: Arc::new(Shared::new().expect("cannot create an epoll instance and an eventfd")),
        timers: RefCell::new(BTreeMap::new()),
        next_timer: Cell::new(0),
        driving: Cell::new(0),
        to_wake: RefCell::new(Vec::new()),
        busy_poll: Cell::new(Duration::ZERO),
    };
}

/// From now on, a wait of this thread's reactor first polls for events without sleeping, for
/// up to `d` (or its timeout, if shorter), and sleeps only if none came (zero, the default:
/// it sleeps at once). A sleeping thread takes tens of microseconds to be scheduled again
/// when its event comes (more in a virtual machine); a thread that polls takes none. That is
/// most of a request/response round trip through the gateway; the price is up to `d` of CPU
/// per wait that ends with nothing, so the gateway sets it only while its traffic is light
/// and quick (see the driver).
pub fn set_busy_poll(d: Duration) {
    REACTOR.with(|r| r.busy_poll.set(d));
}

/// Creates this thread's reactor now (its epoll instance and eventfd), so that it need not be
/// created later (after a seccomp filter is in place, say). Idempotent.
pub fn init() {
    REACTOR.with(|_| ());
}

impl Reactor {
    /// Fires the timers that are due; the nearest deadline left.
    fn fire_timers(&self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        let next = {
            let mut timers = self.timers.borrow_mut();
            while let Some(entry) = timers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            timers.first_key_value().map(|((at, _), _)| *at)
        };
        for waker in due {
            waker.wake();
        }
        next
    }

    /// Waits for events for at most `timeout` (`None`: until one comes) and wakes the tasks
    /// waiting for them. `sleeping` is cleared as soon as the wait is over, before the wakes
    /// (a wake on this thread then needs no eventfd).
    fn wait(&self, timeout: Option<Duration>, sleeping: &AtomicBool) -> io::Result<()> {
        let ms = match timeout {
            None => -1,
            // Rounded up, so that a timer is never found not yet due after the wait.
            Some(t) => i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        let epoll = |events: &mut [libc::epoll_event; EVENTS_PER_WAIT], ms: libc::c_int| {
            // SAFETY: the kernel writes at most EVENTS_PER_WAIT events into `events`.
            unsafe {
                libc::epoll_pwait(
                    self.shared.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS_PER_WAIT as libc::c_int,
                    ms,
                    std::ptr::null(),
                )
            }
        };
        let mut n = 0;
        let spin = timeout.map_or(self.busy_poll.get(), |t| t.min(self.busy_poll.get()));
        let polled = !spin.is_zero();
        if polled {
            let until = Instant::now() + spin;
            loop {
                n = epoll(&mut events, 0);
                if n != 0 || Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        if n == 0 && !(polled && ms == 0) {
            n = epoll(&mut events, ms);
        }
        sleeping.store(false, Ordering::SeqCst);
        let n = match cvt(n) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let mut wake = std::mem::take(&mut *self.to_wake.borrow_mut());
        {
            let sources = self
                .shared
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for event in &events[..n] {
                let (flags, key) = (event.events as libc::c_int, event.u64);
                if key == NOTIFY_KEY {
                    self.shared.clear_notify();
                    continue;
                }
                let Some(source) = sources.get(&key) else {
                    continue;
                };
                let mut state = source.state.lock().unwrap_or_else(|e| e.into_inner());
                let failed = flags & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
                if failed || flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI) != 0 {
                    state.readable = true;
                    wake.extend(state.reader.take());
                }
                if failed || flags & libc::EPOLLOUT != 0 {
                    state.writable = true;
                    match state.writer.take() {
                        Some(w) => wake.push(w),
                        // Nobody waits to write: stop hearing about room.
                        None if state.out_interest => {
                            state.out_interest = false;
                            let _ = self
                                .shared
                                .ctl(libc::EPOLL_CTL_MOD, source.fd, INTEREST, key);
                        }
                        None => {}
                    }
                }
            }
        }
        for waker in wake.drain(..) {
            waker.wake();
        }
        *self.to_wake.borrow_mut() = wake;
        Ok(())
    }
}

/// How [`block_on`]'s future wakes its thread: a flag, and the eventfd when the thread waits.
struct Notifier {
    woken: AtomicBool,
    sleeping: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for Notifier {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.woken.swap(true, Ordering::SeqCst) && self.sleeping.load(Ordering::SeqCst) {
            self.shared.notify();
        }
    }
}

/// Runs `future` to completion on this thread, waiting on this thread's reactor whenever it
/// is pending: the way to drive anything that waits on an [`Io`] or a [`Timer`].
///
/// # Panics
///
/// If the reactor's epoll instance fails (it does not, short of a broken kernel).
pub fn block_on<F: Future>(future: F) -> F::Output {
    REACTOR.with(|reactor| {
        let notifier = Arc::new(Notifier {
            woken: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            shared: reactor.shared.clone(),
        });
        let waker = Waker::from(notifier.clone());
        let mut cx = Context::from_waker(&waker);
        let mut future = pin!(future);
        reactor.driving.set(reactor.driving.get() + 1);
        let _driving = CallOnDrop(|| reactor.driving.set(reactor.driving.get() - 1));
        let mut woken_passes = 0;
        loop {
            notifier.woken.store(false, Ordering::SeqCst);
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
            let next = reactor.fire_timers(Instant::now());
            if notifier.woken.load(Ordering::SeqCst) {
                woken_passes += 1;
                if woken_passes >= WOKEN_PASSES {
                    woken_passes = 0;
                    reactor
                        .wait(Some(Duration::ZERO), &notifier.sleeping)
                        .expect("epoll_pwait");
                }
                continue;
            }
            woken_passes = 0;
            // Wait until something wakes the future: an event or a timer for one of its
            // wakers, or a wake from another thread. Events nobody waits for (readiness the
            // future found by trying first) end a wait, not the loop.
            let mut next = next;
            loop {
                notifier.sleeping.store(true, Ordering::SeqCst);
                if !notifier.woken.load(Ordering::SeqCst) {
                    let timeout = next.map(|at| at.saturating_duration_since(Instant::now()));
                    reactor
                        .wait(timeout, &notifier.sleeping)
                        .expect("epoll_pwait");
                }
                notifier.sleeping.store(false, Ordering::SeqCst);
                next = reactor.fire_timers(Instant::now());
                if notifier.woken.load(Ordering::SeqCst) {
                    break;
                }
            }
        }
    })
}

/// A descriptor registered (on first wait) with the reactor of the thread that waits on it.
/// See the [module documentation](self) for the contract.
#[derive(Debug)]
pub struct Io<T: AsFd> {
    registration: OnceLock<Registration>,
    io: T,
}

#[derive(Debug)]
struct Registration {
    shared: Arc<Shared>,
    key: u64,
    source: Arc<Source>,
}

impl<T: AsFd> Io<T> {
    /// Wraps `io`, putting its descriptor in non-blocking mode.
    ///
    /// # Errors
    ///
    /// When the descriptor's flags cannot be read or set.
    pub fn new(io: T) -> io::Result<Io<T>> {
        let fd = io.as_fd().as_raw_fd();
        // SAFETY: fcntl on a descriptor `io` owns.
        let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
        if flags & libc::O_NONBLOCK == 0 {
            cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        }
        Ok(Io {
            registration: OnceLock::new(),
            io,
        })
    }

    /// Wraps `io`, whose descriptor the caller opened non-blocking (`SOCK_NONBLOCK`), without
    /// the `fcntl` round trip of [`Io::new`]. A blocking descriptor would block the thread.
    pub fn from_nonblocking(io: T) -> Io<T> {
        Io {
            registration: OnceLock::new(),
            io,
        }
    }

    /// The wrapped value.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The wrapped value, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// The registration, made on the first wait (with `EPOLLOUT` when that wait is for
    /// writing: a connect, say, which then needs no second `epoll_ctl`).
    fn registration(&self, write: bool) -> io::Result<&Registration> {
        if let Some(r) = self.registration.get() {
            return Ok(r);
        }
        let (shared, driven) = REACTOR.with(|r| (r.shared.clone(), r.driving.get() > 0));
        assert!(
            driven,
            "a hubnat Io was waited on outside hubnat_backend::rt::block_on, which nothing \
             would ever wake: drive it with rt::block_on on this thread"
        );
        let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
        let fd = self.io.as_fd().as_raw_fd();
        let source = Arc::new(Source {
            fd,
            key,
            state: Mutex::new(Readiness {
                out_interest: write,
                ..Readiness::default()
            }),
        });
        shared
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, source.clone());
        let interest = if write {
            INTEREST | libc::EPOLLOUT
        } else {
            INTEREST
        };
        if let Err(e) = shared.ctl(libc::EPOLL_CTL_ADD, fd, interest, key) {
            shared
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            return Err(e);
        }
        let _ = self.registration.set(Registration {
            shared,
            key,
            source,
        });
        Ok(self.registration.get().expect("just set"))
    }

    fn poll_ready(&self, cx: &mut Context<'_>, write: bool) -> Poll<io::Result<()>> {
        let registration = match self.registration(write) {
            Ok(r) => r,
            Err(e) => return Poll::Ready(Err(e)),
        };
        assert!(
            REACTOR.with(|r| Arc::ptr_eq(&r.shared, &registration.shared)),
            "a hubnat Io was waited on from a thread other than the one it registered on"
        );
        let mut guard = registration
            .source
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        let (ready, waiter) = if write {
            (&mut state.writable, &mut state.writer)
        } else {
            (&mut state.readable, &mut state.reader)
        };
        if std::mem::take(ready) {
            return Poll::Ready(Ok(()));
        }
        match waiter {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waiter = Some(cx.waker().clone()),
        }
        if write && !state.out_interest {
            // Edge-triggered: the kernel reports the descriptor's state as of this change, so
            // room that is there already comes as an event at the next wait.
            let interest = INTEREST | libc::EPOLLOUT;
            let source = &registration.source;
            if let Err(e) =
                registration
                    .shared
                    .ctl(libc::EPOLL_CTL_MOD, source.fd, interest, source.key)
            {
                state.writer = None;
                return Poll::Ready(Err(e));
            }
            state.out_interest = true;
        }
        Poll::Pending
    }

    /// Call right before a read: whether it would say `WouldBlock` for sure (the last one
    /// did, a wait began after it, and no event has come since). Then `cx`'s waker is the one
    /// the next event wakes, and the caller may return pending without the read: a future
    /// polled again for another reason makes no system call for nothing. When it returns
    /// false, the readiness an event reported is taken (the read sees it), so that the
    /// `WouldBlock` that ends this round of reads is followed by a real wait.
    pub fn read_would_block(&self, cx: &mut Context<'_>) -> bool {
        let Some(registration) = self.registration.get() else {
            return false;
        };
        let mut state = registration
            .source
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if state.readable {
            state.readable = false;
            return false;
        }
        match &mut state.reader {
            Some(w) => {
                if !w.will_wake(cx.waker()) {
                    *w = cx.waker().clone();
                }
                true
            }
            None => false,
        }
    }

    /// Ready once the descriptor may be readable: call after a read said `WouldBlock`.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(cx, false)
    }

    /// Ready once the descriptor may be writable: call after a write said `WouldBlock`.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(cx, true)
    }

    /// Waits until the descriptor may be readable: call after a read said `WouldBlock`.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    /// Waits until the descriptor may be writable: call after a write said `WouldBlock`.
    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_writable(cx)).await
    }
}

impl<T: AsFd> Io<T> {
    /// Runs `op` (a read, an accept) until it says something other than `WouldBlock`,
    /// waiting for readability in between.
    pub async fn read_with<R>(&self, op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        self.op_with(false, op).await
    }

    /// Runs `op` (a write) until it says something other than `WouldBlock`, waiting for
    /// writability in between.
    pub async fn write_with<R>(&self, op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        self.op_with(true, op).await
    }

    async fn op_with<R>(
        &self,
        write: bool,
        mut op: impl FnMut(&T) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && write => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                other => return other,
            }
        }
    }

    /// Call right before a round of reads: waits only while a read would say `WouldBlock`
    /// for sure ([`Io::read_would_block`]), so a future polled again for another reason
    /// makes no read for nothing.
    pub async fn read_ready(&self) {
        std::future::poll_fn(|cx| {
            if self.read_would_block(cx) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

/// Connects a TCP socket to `addr` without blocking the thread: the socket is opened
/// non-blocking and waited on until the handshake is over, one way or the other.
///
/// # Errors
///
/// The connect's own error (refused, unreachable, …), or the socket's.
pub async fn tcp_connect(addr: std::net::SocketAddr) -> io::Result<Io<std::net::TcpStream>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok(Io::from_nonblocking(socket.into())),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // To a local or same-host server the handshake has often finished inside connect() (the
    // peer's SYN-ACK is processed before the call returns): a connected socket has a peer,
    // and is taken without a trip through the reactor.
    if socket.peer_addr().is_ok() {
        return Ok(Io::from_nonblocking(socket.into()));
    }
    let stream = Io::from_nonblocking(std::net::TcpStream::from(socket));
    stream.writable().await?;
    match stream.get_ref().take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

impl<T: AsFd> AsFd for Io<T> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.io.as_fd()
    }
}

impl<T: AsFd> AsRawFd for Io<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_fd().as_raw_fd()
    }
}

impl<T: AsFd> Drop for Io<T> {
    fn drop(&mut self) {
        if let Some(r) = self.registration.take() {
            // No EPOLL_CTL_DEL: closing the descriptor (the field drops after this) takes it
            // out of the epoll instance, one system call fewer per session. (Were the
            // descriptor duplicated and kept elsewhere, its events would find no source here
            // and be ignored.)
            r.shared
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&r.key);
        }
    }
}

/// A timer of this thread's reactor: ready at its deadline. Not `Send`.
#[derive(Debug)]
pub struct Timer {
    at: Instant,
    /// The entry in the reactor's timers, while registered.
    id: Option<u64>,
    _not_send: PhantomData<*const ()>,
}

impl Timer {
    /// Ready `after` from now.
    pub fn after(after: Duration) -> Timer {
        Timer::at(Instant::now() + after)
    }

    /// Ready at `at`.
    pub fn at(at: Instant) -> Timer {
        Timer {
            at,
            id: None,
            _not_send: PhantomData,
        }
    }

    fn deregister(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = REACTOR.try_with(|r| r.timers.borrow_mut().remove(&(self.at, id)));
        }
    }
}

impl Future for Timer {
    type Output = Instant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Instant> {
        let now = Instant::now();
        if now >= self.at {
            self.deregister();
            return Poll::Ready(now);
        }
        let at = self.at;
        let id = self.id;
        let id = REACTOR.with(|r| {
            assert!(
                r.driving.get() > 0,
                "a hubnat Timer was waited on outside hubnat_backend::rt::block_on, which nothing \
                 would ever fire: drive it with rt::block_on on this thread"
            );
            let mut timers = r.timers.borrow_mut();
            match id.and_then(|id| timers.get_mut(&(at, id)).map(|w| (id, w))) {
                Some((id, waker)) => {
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    id
                }
                None => {
                    let id = r.next_timer.get();
                    r.next_timer.set(id + 1);
                    timers.insert((at, id), cx.waker().clone());
                    id
                }
            }
        });
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.deregister();
    }
}

/// A gate in front of a future that lives across the turns of a loop that polls it among
/// others: the future is polled only when it was woken since it last returned pending (or
/// it last returned ready), so that a turn woken by something else does not poll it (and
/// make its system calls) for nothing. Not for a future re-created each turn: what it
/// registered to be woken may go with it (an async-channel listener does), and the gate
/// would then stay shut.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<GateWaker>,
}

#[derive(Debug)]
struct GateWaker {
    open: AtomicBool,
    parent: Mutex<Option<Waker>>,
}

impl Wake for GateWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::SeqCst);
        if let Some(w) = self
            .parent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            w.wake_by_ref();
        }
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

impl Gate {
    /// An open gate: the first poll goes through.
    pub fn new() -> Gate {
        Gate {
            inner: Arc::new(GateWaker {
                open: AtomicBool::new(true),
                parent: Mutex::new(None),
            }),
        }
    }

    /// Polls `future` if the gate is open (closing it while `future` is pending); else
    /// pending, with `cx`'s waker woken when `future`'s is.
    pub fn poll<F: Future + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        future: Pin<&mut F>,
    ) -> Poll<F::Output> {
        {
            let mut parent = self.inner.parent.lock().unwrap_or_else(|e| e.into_inner());
            match parent.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *parent = Some(cx.waker().clone()),
            }
        }
        if !self.inner.open.swap(false, Ordering::SeqCst) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.inner.clone());
        match future.poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(output) => {
                self.inner.open.store(true, Ordering::SeqCst);
                Poll::Ready(output)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

struct CallOnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for CallOnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::thread;

    #[test]
    fn a_read_waits_for_bytes_written_later_by_another_thread() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Io::new(a).unwrap();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            (&b).write_all(b"hello").unwrap();
            b
        });
        let got = block_on(async {
            let mut buf = [0u8; 16];
            loop {
                match (&mut a.get_ref()).read(&mut buf) {
                    Ok(n) => return buf[..n].to_vec(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => a.readable().await.unwrap(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        assert_eq!(got, b"hello");
        drop(writer.join().unwrap());
    }

    #[test]
    fn busy_polling_catches_events_and_keeps_timers() {
        // Polling for up to a millisecond at a time: a byte written meanwhile by another thread
        // is read, a timer longer than the polling still fires on time (not early), and a
        // wait with nothing to catch ends in a sleep, not a spin that never stops.
        set_busy_poll(Duration::from_millis(1));
        let (a, b) = UnixStream::pair().unwrap();
        let a = Io::new(a).unwrap();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_micros(300));
            (&b).write_all(b"x").unwrap();
            b
        });
        let start = Instant::now();
        let got = block_on(async {
            let mut buf = [0u8; 4];
            a.read_with(|mut s| s.read(&mut buf)).await.unwrap()
        });
        assert_eq!(got, 1);
        let _b = writer.join().unwrap();
        let before = Instant::now();
        block_on(Timer::after(Duration::from_millis(20)));
        assert!(before.elapsed() >= Duration::from_millis(20));
        assert!(start.elapsed() < Duration::from_secs(10));
        set_busy_poll(Duration::ZERO);
    }

    #[test]
    fn timers_fire_in_order_and_a_dropped_one_never() {
        let start = Instant::now();
        let order = RefCell::new(Vec::new());
        block_on(async {
            let dropped = Timer::after(Duration::from_millis(5));
            let mut dropped = Box::pin(dropped);
            // Registered, then dropped unfired.
            assert!(futures_poll_once(dropped.as_mut()).is_pending());
            drop(dropped);
            let a = async {
                Timer::after(Duration::from_millis(30)).await;
                order.borrow_mut().push(30);
            };
            let b = async {
                Timer::after(Duration::from_millis(10)).await;
                order.borrow_mut().push(10);
            };
            join(a, b).await;
        });
        assert_eq!(*order.borrow(), [10, 30]);
        assert!(start.elapsed() >= Duration::from_millis(30));
        REACTOR.with(|r| assert!(r.timers.borrow().is_empty()));
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let t = thread::spawn(move || {
            let waker = rx.recv().unwrap();
            thread::sleep(Duration::from_millis(30));
            f2.store(true, Ordering::SeqCst);
            waker.wake();
        });
        let mut sent = Some(tx);
        block_on(std::future::poll_fn(|cx| {
            if flag.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            if let Some(tx) = sent.take() {
                tx.send(cx.waker().clone()).unwrap();
            }
            Poll::Pending
        }));
        t.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "outside hubnat_backend::rt::block_on")]
    fn waiting_outside_block_on_is_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let a = Io::new(a).unwrap();
        let waker = Waker::from(Arc::new(Nothing));
        let _ = a.poll_readable(&mut Context::from_waker(&waker));
    }

    #[test]
    fn a_dropped_io_leaves_the_reactor() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Io::new(a).unwrap();
        block_on(async {
            let waker = Waker::from(Arc::new(Nothing));
            assert!(a
                .poll_readable(&mut Context::from_waker(&waker))
                .is_pending());
        });
        REACTOR.with(|r| assert_eq!(r.shared.sources.lock().unwrap().len(), 1));
        drop(a);
        REACTOR.with(|r| assert!(r.shared.sources.lock().unwrap().is_empty()));
        drop(b);
    }

    #[test]
    fn a_gate_polls_its_future_only_once_woken() {
        let polls = Cell::new(0);
        let stored: RefCell<Option<Waker>> = RefCell::new(None);
        let gate = Gate::new();
        let mut inner = pin!(std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            *stored.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        }));
        let waker = Waker::from(Arc::new(Nothing));
        let mut cx = Context::from_waker(&waker);
        assert!(gate.poll(&mut cx, inner.as_mut()).is_pending());
        assert!(gate.poll(&mut cx, inner.as_mut()).is_pending());
        assert_eq!(polls.get(), 1, "closed until woken");
        stored.borrow().as_ref().unwrap().wake_by_ref();
        assert!(gate.poll(&mut cx, inner.as_mut()).is_pending());
        assert_eq!(polls.get(), 2, "woken: polled again");
    }

    #[test]
    fn a_read_that_would_block_is_known_until_an_event_comes() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Io::new(a).unwrap();
        block_on(async {
            let waker = Waker::from(Arc::new(Nothing));
            let mut cx = Context::from_waker(&waker);
            assert!(!a.read_would_block(&mut cx), "never read: try it");
            let mut buf = [0u8; 8];
            assert_eq!(
                (&mut a.get_ref()).read(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            assert!(a.poll_readable(&mut cx).is_pending());
            assert!(a.read_would_block(&mut cx), "waiting, and nothing came");
            (&b).write_all(b"x").unwrap();
            // The event comes with the next wait.
            Timer::after(Duration::from_millis(5)).await;
            assert!(!a.read_would_block(&mut cx), "an event came: read");
            assert_eq!((&mut a.get_ref()).read(&mut buf).unwrap(), 1);
        });
    }

    struct Nothing;
    impl Wake for Nothing {
        fn wake(self: Arc<Self>) {}
    }

    fn futures_poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::new(Nothing));
        f.poll(&mut Context::from_waker(&waker))
    }

    async fn join(a: impl Future<Output = ()>, b: impl Future<Output = ()>) {
        let (mut a, mut b) = (Box::pin(a), Box::pin(b));
        let (mut a_done, mut b_done) = (false, false);
        std::future::poll_fn(|cx| {
            a_done = a_done || a.as_mut().poll(cx).is_ready();
            b_done = b_done || b.as_mut().poll(cx).is_ready();
            if a_done && b_done {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}
