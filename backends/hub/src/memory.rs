//! The in-memory hub: a learning switch whose ports are objects in this process.
//!
//! Used to embed hubnat next to other user-mode stacks, and by the tests, where smoltcp clients
//! and hubnat's core meet on one segment without any privilege.
//!
//! # Theory of operation
//!
//! A [`MemoryHub`] is a cheap, cloneable handle on shared state behind one mutex: a [`Switch`]
//! and, per connected port, the sending half of that port's bounded queue (an async-channel of
//! frames). [`MemoryHub::connect`] creates a port; the [`MemoryPort`] owns the receiving half.
//!
//! * **Sending** never waits. Under the mutex, each frame is checked (at least an Ethernet
//!   header, at most `mtu + 14` bytes: otherwise dropped and counted in the sender's
//!   `tx_dropped`), offered to the switch, and copied into the queue of the one port it goes to
//!   or of every other port when flooded. A full queue drops the frame *for that port only*
//!   (counted in [`HubStats::queue_full`] and the port's [`MemoryPort::rx_dropped`]), like the
//!   output queue of a real switch; the sender and the other ports are unaffected.
//! * **Receiving** takes frames out of the port's own queue: [`Backend::recv_batch`] waits for
//!   the first frame, then takes what is queued without waiting, up to the batch's capacity. It
//!   is cancel-safe: the channel hands a frame out only from a poll that returns it.
//! * **Synchronous use.** [`MemoryPort::try_send`] and [`MemoryPort::try_recv`] do the same
//!   without an executor (a smoltcp `phy::Device` built on a port calls them from its tokens).
//! * **Buffers.** Queued frames are `Vec<u8>`s drawn from a small shared pool and returned to
//!   it once read, so the steady state allocates nothing per frame.
//! * **Disconnecting.** Dropping a [`MemoryPort`] removes its queue (frames still in it are
//!   discarded) and makes the switch forget the stations behind it.
//!
//! # Limits
//!
//! Each port queues at most [`MemoryHubConfig::queue_frames`] frames (default 1024) and
//! [`MemoryHubConfig::queue_bytes`] bytes of them (default 4 MiB), so a port that never reads
//! holds at most that much, whatever the MTU; a queued frame's buffer is as long as the frame
//! (buffers reused from the pool may be longer, up to the largest frame carried). The switch
//! remembers at most [`SwitchLimits::max_entries`] stations, each for
//! [`SwitchLimits::max_age`] after its last frame (defaults 4096 and 300 s). The number of
//! ports is not limited: each costs one queue. Switching time is measured with
//! [`std::time::Instant`].

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use async_channel::{Receiver, Sender, TrySendError};
use hubnat_backend::{Backend, BackendStats, FrameBatch, ETHERNET_HEADER_LEN};

use crate::switch::{Forward, PortId, Switch, SwitchLimits};

/// The default depth of each port's queue, in frames.
pub const DEFAULT_QUEUE_FRAMES: usize = 1024;

/// The default most bytes of frames queued for one port.
pub const DEFAULT_QUEUE_BYTES: usize = 4 << 20;

/// How many spare frame buffers the hub keeps for reuse.
const POOL_BUFFERS: usize = 256;

/// How a [`MemoryHub`] is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryHubConfig {
    /// The segment's MTU: frames up to `mtu + 14` bytes are carried.
    pub mtu: u32,
    /// The depth of each port's queue, in frames (at least 1).
    pub queue_frames: usize,
    /// The most bytes of frames queued for one port (at least one largest frame).
    pub queue_bytes: usize,
    /// The learning table's bounds.
    pub switch: SwitchLimits,
}

impl MemoryHubConfig {
    /// The defaults for `mtu`: [`DEFAULT_QUEUE_FRAMES`] and [`SwitchLimits::default`].
    pub fn new(mtu: u32) -> Self {
        MemoryHubConfig {
            mtu,
            queue_frames: DEFAULT_QUEUE_FRAMES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            switch: SwitchLimits::default(),
        }
    }
}

/// The hub's counters; see [`MemoryHub::stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Frames sent to the one port their destination was learnt behind.
    pub switched: u64,
    /// Frames sent to every port but the sender's (broadcast, multicast, unknown unicast).
    pub flooded: u64,
    /// Frames sent nowhere: shorter than an Ethernet header, longer than `mtu + 14`, from a
    /// group source address, or addressed to a station behind the sender's own port.
    pub dropped: u64,
    /// Copies of frames not queued because the receiving port's queue was full (one per port
    /// per frame).
    pub queue_full: u64,
    /// Ports connected now.
    pub ports: usize,
    /// Stations in the learning table now.
    pub stations: usize,
}

/// One port's counters, shared by the port (its own traffic) and the hub (queue-full drops).
#[derive(Debug, Default)]
struct PortCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    /// Bytes of frames in the port's queue now.
    queued_bytes: AtomicUsize,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The hub's end of a port.
#[derive(Debug)]
struct PortLink {
    queue: Sender<Vec<u8>>,
    counters: Arc<PortCounters>,
}

#[derive(Debug)]
struct Inner {
    switch: Switch,
    ports: BTreeMap<PortId, PortLink>,
    next_port: u64,
    stats: HubStats,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    config: MemoryHubConfig,
    max_frame_len: usize,
    /// Spare frame buffers: taken when a frame is queued, returned when it is read.
    pool_in: Sender<Vec<u8>>,
    pool_out: Receiver<Vec<u8>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while switching leaves the table and the counters consistent enough to carry
        // on (each update is a single field or a whole-entry operation).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A buffer for a frame of `len` bytes: a spare one, or a new one of that length.
    fn buffer(&self, len: usize) -> Vec<u8> {
        match self.pool_out.try_recv() {
            Ok(mut buf) => {
                buf.clear();
                buf
            }
            Err(_) => Vec::with_capacity(len),
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        // A full pool just lets the buffer go.
        let _ = self.pool_in.try_send(buf);
    }

    /// Queues a copy of `frame` for `link`, unless its queue is full.
    fn deliver(&self, stats: &mut HubStats, link: &PortLink, frame: &[u8]) {
        // Only the hub sends on a port's queue, and it does so under the lock: a queue seen
        // not full here cannot fill up before the send below.
        let queued = &link.counters.queued_bytes;
        if link.queue.is_full()
            || queued.load(Ordering::Relaxed) + frame.len() > self.config.queue_bytes
        {
            stats.queue_full += 1;
            bump(&link.counters.rx_dropped, 1);
            return;
        }
        let mut buf = self.buffer(frame.len());
        buf.extend_from_slice(frame);
        // Counted before it can be received (and uncounted), taken back if it is not queued.
        queued.fetch_add(frame.len(), Ordering::Relaxed);
        match link.queue.try_send(buf) {
            Ok(()) => {}
            Err(TrySendError::Full(buf)) => {
                queued.fetch_sub(frame.len(), Ordering::Relaxed);
                stats.queue_full += 1;
                bump(&link.counters.rx_dropped, 1);
                self.recycle(buf);
            }
            Err(TrySendError::Closed(buf)) => {
                queued.fetch_sub(frame.len(), Ordering::Relaxed);
                self.recycle(buf);
            }
        }
    }

    /// Switches one frame from port `from`. Returns false when it was refused for its length.
    fn switch_frame(
        &self,
        inner: &mut Inner,
        from: PortId,
        counters: &PortCounters,
        frame: &[u8],
        now: Instant,
    ) -> bool {
        if frame.len() < ETHERNET_HEADER_LEN || frame.len() > self.max_frame_len {
            bump(&counters.tx_dropped, 1);
            inner.stats.dropped += 1;
            tracing::trace!(port = %from, len = frame.len(), "memory hub: dropped a frame of invalid length");
            return false;
        }
        bump(&counters.tx_frames, 1);
        bump(&counters.tx_bytes, frame.len() as u64);
        let Inner {
            switch,
            ports,
            stats,
            ..
        } = inner;
        match switch.forward(from, frame, now) {
            Forward::Drop => stats.dropped += 1,
            Forward::Unicast(to) => match ports.get(&to) {
                Some(link) => {
                    stats.switched += 1;
                    self.deliver(stats, link, frame);
                }
                // Unreachable: a port's stations are forgotten, under this lock, when it goes.
                None => stats.dropped += 1,
            },
            Forward::Flood => {
                stats.flooded += 1;
                for (_, link) in ports.iter().filter(|(&id, _)| id != from) {
                    self.deliver(stats, link, frame);
                }
            }
        }
        true
    }
}

/// An in-memory learning hub. Cloning gives another handle on the same hub.
#[derive(Debug, Clone)]
pub struct MemoryHub {
    shared: Arc<Shared>,
}

impl MemoryHub {
    /// A hub for a segment of this MTU, with the default limits.
    pub fn new(mtu: u32) -> MemoryHub {
        MemoryHub::with_config(MemoryHubConfig::new(mtu))
    }

    /// A hub with explicit limits. A `queue_frames` of 0 is taken as 1, a `queue_bytes`
    /// under one largest frame as one largest frame.
    pub fn with_config(config: MemoryHubConfig) -> MemoryHub {
        let config = MemoryHubConfig {
            queue_frames: config.queue_frames.max(1),
            queue_bytes: config
                .queue_bytes
                .max(config.mtu as usize + ETHERNET_HEADER_LEN),
            ..config
        };
        let (pool_in, pool_out) = async_channel::bounded(POOL_BUFFERS);
        MemoryHub {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    switch: Switch::new(config.switch),
                    ports: BTreeMap::new(),
                    next_port: 0,
                    stats: HubStats::default(),
                }),
                max_frame_len: config.mtu as usize + ETHERNET_HEADER_LEN,
                config,
                pool_in,
                pool_out,
            }),
        }
    }

    /// Connects a new port. Ports are numbered from 0 in connection order, never reused.
    pub fn connect(&self) -> MemoryPort {
        let (queue, rx) = async_channel::bounded(self.shared.config.queue_frames);
        let counters = Arc::new(PortCounters::default());
        let mut inner = self.shared.lock();
        let id = PortId(inner.next_port);
        inner.next_port += 1;
        inner.ports.insert(
            id,
            PortLink {
                queue,
                counters: Arc::clone(&counters),
            },
        );
        drop(inner);
        tracing::debug!(port = %id, "memory hub: port connected");
        MemoryPort {
            id,
            hub: self.clone(),
            rx,
            counters,
        }
    }

    /// Fixes station `mac` to `port` for good: frames to it always go there, and frames from
    /// other ports claiming it as their source are dropped (see [`Switch::pin`]). For the
    /// virtual host's own MAC on its port.
    pub fn pin_station(&self, mac: [u8; 6], port: PortId) {
        self.shared.lock().switch.pin(mac, port);
    }

    /// The hub's counters, and its current numbers of ports and learnt stations.
    pub fn stats(&self) -> HubStats {
        let inner = self.shared.lock();
        HubStats {
            ports: inner.ports.len(),
            stations: inner.switch.table().len(),
            ..inner.stats
        }
    }

    /// The configuration the hub was built with.
    pub fn config(&self) -> MemoryHubConfig {
        self.shared.config
    }

    /// The largest frame carried: `mtu + 14`.
    pub fn max_frame_len(&self) -> usize {
        self.shared.max_frame_len
    }
}

/// A port of a [`MemoryHub`]: a [`Backend`], and a synchronous frame pipe. Dropping it
/// disconnects it.
#[derive(Debug)]
pub struct MemoryPort {
    id: PortId,
    hub: MemoryHub,
    rx: Receiver<Vec<u8>>,
    counters: Arc<PortCounters>,
}

impl MemoryPort {
    /// This port's number on its hub.
    pub fn id(&self) -> PortId {
        self.id
    }

    /// The hub this port is connected to.
    pub fn hub(&self) -> &MemoryHub {
        &self.hub
    }

    /// Sends one frame to the hub, without waiting. Returns false when the frame was dropped
    /// because of its length (under 14 or over `mtu + 14` bytes); true when the hub took it,
    /// even if it then went nowhere or a receiving queue was full (that is counted by the hub,
    /// as on a real segment).
    pub fn try_send(&self, frame: &[u8]) -> bool {
        let shared = &self.hub.shared;
        let mut inner = shared.lock();
        shared.switch_frame(&mut inner, self.id, &self.counters, frame, Instant::now())
    }

    /// Takes the oldest queued frame, without waiting, into `buf`: returns true and replaces
    /// `buf`'s contents with the frame, or returns false and leaves `buf` untouched when
    /// nothing is queued.
    ///
    /// The frame is not copied: `buf` is swapped with the queued buffer, and `buf`'s old
    /// allocation goes to the hub's pool. Keep reusing the same `buf`.
    pub fn try_recv(&self, buf: &mut Vec<u8>) -> bool {
        match self.rx.try_recv() {
            Ok(frame) => {
                self.swap_in(buf, frame);
                true
            }
            Err(_) => false,
        }
    }

    /// Waits for the oldest queued frame and puts it in `buf` the way
    /// [`MemoryPort::try_recv`] does (a swap, no copy). Cancel-safe: a frame leaves the queue
    /// only in the poll that completes the call.
    ///
    /// # Errors
    ///
    /// Never while the port exists (the hub keeps the sending half of the queue).
    pub async fn recv(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let frame = self.rx.recv().await.map_err(|_| self.disconnected())?;
        self.swap_in(buf, frame);
        Ok(())
    }

    fn swap_in(&self, buf: &mut Vec<u8>, mut frame: Vec<u8>) {
        self.count_rx(frame.len());
        std::mem::swap(buf, &mut frame);
        self.hub.shared.recycle(frame);
    }

    fn disconnected(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("memory port {} is disconnected", self.id),
        )
    }

    /// Frames queued for this port, not yet received.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Frames the hub dropped for this port because its queue was full.
    pub fn rx_dropped(&self) -> u64 {
        self.counters.rx_dropped.load(Ordering::Relaxed)
    }

    fn count_rx(&self, len: usize) {
        bump(&self.counters.rx_frames, 1);
        bump(&self.counters.rx_bytes, len as u64);
        self.counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Bytes of frames queued for this port, not yet received.
    pub fn queued_bytes(&self) -> usize {
        self.counters.queued_bytes.load(Ordering::Relaxed)
    }

    /// Appends a received frame to `batch` and returns its buffer to the pool.
    fn take_into(&self, frame: Vec<u8>, batch: &mut FrameBatch) {
        self.count_rx(frame.len());
        batch.push(&frame);
        self.hub.shared.recycle(frame);
    }
}

impl Backend for MemoryPort {
    fn describe(&self) -> String {
        format!("memory port {}", self.id)
    }

    fn max_frame_len(&self) -> usize {
        self.hub.shared.max_frame_len
    }

    /// Waits for a frame, then takes every queued frame up to the batch's capacity. Returns at
    /// once if `batch` is already full. Cancel-safe: a frame leaves the queue only in a poll
    /// that completes the call. Never fails while the port exists.
    async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()> {
        if batch.is_full() {
            return Ok(());
        }
        if self.rx.is_empty() {
            let frame = self.rx.recv().await.map_err(|_| self.disconnected())?;
            self.take_into(frame, batch);
        }
        while !batch.is_full() {
            match self.rx.try_recv() {
                Ok(frame) => self.take_into(frame, batch),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Switches every frame of `batch` under one lock; never waits and never fails. See
    /// [`MemoryPort::try_send`] for what is dropped.
    async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()> {
        let shared = &self.hub.shared;
        let now = Instant::now();
        let mut inner = shared.lock();
        for frame in batch.iter() {
            shared.switch_frame(&mut inner, self.id, &self.counters, frame, now);
        }
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        let c = &self.counters;
        BackendStats {
            rx_frames: c.rx_frames.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            tx_frames: c.tx_frames.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            tx_dropped: c.tx_dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for MemoryPort {
    fn drop(&mut self) {
        let mut inner = self.hub.shared.lock();
        inner.ports.remove(&self.id);
        let forgotten = inner.switch.port_gone(self.id);
        drop(inner);
        tracing::debug!(port = %self.id, forgotten, "memory hub: port disconnected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_that_never_reads_holds_at_most_queue_bytes() {
        let hub = MemoryHub::new(9000);
        let (sender, idle) = (hub.connect(), hub.connect());
        // A full broadcast frame from a unicast station.
        let mut frame = vec![0xffu8; 9014];
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        for _ in 0..1000 {
            assert!(sender.try_send(&frame));
        }
        assert!(
            idle.queued_bytes() <= DEFAULT_QUEUE_BYTES,
            "{}",
            idle.queued_bytes()
        );
        assert_eq!(idle.queued(), DEFAULT_QUEUE_BYTES / 9014);
        assert_eq!(idle.rx_dropped(), 1000 - idle.queued() as u64);
        // Reading gives the room back.
        let mut buf = Vec::new();
        while idle.try_recv(&mut buf) {}
        assert_eq!(idle.queued_bytes(), 0);
        assert!(sender.try_send(&frame));
        assert_eq!(idle.queued_bytes(), 9014);
    }
}
