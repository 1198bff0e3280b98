//! The frame backend contract: what every hubnat backend provides to the core's driver.
//!
//! A backend moves whole Ethernet frames (destination MAC first, no preamble, no FCS) between
//! the virtual segment and hubnat's virtual host. The driver uses every backend the same way:
//!
//! 1. [`Backend::recv_batch`] waits until at least one frame has arrived, then appends to the
//!    caller's [`FrameBatch`] every further frame that is ready *without waiting*, up to the
//!    batch's frame capacity. One wake-up, many frames.
//! 2. The driver hands the frames to the core, collects the core's replies in another
//!    [`FrameBatch`], and passes that to [`Backend::send_batch`].
//!
//! # Buffers
//!
//! A [`FrameBatch`] is one contiguous byte buffer plus a list of frame ends. It is allocated
//! once and reused: `clear` keeps its capacity, so the steady state allocates nothing per frame.
//! Backends that read from a file descriptor read straight into the batch with
//! [`FrameBatch::push_with`], so a frame is copied exactly once (kernel → batch).
//!
//! # Cancellation
//!
//! The driver races `recv_batch` against timers and host events, and drops it when another
//! branch wins. `recv_batch` must therefore be cancel-safe: a frame is either fully appended to
//! the batch or still waiting in the backend, never lost half-way.

use std::io;

pub mod capture;
pub mod rt;
pub mod vnet;

/// The largest Ethernet header hubnat emits or accepts (no VLAN tags are produced).
pub const ETHERNET_HEADER_LEN: usize = 14;

/// A reusable batch of frames stored back to back in one buffer.
#[derive(Debug, Default, Clone)]
pub struct FrameBatch {
    /// Storage. Its length is the most ever used: bytes past `used` are stale frames, kept
    /// initialized so that [`push_with`](Self::push_with) can lend them out without zeroing
    /// `max_len` bytes for every frame (64 KiB per read at MTU 65520).
    buf: Vec<u8>,
    /// Bytes of `buf` holding this batch's frames.
    used: usize,
    ends: Vec<usize>,
    /// Per frame: the backend vouches for its TCP checksum (see
    /// [`set_last_checksum_verified`](Self::set_last_checksum_verified)).
    verified: Vec<bool>,
    max_frames: usize,
}

impl FrameBatch {
    /// A batch that holds up to `max_frames` frames, with room reserved for `max_frames` frames
    /// of `frame_len` bytes each (it grows beyond that if needed, and keeps what it grew).
    pub fn new(max_frames: usize, frame_len: usize) -> Self {
        let max_frames = max_frames.max(1);
        FrameBatch {
            buf: Vec::with_capacity(max_frames * frame_len),
            used: 0,
            ends: Vec::with_capacity(max_frames),
            verified: Vec::with_capacity(max_frames),
            max_frames,
        }
    }

    /// Removes every frame; keeps the allocated memory.
    pub fn clear(&mut self) {
        self.used = 0;
        self.ends.clear();
        self.verified.clear();
    }

    /// Number of frames in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes of all its frames.
    pub fn bytes(&self) -> usize {
        self.used
    }

    /// True when the batch holds no frame.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// True when the batch holds its maximum number of frames: a backend stops reading then.
    pub fn is_full(&self) -> bool {
        self.ends.len() >= self.max_frames
    }

    /// The maximum number of frames this batch holds.
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// The `len` bytes after the last frame, growing the storage if needed. Their content is
    /// whatever an earlier frame left there.
    fn room(&mut self, len: usize) -> &mut [u8] {
        let end = self.used + len;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.used..end]
    }

    /// Appends the `len` bytes after the last frame as a frame.
    fn commit(&mut self, len: usize) {
        self.used += len;
        self.ends.push(self.used);
        self.verified.push(false);
    }

    /// Marks the last frame as one whose TCP checksum needs no check: the local kernel handed
    /// it over with a partial checksum (`CHECKSUM_PARTIAL`), never computed because the frame
    /// never crossed a wire; the kernel itself trusts such a frame. The core then skips the
    /// check, and a backend skips finishing the sum: at 64 KiB a frame, the two sums were a
    /// fifth of hubnat's work on TCP from a client. Does nothing on an empty batch.
    pub fn set_last_checksum_verified(&mut self) {
        if let Some(last) = self.verified.last_mut() {
            *last = true;
        }
    }

    /// Whether the backend vouched for the TCP checksum of the frame at `index`.
    pub fn checksum_verified(&self, index: usize) -> bool {
        self.verified.get(index).copied().unwrap_or(false)
    }

    /// Appends a copy of `frame`. Returns false (and appends nothing) when the batch is full.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.is_full() {
            return false;
        }
        self.room(frame.len()).copy_from_slice(frame);
        self.commit(frame.len());
        true
    }

    /// Appends a frame of at most `max_len` bytes written in place by `fill`, which returns how
    /// many bytes it wrote. `fill` gets a buffer with stale content, not a zeroed one. If `fill`
    /// fails, or the batch is full, nothing is appended.
    ///
    /// This is how a backend reads from a descriptor without an intermediate copy.
    pub fn push_with<E>(
        &mut self,
        max_len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Option<usize>, E> {
        if self.is_full() {
            return Ok(None);
        }
        let n = fill(self.room(max_len))?.min(max_len);
        self.commit(n);
        Ok(Some(n))
    }

    /// Appends a frame built in place by `build`, which gets a zeroed buffer of exactly `len`
    /// bytes. Returns false (and appends nothing) when the batch is full.
    pub fn push_built(&mut self, len: usize, build: impl FnOnce(&mut [u8])) -> bool {
        if self.is_full() {
            return false;
        }
        let room = self.room(len);
        room.fill(0);
        build(room);
        self.commit(len);
        true
    }

    /// The frame at `index`.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        let end = *self.ends.get(index)?;
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        Some(&self.buf[start..end])
    }

    /// The frames, oldest first, each with whether its TCP checksum was vouched for.
    pub fn iter_verified(&self) -> impl Iterator<Item = (&[u8], bool)> + '_ {
        self.iter().zip(self.verified.iter().copied())
    }

    /// The frames, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let frame = &self.buf[start..end];
            start = end;
            frame
        })
    }
}

/// Counters every backend keeps; reported in the status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendStats {
    /// Frames received from the segment.
    pub rx_frames: u64,
    /// Bytes received from the segment.
    pub rx_bytes: u64,
    /// Frames sent to the segment.
    pub tx_frames: u64,
    /// Bytes sent to the segment.
    pub tx_bytes: u64,
    /// Frames that could not be sent (queue full, frame too big, device gone).
    pub tx_dropped: u64,
}

/// A frame backend: the segment as the virtual host sees it.
///
/// See the crate documentation for how the driver calls it.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// A short human-readable description (`tap hubnat0`, `memory port 0`) for logs.
    fn describe(&self) -> String;

    /// The largest frame this backend carries, Ethernet header included.
    fn max_frame_len(&self) -> usize;

    /// Waits for at least one frame, then appends every frame that is ready without waiting,
    /// until `batch` is full. Cancel-safe. An error means the backend is unusable (device gone,
    /// hub closed); the driver stops.
    async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()>;

    /// Sends every frame of `batch` in order. A frame that cannot be sent right now because a
    /// queue is full is dropped and counted, like on a real link; an error means the backend is
    /// unusable.
    async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()>;

    /// The backend's counters.
    fn stats(&self) -> BackendStats;

    /// Whether the segment takes and gives TCP/IPv4 segments longer than its MTU (TAP
    /// segmentation offload): the core may then receive a client's super-frame whole and send
    /// segments of up to 64 KiB, which the backend marks for the kernel to cut. Default: no.
    fn tcp_offload(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keeps_frames_in_order_and_respects_capacity() {
        let mut b = FrameBatch::new(2, 64);
        assert!(b.push(&[1, 2, 3]));
        assert_eq!(
            b.push_with(10, |buf| {
                buf[..2].copy_from_slice(&[4, 5]);
                Ok::<_, ()>(2)
            }),
            Ok(Some(2))
        );
        assert!(b.is_full());
        assert!(!b.push(&[9]));
        let frames: Vec<&[u8]> = b.iter().collect();
        assert_eq!(frames, vec![&[1u8, 2, 3][..], &[4u8, 5][..]]);
        assert_eq!(b.get(1), Some(&[4u8, 5][..]));
        assert_eq!(b.get(2), None);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn a_vouched_checksum_stays_with_its_frame_until_cleared() {
        let mut b = FrameBatch::new(4, 64);
        b.set_last_checksum_verified(); // empty: nothing to mark
        assert!(b.push(&[1]));
        assert!(b.push(&[2]));
        b.set_last_checksum_verified();
        assert!(b.push(&[3]));
        let marks: Vec<(u8, bool)> = b.iter_verified().map(|(f, v)| (f[0], v)).collect();
        assert_eq!(marks, [(1, false), (2, true), (3, false)]);
        b.clear();
        assert!(b.push(&[4]));
        assert!(!b.checksum_verified(0), "a cleared batch forgets the marks");
    }

    #[test]
    fn reused_storage_shows_only_what_was_written() {
        let mut b = FrameBatch::new(4, 64);
        assert!(b.push(&[0xee; 32]));
        b.clear();
        let n = b.push_with(32, |buf| {
            buf[..3].copy_from_slice(&[1, 2, 3]);
            Ok::<_, ()>(3)
        });
        assert_eq!(n, Ok(Some(3)));
        assert!(b.push_built(4, |buf| assert_eq!(
            buf,
            &[0u8; 4][..],
            "built frames start zeroed"
        )));
        let frames: Vec<&[u8]> = b.iter().collect();
        assert_eq!(frames, vec![&[1u8, 2, 3][..], &[0u8; 4][..]]);
    }

    #[test]
    fn failed_fill_appends_nothing() {
        let mut b = FrameBatch::new(4, 64);
        assert_eq!(
            b.push_with(10, |_| Err::<usize, _>("would block")),
            Err("would block")
        );
        assert!(b.is_empty());
        assert!(b.push_built(3, |buf| buf.copy_from_slice(&[7, 8, 9])));
        assert_eq!(b.get(0), Some(&[7u8, 8, 9][..]));
    }
}
