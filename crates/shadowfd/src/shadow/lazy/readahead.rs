//! Sequential readahead, in the manner of the page cache's: a window that
//! doubles while faults stay sequential, with a marker chunk left unfilled in
//! each window so that reaching it issues the next window before the consumer
//! runs out of filled chunks.

use std::ops::Range;

/// What to do about one fault.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Chunks to fill now, for the faulting thread: the faulting chunk alone
    /// for a random fault, a run from it for a sequential one.
    pub now: Range<u64>,
    /// Chunks to fill ahead, in the background.
    pub ahead: Vec<Range<u64>>,
}

/// Per-shadow readahead state.
#[derive(Debug)]
pub(crate) struct Readahead {
    /// Largest window, in chunks (0: readahead off).
    max_window: u64,
    /// Chunks filled at once for a sequential fault.
    run: u64,
    nchunks: u64,
    /// Last chunk filled for a fault.
    last: Option<u64>,
    window: u64,
    /// First chunk not yet issued.
    next: u64,
    /// The chunk whose fault triggers the next window.
    marker: Option<u64>,
}

impl Readahead {
    pub fn new(max_window: u64, run: u64, nchunks: u64) -> Self {
        Readahead {
            max_window,
            run: run.max(1),
            nchunks,
            last: None,
            window: 0,
            next: 0,
            marker: None,
        }
    }

    /// Whether a fault on chunk `c` continues the sequential stream: it
    /// follows the last fault's chunks, or lands on the marker or inside the
    /// window issued last (the consumer caught up with the readahead).
    fn is_sequential(&self, c: u64) -> bool {
        self.last.is_some_and(|l| c == l + 1)
            || self.marker == Some(c)
            || (self.window > 0 && self.last.is_some_and(|l| c > l) && c < self.next)
    }

    /// Plans the fill for a fault on chunk `c`.
    pub fn on_fault(&mut self, c: u64) -> Plan {
        let single = Plan {
            now: c..c + 1,
            ahead: Vec::new(),
        };
        if self.max_window == 0 {
            return single;
        }
        if self.last == Some(c) {
            // Another thread, or a retry, on the chunk just planned: no news.
            return single;
        }
        if !self.is_sequential(c) {
            self.last = Some(c);
            self.window = 0;
            self.marker = None;
            self.next = c + 1;
            return single;
        }
        let now = c..(c + self.run).min(self.nchunks);
        self.last = Some(now.end - 1);
        self.window = (self.window * 2).clamp((2 * self.run).min(self.max_window), self.max_window);
        let start = self.next.max(now.end);
        let end = (now.end + self.window).min(self.nchunks);
        if start >= end {
            return Plan {
                now,
                ahead: Vec::new(),
            };
        }
        let marker = start + (end - start) / 2;
        self.marker = (marker > start).then_some(marker);
        self.next = end;
        let parts = match self.marker {
            Some(m) => [start..m, m + 1..end],
            None => [start..end, end..end],
        };
        Plan {
            now,
            ahead: parts.into_iter().filter(|r| !r.is_empty()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_faults_fill_one_chunk_and_read_nothing_ahead() {
        let mut ra = Readahead::new(32, 4, 1000);
        for c in [5, 90, 17, 400, 3] {
            assert_eq!(
                ra.on_fault(c),
                Plan {
                    now: c..c + 1,
                    ahead: vec![]
                }
            );
        }
    }

    #[test]
    fn sequential_faults_fill_runs_and_grow_a_window_with_a_marker() {
        let mut ra = Readahead::new(64, 4, 1000);
        assert_eq!(ra.on_fault(0).now, 0..1);
        let p = ra.on_fault(1);
        assert_eq!(p.now, 1..5);
        // window 8 after the run: 5..13, marker at 9
        assert_eq!(p.ahead, vec![5..9, 10..13]);
        // The consumer reaches the marker: next window starts where the last ended.
        let p = ra.on_fault(9);
        assert_eq!(p.now, 9..13);
        assert_eq!(p.ahead[0].start, 13);
        let issued_to = p.ahead.last().unwrap().end;
        assert_eq!(issued_to, 13 + 16);
        // Catching up inside the issued window still counts as sequential.
        let p = ra.on_fault(20);
        assert_eq!(p.now, 20..24);
        // The window never exceeds the maximum.
        for _ in 0..20 {
            let m = ra.marker.unwrap_or(ra.next);
            let p = ra.on_fault(m);
            let span: u64 = p.ahead.iter().map(|r| r.end - r.start).sum();
            assert!(span <= 64);
        }
    }

    #[test]
    fn disabled_when_window_is_zero() {
        let mut ra = Readahead::new(0, 4, 10);
        assert_eq!(ra.on_fault(0).now, 0..1);
        assert_eq!(ra.on_fault(1).now, 1..2);
    }
}
