//! A lazy shadow's working set (docs/worksets.md): the chunks this run
//! needs first, in order, recorded for the next run; and the replay of the
//! last run's record.
//!
//! Only bookkeeping lives here; the fills and the mapping ahead are the
//! shadow's ([`super::LazyShadow::replay_step`]).

use crate::config::Config;
use crate::source::SourceIdentity;
use crate::stats::Counters;
use crate::workset::{KEEP_RUNS, Loaded, Record, RecordKey};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A fixed set of chunk indexes, lock-free.
pub(super) struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(n: u64) -> Bits {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Adds `i`; true if it was not in the set (false past the end).
    fn set(&self, i: u64) -> bool {
        let Some(w) = self.0.get((i / 64) as usize) else {
            return false;
        };
        let bit = 1 << (i % 64);
        w.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }
}

/// How many of the most recent first needs tell whether a run diverged.
const RECENT: u32 = 64;
/// Of the last [`RECENT`] first needs, how many outside the record stop a
/// replay.
const DIVERGED_AT: u32 = 48;
/// Recorded chunks one replay step fills before it goes back to the queue
/// (where faults come first).
pub(super) const STEP_CHUNKS: usize = 64;
/// Runs a replay step fills between two looks for a waiting fault.
pub(super) const LOOK_EVERY: usize = 4;
/// A step that took less than this read a fast source: another chain of
/// steps may start (up to [`Workset::max_chains`]). A source whose reads
/// stall (a network, a gate in a test) never gets a second chain, which
/// could hold the last free worker in a read while faults wait.
pub(super) const FAST_STEP: Duration = Duration::from_millis(4);

pub(super) struct Workset {
    dir: PathBuf,
    key: RecordKey,
    chunk: u64,
    size: u64,
    records: bool,
    opened: Instant,
    window: Duration,
    max_chunks: u64,
    /// Bytes of the plan's first chunks filled before the first access
    /// ([`super::LazyShadow::prefetch_replay`]).
    prefetch: u64,
    /// First needs of this run, in order, while recording; `None` once the
    /// window closed.
    order: Mutex<Option<Vec<u64>>>,
    needed: Bits,
    /// The replay, in this shadow's chunks: what to fill, in order.
    plan: Vec<u64>,
    /// For each of `plan`, its age in the record (runs in a row that did
    /// not touch it).
    plan_ages: Vec<u8>,
    in_plan: Bits,
    replayed: Bits,
    used: Bits,
    /// The next position of `plan` a replay step takes.
    pub cursor: AtomicUsize,
    /// Positions of `plan` whose step has ended.
    pub done: AtomicUsize,
    /// Chains of replay steps started, and how many there may be
    /// ([`super::LazyShadow::replay_step`]).
    pub chains: AtomicUsize,
    pub max_chains: usize,
    stopped: AtomicBool,
    /// The prefetch before the first access was made (or is under way).
    pub prefetched: AtomicBool,
    /// The last [`RECENT`] first needs (bit set: outside the record), and
    /// how many have been seen.
    recent: Mutex<(u64, u32)>,
}

/// What opening found, for the shadow's counters.
pub(super) struct Opened {
    pub workset: Option<Workset>,
    /// A record of an older version of the source was discarded.
    pub discarded: bool,
}

/// What a first need meant to the replay.
#[derive(Default)]
pub(super) struct Noted {
    pub recorded: u64,
    /// Replayed chunks handed to a consumer for the first time.
    pub hits: u64,
    pub diverged: bool,
    /// The window closed: this record is to be stored now.
    pub store: Option<Record>,
}

fn warn(what: std::fmt::Arguments<'_>) {
    eprintln!("shadowfd: working set: {what}");
}

impl Workset {
    /// The working set of a shadow of `identity` (`nchunks` chunks of
    /// `chunk` bytes, `size` bytes), as `cfg` asks: `None` when it neither
    /// records nor has a record to replay.
    pub fn open(cfg: &Config, identity: Option<SourceIdentity>, chunk: u64, size: u64) -> Opened {
        let nothing = Opened {
            workset: None,
            discarded: false,
        };
        let mode = cfg.workset;
        let (Some(id), Some(dir)) = (identity, cfg.workset_dir()) else {
            return nothing;
        };
        if !(mode.records() || mode.replays()) || size == 0 {
            return nothing;
        }
        let key = RecordKey {
            which: id.which,
            version: id.version,
        };
        let nchunks = size.div_ceil(chunk);
        let in_plan = Bits::new(nchunks);
        let mut plan = Vec::new();
        let mut plan_ages = Vec::new();
        let mut discarded = false;
        if mode.replays() {
            match crate::workset::load(&dir, &key) {
                Loaded::Found(r) => {
                    // In this shadow's chunks, each once, in recorded order.
                    for (i, &c) in r.chunks.iter().enumerate() {
                        let from = c.saturating_mul(r.chunk);
                        let to = from.saturating_add(r.chunk).min(size);
                        if from >= to {
                            continue;
                        }
                        for x in from / chunk..to.div_ceil(chunk) {
                            if in_plan.set(x) {
                                plan.push(x);
                                plan_ages.push(r.ages.get(i).copied().unwrap_or(0));
                            }
                        }
                    }
                }
                Loaded::Stale(_) => discarded = true,
                Loaded::Unreadable(e) => warn(format_args!("{e}")),
                Loaded::None => {}
            }
        }
        // `replay` writes nothing; `auto` records where it has no record,
        // and adds to the record it replays.
        let records = mode.records();
        if !records && plan.is_empty() {
            return Opened {
                workset: None,
                discarded,
            };
        }
        Opened {
            workset: Some(Workset {
                dir,
                key,
                chunk,
                size,
                records,
                opened: Instant::now(),
                window: cfg.workset_window,
                max_chunks: (cfg.workset_max / chunk).max(1),
                prefetch: cfg.workset_prefetch,
                order: Mutex::new(records.then(Vec::new)),
                needed: Bits::new(nchunks),
                plan,
                plan_ages,
                in_plan,
                replayed: Bits::new(nchunks),
                used: Bits::new(nchunks),
                cursor: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                // As many as the shadow's open starts (one per worker but
                // one, one or two); a second may join once steps prove fast.
                chains: AtomicUsize::new(cfg.workers.saturating_sub(1).clamp(1, 2)),
                max_chains: cfg.workers.clamp(1, 2),
                stopped: AtomicBool::new(false),
                prefetched: AtomicBool::new(false),
                recent: Mutex::new((0, 0)),
            }),
            discarded,
        }
    }

    /// Whether a replay is under way (it has a plan and did not stop).
    pub fn replaying(&self) -> bool {
        !self.plan.is_empty() && !self.stopped.load(Ordering::Acquire)
    }

    /// Whether this shadow replays a record at all.
    pub fn has_plan(&self) -> bool {
        !self.plan.is_empty()
    }

    /// How many of the plan's first positions the first access waits for
    /// (0 once the replay stopped).
    pub fn prefetch_positions(&self) -> usize {
        if !self.replaying() {
            return 0;
        }
        (self.prefetch.div_ceil(self.chunk) as usize).min(self.plan.len())
    }

    pub fn plan(&self) -> &[u64] {
        &self.plan
    }

    /// Stops the replay; true if this call stopped it.
    pub fn stop(&self) -> bool {
        !self.stopped.swap(true, Ordering::AcqRel)
    }

    /// Marks chunk `c` filled by the replay.
    pub fn replayed(&self, c: u64) -> bool {
        self.replayed.set(c)
    }

    /// Marks the replayed chunk `c` as given to a consumer; true the first
    /// time.
    pub fn used(&self, c: u64) -> bool {
        self.replayed.get(c) && self.used.set(c)
    }

    /// Notes that a consumer needed chunks `first..end`: a fault's answer
    /// mapped them, `populate` or `read_at` asked for them, or readahead
    /// filled them.
    pub fn need(&self, first: u64, end: u64) -> Noted {
        let mut n = Noted {
            // Handed to a consumer: mapped by a fault's answer, or read.
            hits: (first..end).filter(|&c| self.used(c)).count() as u64,
            ..Noted::default()
        };
        let mut fresh = Vec::new();
        for c in first..end {
            if self.needed.set(c) {
                fresh.push(c);
            }
        }
        if fresh.is_empty() {
            return n;
        }
        if self.replaying() {
            let mut r = self.recent.lock();
            for &c in &fresh {
                r.0 = (r.0 << 1) | u64::from(!self.in_plan.get(c));
                r.1 = r.1.saturating_add(1);
            }
            if r.1 >= RECENT && r.0.count_ones() >= DIVERGED_AT && self.stop() {
                n.diverged = true;
            }
        }
        if self.records {
            let mut o = self.order.lock();
            if let Some(order) = o.as_mut() {
                for c in fresh {
                    if (order.len() as u64) < self.max_chunks {
                        order.push(c);
                        n.recorded += 1;
                    }
                }
                if order.len() as u64 >= self.max_chunks || self.opened.elapsed() >= self.window {
                    let order = o.take().unwrap_or_default();
                    n.store = self.record(order);
                }
            }
        }
        n
    }

    /// The record to store at the end of the window or of the shadow
    /// (`None` if nothing is to be written). Closes the window.
    pub fn finish(&self) -> Option<Record> {
        let order = self.order.lock().take()?;
        self.record(order)
    }

    /// The record of `order`, merged with the replayed record (the last
    /// [`KEEP_RUNS`] runs, ordered by first touch): the replayed record's
    /// chunks first, in its order, each at age 0 if a consumer of this run
    /// needed it (a fault, a read), at the age it had if the replay mapped
    /// it into a consumer range ahead of the touch (whether the touch came
    /// cannot be seen), and one run older if neither, dropped at
    /// [`KEEP_RUNS`]; then this run's new ones, at age 0. `None` when
    /// nothing changed.
    fn record(&self, order: Vec<u64>) -> Option<Record> {
        let (chunks, ages) = if self.plan.is_empty() {
            let n = order.len();
            (order, vec![0; n])
        } else {
            let mut all = Vec::with_capacity(self.plan.len());
            let mut ages = Vec::with_capacity(self.plan.len());
            for (&c, &was) in self.plan.iter().zip(&self.plan_ages) {
                let age = if self.needed.get(c) {
                    0
                } else if self.used.get(c) {
                    was
                } else {
                    was.saturating_add(1)
                };
                if age < KEEP_RUNS {
                    all.push(c);
                    ages.push(age);
                }
            }
            for c in order.into_iter().filter(|&c| !self.in_plan.get(c)) {
                all.push(c);
                ages.push(0);
            }
            all.truncate(self.max_chunks as usize);
            ages.truncate(all.len());
            if all == self.plan && ages == self.plan_ages {
                return None;
            }
            (all, ages)
        };
        if chunks.is_empty() && self.plan.is_empty() {
            return None;
        }
        Some(Record {
            key: self.key.clone(),
            chunk: self.chunk,
            size: self.size,
            created: crate::workset::unix_now(),
            chunks,
            ages,
        })
    }

    /// Stores `r` in the record directory; a failure is warned about.
    pub fn store(&self, r: &Record) -> std::io::Result<PathBuf> {
        store_in(&self.dir, r)
    }

    /// When the recording window closes, if this run records.
    pub fn deadline(&self) -> Option<Instant> {
        self.records.then(|| self.opened + self.window)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.clone()
    }
}

/// Shadows whose recording window is open, by when it closes: one thread
/// stores their records then, so a shadow that lives on without faults
/// (a server's) still stores its record when the window closes.
static CLOSING: Mutex<Vec<(Instant, std::sync::Weak<super::LazyShadow>)>> = Mutex::new(Vec::new());
static CLOSER: std::sync::Once = std::sync::Once::new();

/// Has `shadow`'s record stored at `deadline` (unless it was before).
pub(super) fn close_at(deadline: Instant, shadow: std::sync::Weak<super::LazyShadow>) {
    CLOSING.lock().push((deadline, shadow));
    CLOSER.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("shadowfd-workset-closer".into())
            .spawn(closer);
        EXIT_PID.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: `save_at_exit` is an `extern "C" fn()` that never
        // unwinds (it catches panics); registering it has no other
        // precondition.
        unsafe {
            libc::atexit(save_at_exit);
        }
    });
}

/// The process that registered [`save_at_exit`] (a forked child's `exit`
/// stores nothing: the record is its parent's).
static EXIT_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// At `exit`: stores the records of the shadows whose window is still
/// open. A process that ends without dropping its shadows (`shadowfd run`
/// returns while its embedded server still holds the command's files)
/// would otherwise lose the record of a run shorter than the window.
extern "C" fn save_at_exit() {
    if EXIT_PID.load(Ordering::Relaxed) != std::process::id() {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        let open: Vec<std::sync::Weak<super::LazyShadow>> =
            CLOSING.lock().iter().map(|(_, w)| w.clone()).collect();
        let trace = std::env::var_os("SHADOWFD_WORKSET_TRACE").is_some();
        for s in open.iter().filter_map(std::sync::Weak::upgrade) {
            if trace {
                trace_counters(&s);
            }
            let _ = s.save_workset();
        }
    });
}

/// With `SHADOWFD_WORKSET_TRACE` set, what [`save_at_exit`] found of
/// shadow `s`, on standard error (for diagnosing a replay).
fn trace_counters(s: &super::LazyShadow) {
    let c = &s.counters;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let plan = s.workset.as_ref().map_or(0, |w| w.plan.len());
    eprintln!(
        "shadowfd: working set of {} at exit: plan {plan} chunks, faults {}, chunks filled {}, \
         readahead {}, recorded {}, replayed {}, hits {}, mapped ahead {}, used {}, diverged {}",
        s.name,
        g(&c.faults),
        g(&c.chunks_filled),
        g(&c.readahead_chunks),
        g(&c.workset_recorded),
        g(&c.workset_replayed),
        g(&c.workset_hits),
        g(&c.workset_mapped_ahead),
        g(&c.workset_used),
        g(&c.workset_diverged),
    );
}

fn closer() {
    loop {
        let now = Instant::now();
        let due: Vec<std::sync::Weak<super::LazyShadow>> = {
            let mut c = CLOSING.lock();
            let (due, wait): (Vec<_>, Vec<_>) = c.drain(..).partition(|(d, _)| *d <= now);
            *c = wait;
            due.into_iter().map(|(_, w)| w).collect()
        };
        for s in due.iter().filter_map(std::sync::Weak::upgrade) {
            let _ = s.save_workset();
        }
        let next = CLOSING.lock().iter().map(|(d, _)| *d).min();
        // Never longer than a second: a deadline added meanwhile is seen.
        let nap = next.map_or(Duration::from_secs(1), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        });
        std::thread::sleep(nap.max(Duration::from_millis(1)));
    }
}

/// Stores `r` in `dir`, warning on a failure.
pub(super) fn store_in(dir: &std::path::Path, r: &Record) -> std::io::Result<PathBuf> {
    r.store(dir).inspect_err(|e| {
        warn(format_args!(
            "storing the record of {} in {} failed: {e}; set SHADOWFD_WORKSET_DIR to a \
             writable directory, or SHADOWFD_WORKSET=off",
            r.key.which,
            dir.display()
        ))
    })
}

/// Adds `n` to the working-set counter `f` of both `counters`.
pub(super) fn count(counters: [&Counters; 2], f: impl Fn(&Counters) -> &AtomicU64, n: u64) {
    if n > 0 {
        for c in counters {
            f(c).fetch_add(n, Ordering::Relaxed);
        }
    }
}
