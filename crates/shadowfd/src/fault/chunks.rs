//! The chunk state table: one atomic state per chunk of a lazy shadow.
//!
//! A chunk goes `Empty -> Filling` when one thread claims it (a
//! compare-and-swap, so exactly one thread fills it), then `Filling ->
//! Filled` when every page is in the memfd or recorded as bad, or back to
//! `Empty` when a fill is given up (a speculative fill over the budget).
//! `Filled` is final. Readers of `Filled` (Acquire) see everything the filler
//! wrote before publishing it (Release).

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

/// The state of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
    Empty = 0,
    Filling = 1,
    /// Resolved: every page is installed or recorded as bad.
    Filled = 2,
}

/// Per-chunk states of one shadow.
pub(crate) struct ChunkTable {
    states: Box<[AtomicU8]>,
}

impl ChunkTable {
    /// A table of `n` Empty chunks. Allocated zeroed, so that the kernel
    /// hands out zero pages lazily: a huge sparse source costs no more than a
    /// small one until its chunks are touched.
    pub(crate) fn new(n: u64) -> ChunkTable {
        let zeros: Box<[u8]> = vec![0u8; n as usize].into_boxed_slice();
        let len = zeros.len();
        let ptr = Box::into_raw(zeros) as *mut u8;
        // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8
        // (documented), so a boxed [u8] of `len` zeros is a valid boxed
        // [AtomicU8] of `len` Empty states; the allocation's layout is unchanged.
        let states = unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                ptr.cast::<AtomicU8>(),
                len,
            ))
        };
        ChunkTable { states }
    }

    pub(crate) fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub(crate) fn get(&self, c: u64) -> ChunkState {
        match self.states[c as usize].load(Ordering::Acquire) {
            0 => ChunkState::Empty,
            1 => ChunkState::Filling,
            _ => ChunkState::Filled,
        }
    }

    /// `Empty -> Filling`; true if this caller now owns the fill.
    pub(crate) fn claim(&self, c: u64) -> bool {
        self.states[c as usize]
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Claims consecutive Empty chunks from `start`, at most up to `end`.
    /// `None` if `start` itself could not be claimed.
    pub(crate) fn claim_run(&self, start: u64, end: u64) -> Option<Range<u64>> {
        if !self.claim(start) {
            return None;
        }
        let mut e = start + 1;
        while e < end && self.claim(e) {
            e += 1;
        }
        Some(start..e)
    }

    /// `Filling -> Filled` for every chunk of `run` (claimed by the caller).
    pub(crate) fn publish(&self, run: Range<u64>) {
        for c in run {
            debug_assert_eq!(self.get(c), ChunkState::Filling);
            self.states[c as usize].store(ChunkState::Filled as u8, Ordering::Release);
        }
    }

    /// `Filling -> Empty` for every chunk of `run` (claimed by the caller):
    /// the fill is given up and another thread may claim them.
    pub(crate) fn release(&self, run: Range<u64>) {
        for c in run {
            debug_assert_eq!(self.get(c), ChunkState::Filling);
            self.states[c as usize].store(ChunkState::Empty as u8, Ordering::Release);
        }
    }

    /// The end of the run of Filled chunks from `start` (at most `limit`).
    pub(crate) fn filled_until(&self, start: u64, limit: u64) -> u64 {
        self.run_until(start, limit, true)
    }

    /// The end of the run of chunks not Filled (Empty or Filling) from
    /// `start` (at most `limit`).
    pub(crate) fn unfilled_until(&self, start: u64, limit: u64) -> u64 {
        self.run_until(start, limit, false)
    }

    /// The end of the run from `start` (at most `limit`) of chunks that are
    /// Filled (`filled`) or not.
    fn run_until(&self, start: u64, limit: u64, filled: bool) -> u64 {
        let mut c = start;
        while c < limit.min(self.len()) && (self.get(c) == ChunkState::Filled) == filled {
            c += 1;
        }
        c
    }

    /// Whether every chunk is Filled.
    pub(crate) fn all_filled(&self) -> bool {
        self.filled_until(0, self.len()) == self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn starts_empty_and_claims_once() {
        let t = ChunkTable::new(4);
        assert_eq!(t.len(), 4);
        assert!((0..4).all(|c| t.get(c) == ChunkState::Empty));
        assert!(t.claim(1));
        assert!(!t.claim(1));
        assert_eq!(t.get(1), ChunkState::Filling);
    }

    #[test]
    fn runs_stop_at_the_first_claimed_chunk() {
        let t = ChunkTable::new(8);
        assert!(t.claim(3));
        assert_eq!(t.claim_run(0, 8), Some(0..3));
        assert_eq!(t.claim_run(3, 8), None);
        assert_eq!(t.claim_run(4, 6), Some(4..6));
    }

    #[test]
    fn publish_and_release() {
        let t = ChunkTable::new(4);
        let r = t.claim_run(0, 4).unwrap();
        t.release(2..4);
        t.publish(0..2);
        assert_eq!(r, 0..4);
        assert_eq!(t.get(0), ChunkState::Filled);
        assert_eq!(t.get(2), ChunkState::Empty);
        assert_eq!(t.filled_until(0, 4), 2);
        assert_eq!(t.unfilled_until(2, 4), 4);
        assert_eq!(t.unfilled_until(0, 4), 0);
        assert!(!t.all_filled());
        assert_eq!(t.claim_run(2, 4), Some(2..4));
        t.publish(2..4);
        assert!(t.all_filled());
        assert_eq!(t.filled_until(1, 3), 3);
    }

    #[test]
    fn empty_table() {
        let t = ChunkTable::new(0);
        assert!(t.all_filled());
        assert_eq!(t.filled_until(0, 10), 0);
        assert_eq!(t.unfilled_until(0, 10), 0);
    }

    #[test]
    fn huge_table_is_lazy() {
        // 1 TiB of 4 KiB chunks: 256 Mi states, zero pages until touched.
        let t = ChunkTable::new(1 << 28);
        assert_eq!(t.get((1 << 28) - 1), ChunkState::Empty);
    }

    #[test]
    fn concurrent_claims_have_one_winner_per_chunk() {
        let t = Arc::new(ChunkTable::new(1024));
        let wins = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (t, wins) = (t.clone(), wins.clone());
                std::thread::spawn(move || {
                    for c in 0..1024 {
                        if t.claim(c) {
                            wins.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(wins.load(Ordering::Relaxed), 1024);
    }
}
