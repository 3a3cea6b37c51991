//! A per-thread reading of the monotonic clock for the fault path.
//!
//! A fault-service worker used to read the clock six or seven times a
//! fault: for its sleep policy, deferred events, the fill's latency, the
//! staleness check's rate limit and the placement's accounting. Each read
//! is cheap in a loop (about 25 ns here), but on the fault path it follows
//! the faulting thread's own work, whose memory traffic has evicted the
//! clock's data page from the caches and the TLB, and `perf` put about
//! 0.4 µs a fault in them (issue 26, 2026-12-08). A thread that serves
//! faults now takes one reading where its turn starts and one after each
//! wake ([`refresh`]); what it calls in between uses that reading
//! ([`recent`]). A thread that never refreshes reads the clock every time,
//! so nothing but the workers sees a cached value.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static TICK: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Reads the clock and keeps the reading for [`recent`] on this thread.
pub(crate) fn refresh() -> Instant {
    let now = Instant::now();
    TICK.with(|t| t.set(Some(now)));
    now
}

/// This thread's last [`refresh`], or the clock if it never refreshed.
/// Never later than the true time; earlier by at most the time since the
/// thread's last refresh (one turn of a worker's loop).
pub(crate) fn recent() -> Instant {
    TICK.with(Cell::get).unwrap_or_else(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_never_refreshes_reads_the_clock() {
        std::thread::spawn(|| {
            let a = recent();
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert!(recent() > a);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn recent_keeps_the_last_refresh() {
        std::thread::spawn(|| {
            let a = refresh();
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert_eq!(recent(), a);
            let b = refresh();
            assert!(b > a);
            assert_eq!(recent(), b);
        })
        .join()
        .unwrap();
    }
}
