//! Giving a quiet connection's buffer memory back to the system.
//!
//! A connection's two buffers (`nat.tcp_buffer` each way) are allocated zeroed, so they take
//! no memory until bytes pass through them: the process's mmap threshold is fixed at 128 KiB
//! (`host::fix_mmap_threshold`), so a large buffer is a mapping of its own whose pages the
//! kernel supplies on first write. A busy connection touches every page of its ring; when it
//! goes quiet with both buffers empty, [`Pages::release`] hands the whole pages inside the
//! buffer back with `madvise(MADV_DONTNEED)`: they read as zero afterwards and cost nothing
//! until they are written again. Nothing is lost: an empty ring's bytes are never read (smoltcp
//! reads only the queued part).
//!
//! A connection that ends leaves its mapping to the next one when it wrote nothing past the
//! first page of either buffer ([`MappingPool`]): a short connection then costs no `mmap`, no
//! `munmap` and no page fault.
//!
//! These are the only system calls of the core (`mmap`, `munmap`, `madvise`, and `mincore` to
//! count what is given back); they move no data in or out and need no privilege.

/// The whole pages inside one buffer: `[start, start + len)`, page-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pages {
    start: usize,
    len: usize,
}

/// The system's page size (4 KiB if it cannot be read).
pub(super) fn page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n)
            .ok()
            .filter(|n| n.is_power_of_two())
            .unwrap_or(4096)
    })
}

impl Pages {
    /// The whole pages inside `buf`, or `None` when it holds none. Keep the result only while
    /// `buf`'s allocation lives and is not moved (a `Vec` handed to smoltcp keeps its heap
    /// allocation for the socket's life).
    pub(super) fn inside(buf: &mut [u8]) -> Option<Pages> {
        let page = page_size();
        let begin = buf.as_mut_ptr() as usize;
        let start = begin.checked_add(page - 1)? & !(page - 1);
        let end = (begin + buf.len()) & !(page - 1);
        (end > start).then(|| Pages {
            start,
            len: end - start,
        })
    }

    /// Gives the pages back to the system; they read as zero afterwards. Returns the bytes
    /// that were in memory (`mincore`), now given back; pages never touched cost nothing and
    /// are left alone.
    ///
    /// # Safety
    ///
    /// The buffer these pages were taken from ([`Pages::inside`]) must still be allocated, and
    /// nothing may hold a reference into it during the call, nor rely on its bytes afterwards
    /// (an empty ring buffer).
    pub(super) unsafe fn release(&self) -> usize {
        let resident = self.resident();
        if resident > 0 {
            // SAFETY: the range is whole pages inside a live allocation of ours (the caller's
            // promise), so no other object shares them; MADV_DONTNEED on private anonymous
            // memory only replaces their contents with zeros. A failure (it cannot fail for
            // such a range) just leaves the memory in place.
            unsafe {
                libc::madvise(
                    self.start as *mut libc::c_void,
                    self.len,
                    libc::MADV_DONTNEED,
                );
            }
        }
        resident * page_size()
    }

    /// How many bytes the pages span.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// How many of these pages are in memory (`mincore`); 0 if it cannot be told.
    pub(super) fn resident(&self) -> usize {
        let page = page_size();
        let mut vec = vec![0u8; self.len / page];
        // SAFETY: the range is page-aligned and, the buffer being alive, mapped; `vec` has one
        // byte per page.
        let rc =
            unsafe { libc::mincore(self.start as *mut libc::c_void, self.len, vec.as_mut_ptr()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|b| *b & 1 == 1).count()
    }
}

/// A connection's buffer memory: one private anonymous mapping of its own, so that every page
/// of both buffers is a whole page nobody else writes (with `malloc`, the chunk header makes
/// the first page of each buffer resident for the connection's whole life: 8 KiB a session).
/// No page is in memory until bytes pass; [`Pages::release`] gives them back; the mapping
/// goes when the value is dropped, or back to a [`MappingPool`]. The sockets that borrow its
/// buffers must be dropped first.
#[derive(Debug)]
pub(super) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Where the send buffer starts (the receive buffer's pages before it).
    rx_span: usize,
    /// The two buffers' lengths.
    rx: usize,
    tx: usize,
}

// SAFETY: plain memory, owned by one value; the buffers handed out are `&mut` slices whose
// users (the sockets) are dropped before the mapping.
unsafe impl Send for Mapping {}

impl Mapping {
    /// A mapping for a receive buffer of `rx` bytes and a send buffer of `tx` bytes, each
    /// starting on a page; `None` when the system refuses one (too many mappings, say).
    fn map(rx: usize, tx: usize) -> Option<Mapping> {
        let page = page_size();
        let rx_span = rx.checked_add(page - 1)? & !(page - 1);
        let len = rx_span.checked_add(tx.checked_add(page - 1)? & !(page - 1))?;
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())?;
        Some(Mapping {
            ptr,
            len,
            rx_span,
            rx,
            tx,
        })
    }

    /// The receive and the send buffer.
    ///
    /// # Safety
    ///
    /// Nothing else may use the buffers while the results live (whoever had them before is
    /// gone), and their users must be gone before the mapping is dropped or pooled.
    unsafe fn buffers(&self) -> (&'static mut [u8], &'static mut [u8]) {
        // SAFETY: two disjoint ranges of the mapping (zero-filled when made, so initialized),
        // which lives until the `Mapping` is dropped; the caller's promise does the rest.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.rx),
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.rx_span), self.tx),
            )
        }
    }

    /// The pages of each buffer, the partial last page included (the rest of it is this
    /// mapping's, and unused).
    pub(super) fn pages(&self) -> [Option<Pages>; 2] {
        let start = self.ptr.as_ptr() as usize;
        [
            Some(Pages {
                start,
                len: self.rx_span,
            }),
            Some(Pages {
                start: start + self.rx_span,
                len: self.len - self.rx_span,
            }),
        ]
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, whose slices' users are gone (the caller's
        // promise).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// How many mappings of ended connections a [`MappingPool`] keeps.
pub(super) const POOLED_MAPPINGS: usize = 64;

/// The mappings of connections that ended, kept for the next ones: a new connection then
/// costs no `mmap`, no `munmap` when it ends, and no page faults for its first bytes (the
/// first page of each buffer is already in memory). Only the mapping of a connection that
/// wrote nothing past the first page of either buffer is given back (its owner keeps count,
/// with no system call), and at most [`POOLED_MAPPINGS`] are kept: at most 64 × 8 KiB stays
/// in memory for connections to come. A mapping that carried more (a busy connection's
/// ring) is unmapped as before, its memory returned at once. Old bytes in a reused buffer are
/// never read: smoltcp reads only what was queued in it.
#[derive(Debug, Default)]
pub(super) struct MappingPool {
    free: Vec<Mapping>,
}

impl MappingPool {
    /// A mapping for buffers of `rx` and `tx` bytes and the two buffers: a kept one of these
    /// sizes, or a new one (`None` when the system refuses it). Kept mappings of other sizes
    /// (the buffer size was changed) are unmapped.
    pub(super) fn take(
        &mut self,
        rx: usize,
        tx: usize,
    ) -> Option<(Mapping, &'static mut [u8], &'static mut [u8])> {
        if self.free.last().is_some_and(|m| (m.rx, m.tx) != (rx, tx)) {
            self.free.retain(|m| (m.rx, m.tx) == (rx, tx));
        }
        let mapping = match self.free.pop() {
            Some(m) => m,
            None => Mapping::map(rx, tx)?,
        };
        // SAFETY: a new mapping has no users, and a pooled one's are gone (`give`'s promise);
        // the caller drops the buffers' users before it drops or gives back the mapping.
        let (a, b) = unsafe { mapping.buffers() };
        Some((mapping, a, b))
    }

    /// Takes back the mapping of a connection that ended, whose socket is gone and which wrote
    /// nothing past the first page of either buffer: kept while there is room, unmapped
    /// otherwise.
    pub(super) fn give(&mut self, mapping: Mapping) {
        if self.free.len() < POOLED_MAPPINGS {
            self.free.push(mapping);
        }
    }

    /// How many mappings are kept.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_pages_inside_the_buffer() {
        let page = page_size();
        let mut buf = vec![0u8; 3 * page + 100];
        let begin = buf.as_ptr() as usize;
        let p = Pages::inside(&mut buf[..]).unwrap();
        assert_eq!(p.start % page, 0);
        assert!(p.start >= begin && p.start + p.len <= begin + buf.len());
        assert!(p.len >= 2 * page);
        assert_eq!(Pages::inside(&mut buf[1..page / 2]), None);
    }

    #[test]
    fn released_pages_leave_memory_and_read_as_zero() {
        let page = page_size();
        let mut buf = vec![0u8; 64 * page];
        buf.iter_mut().for_each(|b| *b = 7);
        let p = Pages::inside(&mut buf[..]).unwrap();
        assert!(p.resident() >= 63, "written pages are resident");
        // SAFETY: `buf` is alive and not borrowed; its bytes are not needed any more.
        let released = unsafe { p.release() };
        assert!(released >= 63 * page, "{released}");
        assert_eq!(p.resident(), 0);
        // SAFETY: as above.
        assert_eq!(unsafe { p.release() }, 0, "nothing left to give back");
        let lo = p.start - buf.as_ptr() as usize;
        assert!(buf[lo..lo + p.len].iter().all(|b| *b == 0));
    }

    #[test]
    fn kept_mappings_are_reused_bounded_and_dropped_for_another_size() {
        let page = page_size();
        let (rx_len, tx_len) = (16 * page + 100, 16 * page);
        let mut pool = MappingPool::default();
        let (m, rx, tx) = pool.take(rx_len, tx_len).unwrap();
        assert_eq!((rx.len(), tx.len()), (rx_len, tx_len));
        rx[..10].copy_from_slice(b"0123456789");
        tx[0] = 1;
        let first = rx.as_ptr();
        pool.give(m);
        assert_eq!(pool.kept(), 1);
        let (m, rx, _) = pool.take(rx_len, tx_len).unwrap();
        assert_eq!(rx.as_ptr(), first, "the kept mapping is reused");
        assert_eq!(pool.kept(), 0);
        drop(m);
        let taken: Vec<_> = (0..POOLED_MAPPINGS + 3)
            .map(|_| pool.take(rx_len, tx_len).unwrap().0)
            .collect();
        taken.into_iter().for_each(|m| pool.give(m));
        assert_eq!(pool.kept(), POOLED_MAPPINGS, "bounded");
        let (m, rx, tx) = pool.take(page, page).unwrap();
        assert_eq!((rx.len(), tx.len()), (page, page));
        assert_eq!(pool.kept(), 0, "mappings of the old size are unmapped");
        drop(m);
    }
}
