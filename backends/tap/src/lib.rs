//! hubnat's TAP backend: the virtual segment is a Linux TAP device.
//!
//! The kernel side of the device is the segment: whatever the kernel (or a bridge, a VM, a
//! container's veth) sends through the TAP interface reaches hubnat's virtual host, and the
//! frames hubnat sends are received by the kernel as if they came from a wire.
//!
//! # Theory of operation
//!
//! * **Opening.** [`TapBackend::open`] attaches to the TAP device `name` with tun-tap
//!   (`IFF_TAP | IFF_NO_PI`: plain Ethernet frames, no packet-information prefix). A device of
//!   that name that already exists and is persistent (`ip tuntap add dev NAME mode tap`) is
//!   reused; otherwise a new device is created, and it disappears when the backend is dropped.
//!   Then the interface MTU is set to the configured one (the MSS hubnat offers follows it, so
//!   they must match) and the interface is brought up. Creating or attaching needs
//!   CAP_NET_ADMIN, unless the persistent device was created for this user (`user` option of
//!   `ip tuntap add`); setting the MTU and flags needs CAP_NET_ADMIN in any case.
//! * **Namespaces.** The device and the configuration ioctls live in the network namespace of
//!   the *thread* that calls [`TapBackend::open`].
//! * **Receiving.** The descriptor is non-blocking and registered (edge-triggered) with the reactor of `hubnat_backend::rt`. One
//!   `read` returns exactly one frame, so [`Backend::recv_batch`] waits for readability, then
//!   reads frame after frame straight into the caller's [`FrameBatch`] (one copy, kernel to
//!   batch) until the device has nothing more (`EAGAIN`) or the batch is full. The only await
//!   point is the readability wait, before any byte is taken, which makes it cancel-safe.
//!   Frames shorter than an Ethernet header or longer than [`Backend::max_frame_len`] are
//!   discarded and counted ([`TapBackend::rx_dropped`]).
//! * **Sending.** One `write` per frame. A TAP write practically never blocks (the kernel
//!   queues the frame on its backlog), but if it does, the backend waits for writability at
//!   most [`WRITE_STALL_LIMIT`] once per batch; after that, frames that would block are dropped
//!   and counted, like on a congested link. Oversized or runt frames are dropped and counted.
//! * **Failure.** `ENXIO`, `EBADFD`, `EBADF` and `ENODEV` mean the device is gone (deleted
//!   with `ip link del`, or its namespace torn down): both directions then return an error and
//!   the driver stops. A write's `EIO` means the link is down (`ip link set down`, or the
//!   device was just moved to another namespace and is not up yet): the frame is dropped and
//!   counted, a warning says so once, and sending resumes when the link comes up. Any other
//!   read error is fatal (retrying it would spin); any other write error drops that one frame.
//!
//! # Limits
//!
//! The MTU must lie in [`MIN_MTU`]`..=`[`MAX_MTU`], the range the kernel's TUN driver accepts
//! for a TAP device. Without offload ([`TapBackend::open`]) the kernel segments and checksums
//! everything before handing it over, and every frame fits in `mtu + 14` bytes.
//!
//! # Segmentation offload
//!
//! [`TapBackend::open_with`] with `offload` opens `/dev/net/tun` itself with `IFF_VNET_HDR`
//! (tun-tap cannot) and tells the kernel, with `TUNSETOFFLOAD` (`TUN_F_CSUM | TUN_F_TSO4`),
//! that the reader takes partial checksums and TCP/IPv4 super-frames. Every frame then comes
//! and goes with a `virtio_net_hdr` ([`hubnat_backend::vnet`]), read and written with the frame
//! in one `readv` / `writev`:
//!
//! * **In**: a partial checksum is completed; a TCP/IPv4 super-frame (up to 64 KiB) is handed
//!   on whole, for the core takes a TCP segment of any length; other super-frames (which the
//!   kernel does not send, as they were not offered) are discarded and counted.
//! * **Out**: a frame that fits the MTU gets an empty header; a longer one must be a TCP/IPv4
//!   segment, and gets a GSO header (`gso_size` = the MTU less the IPv4 and TCP headers) and a
//!   partial checksum in a copy of its headers, so that the kernel cuts it where a wire needs
//!   it. The core sends such segments only when [`Backend::tcp_offload`] says so.
//!
//! [`Backend::max_frame_len`] is then [`MAX_SUPER_FRAME`]. If the kernel refuses the offloads,
//! the device works without them.

mod sys;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use futures_lite::FutureExt;
use hubnat_backend::rt::{Io, Timer};
use hubnat_backend::vnet::{
    finish_offloads, vnet_prefix, VnetHdr, VnetPrefix, GSO_NONE, VNET_HDR_LEN,
};
use hubnat_backend::{Backend, BackendStats, FrameBatch, ETHERNET_HEADER_LEN};
use tun_tap::{Iface, Mode};

/// The smallest MTU accepted: the IPv4 minimum (the TUN driver's `ETH_MIN_MTU`).
pub const MIN_MTU: u32 = 68;

/// The largest MTU accepted: the TUN driver's limit for a TAP device (65535 minus the 14-byte
/// Ethernet header).
pub const MAX_MTU: u32 = 65521;

/// How long [`Backend::send_batch`] waits, at most once per batch, for a TAP device that
/// refuses writes (`EAGAIN`) to become writable before it drops frames instead.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_millis(10);

/// Why a TAP device could not be opened and configured.
///
/// Every message names the device and the cause, and says what to do about a missing
/// privilege (`EPERM`). [`TapError::io_error`] gives the underlying OS error, if any.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name breaks the kernel's interface-name rules (empty, over 15 bytes, or containing
    /// `/`, `:`, NUL or whitespace).
    #[error("invalid TAP device name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The MTU is outside [`MIN_MTU`]`..=`[`MAX_MTU`].
    #[error(
        "invalid MTU {mtu} for TAP device {name:?}: it must lie between {MIN_MTU} and {MAX_MTU}"
    )]
    InvalidMtu {
        /// The device name.
        name: String,
        /// The MTU as given.
        mtu: u32,
    },
    /// `/dev/net/tun` could not be opened, or the device could not be created or attached.
    #[error("cannot open TAP device {name:?}: {cause}{}", open_hint(cause))]
    Open {
        /// The device name.
        name: String,
        /// The OS error.
        cause: io::Error,
    },
    /// The interface MTU could not be set.
    #[error(
        "cannot set MTU {mtu} on TAP device {name:?}: {cause}{}",
        config_hint(cause)
    )]
    SetMtu {
        /// The device name.
        name: String,
        /// The MTU asked for.
        mtu: u32,
        /// The OS error.
        cause: io::Error,
    },
    /// The interface could not be brought up.
    #[error("cannot bring TAP device {name:?} up: {cause}{}", config_hint(cause))]
    BringUp {
        /// The device name.
        name: String,
        /// The OS error.
        cause: io::Error,
    },
    /// The descriptor could not be made non-blocking or registered with the async reactor.
    #[error("cannot register TAP device {name:?} with the async reactor: {cause}")]
    Reactor {
        /// The device name.
        name: String,
        /// The OS error.
        cause: io::Error,
    },
}

impl TapError {
    /// The OS error behind this error, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            TapError::InvalidName { .. } | TapError::InvalidMtu { .. } => None,
            TapError::Open { cause, .. }
            | TapError::SetMtu { cause, .. }
            | TapError::BringUp { cause, .. }
            | TapError::Reactor { cause, .. } => Some(cause),
        }
    }
}

const EPERM_HINT: &str = " (EPERM: opening and configuring a TAP device needs CAP_NET_ADMIN; \
     run hubnat as root or grant it the capability, e.g. `setcap cap_net_admin+ep`, or create \
     a persistent device for this user with `ip tuntap add dev NAME mode tap user USER`)";

/// Advice for an error from opening the device.
fn open_hint(cause: &io::Error) -> &'static str {
    match cause.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => EPERM_HINT,
        Some(libc::EBUSY) => " (the device is already attached to another process)",
        Some(libc::EINVAL) => {
            " (a device of this name exists but is not a single-queue TAP device, \
             or the name is taken by another kind of interface)"
        }
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            " (/dev/net/tun is missing: load the `tun` kernel module)"
        }
        _ => "",
    }
}

/// Advice for an error from configuring the interface.
fn config_hint(cause: &io::Error) -> &'static str {
    match cause.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => CONFIG_EPERM_HINT,
        _ => "",
    }
}

const CONFIG_EPERM_HINT: &str = " (EPERM: changing a TAP device's MTU or bringing it up needs \
     CAP_NET_ADMIN; with a persistent device made for this user, set them once as root: \
     `ip link set dev NAME mtu MTU up`, with the MTU hubnat is configured for)";

/// An I/O error on an open device, with the device named in its message.
#[derive(Debug, thiserror::Error)]
#[error("TAP device {name:?}: {op} failed: {cause}{}", gone_hint(cause))]
struct DeviceIoError {
    name: String,
    op: &'static str,
    cause: io::Error,
}

/// True for the errors that mean the device no longer exists (or is down for good).
fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO)
            | Some(libc::ENXIO)
            | Some(libc::EBADFD)
            | Some(libc::EBADF)
            | Some(libc::ENODEV)
    )
}

fn gone_hint(cause: &io::Error) -> &'static str {
    if device_gone(cause) {
        " (the device was deleted or taken down)"
    } else {
        ""
    }
}

/// The TAP descriptor as the reactor needs it: tun-tap's `Iface` (plain frames) only implements
/// `AsRawFd`; a descriptor opened with `IFF_VNET_HDR` is our own.
#[derive(Debug)]
enum TapFd {
    Plain(Iface),
    Vnet(OwnedFd),
}

impl AsFd for TapFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the Iface or OwnedFd owns the descriptor until it is dropped, and the
        // returned BorrowedFd cannot outlive the borrow of self.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

impl AsRawFd for TapFd {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            TapFd::Plain(iface) => iface.as_raw_fd(),
            TapFd::Vnet(fd) => fd.as_raw_fd(),
        }
    }
}

/// The largest frame with offloads: a TCP/IPv4 super-frame of 64 KiB and its Ethernet header.
pub const MAX_SUPER_FRAME: usize = 65535 + ETHERNET_HEADER_LEN;

/// Why one read did not yield a frame for the batch.
enum ReadSkip {
    /// The frame was a runt or oversized: discarded.
    Discarded,
    /// The read failed.
    Io(io::Error),
}

/// What one read attempt produced.
enum ReadOutcome {
    /// A frame was appended to the batch.
    Frame,
    /// A frame was read and discarded, or the read was interrupted: try again.
    Again,
    /// The device has nothing more right now.
    Empty,
}

/// A frame backend on a Linux TAP device. See the crate documentation.
#[derive(Debug)]
pub struct TapBackend {
    fd: Io<TapFd>,
    name: String,
    mtu: u32,
    max_frame_len: usize,
    stats: BackendStats,
    rx_dropped: u64,
    /// Frames carry a `virtio_net_hdr` (the descriptor was opened with `IFF_VNET_HDR`).
    vnet: bool,
    /// The kernel hands over, and takes, TCP/IPv4 super-frames with partial checksums.
    offload: bool,
    /// Super-frames received (and handed on whole).
    rx_super: u64,
    /// Super-frames sent (the kernel cuts them where it must).
    tx_super: u64,
    /// A write found the link down, and no write has succeeded since (warned once).
    link_down: bool,
}

impl TapBackend {
    /// Opens the TAP device `name` (reusing it if it exists and is persistent, creating it
    /// otherwise), sets its MTU to `mtu`, brings it up, and makes it non-blocking for the reactor (`hubnat_backend::rt`).
    ///
    /// `name` must be a valid interface name (1 to 15 bytes, no `/`, `:` or whitespace); a
    /// `%d` in it lets the kernel pick a free number, and [`TapBackend::name`] then tells the
    /// name chosen. Call from the thread whose network namespace should hold the device.
    ///
    /// # Errors
    ///
    /// [`TapError`] says which step failed for which device and why; `EPERM` means the process
    /// lacks CAP_NET_ADMIN.
    pub fn open(name: &str, mtu: u32) -> Result<TapBackend, TapError> {
        Self::open_with(name, mtu, false)
    }

    /// [`TapBackend::open`], with segmentation and checksum offload when `offload`: the
    /// descriptor is opened with `IFF_VNET_HDR` and the kernel told (`TUNSETOFFLOAD`) that
    /// hubnat takes partial checksums and TCP/IPv4 super-frames of up to 64 KiB, and hands
    /// such super-frames back for the kernel to cut (see the crate documentation). If the
    /// kernel refuses the offloads, the device works without them (a warning says so).
    pub fn open_with(name: &str, mtu: u32, offload: bool) -> Result<TapBackend, TapError> {
        if let Err(reason) = sys::check_name(name) {
            return Err(TapError::InvalidName {
                name: name.to_owned(),
                reason,
            });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(TapError::InvalidMtu {
                name: name.to_owned(),
                mtu,
            });
        }
        let (tap, name, offload) = if offload {
            let (fd, name) = sys::open_vnet(name).map_err(|cause| TapError::Open {
                name: name.to_owned(),
                cause,
            })?;
            let on = match sys::set_offload(&fd, libc::TUN_F_CSUM | libc::TUN_F_TSO4) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(device = %name, error = %e, "TAP device: the kernel refused checksum and segmentation offload (TUNSETOFFLOAD); going on without");
                    false
                }
            };
            (TapFd::Vnet(fd), name, on)
        } else {
            let iface =
                Iface::without_packet_info(name, Mode::Tap).map_err(|cause| TapError::Open {
                    name: name.to_owned(),
                    cause,
                })?;
            let name = iface.name().to_owned();
            (TapFd::Plain(iface), name, false)
        };
        let vnet = matches!(tap, TapFd::Vnet(_));
        sys::set_mtu(&name, mtu).map_err(|cause| TapError::SetMtu {
            name: name.clone(),
            mtu,
            cause,
        })?;
        sys::set_up(&name).map_err(|cause| TapError::BringUp {
            name: name.clone(),
            cause,
        })?;
        // Io::new puts the descriptor in non-blocking mode; it registers on the first wait.
        let fd = Io::new(tap).map_err(|cause| TapError::Reactor {
            name: name.clone(),
            cause,
        })?;
        let max_frame_len = if offload {
            MAX_SUPER_FRAME.max(mtu as usize + ETHERNET_HEADER_LEN)
        } else {
            mtu as usize + ETHERNET_HEADER_LEN
        };
        tracing::info!(device = %name, mtu, offload, "TAP device open");
        Ok(TapBackend {
            fd,
            name,
            mtu,
            max_frame_len,
            stats: BackendStats::default(),
            rx_dropped: 0,
            vnet,
            offload,
            rx_super: 0,
            tx_super: 0,
            link_down: false,
        })
    }

    /// The device's name (the kernel's choice if the requested name had a `%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface MTU set at open time.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Whether checksum and segmentation offload is on.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// TCP super-frames received from the kernel and sent to it.
    pub fn super_frames(&self) -> (u64, u64) {
        (self.rx_super, self.tx_super)
    }

    /// Frames read from the device and discarded: shorter than an Ethernet header, or longer
    /// than [`Backend::max_frame_len`] (only possible if someone raised the MTU behind our
    /// back).
    pub fn rx_dropped(&self) -> u64 {
        self.rx_dropped
    }

    fn io_error(&self, op: &'static str, cause: io::Error) -> io::Error {
        io::Error::new(
            cause.kind(),
            DeviceIoError {
                name: self.name.clone(),
                op,
                cause,
            },
        )
    }

    /// Reads one frame into `batch` without waiting. The batch must not be full.
    fn read_one(&mut self, batch: &mut FrameBatch) -> io::Result<ReadOutcome> {
        let max = self.max_frame_len;
        let tap = self.fd.get_ref();
        // One byte of room beyond the maximum tells an oversized frame from a full-size one
        // (the kernel truncates a frame to the buffer without saying so).
        let mut received = None;
        let read = batch.push_with(max + 1, |buf| {
            let n = match tap {
                TapFd::Plain(iface) => iface.recv(buf),
                TapFd::Vnet(fd) => read_vnet(fd, &mut *buf).map(|(hdr, n)| {
                    let len = n.min(buf.len());
                    match finish_offloads(&hdr, &mut buf[..len]) {
                        Some(r) => {
                            received = Some(r);
                            n
                        }
                        // Not something the core can take: discarded below.
                        None => 0,
                    }
                }),
            };
            match n {
                Ok(n) if n < ETHERNET_HEADER_LEN || n > max => Err(ReadSkip::Discarded),
                Ok(n) => Ok(n),
                Err(e) => Err(ReadSkip::Io(e)),
            }
        });
        if let (Some(r), Ok(Some(_))) = (received, &read) {
            if r.super_frame {
                self.rx_super += 1;
            }
            if r.checksum_verified {
                batch.set_last_checksum_verified();
            }
        }
        match read {
            Ok(Some(n)) => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += n as u64;
                Ok(ReadOutcome::Frame)
            }
            // The caller checks for a full batch first; treat it as "nothing more".
            Ok(None) => Ok(ReadOutcome::Empty),
            Err(ReadSkip::Discarded) => {
                self.rx_dropped += 1;
                tracing::trace!(device = %self.name, "discarded a runt or oversized frame");
                Ok(ReadOutcome::Again)
            }
            Err(ReadSkip::Io(e)) => match e.kind() {
                io::ErrorKind::WouldBlock => Ok(ReadOutcome::Empty),
                io::ErrorKind::Interrupted => Ok(ReadOutcome::Again),
                _ => Err(self.io_error("read", e)),
            },
        }
    }

    /// Waits until the device is writable, for at most [`WRITE_STALL_LIMIT`]. Returns false
    /// on timeout.
    async fn wait_writable(&self) -> io::Result<bool> {
        async { self.fd.writable().await.map(|()| true) }
            .or(async {
                Timer::after(WRITE_STALL_LIMIT).await;
                Ok(false)
            })
            .await
    }
}

impl Backend for TapBackend {
    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }

    fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// See the crate documentation. Cancel-safe: the only await is the readability wait,
    /// which happens before a frame is taken from the device.
    async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()> {
        // Nothing came since the last read said WouldBlock: wait without reading again.
        self.fd.read_ready().await;
        let mut got_one = false;
        loop {
            if batch.is_full() {
                return Ok(());
            }
            match self.read_one(batch)? {
                ReadOutcome::Frame => got_one = true,
                ReadOutcome::Again => {}
                ReadOutcome::Empty if got_one => return Ok(()),
                ReadOutcome::Empty => self
                    .fd
                    .readable()
                    .await
                    .map_err(|e| self.io_error("waiting for readability", e))?,
            }
        }
    }

    /// See the crate documentation. Not cancel-safe in the sense that a cancelled call may
    /// have sent some of the batch's frames (never part of a frame).
    async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()> {
        let mut may_wait = true;
        let wire_max = self.mtu as usize + ETHERNET_HEADER_LEN;
        for frame in batch.iter() {
            if frame.len() < ETHERNET_HEADER_LEN || frame.len() > self.max_frame_len {
                self.stats.tx_dropped += 1;
                tracing::debug!(device = %self.name, len = frame.len(), "dropped a frame of invalid length");
                continue;
            }
            // What goes before the frame: nothing, or a virtio_net_hdr (a super-frame's says
            // how to cut it, with its TCP checksum field turned into a partial one).
            let prefix = if self.vnet {
                match vnet_prefix(frame, wire_max, self.offload) {
                    Some(p) => Some(p),
                    None => {
                        self.stats.tx_dropped += 1;
                        tracing::debug!(device = %self.name, len = frame.len(), "dropped a frame longer than the MTU that is not a TCP/IPv4 segment");
                        continue;
                    }
                }
            } else {
                None
            };
            loop {
                let sent = match (self.fd.get_ref(), &prefix) {
                    (TapFd::Plain(iface), _) => iface.send(frame),
                    (TapFd::Vnet(fd), Some(p)) => write_vnet(fd, p, frame),
                    (TapFd::Vnet(fd), None) => write_vnet(fd, &VnetPrefix::plain(), frame),
                };
                match sent {
                    Ok(_) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame.len() as u64;
                        if prefix.as_ref().is_some_and(|p| p.hdr.gso_type != GSO_NONE) {
                            self.tx_super += 1;
                        }
                        if std::mem::take(&mut self.link_down) {
                            tracing::info!(device = %self.name, "TAP device is up again: frames go out");
                        }
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if may_wait
                            && self
                                .wait_writable()
                                .await
                                .map_err(|e| self.io_error("waiting for writability", e))?
                        {
                            continue;
                        }
                        may_wait = false;
                        self.stats.tx_dropped += 1;
                        tracing::trace!(device = %self.name, "device not writable: dropped a frame");
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        // The link is down (not gone: that is EBADFD): drop, count, go on.
                        self.stats.tx_dropped += 1;
                        if !std::mem::replace(&mut self.link_down, true) {
                            tracing::warn!(device = %self.name, "TAP device is down: frames to the segment are dropped until it is up");
                        }
                        break;
                    }
                    Err(e) if device_gone(&e) => return Err(self.io_error("write", e)),
                    Err(e) => {
                        self.stats.tx_dropped += 1;
                        tracing::debug!(device = %self.name, error = %e, "write failed: dropped a frame");
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }

    fn tcp_offload(&self) -> bool {
        self.offload
    }
}

/// Reads one `virtio_net_hdr` and the frame after it (into `buf`) with one `readv`.
fn read_vnet(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(VnetHdr, usize)> {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let iov = [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        },
    ];
    // SAFETY: both iovecs point to exclusively borrowed buffers of the given lengths.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let hdr = VnetHdr::parse(&hdr)
        .filter(|_| n >= VNET_HDR_LEN)
        .unwrap_or_default();
    Ok((hdr, n.saturating_sub(VNET_HDR_LEN)))
}

/// Writes the header, the (changed) headers and the rest of `frame` with one `writev`.
fn write_vnet(fd: &OwnedFd, prefix: &VnetPrefix, frame: &[u8]) -> io::Result<usize> {
    let hdr = prefix.hdr.to_bytes();
    let headers = prefix.headers();
    let rest = &frame[headers.len()..];
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: headers.as_ptr() as *mut libc::c_void,
            iov_len: headers.len(),
        },
        libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        },
    ];
    // SAFETY: the iovecs point to live buffers of the given lengths, which writev only reads.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 3) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
