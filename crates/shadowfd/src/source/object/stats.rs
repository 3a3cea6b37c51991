//! What an object source did: requests, bytes, retries, cache use, fetch
//! latency, and the last failure.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latencies kept for the percentiles: the first this many (enough for a
/// 1 GiB object in 256 KiB blocks), then every later one replaces a slot
/// chosen by its index.
const KEPT: usize = 8192;

/// Live counters of one [`super::ObjectSource`].
#[derive(Debug, Default)]
pub struct ObjectCounters {
    pub(super) requests: AtomicU64,
    pub(super) bytes_fetched: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) cache_misses: AtomicU64,
    pub(super) cache_rejected: AtomicU64,
    pub(super) memory_hits: AtomicU64,
    pub(super) cache_writes: AtomicU64,
    pub(super) cache_write_errors: AtomicU64,
    pub(super) cache_writes_abandoned: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    seen: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ObjectCounters {
    pub(super) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one successful request's latency.
    pub(super) fn latency(&self, us: u64) {
        let i = self.seen.fetch_add(1, Ordering::Relaxed) as usize;
        let mut l = self.latencies_us.lock();
        if l.len() < KEPT {
            l.push(us);
        } else {
            l[i % KEPT] = us;
        }
    }

    /// Records a failure the reader saw (retries spent, object changed).
    pub(super) fn failed(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(why);
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> ObjectStats {
        let mut l = self.latencies_us.lock().clone();
        l.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            if l.is_empty() {
                return None;
            }
            let i = ((l.len() as f64 - 1.0) * p).round() as usize;
            Some(l[i] as f64)
        };
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ObjectStats {
            requests: g(&self.requests),
            bytes_fetched: g(&self.bytes_fetched),
            retries: g(&self.retries),
            failures: g(&self.failures),
            cache_hits: g(&self.cache_hits),
            cache_misses: g(&self.cache_misses),
            cache_rejected: g(&self.cache_rejected),
            memory_hits: g(&self.memory_hits),
            cache_writes: g(&self.cache_writes),
            cache_write_errors: g(&self.cache_write_errors),
            cache_writes_abandoned: g(&self.cache_writes_abandoned),
            fetch_p50_us: pct(0.5),
            fetch_p99_us: pct(0.99),
            last_error: self.last_error.lock().clone(),
        }
    }
}

/// A snapshot of an object source's counters.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ObjectStats {
    /// Ranged GETs sent, retries included (HEADs are not counted).
    pub requests: u64,
    /// Body bytes received by successful GETs.
    pub bytes_fetched: u64,
    /// Attempts repeated after a transient failure.
    pub retries: u64,
    /// Reads that failed for good (retries spent, object changed).
    pub failures: u64,
    /// Reads answered from the disk cache: a whole block loaded into
    /// memory, or the part of one a read asked for, read straight into
    /// the reader's buffer (each checked page by page).
    pub cache_hits: u64,
    /// Blocks the disk cache did not hold (fetched instead).
    pub cache_misses: u64,
    /// Cached blocks refused on reading back (torn, truncated, tampered)
    /// and fetched again.
    pub cache_rejected: u64,
    /// Block reads answered from the blocks in memory (fetched ahead).
    pub memory_hits: u64,
    /// Fetched blocks written to the disk cache.
    pub cache_writes: u64,
    /// Fetched blocks the disk cache failed to write (a full disk, ...):
    /// the next run fetches them again.
    pub cache_write_errors: u64,
    /// Fetched blocks never written to the disk cache because the source
    /// was dropped (or its runtime shut down) and the writes were not done
    /// within [`super::CACHE_WRITE_BOUND`].
    pub cache_writes_abandoned: u64,
    /// Median latency of a successful GET, body included (µs).
    pub fetch_p50_us: Option<f64>,
    /// 99th percentile of the same (µs).
    pub fetch_p99_us: Option<f64>,
    /// The last failure, with its cause.
    pub last_error: Option<String>,
}
