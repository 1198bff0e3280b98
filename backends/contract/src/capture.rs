//! Packet capture: every frame a backend passes, in both directions, written to a pcap file
//! that tcpdump, tshark and Wireshark read.
//!
//! # Theory of operation
//!
//! * **Format.** The classic pcap format (not pcapng): a 24-byte file header (magic
//!   `0xa1b2c3d4` in this machine's byte order, version 2.4, microsecond time stamps, the snap
//!   length, link type 1 = Ethernet), then per frame a 16-byte record header (seconds,
//!   microseconds, captured length, original length) and the captured bytes. Writing it by hand
//!   takes fifty lines and no dependency; every reader of pcap files understands it. Classic
//!   pcap has no direction field: the MAC addresses tell which way a frame went (the virtual
//!   host's MAC is the source of everything hubnat sent).
//! * **[`Capture`]** wraps any [`Backend`] and is itself a [`Backend`]: frames returned by the
//!   inner `recv_batch` are recorded after it returns (so a cancelled receive records nothing,
//!   and the wrapper stays cancel-safe), frames given to `send_batch` are recorded before they
//!   are handed on. Each batch is written with one time stamp and flushed once, so a capture
//!   file is current after every batch and costs one `write` per batch.
//! * **Snap length.** Frames longer than [`CaptureOptions::snaplen`] are cut to it; the
//!   record keeps their original length, as tcpdump does.
//! * **Size limit and rotation.** With [`CaptureOptions::max_size`] set, a record that would
//!   take the file past the limit first rotates it: `PATH.N-1` is deleted, `PATH.i` becomes
//!   `PATH.i+1`, `PATH` becomes `PATH.1`, and a fresh `PATH` is started, so at most
//!   [`CaptureOptions::max_files`] files exist (the newest is always `PATH`). With
//!   `max_files = 1` the file is simply started again. A file always holds at least one record,
//!   so a record bigger than the limit still gets written.
//! * **Failures.** A capture is for debugging and must never take the segment down: when a
//!   write fails (disk full, file removed under a read-only directory, …), [`Capture`] reports
//!   the error once through its [`Capture::on_error`] callback and stops capturing; the frames
//!   keep flowing.
//!
//! # Cost
//!
//! One copy of each frame into the writer's buffer (8 KiB … 1 MiB, flushed per batch). No
//! allocation per frame.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Backend, BackendStats, FrameBatch};

/// The snap length used when none is given: the largest frame of a 65520-byte MTU fits.
pub const DEFAULT_SNAPLEN: u32 = 65535;

/// The smallest snap length accepted: an Ethernet header.
pub const MIN_SNAPLEN: u32 = crate::ETHERNET_HEADER_LEN as u32;

/// The largest snap length accepted (what tcpdump uses as "everything").
pub const MAX_SNAPLEN: u32 = 262_144;

/// The pcap link type of Ethernet frames.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// Length of the pcap file header.
pub const FILE_HEADER_LEN: u64 = 24;

/// Length of a pcap record header.
pub const RECORD_HEADER_LEN: u64 = 16;

/// How many files a rotating capture keeps by default.
pub const DEFAULT_MAX_FILES: u32 = 2;

/// The size at which hubnat's configuration rotates a capture by default (100 MiB), so a
/// capture left on cannot fill the disk.
pub const DEFAULT_MAX_SIZE: u64 = 100 << 20;

/// The pcap magic number for microsecond time stamps.
const MAGIC_MICROS: u32 = 0xa1b2_c3d4;

/// Where and how to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    /// The capture file; created or truncated when the writer is created.
    pub path: PathBuf,
    /// Bytes kept of each frame, [`MIN_SNAPLEN`]`..=`[`MAX_SNAPLEN`] (values outside are
    /// clamped).
    pub snaplen: u32,
    /// Rotate when the file would grow past this many bytes; `None`: never.
    pub max_size: Option<u64>,
    /// Files kept when rotating, the current one included (at least 1).
    pub max_files: u32,
}

impl CaptureOptions {
    /// Capture to `path`: whole frames, no size limit.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CaptureOptions {
            path: path.into(),
            snaplen: DEFAULT_SNAPLEN,
            max_size: None,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// The path of rotated file number `n` (1 = the most recent) of a capture at `path`.
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A pcap file writer with optional size-based rotation. See the module documentation.
#[derive(Debug)]
pub struct PcapWriter {
    options: CaptureOptions,
    file: BufWriter<File>,
    /// Bytes in the current file, header included.
    size: u64,
    frames: u64,
    rotations: u64,
}

impl PcapWriter {
    /// Creates (or truncates) the capture file and writes the pcap header.
    ///
    /// # Errors
    ///
    /// The file cannot be created or written; the message names it.
    pub fn create(options: CaptureOptions) -> io::Result<PcapWriter> {
        let options = CaptureOptions {
            snaplen: options.snaplen.clamp(MIN_SNAPLEN, MAX_SNAPLEN),
            max_files: options.max_files.max(1),
            ..options
        };
        let file = Self::open(&options)?;
        Ok(PcapWriter {
            options,
            file,
            size: FILE_HEADER_LEN,
            frames: 0,
            rotations: 0,
        })
    }

    fn open(options: &CaptureOptions) -> io::Result<BufWriter<File>> {
        let path = &options.path;
        // Frames carry the clients' traffic: the file is the owner's alone, also when it was
        // there before with a wider mode.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| name_error(path, "create", e))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| name_error(path, "restrict the mode of", e))?;
        let mut file = BufWriter::with_capacity(buffer_len(options.snaplen), file);
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        header[0..4].copy_from_slice(&MAGIC_MICROS.to_ne_bytes());
        header[4..6].copy_from_slice(&2u16.to_ne_bytes());
        header[6..8].copy_from_slice(&4u16.to_ne_bytes());
        // thiszone and sigfigs stay 0.
        header[16..20].copy_from_slice(&options.snaplen.to_ne_bytes());
        header[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_ne_bytes());
        file.write_all(&header)
            .and_then(|()| file.flush())
            .map_err(|e| name_error(path, "write the header of", e))?;
        Ok(file)
    }

    /// The options in force (snap length clamped, `max_files` at least 1).
    pub fn options(&self) -> &CaptureOptions {
        &self.options
    }

    /// Frames recorded so far, over all files.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// How many times the file was rotated.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Appends one frame seen at `time`. Buffered: call [`PcapWriter::flush`] to push it to
    /// the file.
    pub fn write_frame(&mut self, time: SystemTime, frame: &[u8]) -> io::Result<()> {
        let kept = frame.len().min(self.options.snaplen as usize);
        let record = RECORD_HEADER_LEN + kept as u64;
        if let Some(max) = self.options.max_size {
            if self.size > FILE_HEADER_LEN && self.size + record > max {
                self.rotate()?;
            }
        }
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        // The format's seconds are 32 bits: they wrap in 2106.
        header[0..4].copy_from_slice(&(since.as_secs() as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&since.subsec_micros().to_ne_bytes());
        header[8..12].copy_from_slice(&(kept as u32).to_ne_bytes());
        let orig = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        header[12..16].copy_from_slice(&orig.to_ne_bytes());
        let path = &self.options.path;
        self.file
            .write_all(&header)
            .and_then(|()| self.file.write_all(&frame[..kept]))
            .map_err(|e| name_error(path, "write to", e))?;
        self.size += record;
        self.frames += 1;
        Ok(())
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        let path = &self.options.path;
        self.file
            .flush()
            .map_err(|e| name_error(path, "write to", e))
    }

    /// Closes the current file, shifts the older ones and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        let path = self.options.path.clone();
        let keep = self.options.max_files;
        if keep > 1 {
            // PATH.(keep-1) is the oldest kept; it is overwritten by the rename below.
            for n in (1..keep - 1).rev() {
                let from = rotated_path(&path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated_path(&path, n + 1))
                        .map_err(|e| name_error(&from, "rotate", e))?;
                }
            }
            std::fs::rename(&path, rotated_path(&path, 1))
                .map_err(|e| name_error(&path, "rotate", e))?;
        }
        self.file = Self::open(&self.options)?;
        self.size = FILE_HEADER_LEN;
        self.rotations += 1;
        Ok(())
    }
}

/// A write buffer that holds a batch of typical frames, within sane bounds.
fn buffer_len(snaplen: u32) -> usize {
    (snaplen as usize * 4).clamp(8 * 1024, 1024 * 1024)
}

fn name_error(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot {what} the capture file {}: {e}", path.display()),
    )
}

/// Called with the error that stopped a capture.
pub type ErrorHook = Box<dyn FnMut(&io::Error) + Send>;

/// A backend whose frames, both ways, are also written to a pcap file. See the module
/// documentation.
pub struct Capture<B> {
    inner: B,
    writer: Option<PcapWriter>,
    path: PathBuf,
    on_error: Option<ErrorHook>,
}

impl<B: std::fmt::Debug> std::fmt::Debug for Capture<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("inner", &self.inner)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Capture<B> {
    /// Records what `inner` passes with `writer`.
    pub fn new(inner: B, writer: PcapWriter) -> Self {
        Capture {
            inner,
            path: writer.options().path.clone(),
            writer: Some(writer),
            on_error: None,
        }
    }

    /// Sets the function told about the write error that stopped the capture (for a log line).
    pub fn on_error(mut self, hook: impl FnMut(&io::Error) + Send + 'static) -> Self {
        self.on_error = Some(Box::new(hook));
        self
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The wrapped backend, mutably.
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// The writer, unless a write error stopped the capture.
    pub fn writer(&self) -> Option<&PcapWriter> {
        self.writer.as_ref()
    }

    /// Flushes the capture and gives the wrapped backend back.
    pub fn into_inner(mut self) -> B {
        if let Some(w) = self.writer.as_mut() {
            let _ = w.flush();
        }
        self.inner
    }

    /// Records `frames` with one time stamp and flushes; on failure stops capturing.
    fn record<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        let now = SystemTime::now();
        let mut result = Ok(());
        for frame in frames {
            result = writer.write_frame(now, frame);
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result.and_then(|()| writer.flush()) {
            self.writer = None;
            if let Some(hook) = self.on_error.as_mut() {
                hook(&e);
            }
        }
    }
}

impl<B: Backend> Backend for Capture<B> {
    fn describe(&self) -> String {
        format!(
            "{} (captured to {})",
            self.inner.describe(),
            self.path.display()
        )
    }

    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len()
    }

    /// The inner receive, then the new frames are recorded. Cancel-safe when the inner one is.
    async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()> {
        let first = batch.len();
        self.inner.recv_batch(batch).await?;
        self.record((first..batch.len()).filter_map(|i| batch.get(i)));
        Ok(())
    }

    /// The frames are recorded, then sent by the inner backend.
    async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()> {
        self.record(batch.iter());
        self.inner.send_batch(batch).await
    }

    fn stats(&self) -> BackendStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A pcap file parsed back: (snaplen, linktype, records of (secs, micros, orig_len, data)).
    type Parsed = (u32, u32, Vec<(u32, u32, u32, Vec<u8>)>);

    fn parse(bytes: &[u8]) -> Parsed {
        let u32_at = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        assert_eq!(u32_at(0), MAGIC_MICROS);
        assert_eq!(
            &bytes[4..8],
            &[2u16.to_ne_bytes(), 4u16.to_ne_bytes()].concat()[..]
        );
        let (snaplen, linktype) = (u32_at(16), u32_at(20));
        let mut records = Vec::new();
        let mut i = 24;
        while i < bytes.len() {
            let (secs, micros, incl, orig) =
                (u32_at(i), u32_at(i + 4), u32_at(i + 8), u32_at(i + 12));
            let data = bytes[i + 16..i + 16 + incl as usize].to_vec();
            records.push((secs, micros, orig, data));
            i += 16 + incl as usize;
        }
        assert_eq!(i, bytes.len(), "no trailing bytes");
        (snaplen, linktype, records)
    }

    fn frame(n: u8, len: usize) -> Vec<u8> {
        let mut f = vec![n; len];
        f[..6].copy_from_slice(&[0xff; 6]);
        f
    }

    #[test]
    fn the_file_is_the_owners_alone_even_if_it_was_there_before() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let path = dir.join("old.pcap");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let options = CaptureOptions {
            max_size: Some(200),
            ..CaptureOptions::new(&path)
        };
        let mut w = PcapWriter::create(options).expect("create");
        for n in 0..4 {
            w.write_frame(SystemTime::now(), &frame(n, 100))
                .expect("write");
        }
        w.flush().expect("flush");
        for p in [path.clone(), rotated_path(&path, 1)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn header_and_records_are_classic_pcap() {
        let dir = tempdir();
        let path = dir.join("a.pcap");
        let mut w = PcapWriter::create(CaptureOptions {
            snaplen: 100,
            ..CaptureOptions::new(&path)
        })
        .expect("create");
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        w.write_frame(t, &frame(1, 60)).expect("write");
        w.write_frame(t, &frame(2, 300)).expect("write");
        w.flush().expect("flush");
        let (snaplen, linktype, records) = parse(&std::fs::read(&path).expect("read"));
        assert_eq!((snaplen, linktype), (100, LINKTYPE_ETHERNET));
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], (1_700_000_000, 123_456, 60, frame(1, 60)));
        // Cut to the snap length, original length kept.
        assert_eq!(records[1].2, 300);
        assert_eq!(records[1].3, frame(2, 300)[..100].to_vec());
        assert_eq!(w.frames(), 2);
    }

    #[test]
    fn rotation_keeps_max_files_and_the_newest_in_path() {
        let dir = tempdir();
        let path = dir.join("r.pcap");
        // Header 24 + two records of 16 + 100 = 256 bytes fit; a third does not.
        let options = CaptureOptions {
            max_size: Some(256),
            max_files: 3,
            ..CaptureOptions::new(&path)
        };
        let mut w = PcapWriter::create(options).expect("create");
        for n in 0..9u8 {
            w.write_frame(SystemTime::now(), &frame(n, 100))
                .expect("write");
        }
        w.flush().expect("flush");
        assert_eq!(w.rotations(), 4);
        let firsts = |p: &Path| -> Vec<u8> {
            parse(&std::fs::read(p).expect("read"))
                .2
                .iter()
                .map(|r| r.3[6])
                .collect()
        };
        assert_eq!(firsts(&path), vec![8]);
        assert_eq!(firsts(&rotated_path(&path, 1)), vec![6, 7]);
        assert_eq!(firsts(&rotated_path(&path, 2)), vec![4, 5]);
        assert!(!rotated_path(&path, 3).exists(), "at most 3 files");
        for p in [&path, &rotated_path(&path, 1)] {
            assert!(std::fs::metadata(p).expect("stat").len() <= 256);
        }
    }

    #[test]
    fn a_single_file_restarts_and_an_oversized_record_still_fits() {
        let dir = tempdir();
        let path = dir.join("s.pcap");
        let options = CaptureOptions {
            max_size: Some(100),
            max_files: 1,
            ..CaptureOptions::new(&path)
        };
        let mut w = PcapWriter::create(options).expect("create");
        w.write_frame(SystemTime::now(), &frame(1, 500))
            .expect("write");
        w.write_frame(SystemTime::now(), &frame(2, 60))
            .expect("write");
        w.flush().expect("flush");
        let (_, _, records) = parse(&std::fs::read(&path).expect("read"));
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].3[6], 2);
        assert!(!rotated_path(&path, 1).exists());
    }

    /// A backend that yields scripted frames and remembers what it sent.
    struct Script {
        rx: Vec<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl Backend for Script {
        fn describe(&self) -> String {
            "script".into()
        }
        fn max_frame_len(&self) -> usize {
            1514
        }
        async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<()> {
            for f in self.rx.drain(..) {
                batch.push(&f);
            }
            Ok(())
        }
        async fn send_batch(&mut self, batch: &FrameBatch) -> io::Result<()> {
            self.sent.extend(batch.iter().map(<[u8]>::to_vec));
            Ok(())
        }
        fn stats(&self) -> BackendStats {
            BackendStats::default()
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn capture_records_both_directions_and_passes_frames_through() {
        let dir = tempdir();
        let path = dir.join("c.pcap");
        let inner = Script {
            rx: vec![frame(1, 60), frame(2, 70)],
            sent: Vec::new(),
        };
        let mut cap = Capture::new(
            inner,
            PcapWriter::create(CaptureOptions::new(&path)).expect("create"),
        );
        assert_eq!(
            cap.describe(),
            format!("script (captured to {})", path.display())
        );
        let mut batch = FrameBatch::new(8, 1514);
        batch.push(&frame(0, 50)); // already there: not received now, not recorded
        block_on(cap.recv_batch(&mut batch)).expect("recv");
        assert_eq!(batch.len(), 3);
        let mut out = FrameBatch::new(8, 1514);
        out.push(&frame(3, 80));
        block_on(cap.send_batch(&out)).expect("send");
        assert_eq!(cap.inner().sent, vec![frame(3, 80)]);
        assert_eq!(cap.writer().expect("capturing").frames(), 3);
        let (_, _, records) = parse(&std::fs::read(&path).expect("read"));
        let firsts: Vec<u8> = records.iter().map(|r| r.3[6]).collect();
        assert_eq!(firsts, vec![1, 2, 3]);
    }

    #[test]
    fn a_failing_capture_reports_once_and_stops_without_stopping_frames() {
        let dir = tempdir();
        let path = dir.join("f.pcap");
        let inner = Script {
            rx: Vec::new(),
            sent: Vec::new(),
        };
        let writer = PcapWriter::create(CaptureOptions::new(&path)).expect("create");
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&errors);
        let mut cap = Capture::new(inner, writer)
            .on_error(move |e| seen.lock().expect("lock").push(e.to_string()));
        // Replace the file with one that refuses writes: /dev/full.
        cap.writer.as_mut().expect("writer").file = BufWriter::new(
            OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full"),
        );
        let mut out = FrameBatch::new(8, 1514);
        out.push(&frame(3, 80));
        block_on(cap.send_batch(&out)).expect("frames still flow");
        block_on(cap.send_batch(&out)).expect("frames still flow");
        assert_eq!(cap.inner().sent.len(), 2);
        assert!(cap.writer().is_none());
        let errors = errors.lock().expect("lock");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("capture file"), "{}", errors[0]);
    }

    /// A fresh directory under the system's temp dir, removed on drop (the contract crate has
    /// no dev-dependencies).
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hubnat-capture-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}
