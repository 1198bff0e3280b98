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
//! * **Receiving.** The descriptor is non-blocking and registered with async-io's reactor. One
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
//! * **Failure.** `EIO`, `ENXIO`, `EBADFD`, `EBADF` and `ENODEV` mean the device is gone (deleted
//!   with `ip link del`, or its namespace torn down): both directions then return an error and
//!   the driver stops. Any other read error is fatal too (retrying it would spin); any other
//!   write error drops that one frame.
//!
//! # Limits
//!
//! The MTU must lie in [`MIN_MTU`]`..=`[`MAX_MTU`], the range the kernel's TUN driver accepts
//! for a TAP device. No offloads (`IFF_VNET_HDR`) are negotiated, so the kernel segments and
//! checksums everything before handing it over, and every frame fits in `mtu + 14` bytes.

mod sys;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::FutureExt;
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

/// The TAP descriptor as async-io needs it: tun-tap's `Iface` only implements `AsRawFd`.
#[derive(Debug)]
struct TapFd(Iface);

impl AsFd for TapFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the Iface owns the descriptor (a File) until it is dropped, and the returned
        // BorrowedFd cannot outlive the borrow of self, hence of the Iface.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

impl AsRawFd for TapFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

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
    fd: Async<TapFd>,
    name: String,
    mtu: u32,
    max_frame_len: usize,
    stats: BackendStats,
    rx_dropped: u64,
}

impl TapBackend {
    /// Opens the TAP device `name` (reusing it if it exists and is persistent, creating it
    /// otherwise), sets its MTU to `mtu`, brings it up, and registers it with async-io.
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
        let iface =
            Iface::without_packet_info(name, Mode::Tap).map_err(|cause| TapError::Open {
                name: name.to_owned(),
                cause,
            })?;
        let name = iface.name().to_owned();
        sys::set_mtu(&name, mtu).map_err(|cause| TapError::SetMtu {
            name: name.clone(),
            mtu,
            cause,
        })?;
        sys::set_up(&name).map_err(|cause| TapError::BringUp {
            name: name.clone(),
            cause,
        })?;
        // Async::new puts the descriptor in non-blocking mode before registering it.
        let fd = Async::new(TapFd(iface)).map_err(|cause| TapError::Reactor {
            name: name.clone(),
            cause,
        })?;
        let max_frame_len = mtu as usize + ETHERNET_HEADER_LEN;
        tracing::info!(device = %name, mtu, "TAP device open");
        Ok(TapBackend {
            fd,
            name,
            mtu,
            max_frame_len,
            stats: BackendStats::default(),
            rx_dropped: 0,
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
        let iface = &self.fd.get_ref().0;
        // One byte of room beyond the maximum tells an oversized frame from a full-size one
        // (the kernel truncates a frame to the buffer without saying so).
        let read = batch.push_with(max + 1, |buf| match iface.recv(buf) {
            Ok(n) if n < ETHERNET_HEADER_LEN || n > max => Err(ReadSkip::Discarded),
            Ok(n) => Ok(n),
            Err(e) => Err(ReadSkip::Io(e)),
        });
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
        for frame in batch.iter() {
            if frame.len() < ETHERNET_HEADER_LEN || frame.len() > self.max_frame_len {
                self.stats.tx_dropped += 1;
                tracing::debug!(device = %self.name, len = frame.len(), "dropped a frame of invalid length");
                continue;
            }
            loop {
                match self.fd.get_ref().0.send(frame) {
                    Ok(_) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame.len() as u64;
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
}
