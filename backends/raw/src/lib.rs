//! hubnat's raw backend: the virtual host joins an *existing* interface — a bridge, a VPN's TAP
//! device, one end of a veth pair — as one more station, through an `AF_PACKET` socket opened
//! with pnet's datalink. hubnat owns no device: it receives every frame on the interface and
//! injects its replies into it.
//!
//! # Theory of operation
//!
//! * **Opening.** [`RawBackend::open`] looks the interface up by name (pnet's
//!   `interfaces()`), creates an `AF_PACKET`/`SOCK_RAW` socket with protocol 0 (so that it
//!   receives nothing yet), attaches the kernel filter described below, and hands it to
//!   `pnet_datalink::linux::channel`, which binds it to the interface with `ETH_P_ALL`, adds a
//!   promiscuous membership (so that frames for the virtual host's MAC reach the socket on a
//!   real NIC; the membership goes away with the socket) and makes it non-blocking. The
//!   descriptor is registered (edge-triggered) with the reactor of `hubnat_backend::rt`. Needs CAP_NET_RAW.
//! * **Frames the host kernel owns are not the segment's.** A packet socket sees, besides the
//!   segment's frames, every frame the host itself sends on the interface, and frames addressed
//!   to the host's own MAC. None of them is client traffic: the host's own DHCP client or ARP
//!   must not get answers from the virtual host, and hubnat's own injected frames must not come
//!   back to it. So a classic BPF program on the socket drops, in the kernel, frames of packet
//!   type `PACKET_OUTGOING` (sent by this host, hubnat's injections included) and `PACKET_HOST`
//!   (addressed to the interface's MAC); and [`Backend::recv_batch`] also skips any frame whose
//!   source is the interface's MAC or the virtual host's own MAC ([`RawOptions::own_mac`]).
//!   They are counted in [`RawBackend::host_frames`].
//! * **Receiving.** After a readability wait, pnet's receiver reads frame after frame (each
//!   `recvfrom` returns one) into the caller's batch until nothing is left or the batch is full.
//!   The only await happens before a frame is taken, so the call is cancel-safe. Frames under
//!   14 bytes or over `mtu + 14` are discarded and counted ([`RawBackend::rx_dropped`]).
//! * **Local senders' offloads.** A process on this host that sends through a veth or a bridge
//!   (a container, a namespace) hands over frames as the kernel holds them: with a partial
//!   TCP/UDP checksum, or as a TSO super-frame of up to 64 KiB. The socket is opened with
//!   `PACKET_VNET_HDR`, so each frame comes with a `virtio_net_hdr` saying what is left to do;
//!   the backend finishes a partial checksum, except a TCP/IPv4 one, which stays partial and
//!   is vouched for (as the kernel takes it; the core then does not sum it again,
//!   [`FrameBatch::set_last_checksum_verified`]); with [`RawOptions::offload`] (the default) a TCP/IPv4
//!   super-frame goes to the caller whole (the core takes TCP segments of any length, as with
//!   a TAP device), without it the backend cuts it into wire-sized segments ([`offload`]).
//!   Other super-frames (TCP over IPv6, UDP GSO) are dropped and counted. On a kernel without
//!   `PACKET_VNET_HDR` the backend works without it (and without offload), and local peers
//!   then need their offloads off (`ethtool -K DEV tx off`).
//! * **Sending.** A batch goes out with one `sendmmsg`, each frame after its
//!   `virtio_net_hdr`: empty for a frame that fits the MTU, and with offload, for a longer
//!   TCP/IPv4 segment, a GSO header with which the kernel cuts it where a wire needs it. If
//!   the socket's buffer is full the backend waits for it at most [`WRITE_STALL_LIMIT`] once
//!   per batch, then drops and counts, like a congested link.
//! * **Down and up.** When the interface goes down (or is deleted), the kernel reports
//!   `ENETDOWN` on the socket: the backend logs it, closes the socket and checks the interface
//!   every [`RawOptions::recheck`] (a timer, no busy loop). Meanwhile `recv_batch` waits and
//!   `send_batch` drops (counted). Once an interface of that name is up again — the same one
//!   or a new one — the backend opens a fresh socket on it, logs that it resumed, and carries
//!   on. An interface that is down at start is waited for the same way; one that does not
//!   exist at start is an error.
//!
//! # Limits
//!
//! The interface's MTU should equal hubnat's (`nat.mtu`). VLAN tags stripped by the NIC are
//! not looked at. The receive buffer holds one super-frame (64 KiB); the segmenter keeps a copy
//! of the one being cut.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use futures_lite::FutureExt;
use hubnat_backend::rt::{Io, Timer};
use hubnat_backend::vnet::{finish_offloads, vnet_prefix, VnetPrefix};
use hubnat_backend::{Backend, BackendStats, FrameBatch, ETHERNET_HEADER_LEN};
use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};

pub mod offload;

use offload::{TcpSegmenter, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, VNET_HDR_LEN};

/// The largest frame a local sender may hand over with `PACKET_VNET_HDR`: a 64 KiB GSO
/// super-frame with its headers.
const MAX_SUPER_FRAME: usize = 65_536 + 64;

/// `SOL_PACKET` option: a `virtio_net_hdr` before each frame.
const PACKET_VNET_HDR: libc::c_int = 15;

/// How long [`Backend::send_batch`] waits, at most once per batch, for a socket whose send
/// buffer is full before it drops frames instead.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_millis(10);

/// How often a down interface is checked by default.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(1);

/// The smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;

/// The largest MTU accepted.
pub const MAX_MTU: u32 = 65535;

/// An Ethernet MAC address.
pub type MacAddr = [u8; 6];

/// How a [`RawBackend`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawOptions {
    /// The segment's MTU: frames up to `mtu + 14` bytes are carried.
    pub mtu: u32,
    /// The virtual host's MAC: frames from it are never taken as the segment's (an echo of
    /// hubnat's own frames), and it must differ from the interface's own MAC.
    pub own_mac: Option<MacAddr>,
    /// How often a down interface is checked.
    pub recheck: Duration,
    /// TCP segmentation offload (with `PACKET_VNET_HDR`): local senders' TCP/IPv4
    /// super-frames go to the caller whole, and long TCP/IPv4 segments sent leave with a GSO
    /// header for the kernel to cut. Without it, super-frames are cut here and every frame
    /// sent must fit the MTU.
    pub offload: bool,
}

impl RawOptions {
    /// Options for `mtu` with the defaults for the rest.
    pub fn new(mtu: u32) -> Self {
        RawOptions {
            mtu,
            own_mac: None,
            recheck: DEFAULT_RECHECK,
            offload: true,
        }
    }
}

/// Why the raw backend could not start. Every message names the interface and the cause, and
/// says what to do about a missing privilege.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// No interface has this name (in this network namespace).
    #[error("interface {name:?} does not exist{}", available_hint(.available))]
    NotFound {
        /// The name asked for.
        name: String,
        /// The interfaces that do exist.
        available: Vec<String>,
    },
    /// The MTU is outside [`MIN_MTU`]`..=`[`MAX_MTU`].
    #[error(
        "invalid MTU {mtu} for interface {name:?}: it must lie between {MIN_MTU} and {MAX_MTU}"
    )]
    InvalidMtu {
        /// The interface.
        name: String,
        /// The MTU as given.
        mtu: u32,
    },
    /// The virtual host's MAC is the interface's own: hubnat would answer for the host kernel.
    #[error(
        "interface {name:?} has the MAC address {mac} that the virtual host is configured with; \
         the virtual host must be a station of its own: set host.mac to another address or \
         leave it unset"
    )]
    SameMac {
        /// The interface.
        name: String,
        /// The shared MAC, as text.
        mac: String,
    },
    /// The packet socket could not be created, filtered, bound or registered.
    #[error("cannot open a packet socket on interface {name:?}: {step}: {cause}{}", perm_hint(.cause))]
    Socket {
        /// The interface.
        name: String,
        /// Which step failed.
        step: &'static str,
        /// The OS error.
        cause: io::Error,
    },
}

impl RawError {
    /// The OS error behind this error, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            RawError::Socket { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

fn available_hint(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!(" (interfaces here: {})", available.join(", "))
    }
}

fn perm_hint(cause: &io::Error) -> &'static str {
    match cause.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (EPERM: a packet socket needs CAP_NET_RAW; run hubnat as root or grant it the \
             capability, e.g. `setcap cap_net_raw+ep`)"
        }
        _ => "",
    }
}

fn fmt_mac(mac: &MacAddr) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The socket descriptor for the reactor, borrowed from pnet's channel, which owns and closes it.
#[derive(Debug)]
struct SocketFd(RawFd);

impl AsFd for SocketFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: pnet's sender and receiver (which close the descriptor when both are dropped)
        // are fields of the same `Link`, declared after this one, so they outlive it.
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

impl AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// An open packet socket on the interface.
struct Link {
    // Declared first: dropped (deregistered from the reactor) before pnet closes the socket.
    fd: Io<SocketFd>,
    /// pnet's sending end: frames go out with `sendmmsg` on `fd` ([`send_many`]), but the
    /// socket is pnet's, open while both of its ends are.
    _tx: Box<dyn DataLinkSender>,
    rx: Box<dyn DataLinkReceiver>,
    index: u32,
    mac: Option<MacAddr>,
    /// Frames come with, and must be sent with, a `virtio_net_hdr` in front.
    vnet: bool,
}

enum State {
    Up(Link),
    Down { next_check: Instant },
}

/// What one read attempt gave.
enum Read {
    Frame,
    Skipped,
    Empty,
    Down(String),
}

/// A frame backend on an existing interface. See the crate documentation.
pub struct RawBackend {
    name: String,
    options: RawOptions,
    state: State,
    stats: BackendStats,
    rx_dropped: u64,
    host_frames: u64,
    downs: u64,
    checksums_finished: u64,
    super_frames: u64,
    segmenter: TcpSegmenter,
}

impl std::fmt::Debug for RawBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBackend")
            .field("name", &self.name)
            .field("up", &self.is_up())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl RawBackend {
    /// Attaches to the interface `name`. If it exists but is down, the backend starts in the
    /// waiting state (see the crate documentation). Call from the thread whose network
    /// namespace holds the interface.
    ///
    /// # Errors
    ///
    /// [`RawError`]: no such interface, a bad MTU, the virtual host's MAC equal to the
    /// interface's, or the socket could not be opened (`EPERM`: CAP_NET_RAW is missing).
    pub fn open(name: &str, options: RawOptions) -> Result<RawBackend, RawError> {
        if !(MIN_MTU..=MAX_MTU).contains(&options.mtu) {
            return Err(RawError::InvalidMtu {
                name: name.to_owned(),
                mtu: options.mtu,
            });
        }
        let all = pnet_datalink::interfaces();
        let Some(iface) = all.iter().find(|i| i.name == name) else {
            return Err(RawError::NotFound {
                name: name.to_owned(),
                available: all.into_iter().map(|i| i.name).collect(),
            });
        };
        let mut backend = RawBackend {
            name: name.to_owned(),
            options,
            state: State::Down {
                next_check: Instant::now(),
            },
            stats: BackendStats::default(),
            rx_dropped: 0,
            host_frames: 0,
            downs: 0,
            checksums_finished: 0,
            super_frames: 0,
            segmenter: TcpSegmenter::new(),
        };
        if iface.is_up() {
            let link = backend.open_link(iface)?;
            if !link.vnet && backend.options.offload {
                // No PACKET_VNET_HDR: no super-frame comes in whole or goes out.
                backend.options.offload = false;
            }
            backend.state = State::Up(link);
            tracing::info!(interface = name, mtu = options.mtu, "raw backend attached");
        } else {
            // Still check what can be checked now.
            backend.check_mac(iface)?;
            tracing::warn!(
                interface = name,
                "interface is down; waiting for it to come up"
            );
            backend.state = State::Down {
                next_check: Instant::now() + options.recheck,
            };
        }
        Ok(backend)
    }

    /// The longest frame a wire of the segment carries: `mtu + 14`.
    fn wire_max(&self) -> usize {
        self.options.mtu as usize + ETHERNET_HEADER_LEN
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True while the socket is open on an up interface.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// Frames received and discarded for their length (under 14 or over `mtu + 14` bytes).
    pub fn rx_dropped(&self) -> u64 {
        self.rx_dropped
    }

    /// Frames received and ignored because the host kernel or the virtual host sent them (the
    /// kernel filter drops most such frames before they are counted).
    pub fn host_frames(&self) -> u64 {
        self.host_frames
    }

    /// How many times the interface went down (or away) while attached.
    pub fn downs(&self) -> u64 {
        self.downs
    }

    /// Frames from local senders with a partial checksum that the backend took care of:
    /// finished, or (TCP/IPv4) left partial and vouched for, as the kernel takes it.
    pub fn checksums_finished(&self) -> u64 {
        self.checksums_finished
    }

    /// TCP super-frames from local senders that the backend cut into segments.
    pub fn super_frames(&self) -> u64 {
        self.super_frames
    }

    fn check_mac(&self, iface: &NetworkInterface) -> Result<(), RawError> {
        if let (Some(own), Some(m)) = (self.options.own_mac, iface.mac) {
            if own == m.octets() {
                return Err(RawError::SameMac {
                    name: self.name.clone(),
                    mac: fmt_mac(&own),
                });
            }
        }
        Ok(())
    }

    fn open_link(&self, iface: &NetworkInterface) -> Result<Link, RawError> {
        self.check_mac(iface)?;
        let err = |step, cause| RawError::Socket {
            name: self.name.clone(),
            step,
            cause,
        };
        // Protocol 0: the socket receives nothing until pnet binds it to the interface.
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("socket", io::Error::last_os_error()));
        }
        if let Err(cause) = attach_filter(fd) {
            // SAFETY: fd is ours and not yet handed to anyone.
            unsafe { libc::close(fd) };
            return Err(err("attaching the filter for the host's own frames", cause));
        }
        let vnet = match set_vnet_hdr(fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    interface = %self.name,
                    error = %e,
                    "PACKET_VNET_HDR is not available: frames from local senders with checksum \
                     or segmentation offload on will be unusable (turn those off on them)"
                );
                false
            }
        };
        // One byte of room beyond the largest frame tells an oversized frame from a full one.
        let read_buffer_size = if vnet {
            VNET_HDR_LEN + MAX_SUPER_FRAME.max(self.wire_max()) + 1
        } else {
            self.wire_max() + 1
        };
        let config = pnet_datalink::Config {
            read_buffer_size,
            // pnet's sender is not used (see `send_many`).
            write_buffer_size: self.wire_max(),
            // Never block inside pnet: the reactor does the waiting.
            read_timeout: Some(Duration::ZERO),
            write_timeout: Some(Duration::ZERO),
            promiscuous: true,
            socket_fd: Some(fd),
            ..pnet_datalink::Config::default()
        };
        // On failure pnet closes the descriptor itself.
        let (tx, rx) = match pnet_datalink::linux::channel(iface, (&config).into()) {
            Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
            Ok(_) => {
                return Err(err(
                    "binding",
                    io::Error::other("pnet returned a channel that is not Ethernet"),
                ))
            }
            Err(cause) => return Err(err("binding to the interface", cause)),
        };
        let fd =
            Io::new(SocketFd(fd)).map_err(|cause| err("registering with the reactor", cause))?;
        Ok(Link {
            fd,
            _tx: tx,
            rx,
            index: iface.index,
            mac: iface.mac.map(|m| m.octets()),
            vnet,
        })
    }

    /// Closes the socket and starts waiting for the interface.
    fn go_down(&mut self, why: &str) {
        if let State::Up(link) = &self.state {
            self.downs += 1;
            tracing::warn!(
                interface = %self.name,
                index = link.index,
                reason = why,
                recheck = ?self.options.recheck,
                "interface went down; waiting for it to come back"
            );
        }
        self.state = State::Down {
            next_check: Instant::now() + self.options.recheck,
        };
    }

    /// Once the check time has come: reopens on the interface if it is up again.
    fn check_interface(&mut self) {
        let found = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == self.name);
        let next = Instant::now() + self.options.recheck;
        match found {
            Some(iface) if iface.is_up() => match self.open_link(&iface) {
                Ok(link) => {
                    tracing::info!(
                        interface = %self.name,
                        index = link.index,
                        "interface is up again; resuming"
                    );
                    self.state = State::Up(link);
                }
                Err(e) => {
                    tracing::debug!(interface = %self.name, error = %e, "interface is up but cannot be opened yet");
                    self.state = State::Down { next_check: next };
                }
            },
            _ => self.state = State::Down { next_check: next },
        }
    }

    /// Reads one frame into `batch` without waiting. The batch must not be full.
    fn read_one(&mut self, batch: &mut FrameBatch) -> Read {
        let wire_max = self.wire_max();
        let State::Up(link) = &mut self.state else {
            return Read::Empty;
        };
        let vnet = link.vnet;
        let result = link.rx.next();
        let raw = match result {
            Ok(raw) => raw,
            Err(e) => {
                return match e.kind() {
                    // pnet's zero-timeout poll found nothing.
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Read::Empty,
                    io::ErrorKind::Interrupted => Read::Skipped,
                    _ => {
                        // A poll error (POLLERR) or a failed recvfrom: the pending socket error
                        // says why, and reading it clears it.
                        let cause = match e.raw_os_error() {
                            Some(_) => e,
                            None => socket_error(link.fd.as_raw_fd()).unwrap_or(e),
                        };
                        Read::Down(cause.to_string())
                    }
                };
            }
        };
        let (hdr, frame) = if vnet {
            match VnetHdr::parse(raw) {
                Some(hdr) => (hdr, &raw[VNET_HDR_LEN..]),
                None => {
                    self.rx_dropped += 1;
                    return Read::Skipped;
                }
            }
        } else {
            (VnetHdr::default(), raw)
        };
        let super_frame = hdr.gso_type != GSO_NONE;
        if frame.len() < ETHERNET_HEADER_LEN
            || (!super_frame && frame.len() > wire_max)
            || frame.len() > MAX_SUPER_FRAME
        {
            self.rx_dropped += 1;
            tracing::trace!(interface = %self.name, len = frame.len(), "discarded a runt or oversized frame");
            return Read::Skipped;
        }
        let (dst, src) = (&frame[0..6], &frame[6..12]);
        let host = link.mac.is_some_and(|m| dst == m || src == m)
            || self.options.own_mac.is_some_and(|m| src == m);
        if host {
            self.host_frames += 1;
            return Read::Skipped;
        }
        if super_frame {
            if hdr.gso_type & !GSO_ECN != GSO_TCPV4 {
                self.rx_dropped += 1;
                tracing::debug!(interface = %self.name, gso_type = hdr.gso_type, len = frame.len(), "discarded a super-frame of a kind the core cannot take (only TCP/IPv4)");
                return Read::Skipped;
            }
            if !self.options.offload {
                if let Err(e) = self
                    .segmenter
                    .start(frame, usize::from(hdr.gso_size), wire_max)
                {
                    self.rx_dropped += 1;
                    tracing::debug!(interface = %self.name, error = %e, len = frame.len(), "discarded a super-frame");
                    return Read::Skipped;
                }
                self.super_frames += 1;
                if self.super_frames == 1 {
                    tracing::debug!(interface = %self.name, len = frame.len(), gso_size = hdr.gso_size, "a local sender's TCP super-frame: cutting it into segments (and any that follow)");
                }
                return if self.emit_segments(batch) > 0 {
                    Read::Frame
                } else {
                    Read::Skipped
                };
            }
            // With offload it goes whole, like a frame that fits: the core takes TCP segments
            // of any length.
            self.super_frames += 1;
            if self.super_frames == 1 {
                tracing::debug!(interface = %self.name, len = frame.len(), gso_size = hdr.gso_size, "a local sender's TCP super-frame: taken whole (and any that follow)");
            }
        }
        let needs_csum = hdr.flags & F_NEEDS_CSUM != 0;
        let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        // A partial checksum is finished, except a TCP/IPv4 one: it stays partial and the
        // frame is vouched for, as the kernel takes it (`finish_offloads`).
        let mut received = None;
        let pushed = batch.push_with(frame.len(), |buf| {
            let buf = &mut buf[..frame.len()];
            buf.copy_from_slice(frame);
            received = finish_offloads(&hdr, buf);
            // A super-frame whose checksum cannot be finished is nothing the core can take.
            if super_frame && received.is_none() {
                return Err(());
            }
            Ok(frame.len())
        });
        if pushed.is_err() {
            self.rx_dropped += 1;
            tracing::debug!(interface = %self.name, start, offset, len = frame.len(), "discarded a super-frame whose partial checksum's offsets do not fit it");
            return Read::Skipped;
        }
        if received.is_some_and(|r| r.checksum_verified) {
            batch.set_last_checksum_verified();
        }
        if needs_csum {
            if received.is_some() {
                self.checksums_finished += 1;
                if self.checksums_finished == 1 {
                    tracing::debug!(interface = %self.name, "a local sender's partial checksum: taking it as the kernel does (and any that follow)");
                }
            } else {
                tracing::debug!(interface = %self.name, start, offset, "a partial checksum's offsets do not fit the frame");
            }
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame.len() as u64;
        Read::Frame
    }

    /// Appends what is left of the super-frame being cut; returns how many segments.
    fn emit_segments(&mut self, batch: &mut FrameBatch) -> usize {
        let before = batch.len();
        let n = self.segmenter.emit(batch);
        for i in before..batch.len() {
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += batch.get(i).map_or(0, |f| f.len() as u64);
        }
        n
    }
}

/// Asks the kernel for a `virtio_net_hdr` before each frame (and to expect one before each
/// frame sent).
fn set_vnet_hdr(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes the socket's pending error (`SO_ERROR`), if any.
fn socket_error(fd: RawFd) -> Option<io::Error> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && value != 0).then(|| io::Error::from_raw_os_error(value))
}

/// The kernel filter: drop frames the host sends (`PACKET_OUTGOING`) and frames addressed to
/// the host (`PACKET_HOST`); accept the rest whole.
fn filter_program() -> [libc::sock_filter; 5] {
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // SKF_AD_OFF + SKF_AD_PKTTYPE, as the unsigned offset the kernel expects.
    const PKTTYPE: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        insn(LD_B_ABS, 0, 0, PKTTYPE),
        insn(JEQ_K, 2, 0, u32::from(libc::PACKET_OUTGOING)),
        insn(JEQ_K, 1, 0, u32::from(libc::PACKET_HOST)),
        insn(RET_K, 0, 0, 0x0004_0000),
        insn(RET_K, 0, 0, 0),
    ]
}

fn attach_filter(fd: RawFd) -> io::Result<()> {
    let mut program = filter_program();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: fprog points at `program`, which lives until the call returns; the kernel copies
    // it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True for send errors that mean the interface is down or gone.
fn is_down_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETDOWN) | Some(libc::ENXIO) | Some(libc::ENODEV)
    )
}

/// Sends `frames` on the packet socket `fd` (interface `index`), each after its
/// `virtio_net_hdr` (and the super-frame's changed headers) from `prefixes` when the socket has
/// `PACKET_VNET_HDR`, with `sendmmsg`: returns how many went, and the error of the first that
/// did not (the rest were not tried).
fn send_many(
    fd: RawFd,
    index: u32,
    prefixes: Option<&[VnetPrefix]>,
    frames: &[&[u8]],
) -> (usize, Option<io::Error>) {
    /// The most messages one call takes (the kernel's UIO_MAXIOV).
    const MAX_MESSAGES: usize = 1024;
    fn iov(bytes: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        }
    }
    // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    let frames = &frames[..frames.len().min(MAX_MESSAGES)];
    let hdrs: Vec<[u8; VNET_HDR_LEN]> = prefixes
        .map(|p| p[..frames.len()].iter().map(|p| p.hdr.to_bytes()).collect())
        .unwrap_or_default();
    let iovs: Vec<[libc::iovec; 3]> = frames
        .iter()
        .enumerate()
        .map(|(i, frame)| match prefixes {
            Some(p) => {
                let headers = p[i].headers();
                [iov(&hdrs[i]), iov(headers), iov(&frame[headers.len()..])]
            }
            None => [iov(frame), iov(&[]), iov(&[])],
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter()
        .map(|iov| {
            // SAFETY: all-zero is a valid msghdr (no control data); the pointers set below
            // outlive the call.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = (&addr as *const libc::sockaddr_ll) as *mut libc::c_void;
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            hdr.msg_iov = iov.as_ptr() as *mut libc::iovec;
            hdr.msg_iovlen = if prefixes.is_some() { 3 } else { 1 };
            libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: `msgs` holds `msgs.len()` headers whose names and buffers live until the call
    // returns (the frames are only read).
    let n = unsafe {
        libc::sendmmsg(
            fd,
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n < 0 => (0, Some(io::Error::last_os_error())),
        // Nothing sent and no error (it does not happen): as a full socket.
        0 => (0, Some(io::ErrorKind::WouldBlock.into())),
        n => (n as usize, None),
    }
}

impl Backend for RawBackend {
    fn describe(&self) -> String {
        format!("raw {}", self.name)
    }

    /// `mtu + 14`, or with offload a TCP super-frame's length.
    fn max_frame_len(&self) -> usize {
        if self.options.offload {
            MAX_SUPER_FRAME.max(self.wire_max())
        } else {
            self.wire_max()
        }
    }

    fn tcp_offload(&self) -> bool {
        self.options.offload
    }

    /// See the crate documentation. Cancel-safe: the awaits (readability, the recheck timer)
    /// come before a frame is taken, and the recheck time is kept across calls.
    async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()> {
        // Nothing came since the last read said WouldBlock: wait without reading again.
        if let (State::Up(link), false) = (&self.state, self.segmenter.is_active()) {
            link.fd.read_ready().await;
        }
        let mut got_one = false;
        loop {
            if batch.is_full() {
                return Ok(());
            }
            // Segments of a super-frame cut earlier come first.
            if self.segmenter.is_active() {
                got_one |= self.emit_segments(batch) > 0;
                continue;
            }
            if let State::Down { next_check } = self.state {
                if got_one {
                    return Ok(());
                }
                Timer::at(next_check).await;
                self.check_interface();
                continue;
            }
            match self.read_one(batch) {
                Read::Frame => got_one = true,
                Read::Skipped => {}
                Read::Down(why) => self.go_down(&why),
                Read::Empty if got_one => return Ok(()),
                Read::Empty => {
                    let State::Up(link) = &self.state else {
                        continue;
                    };
                    if let Err(e) = link.fd.readable().await {
                        self.go_down(&e.to_string());
                    }
                }
            }
        }
    }

    /// See the crate documentation. While the interface is down, frames are dropped and
    /// counted; never fails. The batch goes out with as few `sendmmsg` calls as the socket
    /// takes (one, unless a frame fails).
    async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()> {
        let mut frames: Vec<&[u8]> = Vec::with_capacity(batch.len());
        // With PACKET_VNET_HDR, each frame's header: empty, or for a long TCP/IPv4 segment a
        // GSO header that lets the kernel cut it to the MTU.
        let mut prefixes: Vec<VnetPrefix> = Vec::new();
        let vnet = matches!(&self.state, State::Up(link) if link.vnet);
        let offload = vnet && self.options.offload;
        for frame in batch.iter() {
            if frame.len() < ETHERNET_HEADER_LEN || frame.len() > self.max_frame_len() {
                self.stats.tx_dropped += 1;
                continue;
            }
            if vnet {
                match vnet_prefix(frame, self.wire_max(), offload) {
                    Some(p) => prefixes.push(p),
                    None => {
                        self.stats.tx_dropped += 1;
                        tracing::debug!(interface = %self.name, len = frame.len(), "dropped a frame longer than the MTU that is not a TCP/IPv4 segment");
                        continue;
                    }
                }
            } else if frame.len() > self.wire_max() {
                self.stats.tx_dropped += 1;
                continue;
            }
            frames.push(frame);
        }
        let mut waited = false;
        let mut next = 0;
        while next < frames.len() {
            let State::Up(link) = &mut self.state else {
                self.stats.tx_dropped += (frames.len() - next) as u64;
                return Ok(());
            };
            let (sent, failed) = send_many(
                link.fd.as_raw_fd(),
                link.index,
                link.vnet.then_some(&prefixes[next..]),
                &frames[next..],
            );
            for frame in &frames[next..next + sent] {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += frame.len() as u64;
            }
            next += sent;
            let Some(e) = failed else {
                continue;
            };
            // Frame `next` failed.
            if is_down_error(&e) {
                self.stats.tx_dropped += 1;
                next += 1;
                self.go_down(&e.to_string());
            } else if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) || e.raw_os_error() == Some(libc::ENOBUFS)
            {
                if !waited {
                    waited = true;
                    let writable = async { link.fd.writable().await.is_ok() }
                        .or(async {
                            Timer::after(WRITE_STALL_LIMIT).await;
                            false
                        })
                        .await;
                    if writable {
                        continue;
                    }
                }
                self.stats.tx_dropped += 1;
                next += 1;
            } else if e.kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                self.stats.tx_dropped += 1;
                tracing::debug!(interface = %self.name, error = %e, len = frames[next].len(), "cannot send a frame");
                next += 1;
            }
        }
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_jumps_land_on_the_drop() {
        let p = filter_program();
        // Both comparisons jump to the last instruction, which returns 0 (drop).
        assert_eq!(1 + 1 + p[1].jt as usize, p.len() - 1);
        assert_eq!(2 + 1 + p[2].jt as usize, p.len() - 1);
        assert_eq!(p[4].k, 0);
        assert_ne!(p[3].k, 0);
    }

    #[test]
    fn a_missing_interface_names_what_exists() {
        let err = RawBackend::open("no-such-if0", RawOptions::new(1500)).expect_err("missing");
        let text = err.to_string();
        assert!(
            text.starts_with("interface \"no-such-if0\" does not exist"),
            "{text}"
        );
        assert!(text.contains("lo"), "{text}");
    }

    #[test]
    fn bad_mtus_are_refused() {
        let err = RawBackend::open("lo", RawOptions::new(10)).expect_err("tiny");
        assert!(err.to_string().contains("invalid MTU 10"), "{err}");
    }
}
