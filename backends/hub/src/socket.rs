//! The hub socket: peers on Unix or TCP stream sockets, in QEMU's `-netdev stream` framing,
//! switched with each other and with the virtual host like a learning hub.
//!
//! A VM joins the segment with
//! `qemu-system-x86_64 -netdev stream,id=n0,server=off,addr.type=unix,addr.path=SOCK -device
//! virtio-net-pci,netdev=n0` exactly as it would join passt; other programs (a VPN hub's
//! sidecar, a test) speak the same framing: each Ethernet frame is preceded by its length as a
//! 4-byte big-endian integer.
//!
//! # Theory of operation
//!
//! * **A memory hub inside.** A [`HubSocket`] owns a [`MemoryHub`]. The virtual host is one of
//!   its ports (the [`Backend`] that [`HubSocket`] implements delegates to it); every socket
//!   peer is another port. The hub's [`Switch`](crate::Switch) learns which station is behind
//!   which port, sends unicast frames to the learnt port and floods broadcast, multicast and
//!   unknown destinations to every other port. A peer that goes away takes its stations with it.
//! * **One server thread.** [`HubSocket::start`] binds every listening socket on the calling
//!   thread (so errors are reported at start-up), then starts one thread, `hubnat-hub`, that
//!   runs a single-threaded async executor: one task per listener accepting peers, one task for
//!   the outgoing connection if there is one, and one task per peer.
//! * **Peers are independent.** A peer's task reads from its socket into its own buffer, cuts
//!   frames out of it and hands each to the hub, which never waits (a full queue drops the frame
//!   for that one destination, like a switch's output queue). The same task waits for frames
//!   queued for its port and writes them, framed, to the socket. A slow peer blocks only its
//!   own writes; its queue fills and further frames for it are dropped and counted
//!   ([`MemoryPort::rx_dropped`], [`HubStats::queue_full`]); nobody else notices.
//! * **Bad peers.** A length under 14 bytes (no room for an Ethernet header) or over
//!   [`MAX_WIRE_FRAME`] cannot be a frame: the peer is disconnected with a warning, and only that
//!   peer. A frame longer than the segment's `mtu + 14` but within that bound is skipped and
//!   counted ([`SocketStats::oversized`]), as a switch drops a frame too big for its ports.
//! * **Connecting out.** With [`HubSocketConfig::connect`], hubnat dials a hub that listens
//!   (the sidecar of a VPN hub) and treats the connection as one more peer. When it fails or
//!   ends, hubnat dials again after 1 s, doubling up to 30 s while it keeps failing, with a log
//!   line each time it connects, loses the connection, or first fails.
//! * **Unix socket files.** A missing parent directory is created (mode 0755). A stale socket
//!   file (nobody accepting on it) is replaced; a live one, or a path that is not a socket, is
//!   an error. The socket is created with umask 0177,
//!   so it is never more open than owner-only, then set to [`HubSocketConfig::socket_mode`]
//!   (default 0600). It is removed when the [`HubSocket`] is dropped.
//!
//! # Buffers and limits
//!
//! Per peer: one read buffer of `2 × (MAX_WIRE_FRAME + 4)` bytes and one write buffer of up to
//! 64 KiB, allocated when it connects; frames travel in the hub's pooled buffers, so the steady
//! state allocates nothing per frame. Copies per frame: socket → read buffer → hub queue on the
//! way in, hub queue → write buffer → socket on the way out. At most
//! [`HubSocketConfig::max_peers`] peers at once; further connections are accepted and closed
//! at once, with a warning.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_executor::LocalExecutor;
use futures_lite::FutureExt;
use hubnat_backend::rt::{Io, Timer};
use hubnat_backend::{Backend, BackendStats, FrameBatch, ETHERNET_HEADER_LEN};

use crate::memory::{
    HubStats, MemoryHub, MemoryHubConfig, MemoryPort, DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_FRAMES,
};
use crate::switch::SwitchLimits;

/// The longest length prefix a peer may send: an Ethernet frame of the largest MTU any peer
/// could use (65535) with its header. Longer is a broken or hostile peer.
pub const MAX_WIRE_FRAME: usize = 65_535 + ETHERNET_HEADER_LEN;

/// The default bound on peers connected at once.
pub const DEFAULT_MAX_PEERS: usize = 64;

/// The default permissions of a listening Unix socket: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// The longest Unix socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
pub const MAX_UNIX_PATH_LEN: usize = 107;

/// How much a peer's writer gathers before one `write`.
const WRITE_GATHER: usize = 64 * 1024;

/// The first and the longest wait before dialling a listening hub again.
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// How long an accept loop rests after an error such as running out of descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// An error from parsing an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EndpointError(String);

/// Where a hub socket listens or connects: `unix:/path/to/sock` or `tcp:IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP socket at this address (`[v6]:port` for IPv6).
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| {
            EndpointError(format!(
                "invalid hub socket address {s:?}: {why}; write \"unix:/path/to/socket\" or \
                 \"tcp:IP:PORT\", e.g. \"unix:/run/hubnat/hub.sock\" or \"tcp:127.0.0.1:5555\""
            ))
        };
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the path is empty".into()));
            }
            if path.len() > MAX_UNIX_PATH_LEN {
                return Err(bad(format!(
                    "the path is {} bytes long; Linux allows at most {MAX_UNIX_PATH_LEN}",
                    path.len()
                )));
            }
            if path.contains('\0') {
                return Err(bad("the path contains a NUL byte".into()));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Endpoint::Tcp)
                .map_err(|_| bad(format!("{addr:?} is not an IP address and port")))
        } else {
            Err(bad("it must start with \"unix:\" or \"tcp:\"".into()))
        }
    }
}

/// How a [`HubSocket`] is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSocketConfig {
    /// The segment's MTU: frames up to `mtu + 14` bytes are carried.
    pub mtu: u32,
    /// Where to accept peers (any number of Unix and TCP sockets).
    pub listen: Vec<Endpoint>,
    /// A listening hub to connect to as one more peer, kept connected.
    pub connect: Option<Endpoint>,
    /// Permissions of the Unix socket files created for `listen` (e.g. `0o600`, `0o660`).
    pub socket_mode: u32,
    /// Peers connected at once, at most (the outgoing connection included).
    pub max_peers: usize,
    /// The depth of each port's queue, in frames.
    pub queue_frames: usize,
    /// The most bytes of frames queued for one port (a peer that does not read).
    pub queue_bytes: usize,
    /// The virtual host's MAC: fixed to the virtual host's port, so a peer that claims it
    /// gets its frames dropped instead of the virtual host's traffic.
    pub own_mac: Option<[u8; 6]>,
    /// The learning table's bounds.
    pub switch: SwitchLimits,
}

impl HubSocketConfig {
    /// A configuration for `mtu` that listens on `listen`, with the defaults for the rest.
    pub fn new(mtu: u32, listen: Vec<Endpoint>) -> Self {
        HubSocketConfig {
            mtu,
            listen,
            connect: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            max_peers: DEFAULT_MAX_PEERS,
            queue_frames: DEFAULT_QUEUE_FRAMES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            own_mac: None,
            switch: SwitchLimits::default(),
        }
    }
}

/// Why a hub socket could not start. Every message names the endpoint and the cause.
#[derive(Debug, thiserror::Error)]
pub enum HubSocketError {
    /// Neither `listen` nor `connect` was given.
    #[error("the hub socket needs at least one address to listen on or to connect to")]
    NoEndpoint,
    /// A Unix socket path is taken by a process that accepts connections on it.
    #[error("hub socket {0}: another process is listening on this socket")]
    InUse(Endpoint),
    /// A Unix socket path names something that is not a socket.
    #[error("hub socket {0}: the path exists and is not a socket; remove it or choose another")]
    NotASocket(Endpoint),
    /// Binding or listening failed.
    #[error("hub socket {endpoint}: cannot listen: {cause}")]
    Listen {
        /// Where.
        endpoint: Endpoint,
        /// The OS error.
        cause: io::Error,
    },
    /// The socket file's permissions could not be set.
    #[error("hub socket {endpoint}: cannot set its permissions to {mode:04o}: {cause}")]
    Permissions {
        /// Where.
        endpoint: Endpoint,
        /// The mode asked for.
        mode: u32,
        /// The OS error.
        cause: io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the hub socket thread: {0}")]
    Thread(io::Error),
}

/// The hub socket's own counters; see [`HubSocket::socket_stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SocketStats {
    /// Peers connected now (the outgoing connection included).
    pub peers: usize,
    /// Peers that ever connected (accepted, or dialled successfully).
    pub connected: u64,
    /// Connections closed at once because `max_peers` were connected.
    pub refused: u64,
    /// Peers disconnected for a length prefix that cannot be a frame.
    pub bad_length: u64,
    /// Frames longer than `mtu + 14` (but not bad) that were skipped.
    pub oversized: u64,
}

#[derive(Debug, Default)]
struct Counters {
    peers: AtomicUsize,
    connected: AtomicU64,
    refused: AtomicU64,
    bad_length: AtomicU64,
    oversized: AtomicU64,
    next_peer: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the server thread needs.
struct Server {
    hub: MemoryHub,
    counters: Arc<Counters>,
    max_frame_len: usize,
    max_peers: usize,
}

impl Server {
    /// Takes a peer's place, if one is free (else counts the refusal). The count moves here,
    /// before the peer's task is spawned, so a burst of connections cannot all slip in; the
    /// place is given back when [`serve_peer`] ends.
    fn claim_peer(&self) -> bool {
        let peers = &self.counters.peers;
        if peers.load(Ordering::Relaxed) >= self.max_peers {
            bump(&self.counters.refused);
            return false;
        }
        peers.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// A listening socket, bound at start-up.
enum Listener {
    Unix(Io<UnixListener>, Endpoint),
    Tcp(Io<TcpListener>, Endpoint),
}

/// The hub socket backend. See the module documentation.
///
/// As a [`Backend`] it is the virtual host's port on the hub. Dropping it stops the server
/// thread, disconnects every peer and removes the Unix socket files it created.
pub struct HubSocket {
    port: MemoryPort,
    counters: Arc<Counters>,
    endpoints: Vec<Endpoint>,
    connect: Option<Endpoint>,
    socket_files: Vec<PathBuf>,
    stop: Option<async_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for HubSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSocket")
            .field("endpoints", &self.endpoints)
            .field("connect", &self.connect)
            .field("stats", &self.socket_stats())
            .finish_non_exhaustive()
    }
}

impl HubSocket {
    /// Binds every `listen` endpoint, then starts the server thread, which accepts peers and,
    /// with `connect`, dials out.
    ///
    /// Call from the thread whose network namespace should hold TCP sockets (the server thread
    /// is started from it and inherits it).
    ///
    /// # Errors
    ///
    /// [`HubSocketError`] names the endpoint that failed and why.
    pub fn start(config: HubSocketConfig) -> Result<HubSocket, HubSocketError> {
        if config.listen.is_empty() && config.connect.is_none() {
            return Err(HubSocketError::NoEndpoint);
        }
        let mut listeners = Vec::new();
        let mut endpoints = Vec::new();
        let mut socket_files = Vec::new();
        let cleanup = |files: &[PathBuf]| {
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        };
        for endpoint in &config.listen {
            let bound = match endpoint {
                Endpoint::Unix(path) => bind_unix(endpoint, path, config.socket_mode).map(|l| {
                    socket_files.push(path.clone());
                    (Listener::Unix(l, endpoint.clone()), endpoint.clone())
                }),
                Endpoint::Tcp(addr) => bind_tcp(endpoint, *addr).and_then(|l| {
                    let local =
                        l.get_ref()
                            .local_addr()
                            .map_err(|cause| HubSocketError::Listen {
                                endpoint: endpoint.clone(),
                                cause,
                            })?;
                    let actual = Endpoint::Tcp(local);
                    Ok((Listener::Tcp(l, actual.clone()), actual))
                }),
            };
            match bound {
                Ok((listener, actual)) => {
                    tracing::info!(endpoint = %actual, "hub socket listening");
                    listeners.push(listener);
                    endpoints.push(actual);
                }
                Err(e) => {
                    cleanup(&socket_files);
                    return Err(e);
                }
            }
        }

        let hub = MemoryHub::with_config(MemoryHubConfig {
            mtu: config.mtu,
            queue_frames: config.queue_frames,
            queue_bytes: config.queue_bytes,
            switch: config.switch,
        });
        let port = hub.connect();
        if let Some(mac) = config.own_mac {
            hub.pin_station(mac, port.id());
        }
        let counters = Arc::new(Counters::default());
        let server = Server {
            max_frame_len: hub.max_frame_len(),
            hub,
            counters: Arc::clone(&counters),
            max_peers: config.max_peers.max(1),
        };
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let connect = config.connect.clone();
        let thread = std::thread::Builder::new()
            .name("hubnat-hub".into())
            .spawn(move || serve(server, listeners, connect, stopped))
            .map_err(|e| {
                cleanup(&socket_files);
                HubSocketError::Thread(e)
            })?;
        Ok(HubSocket {
            port,
            counters,
            endpoints,
            connect: config.connect,
            socket_files,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where peers are accepted: the `listen` endpoints, with the port the system chose for a
    /// TCP endpoint given port 0.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The hub inside: connect in-process ports to it to join the segment without a socket.
    pub fn hub(&self) -> &MemoryHub {
        self.port.hub()
    }

    /// The switching counters of the hub inside.
    pub fn hub_stats(&self) -> HubStats {
        self.port.hub().stats()
    }

    /// The socket counters: peers now and in total, refusals, bad peers, skipped frames.
    pub fn socket_stats(&self) -> SocketStats {
        let c = &self.counters;
        SocketStats {
            peers: c.peers.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            bad_length: c.bad_length.load(Ordering::Relaxed),
            oversized: c.oversized.load(Ordering::Relaxed),
        }
    }
}

impl Backend for HubSocket {
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| format!("listen {e}"))
            .collect();
        if let Some(c) = &self.connect {
            parts.push(format!("connect {c}"));
        }
        format!("hub {}", parts.join(", "))
    }

    fn max_frame_len(&self) -> usize {
        self.port.max_frame_len()
    }

    /// The virtual host's port: waits for frames from the peers. Cancel-safe.
    async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()> {
        self.port.recv_batch(batch).await
    }

    /// Switches the virtual host's frames to the peers; never waits.
    async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()> {
        self.port.send_batch(batch).await
    }

    fn stats(&self) -> BackendStats {
        self.port.stats()
    }
}

impl Drop for HubSocket {
    fn drop(&mut self) {
        // Closing the channel ends the server's executor, which drops every task and socket.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the hub socket thread panicked");
            }
        }
        for path in &self.socket_files {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a Unix listener at `path`, replacing a stale socket file, with owner-only permissions
/// from the start and `mode` after.
fn bind_unix(
    endpoint: &Endpoint,
    path: &Path,
    mode: u32,
) -> Result<Io<UnixListener>, HubSocketError> {
    let listen_error = |cause| HubSocketError::Listen {
        endpoint: endpoint.clone(),
        cause,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(HubSocketError::InUse(endpoint.clone())),
            Err(_) => {
                tracing::info!(endpoint = %endpoint, "replacing a stale hub socket file");
                std::fs::remove_file(path).map_err(listen_error)?;
            }
        },
        Ok(_) => return Err(HubSocketError::NotASocket(endpoint.clone())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // A missing directory (such as /run/hubnat) is created; the socket's own mode
            // decides who may connect.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(listen_error)?;
            }
        }
        Err(e) => return Err(listen_error(e)),
    }
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail. The window in
    // which other threads' new files get this stricter mask is the bind call alone.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(listen_error)?;
    if let Err(cause) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(HubSocketError::Permissions {
            endpoint: endpoint.clone(),
            mode,
            cause,
        });
    }
    Io::new(listener).map_err(|cause| {
        let _ = std::fs::remove_file(path);
        listen_error(cause)
    })
}

fn bind_tcp(endpoint: &Endpoint, addr: SocketAddr) -> Result<Io<TcpListener>, HubSocketError> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            endpoint = %endpoint,
            "hub socket on a non-loopback address: anyone who can reach it joins the segment"
        );
    }
    TcpListener::bind(addr)
        .and_then(Io::new)
        .map_err(|cause| HubSocketError::Listen {
            endpoint: endpoint.clone(),
            cause,
        })
}

/// The server thread: runs every listener, the outgoing connection and the peers until `stop`
/// is closed.
fn serve(
    server: Server,
    listeners: Vec<Listener>,
    connect: Option<Endpoint>,
    stop: async_channel::Receiver<()>,
) {
    let ex = Rc::new(LocalExecutor::new());
    let server = Rc::new(server);
    for listener in listeners {
        // The tasks hold the executor weakly: when `run` returns, dropping `ex` drops every
        // task, and with them every socket.
        ex.spawn(accept_loop(
            Rc::downgrade(&ex),
            Rc::clone(&server),
            listener,
        ))
        .detach();
    }
    if let Some(endpoint) = connect {
        ex.spawn(connect_loop(Rc::clone(&server), endpoint))
            .detach();
    }
    hubnat_backend::rt::block_on(ex.run(async {
        let _ = stop.recv().await;
    }));
    drop(ex);
    tracing::debug!("hub socket thread stopped");
}

async fn accept_loop(ex: Weak<LocalExecutor<'static>>, server: Rc<Server>, listener: Listener) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l, _) => l
                .read_with(|l| l.accept())
                .await
                .and_then(|(s, _)| Io::new(s))
                .map(Stream::Unix),
            Listener::Tcp(l, _) => l.read_with(|l| l.accept()).await.and_then(|(s, addr)| {
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(Io::new(s)?, addr))
            }),
        };
        let endpoint = match &listener {
            Listener::Unix(_, e) | Listener::Tcp(_, e) => e,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(endpoint = %endpoint, error = %e, "hub socket: accept failed");
                Timer::after(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if !server.claim_peer() {
            tracing::warn!(
                endpoint = %endpoint,
                max_peers = server.max_peers,
                "hub socket: refused a peer: the maximum number of peers is connected"
            );
            continue;
        }
        let Some(ex) = ex.upgrade() else {
            return;
        };
        let name = peer_name(&server, &stream, endpoint);
        let server = Rc::clone(&server);
        ex.spawn(async move {
            serve_peer(&server, stream, &name).await;
        })
        .detach();
    }
}

async fn connect_loop(server: Rc<Server>, endpoint: Endpoint) {
    let mut delay = RECONNECT_FIRST;
    let mut failures = 0u64;
    loop {
        let dialled = match &endpoint {
            // A local socket's connect does not wait for anything.
            Endpoint::Unix(path) => UnixStream::connect(path)
                .and_then(Io::new)
                .map(Stream::Unix),
            // Without blocking the thread: a hub that does not answer would hold every peer
            // for the kernel's connect timeout.
            Endpoint::Tcp(addr) => hubnat_backend::rt::tcp_connect(*addr).await.map(|s| {
                let _ = s.get_ref().set_nodelay(true);
                Stream::Tcp(s, *addr)
            }),
        };
        match dialled {
            Ok(stream) => {
                failures = 0;
                delay = RECONNECT_FIRST;
                if !server.claim_peer() {
                    tracing::warn!(endpoint = %endpoint, "hub socket: not using the connection: the maximum number of peers is connected");
                } else {
                    let name = peer_name(&server, &stream, &endpoint);
                    serve_peer(&server, stream, &name).await;
                    tracing::info!(endpoint = %endpoint, retry_in = ?delay, "hub socket: connection to the listening hub ended; dialling again");
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(endpoint = %endpoint, error = %e, retry_in = ?delay, "hub socket: cannot connect to the listening hub; retrying");
                } else {
                    tracing::debug!(endpoint = %endpoint, error = %e, failures, retry_in = ?delay, "hub socket: still cannot connect");
                }
            }
        }
        Timer::after(delay).await;
        if failures > 0 {
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }
}

/// A connected peer's socket.
enum Stream {
    Unix(Io<UnixStream>),
    Tcp(Io<TcpStream>, SocketAddr),
}

fn peer_name(server: &Server, stream: &Stream, endpoint: &Endpoint) -> String {
    let n = server.counters.next_peer.fetch_add(1, Ordering::Relaxed);
    match stream {
        Stream::Unix(_) => format!("peer {n} on {endpoint}"),
        Stream::Tcp(_, addr) => format!("peer {n} from {addr} on {endpoint}"),
    }
}

/// How a peer's session ended.
enum PeerEnd {
    Closed,
    BadLength(usize),
    Error(io::Error),
}

/// Runs one peer, claimed with [`Server::claim_peer`], until it disconnects, misbehaves or the
/// server stops; gives its place back.
async fn serve_peer(server: &Server, stream: Stream, name: &str) {
    let counters = &server.counters;
    bump(&counters.connected);
    let port = server.hub.connect();
    tracing::info!(peer = name, port = %port.id(), "hub socket: peer connected");
    let end = match &stream {
        Stream::Unix(s) => run_peer(server, s, &port).await,
        Stream::Tcp(s, _) => run_peer(server, s, &port).await,
    };
    let dropped = port.rx_dropped();
    drop(port);
    counters.peers.fetch_sub(1, Ordering::Relaxed);
    match end {
        PeerEnd::Closed => tracing::info!(peer = name, dropped, "hub socket: peer disconnected"),
        PeerEnd::BadLength(len) => {
            bump(&counters.bad_length);
            tracing::warn!(
                peer = name,
                length = len,
                min = ETHERNET_HEADER_LEN,
                max = MAX_WIRE_FRAME,
                "hub socket: peer sent a frame length that cannot be an Ethernet frame; disconnected it"
            );
        }
        PeerEnd::Error(e) => {
            tracing::info!(peer = name, error = %e, dropped, "hub socket: peer connection failed; disconnected it")
        }
    }
}

/// Both directions of one peer; ends when either does.
async fn run_peer<S: AsFd>(server: &Server, stream: &Io<S>, port: &MemoryPort) -> PeerEnd
where
    for<'a> &'a S: io::Read + io::Write,
{
    let reader = read_frames(server, stream, port);
    let writer = async {
        match write_frames(stream, port).await {
            Ok(()) => PeerEnd::Closed,
            Err(e) => PeerEnd::Error(e),
        }
    };
    reader.or(writer).await
}

/// Reads framed frames from the peer and hands them to the hub.
async fn read_frames<S: AsFd>(server: &Server, stream: &Io<S>, port: &MemoryPort) -> PeerEnd
where
    for<'a> &'a S: io::Read,
{
    let mut buf = vec![0u8; 2 * (MAX_WIRE_FRAME + 4)];
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        // Every complete frame in the buffer.
        let cut = split_frames(&buf[start..end], server.max_frame_len, |item| match item {
            Framed::Frame(frame) => {
                port.try_send(frame);
            }
            Framed::Oversized(len) => {
                bump(&server.counters.oversized);
                tracing::trace!(port = %port.id(), len, "hub socket: skipped an oversized frame");
            }
        });
        match cut {
            Ok(consumed) => start += consumed,
            Err(len) => return PeerEnd::BadLength(len),
        }
        // Keep the partial frame at the front, so the rest of it fits.
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        // A peer that writes without pause would otherwise keep this thread to itself: every
        // read succeeds at once. Let the other peers (and the stop signal) have a turn.
        futures_lite::future::yield_now().await;
        let room = &mut buf[end..];
        match stream.read_with(|mut s| s.read(room)).await {
            Ok(0) => return PeerEnd::Closed,
            Ok(n) => end += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return PeerEnd::Error(e),
        }
    }
}

/// One item [`split_frames`] cut out of a peer's bytes.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A frame for the hub.
    Frame(&'a [u8]),
    /// A frame of this length, longer than the segment's largest frame: skipped.
    Oversized(usize),
}

/// Cuts every complete frame out of `bytes` (what a peer sent: each frame after its length as
/// a 4-byte big-endian integer) and hands each to `each`, in order; a frame longer than
/// `max_frame_len` (but within [`MAX_WIRE_FRAME`]) is handed as [`Framed::Oversized`].
/// Returns how many bytes it consumed: the rest is the start of a frame still arriving.
/// `Err(len)`: a length under the Ethernet header or over [`MAX_WIRE_FRAME`], which cannot be
/// a frame (disconnect the peer); the frames before it were handed over. Pure, so the reader's
/// framing can be tested and fuzzed without a socket.
#[doc(hidden)]
pub fn split_frames<'a>(
    bytes: &'a [u8],
    max_frame_len: usize,
    mut each: impl FnMut(Framed<'a>),
) -> Result<usize, usize> {
    let mut start = 0usize;
    while bytes.len() - start >= 4 {
        let len = u32::from_be_bytes([
            bytes[start],
            bytes[start + 1],
            bytes[start + 2],
            bytes[start + 3],
        ]) as usize;
        if !(ETHERNET_HEADER_LEN..=MAX_WIRE_FRAME).contains(&len) {
            return Err(len);
        }
        if bytes.len() - start < 4 + len {
            break;
        }
        if len > max_frame_len {
            each(Framed::Oversized(len));
        } else {
            each(Framed::Frame(&bytes[start + 4..start + 4 + len]));
        }
        start += 4 + len;
    }
    Ok(start)
}

/// Writes the frames queued for the peer's port, framed, gathering what is queued into one
/// write. Returns `Ok` only if the port is disconnected (never while the peer runs).
async fn write_frames<S: AsFd>(stream: &Io<S>, port: &MemoryPort) -> io::Result<()>
where
    for<'a> &'a S: io::Write,
{
    let mut frame = Vec::new();
    let mut out = Vec::with_capacity(WRITE_GATHER + MAX_WIRE_FRAME + 4);
    loop {
        port.recv(&mut frame).await?;
        out.clear();
        push_framed(&mut out, &frame);
        while out.len() < WRITE_GATHER && port.try_recv(&mut frame) {
            push_framed(&mut out, &frame);
        }
        let mut sent = 0;
        while sent < out.len() {
            match stream.write_with(|mut s| s.write(&out[sent..])).await {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Likewise for a port that always has frames queued and a socket that always has room.
        futures_lite::future::yield_now().await;
    }
}

fn push_framed(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_display() {
        let e: Endpoint = "unix:/run/hubnat/hub.sock".parse().expect("unix");
        assert_eq!(e, Endpoint::Unix("/run/hubnat/hub.sock".into()));
        assert_eq!(e.to_string(), "unix:/run/hubnat/hub.sock");
        let e: Endpoint = " tcp:127.0.0.1:5555 ".parse().expect("tcp");
        assert_eq!(e, Endpoint::Tcp("127.0.0.1:5555".parse().expect("addr")));
        assert_eq!(e.to_string(), "tcp:127.0.0.1:5555");
        let e: Endpoint = "tcp:[::1]:5555".parse().expect("tcp6");
        assert_eq!(e.to_string(), "tcp:[::1]:5555");
        for (bad, why) in [
            ("/run/x.sock", "must start with"),
            ("unix:", "path is empty"),
            ("tcp:localhost:5555", "not an IP address and port"),
            ("tcp:127.0.0.1", "not an IP address and port"),
            ("udp:127.0.0.1:5", "must start with"),
        ] {
            let err = bad.parse::<Endpoint>().expect_err(bad).to_string();
            assert!(
                err.contains(why) && err.contains(&format!("{:?}", bad.trim())),
                "{bad}: {err}"
            );
        }
        let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH_LEN));
        assert!(long
            .parse::<Endpoint>()
            .expect_err("too long")
            .to_string()
            .contains("at most 107"));
    }

    #[test]
    fn split_frames_cuts_whole_frames_and_keeps_the_rest() {
        let mut bytes = Vec::new();
        push_framed(&mut bytes, &[1u8; 60]);
        push_framed(&mut bytes, &[2u8; 100]);
        push_framed(&mut bytes, &[3u8; 20]);
        bytes.extend_from_slice(&[0, 0, 0, 60, 4, 4]); // a frame still arriving
        let mut items = Vec::new();
        let consumed = split_frames(&bytes, 80, |item| items.push(format!("{item:?}")));
        assert_eq!(consumed, Ok(64 + 104 + 24));
        assert_eq!(items.len(), 3);
        assert!(items[0].starts_with("Frame([1, 1"), "{}", items[0]);
        assert_eq!(items[1], "Oversized(100)");
        assert!(items[2].starts_with("Frame([3, 3"), "{}", items[2]);
        // Fewer than 4 bytes: nothing yet.
        assert_eq!(split_frames(&[0, 0, 0], 80, |_| panic!("no frame")), Ok(0));
    }

    #[test]
    fn split_frames_refuses_lengths_that_cannot_be_frames() {
        let mut bytes = Vec::new();
        push_framed(&mut bytes, &[1u8; 60]);
        bytes.extend_from_slice(&13u32.to_be_bytes());
        let mut frames = 0;
        assert_eq!(split_frames(&bytes, 1514, |_| frames += 1), Err(13));
        assert_eq!(frames, 1, "the frame before the bad length was handed over");
        let too_long = ((MAX_WIRE_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(
            split_frames(&too_long, 1514, |_| panic!("no frame")),
            Err(MAX_WIRE_FRAME + 1)
        );
    }

    #[test]
    fn framing_puts_a_big_endian_length_first() {
        let mut out = Vec::new();
        push_framed(&mut out, &[7u8; 300]);
        assert_eq!(&out[..4], &[0, 0, 1, 44]);
        assert_eq!(out.len(), 304);
    }
}
