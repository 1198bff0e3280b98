//! The control API: a running gateway's status, settings and tables over HTTP/1.1 with JSON
//! bodies on a Unix socket, and its metrics in the Prometheus text format.
//!
//! # Theory of operation
//!
//! [`ControlServer::start`] binds the control socket (`[control] socket`, by default
//! `control.sock` in the state directory; created mode 0600, a stale socket file replaced, a
//! live one an error) and serves it on a thread of its own, with a local executor and one task
//! per connection. HTTP is hyper's (1.x, HTTP/1 only), joined to the smol family by
//! `smol-hyper`; nothing here parses HTTP by hand. Every answer is JSON (`/metrics` excepted).
//!
//! **Who may do what.** Each connection's peer is identified with `SO_PEERCRED` when it is
//! accepted. Reading (`GET`) is open to anyone who can open the socket (the file's mode decides
//! that: 0600 lets only the owner and root in; an administrator may widen it). Changing
//! anything (`POST`, `PATCH`, `DELETE`) is allowed only to the socket's owner (the user the
//! gateway runs as) and root; anyone else gets 403.
//!
//! **Settings.** A change is `KEY=VALUE` pairs of one section (`dhcp`, `nat`, `host`, `dns`),
//! given to [`GatewayHandle::set`](crate::driver::GatewayHandle::set) with the source `the control API (uid N)`: the gateway
//! checks them as a whole ([`Config::with_changes`](crate::config::Config::with_changes)) and either applies all at once or none
//! (400, with the key and the reason). An applied change is merged into `overrides.toml` in
//! the state directory ([`persist_changes`](crate::config::persist_changes)), which the loader reads at the next start, after
//! the configuration file and the environment; the configuration file is never written. The
//! gateway's security log gets one line per changed key with the peer's uid (the driver writes
//! it); the control API adds a line of its own for each session ended and each lease released
//! by an operator, with the uid.
//!
//! **Policies.** `GET /v1/policies` lists the policies in force with their counters;
//! `POST /v1/policies/reload` re-reads the `[[policy]]` list through the [`PolicySource`] the
//! embedder gave (`hubnat run` re-loads its configuration file, environment and flags, as at
//! start) and waits for the gateway's reload report. A configuration that no longer loads
//! changes nothing (400, with the key); a module that fails to load keeps its previous one in
//! force (200, the report says which and why).
//!
//! The routes are in `api.rs`, the metrics in `metrics.rs`, and the client the CLI uses in
//! `client.rs`.

mod api;
pub mod client;
mod metrics;

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_io::Async;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use smol_hyper::rt::{FuturesIo, SmolTimer};

use crate::config::{Config, ConfigError, Overridden, PolicyConfig};
use crate::driver::GatewayHandle;

/// Connections served at once on each listener; more are closed at once (a local client
/// opening sockets in a loop, or a scraper gone wrong, cannot exhaust the process's files).
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP/1 server settings of every connection.
fn http() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(SmolTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    b
}

/// Counts a listener's live connections; a slot is given back when its guard drops.
#[derive(Clone, Default)]
struct Slots(Rc<std::cell::Cell<usize>>);

struct Slot(Slots);

impl Slots {
    fn take(&self) -> Option<Slot> {
        let n = self.0.get();
        (n < MAX_CONNECTIONS).then(|| {
            self.0.set(n + 1);
            Slot(self.clone())
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.0 .0;
        slots.set(slots.get().saturating_sub(1));
    }
}

/// Where a policy reload gets its `[[policy]]` list: `hubnat run` re-loads its configuration
/// from the same sources as at start (SIGHUP uses the same source).
#[derive(Clone)]
pub struct PolicySource(Arc<dyn Fn() -> Result<Vec<PolicyConfig>, ConfigError> + Send + Sync>);

impl PolicySource {
    /// A source that calls `read` for each reload.
    pub fn new(
        read: impl Fn() -> Result<Vec<PolicyConfig>, ConfigError> + Send + Sync + 'static,
    ) -> Self {
        PolicySource(Arc::new(read))
    }

    /// The `[[policy]]` list as the source has it now, or why it cannot be read.
    pub fn read(&self) -> Result<Vec<PolicyConfig>, ConfigError> {
        (self.0)()
    }
}

impl std::fmt::Debug for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicySource")
    }
}

/// What the control server needs besides the gateway's handle.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// The control socket's path.
    pub socket: PathBuf,
    /// A TCP address that serves `/metrics` only.
    pub metrics_listen: Option<SocketAddr>,
    /// The configuration the gateway started with.
    pub config: Config,
    /// The values the configuration's layers set (see [`Config::overridden`]).
    pub overridden: Vec<Overridden>,
    /// Where `POST /v1/policies/reload` reads the policies from; `None`: the reload is
    /// refused (an embedder reloads with `GatewayHandle::reload_policies`).
    pub policy_source: Option<PolicySource>,
}

impl ControlOptions {
    /// The options `config` gives: its socket and metrics address; `overridden` as the loader
    /// found them.
    pub fn new(config: &Config, overridden: Vec<Overridden>) -> Self {
        ControlOptions {
            socket: config.control_socket_path(),
            metrics_listen: config.control.metrics_listen,
            config: config.clone(),
            overridden,
            policy_source: None,
        }
    }
}

/// Why the control server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process serves the socket already.
    #[error("control.socket = {0:?}: another hubnat answers on this socket; stop it or set another control.socket")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("control.socket = {path:?}: cannot create the control socket: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The metrics address could not be bound.
    #[error("control.metrics_listen = \"{addr}\": cannot listen: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// The running control server; dropping it (or [`stop`](Self::stop)) stops it and removes the
/// socket file.
#[derive(Debug)]
pub struct ControlServer {
    stop: async_channel::Sender<()>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
    metrics_addr: Option<SocketAddr>,
}

impl ControlServer {
    /// Binds the control socket (and the metrics address) and serves them on a new thread.
    pub fn start(handle: GatewayHandle, options: ControlOptions) -> Result<Self, ControlError> {
        let path = options.socket.clone();
        let socket_err = |source| ControlError::Socket {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(socket_err)?;
        }
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(ControlError::InUse(path));
            }
            std::fs::remove_file(&path).map_err(socket_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(socket_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err)?;
        let owner = std::fs::metadata(&path).map_err(socket_err)?.uid();
        let listener = Async::new(listener).map_err(socket_err)?;
        let metrics = match options.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .and_then(Async::new)
                    .map_err(|source| ControlError::Metrics { addr, source })?;
                Some(l)
            }
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.get_ref().local_addr().ok());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let socket = path.clone();
        let thread = std::thread::Builder::new()
            .name("hubnat-control".into())
            .spawn(move || {
                let state = Rc::new(api::State {
                    handle,
                    owner,
                    state_dir: options.config.state.dir.clone(),
                    overridden: RefCell::new(options.overridden),
                    policy_source: options.policy_source,
                });
                let ex = Rc::new(async_executor::LocalExecutor::new());
                let serve = serve(ex.clone(), state, listener, metrics);
                // futures-lite's block_on, not async-io's: this thread must not take the
                // reactor (one epoll for the process). Were it the one waiting in epoll, each
                // readiness of the gateway's sockets would cross to the gateway's thread with a
                // wake-up of its own; the gateway's loop (or async-io's own thread) drives the
                // reactor, and wakes this thread for its sockets.
                futures_lite::future::block_on(ex.run(futures_lite::future::or(
                    serve,
                    async move {
                        let _ = stopped.recv().await;
                    },
                )));
            })
            .map_err(socket_err)?;
        tracing::info!(socket = %socket.display(), metrics = ?metrics_addr, "control API listening");
        Ok(ControlServer {
            stop,
            thread: Some(thread),
            socket,
            metrics_addr,
        })
    }

    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The address the metrics listener is bound to (with the port the system chose for 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops the server and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The peer of a Unix connection, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) uid: u32,
    pub(crate) pid: i32,
}

fn peer_cred(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `stream`; `cred` and `len` are valid for writes
    // of the size given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        uid: cred.uid,
        pid: cred.pid,
    })
}

/// Accepts connections on the control socket (and the metrics listener) until dropped.
async fn serve(
    ex: Rc<async_executor::LocalExecutor<'static>>,
    state: Rc<api::State>,
    listener: Async<UnixListener>,
    metrics: Option<Async<TcpListener>>,
) {
    if let Some(metrics) = metrics {
        let state = state.clone();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let slots = Slots::default();
            loop {
                let Ok((stream, _)) = metrics.accept().await else {
                    async_io::Timer::after(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let Some(slot) = slots.take() else {
                    continue;
                };
                let state = state.clone();
                ex2.spawn(async move {
                    let _slot = slot;
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(api::metrics_only(&state, req).await)
                        }
                    });
                    let _ = http()
                        .serve_connection(FuturesIo::new(stream), service)
                        .await;
                })
                .detach();
            }
        })
        .detach();
    }
    let slots = Slots::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                async_io::Timer::after(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = match peer_cred(stream.get_ref()) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: no peer credentials; connection closed");
                continue;
            }
        };
        let Some(slot) = slots.take() else {
            tracing::warn!(
                uid = peer.uid,
                "control socket: {MAX_CONNECTIONS} connections already; connection closed"
            );
            continue;
        };
        let state = state.clone();
        ex.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(api::route(&state, peer, req).await) }
            });
            let _ = http()
                .serve_connection(FuturesIo::new(stream), service)
                .await;
        })
        .detach();
    }
}
