//! Sequential readahead, in the manner of the page cache's: a window that
//! doubles while faults stay sequential, with a marker chunk left unfilled in
//! each window so that reaching it issues the next window before the consumer
//! runs out of filled chunks.

use std::ops::Range;

/// Per-shadow readahead state; only the reader thread updates it.
#[derive(Debug)]
pub(crate) struct Readahead {
    max_window: u64,
    nchunks: u64,
    last: Option<u64>,
    window: u64,
    /// First chunk not yet issued.
    next: u64,
    /// The chunk whose fault triggers the next window.
    marker: Option<u64>,
}

const INITIAL_WINDOW: u64 = 4;

impl Readahead {
    pub fn new(max_window: u64, nchunks: u64) -> Self {
        Readahead {
            max_window,
            nchunks,
            last: None,
            window: 0,
            next: 0,
            marker: None,
        }
    }

    /// Called for each fault on chunk `c`; returns the chunk ranges to
    /// prefetch (the window minus its marker).
    pub fn on_fault(&mut self, c: u64) -> Option<Vec<Range<u64>>> {
        if self.max_window == 0 {
            return None;
        }
        let sequential = self.last.is_some_and(|l| c == l + 1)
            || self.marker == Some(c)
            || (self.window > 0 && c == self.next);
        self.last = Some(c);
        if !sequential {
            self.window = 0;
            self.marker = None;
            return None;
        }
        self.window = (self.window * 2).clamp(INITIAL_WINDOW.min(self.max_window), self.max_window);
        let start = self.next.max(c + 1);
        let end = (c + 1 + self.window).min(self.nchunks);
        if start >= end {
            return None;
        }
        let marker = start + (end - start) / 2;
        self.marker = (marker > start).then_some(marker);
        self.next = end;
        let parts = match self.marker {
            Some(m) => [start..m, m + 1..end],
            None => [start..end, end..end],
        };
        Some(parts.into_iter().filter(|r| !r.is_empty()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_faults_do_not_read_ahead() {
        let mut ra = Readahead::new(32, 1000);
        for c in [5, 90, 17, 400, 3] {
            assert_eq!(ra.on_fault(c), None);
        }
    }

    #[test]
    fn sequential_faults_grow_the_window_and_leave_a_marker() {
        let mut ra = Readahead::new(16, 1000);
        assert_eq!(ra.on_fault(0), None);
        let w1 = ra.on_fault(1).unwrap();
        assert_eq!(w1, vec![2..4, 5..6]); // 4 is the marker
        let w2 = ra.on_fault(4).unwrap();
        assert_eq!(w2[0].start, 6);
        assert!(w2.iter().all(|r| !r.contains(&4)));
        let total: usize = (0..20)
            .filter_map(|_| ra.on_fault(ra.marker?))
            .map(|v| v.len())
            .sum();
        assert!(total > 0);
        assert!(ra.window <= 16);
    }

    #[test]
    fn disabled_when_window_is_zero() {
        let mut ra = Readahead::new(0, 10);
        assert_eq!(ra.on_fault(0), None);
        assert_eq!(ra.on_fault(1), None);
    }
}
