//! Spare workers: faults keep being served while every worker is held in a
//! slow fill.
//!
//! A fill runs on the worker that read its fault, and a source read may
//! take as long as the source likes (a stalled network store, an embedder's
//! callback that blocks for 30 s). With every worker inside such fills,
//! nobody would read the userfaultfd, and the faults of every other shadow
//! of the engine, however fast their sources, would wait too.
//!
//! So the service counts the threads inside fills. When all of them are
//! (a worker entering a fill finds itself the last), a watchdog thread is
//! woken. If after [`HELD`] no fill has ended since and faults or claimed
//! jobs wait, it starts a *spare*: an unpinned thread that reads and serves
//! faults like a worker (its own fills counted the same way, so further
//! spares follow if it is held too), and ends once it found nothing to do
//! for [`SPARE_IDLE`], or sooner once a worker is free again. At most
//! [`MAX_SPARES`] run at once: a source that holds every read for ever
//! holds that many threads, and then the engine's other shadows wait as
//! before. An engine whose fills end costs one sleeping thread; the
//! watchdog wakes only when every worker is filling at once, and then at
//! most every [`HELD`].
//!
//! Spares take no part in CPU placement (`service`'s local mode): they are
//! a way out of a stall, not a fast path.

use super::{Core, ReadBufs, mark_in_service};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long every thread must have been filling, with no fill ending, for
/// a spare to start.
pub(crate) const HELD: Duration = Duration::from_millis(100);
/// A spare that found nothing to do for this long ends.
pub(crate) const SPARE_IDLE: Duration = Duration::from_secs(1);
/// Spares running at once, at most.
pub(crate) const MAX_SPARES: usize = 32;

/// The fill count and the watchdog's wake-up.
pub(crate) struct Spares {
    workers: usize,
    /// Threads (workers and spares) inside a fill.
    busy: AtomicUsize,
    /// Fills ended so far.
    ended: AtomicU64,
    running: AtomicUsize,
    /// The watchdog has been told that every thread is filling.
    watching: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// Held while a thread fills; see [`Spares::enter`].
pub(crate) struct Filling<'a>(&'a Spares);

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Spares {
    pub fn new(workers: usize) -> Spares {
        Spares {
            workers,
            busy: AtomicUsize::new(0),
            ended: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            watching: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// How many threads serve: the workers and the spares running.
    fn threads(&self) -> usize {
        self.workers + self.running.load(Ordering::SeqCst)
    }

    fn all_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) >= self.threads()
    }

    /// Counts the calling thread as filling until the result drops; wakes
    /// the watchdog if that makes every thread busy.
    pub fn enter(&self) -> Filling<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.check();
        Filling(self)
    }

    /// Wakes the watchdog if every thread is filling and it was not told.
    fn check(&self) {
        if self.all_busy() && !self.watching.swap(true, Ordering::SeqCst) {
            let _g = self.lock.lock();
            self.cv.notify_one();
        }
    }

    /// Wakes the watchdog to see the service stopping.
    pub fn stop(&self) {
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

/// The watchdog thread: starts spares while every thread is held in fills
/// and faults wait.
pub(crate) fn watchdog(core: Arc<Core>) {
    let s = &core.spares;
    let stopping = || core.stopping.load(Ordering::SeqCst);
    while !stopping() {
        {
            let mut g = s.lock.lock();
            while !s.watching.load(Ordering::SeqCst) && !stopping() {
                s.cv.wait(&mut g);
            }
        }
        let ended = s.ended.load(Ordering::SeqCst);
        {
            let mut g = s.lock.lock();
            if !stopping() {
                let _ = s.cv.wait_for(&mut g, HELD);
            }
        }
        if stopping() {
            return;
        }
        if !s.all_busy() {
            s.watching.store(false, Ordering::SeqCst);
            // A thread that made them all busy since then found the flag
            // still set and did not wake us: look again.
            if s.all_busy() {
                s.watching.store(true, Ordering::SeqCst);
            }
            continue;
        }
        let held = s.ended.load(Ordering::SeqCst) == ended;
        if held && core.work_waits() && s.running.load(Ordering::SeqCst) < MAX_SPARES {
            s.running.fetch_add(1, Ordering::SeqCst);
            core.counters.spare_workers.fetch_add(1, Ordering::Relaxed);
            let c = core.clone();
            let started = std::thread::Builder::new()
                .name("shadowfd-spare".into())
                .spawn(move || spare(c));
            if started.is_err() {
                s.running.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// A spare: serves faults and claimed jobs until there is nothing to do
/// for [`SPARE_IDLE`]. If every thread left is filling when it ends, the
/// watchdog is told, as when a worker enters a fill.
fn spare(core: Arc<Core>) {
    mark_in_service();
    let s = &core.spares;
    let mut bufs = ReadBufs::new();
    let mut last = Instant::now();
    while !core.stopping.load(Ordering::SeqCst) {
        if core.serve_once(&mut bufs) {
            last = Instant::now();
            continue;
        }
        if last.elapsed() >= SPARE_IDLE {
            break;
        }
        core.uffd.wait_readable(20);
    }
    s.running.fetch_sub(1, Ordering::SeqCst);
    s.check();
}
