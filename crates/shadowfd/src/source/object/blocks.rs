//! Blocks of the object in memory: fetched on demand or ahead of a
//! sequential reader, many GETs at once, adjacent blocks merged into one
//! request, each block waited on with a bound.
//!
//! A block is claimed (Pending) by the first reader that wants it; the
//! others wait on it. The disk cache is asked first; what it lacks is
//! fetched by tasks on the source's private runtime, at most
//! [`ObjectConfig::concurrency`] at once. Ready blocks stay in memory up to
//! [`ObjectConfig::memory`] bytes, least recently used evicted first; a
//! failed block is dropped from the table once its readers are told, so a
//! later read tries again.
//!
//! Fetched blocks are written to the disk cache behind the reads, on the
//! runtime's blocking threads. Each is counted as a pending write (in its
//! source and in the process, [`WRITES`]) before any reader can see it, and
//! counted out once written, failed, or abandoned: dropping the source
//! waits for its count to reach zero, and a program about to exit waits
//! for the process's ([`finish_cache_writes`]), each for at most
//! [`CACHE_WRITE_BOUND`].

use super::cache::{ChunkCache, Miss};
use super::client::Client;
use super::stats::ObjectCounters;
use crate::object_error::ObjectError;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many blocks before the last read's end a read may start and still
/// count as sequential.
const SEQ_SLACK: u64 = 4;

/// How many claims ago a block counts as used lately.
const LATELY: u64 = 32;

/// Blocks read ahead from the disk cache by one blocking thread.
const CACHE_LOAD_GROUP: usize = 4;

/// Blocks fetched that may wait to be written to the disk cache.
const WRITE_BEHIND: usize = 64;

/// How long dropping an object source, and [`finish_cache_writes`], wait
/// for the fetched blocks still to be written to the disk cache: at most
/// [`WRITE_BEHIND`] blocks are queued (16 MiB of 256 KiB blocks) plus the
/// GETs that just finished, which a local disk writes in milliseconds; the
/// bound only matters for a disk that hangs. Past it, the writes not
/// started are abandoned ([`super::ObjectStats::cache_writes_abandoned`])
/// and the next run fetches those blocks again.
pub const CACHE_WRITE_BOUND: Duration = Duration::from_secs(10);

/// A count of pending cache writes (blocks), with a wait for zero.
pub(super) struct Pending {
    n: std::sync::Mutex<u64>,
    cv: std::sync::Condvar,
}

impl Pending {
    const fn new() -> Pending {
        Pending {
            n: std::sync::Mutex::new(0),
            cv: std::sync::Condvar::new(),
        }
    }

    fn count(&self) -> std::sync::MutexGuard<'_, u64> {
        self.n.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, k: u64) {
        *self.count() += k;
    }

    fn sub(&self, k: u64) {
        let mut n = self.count();
        *n -= k;
        if *n == 0 {
            self.cv.notify_all();
        }
    }

    /// Waits (at most `bound`) for the count to reach zero; returns what
    /// is left.
    fn wait(&self, bound: Duration) -> u64 {
        let until = Instant::now() + bound;
        let mut n = self.count();
        while *n > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = match self.cv.wait_timeout(n, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        *n
    }
}

/// The cache writes pending in this process, from every object source.
static WRITES: Pending = Pending::new();

/// Waits until every fetched block that an object source of this process
/// handed to its disk cache is written (or failed to be), for at most
/// `bound`; returns how many were still pending then (0: all done).
///
/// For a program about to exit with sources it does not drop (held by a
/// signal handler's state, or by threads that never end): the process
/// exit would cut their writes short, and the next run would fetch those
/// blocks again. Blocks whose GET is still in flight are not waited for.
/// The writes still pending when it returns go on, and end with the
/// process if it exits.
pub fn finish_cache_writes(bound: Duration) -> u64 {
    WRITES.wait(bound)
}

/// Fetched blocks counted as pending writes, in their source and in the
/// process, until counted out: as written, failed, or (dropped without
/// that, by a runtime shut down or a source past its bound) abandoned.
struct WriteTicket {
    sh: Arc<Shared>,
    left: u64,
}

impl WriteTicket {
    fn new(sh: &Arc<Shared>, n: u64) -> WriteTicket {
        sh.pending.add(n);
        WRITES.add(n);
        WriteTicket {
            sh: sh.clone(),
            left: n,
        }
    }

    /// One block written (`ok`) or failed.
    fn done(&mut self, ok: bool) {
        let c = &self.sh.client.counters;
        match ok {
            true => ObjectCounters::add(&c.cache_writes, 1),
            false => ObjectCounters::add(&c.cache_write_errors, 1),
        }
        self.left -= 1;
        WRITES.sub(1);
        self.sh.pending.sub(1);
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if self.left > 0 {
            let c = &self.sh.client.counters;
            ObjectCounters::add(&c.cache_writes_abandoned, self.left);
            WRITES.sub(self.left);
            self.sh.pending.sub(self.left);
        }
    }
}

enum State {
    Pending,
    Ready(Arc<Vec<u8>>),
    Failed(ObjectError),
}

struct Slot {
    state: Mutex<State>,
    cv: Condvar,
    used: AtomicU64,
}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(State::Pending),
            cv: Condvar::new(),
            used: AtomicU64::new(0),
        })
    }

    fn set(&self, s: State) {
        *self.state.lock() = s;
        self.cv.notify_all();
    }
}

/// The shared part the fetch tasks hold.
pub(super) struct Shared {
    pub client: Client,
    pub cache: Option<ChunkCache>,
    pub etag: String,
    pub size: u64,
    table: Mutex<HashMap<u64, Arc<Slot>>>,
    tick: AtomicU64,
    limit: tokio::sync::Semaphore,
    /// What guesses (blocks read ahead) take first: one permit fewer than
    /// `limit`, so a read that waits for its own block waits behind at
    /// most one round of them.
    ahead_limit: tokio::sync::Semaphore,
    /// Spawns on the source's runtime.
    handle: tokio::runtime::Handle,
    /// Room for blocks waiting to be written to the disk cache, the
    /// blocks fetched and not yet written, and whether the writes not
    /// started are given up (the source was dropped and the bound passed).
    writes: Arc<tokio::sync::Semaphore>,
    pending: Pending,
    give_up: AtomicBool,
    /// The last failure for good, and when: reads within the cool-down
    /// after it (and fetches queued before it) fail at once with it, so a
    /// dead store costs one bound, not one per page the engine retries. A
    /// changed object stays failed.
    broken: Mutex<Option<(Instant, ObjectError)>>,
}

impl Shared {
    fn block_range(&self, i: u64) -> Range<u64> {
        let b = self.client.cfg.block;
        i * b..((i + 1) * b).min(self.size)
    }

    /// Fills the claimed `blocks` (ascending): from the disk cache where it
    /// holds them, the rest with GETs.
    fn load(self: &Arc<Self>, blocks: Vec<(u64, Arc<Slot>)>, ahead: bool) {
        let fetch = self.from_cache(blocks);
        self.start(fetch, ahead);
    }

    /// Fills the claimed `blocks` the disk cache holds (if there is one);
    /// returns the others.
    fn from_cache(self: &Arc<Self>, blocks: Vec<(u64, Arc<Slot>)>) -> Vec<(u64, Arc<Slot>)> {
        let mut fetch = Vec::new();
        let c = &self.client.counters;
        for (i, slot) in blocks {
            let r = self.block_range(i);
            let Some(cache) = &self.cache else {
                fetch.push((i, slot));
                continue;
            };
            match cache.get(i, (r.end - r.start) as usize) {
                Ok((data, due)) => {
                    ObjectCounters::add(&c.cache_hits, 1);
                    slot.set(State::Ready(Arc::new(data)));
                    self.touches_due(due);
                }
                Err(miss) => {
                    if miss == Miss::Refused {
                        ObjectCounters::add(&c.cache_rejected, 1);
                    }
                    ObjectCounters::add(&c.cache_misses, 1);
                    fetch.push((i, slot));
                }
            }
        }
        fetch
    }

    /// Writes the disk cache's noted hit times on the runtime's blocking
    /// threads, when a batch is `due`.
    fn touches_due(self: &Arc<Self>, due: bool) {
        if due {
            let sh = self.clone();
            self.handle.spawn_blocking(move || {
                if let Some(c) = &sh.cache {
                    c.flush_touches();
                }
            });
        }
    }

    /// Starts GETs for `blocks` (ascending), adjacent ones merged up to
    /// the largest request.
    fn start(self: &Arc<Self>, blocks: Vec<(u64, Arc<Slot>)>, ahead: bool) {
        let per = (self.client.cfg.max_request / self.client.cfg.block).max(1) as usize;
        let mut run: Vec<(u64, Arc<Slot>)> = Vec::new();
        for (i, s) in blocks {
            if run.last().is_some_and(|l| l.0 + 1 != i) || run.len() == per {
                self.spawn(std::mem::take(&mut run), ahead);
            }
            run.push((i, s));
        }
        if !run.is_empty() {
            self.spawn(run, ahead);
        }
    }

    fn spawn(self: &Arc<Self>, run: Vec<(u64, Arc<Slot>)>, ahead: bool) {
        let sh = self.clone();
        let start = self.block_range(run[0].0).start;
        let end = self.block_range(run[run.len() - 1].0).end;
        let block = self.client.cfg.block;
        let queued = Instant::now();
        self.handle.spawn(async move {
            let _guess = match ahead {
                true => sh.ahead_limit.acquire().await.ok(),
                false => None,
            };
            let got = match sh.limit.acquire().await {
                Ok(_permit) => match sh.broken(queued) {
                    Some(e) => Err(e),
                    None => sh.client.fetch(start, end, block, &sh.etag).await,
                },
                Err(_) => Err(ObjectError::Client {
                    url: sh.client.url.to_string(),
                    detail: "the source is closing".into(),
                }),
            };
            match got {
                Ok(pieces) => {
                    // Counted as pending writes before any reader sees
                    // them: a program that waits for the writes once its
                    // reads are done waits for these.
                    let ticket = sh
                        .cache
                        .is_some()
                        .then(|| WriteTicket::new(&sh, pieces.len() as u64));
                    let mut put = Vec::with_capacity(pieces.len());
                    for ((i, slot), data) in run.into_iter().zip(pieces) {
                        let data = Arc::new(data);
                        slot.set(State::Ready(data.clone()));
                        put.push((i, data));
                    }
                    if let Some(t) = ticket {
                        sh.write_behind(put, t).await;
                    }
                }
                Err(e) => {
                    let mut b = sh.broken.lock();
                    if !b
                        .as_ref()
                        .is_some_and(|(_, old)| matches!(old, ObjectError::Changed { .. }))
                    {
                        *b = Some((Instant::now(), e.clone()));
                    }
                    drop(b);
                    let mut t = sh.table.lock();
                    for (i, slot) in run {
                        if t.get(&i).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                            t.remove(&i);
                        }
                        slot.set(State::Failed(e.clone()));
                    }
                }
            }
        });
    }

    /// Writes fetched `blocks` (counted in `ticket`) to the disk cache on
    /// the runtime's blocking threads, off the async threads that drive
    /// the GETs and off the reader's. At most [`WRITE_BEHIND`] blocks wait
    /// to be written: past that the fetch waits (without a thread) for
    /// room, so a slow disk slows the fetches instead of growing memory.
    async fn write_behind(
        self: &Arc<Self>,
        blocks: Vec<(u64, Arc<Vec<u8>>)>,
        mut ticket: WriteTicket,
    ) {
        let n = blocks.len().min(WRITE_BEHIND) as u32;
        let Ok(permit) = self.writes.clone().acquire_many_owned(n).await else {
            return;
        };
        let sh = self.clone();
        self.handle.spawn_blocking(move || {
            if let Some(c) = &sh.cache {
                for (i, d) in blocks {
                    if sh.give_up.load(Ordering::Relaxed) {
                        break;
                    }
                    ticket.done(c.put(i, &d).is_ok());
                }
            }
            drop(permit);
            // Blocks not written (given up) are counted as abandoned.
            drop(ticket);
        });
    }

    /// The failure a read or fetch started at `since` meets without asking
    /// the store: a changed object, or a failure after `since` or within
    /// the cool-down.
    fn broken(&self, since: Instant) -> Option<ObjectError> {
        let b = self.broken.lock();
        let (at, e) = b.as_ref()?;
        let cool = self.client.cfg.deadline.max(Duration::from_secs(1));
        (matches!(e, ObjectError::Changed { .. }) || *at > since || at.elapsed() < cool)
            .then(|| e.clone())
    }
}

/// Drops a reference to a runtime; the last one shuts it down without
/// waiting for the fetches in flight (which are abandoned).
pub(super) fn shut_down(rt: Arc<tokio::runtime::Runtime>) {
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown_background();
    }
}

/// The block table of one source.
pub(super) struct Blocks {
    shared: Arc<Shared>,
    /// Its runtime: its own, or shared with the sources of one object tree.
    rt: Option<Arc<tokio::runtime::Runtime>>,
    /// One past the last block a read asked for, and how many reads in a
    /// row continued the one before: sequential detection.
    next: AtomicU64,
    streak: AtomicU32,
    /// One past the last block read ahead (0: none yet).
    frontier: AtomicU64,
}

impl Drop for Blocks {
    fn drop(&mut self) {
        // Blocks fetched and not yet in the disk cache are written first
        // (a local disk: bounded all the same), so that the next run finds
        // every block this one fetched. Past the bound, the writes not
        // started are given up and counted.
        if self.shared.pending.wait(CACHE_WRITE_BOUND) > 0 {
            self.shared.give_up.store(true, Ordering::Relaxed);
        }
        // Fetches in flight are abandoned, never waited for (a block whose
        // GET ends now is not written either: its ticket is dropped with
        // the task, counted as abandoned).
        if let Some(rt) = self.rt.take() {
            shut_down(rt);
        }
    }
}

impl Blocks {
    /// The blocks of the version `etag` (of `size` bytes) that `client`
    /// reads, through `cache`, fetched on `rt`.
    pub fn new(
        client: Client,
        cache: Option<ChunkCache>,
        etag: String,
        size: u64,
        rt: Arc<tokio::runtime::Runtime>,
    ) -> Blocks {
        let permits = client.cfg.concurrency;
        Blocks {
            shared: Arc::new(Shared {
                client,
                cache,
                etag,
                size,
                table: Mutex::new(HashMap::new()),
                tick: AtomicU64::new(1),
                limit: tokio::sync::Semaphore::new(permits),
                ahead_limit: tokio::sync::Semaphore::new(permits.saturating_sub(1).max(1)),
                handle: rt.handle().clone(),
                writes: Arc::new(tokio::sync::Semaphore::new(WRITE_BEHIND)),
                pending: Pending::new(),
                give_up: AtomicBool::new(false),
                broken: Mutex::new(None),
            }),
            rt: Some(rt),
            next: AtomicU64::new(u64::MAX),
            streak: AtomicU32::new(0),
            frontier: AtomicU64::new(0),
        }
    }

    /// A HEAD of the object now, on the source's runtime.
    pub fn head(&self) -> Result<super::client::Head, ObjectError> {
        match &self.rt {
            Some(rt) => rt.block_on(self.shared.client.head()),
            None => unreachable!("the runtime lives as long as the blocks"),
        }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    fn block(&self) -> u64 {
        self.shared.client.cfg.block
    }

    fn nblocks(&self) -> u64 {
        self.shared.size.div_ceil(self.block())
    }

    fn block_range(&self, i: u64) -> Range<u64> {
        let b = self.block();
        i * b..((i + 1) * b).min(self.shared.size)
    }

    /// Copies `buf.len()` bytes at `offset` (within the object) from the
    /// blocks, fetching what is missing. Every wait is bounded.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ObjectError> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(e) = self.shared.broken(Instant::now()) {
            return Err(e);
        }
        let b = self.block();
        let first = offset / b;
        let last = (offset + buf.len() as u64 - 1) / b;
        // The part of `buf` block `i` fills, and where in the block it starts.
        let end = offset + buf.len() as u64;
        let part = |i: u64| {
            let r = self.block_range(i);
            let from = offset.max(r.start);
            let to = end.min(r.end);
            (
                (from - offset) as usize..(to - offset) as usize,
                from - r.start,
            )
        };
        // Blocks not in memory that the disk cache holds are read from it
        // straight into `buf`; the rest are claimed, a run at a time.
        let mut runs: Vec<Range<u64>> = Vec::new();
        for i in first..=last {
            let (dst, at) = part(i);
            if self.read_cached(i, &mut buf[dst], at) {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        let claimed: Vec<(Range<u64>, Vec<Arc<Slot>>)> = runs
            .into_iter()
            .map(|r| (r.clone(), self.claim(r, false)))
            .collect();
        self.ahead(first, last);
        let deadline = Instant::now() + self.shared.client.cfg.worst_case();
        for (range, slots) in claimed {
            for (i, slot) in range.zip(slots) {
                let data = self.wait(&slot, i, deadline)?;
                let (dst, at) = part(i);
                let n = dst.len();
                buf[dst].copy_from_slice(&data[at as usize..at as usize + n]);
            }
        }
        Ok(())
    }

    /// Fills `dst` from `at` in block `i` from the disk cache, when the
    /// block is not in memory (held, or being fetched) and the cache holds
    /// it whole and right in the pages read. False: claim it.
    fn read_cached(&self, i: u64, dst: &mut [u8], at: u64) -> bool {
        let sh = &self.shared;
        let Some(cache) = &sh.cache else {
            return false;
        };
        if sh.table.lock().contains_key(&i) {
            return false;
        }
        let r = self.block_range(i);
        let c = &sh.client.counters;
        match cache.read(i, (r.end - r.start) as usize, at as usize, dst) {
            Ok(due) => {
                ObjectCounters::add(&c.cache_hits, 1);
                sh.touches_due(due);
                true
            }
            Err(Miss::Refused) => {
                ObjectCounters::add(&c.cache_rejected, 1);
                false
            }
            Err(Miss::Absent) => false,
        }
    }

    /// Sequential reads start fetching the next blocks: from the second
    /// read in a row that continues the last, a window that doubles with
    /// each such read, up to the readahead.
    fn ahead(&self, first: u64, last: u64) {
        let prev = self.next.swap(last + 1, Ordering::Relaxed);
        let max = self.shared.client.cfg.readahead / self.block();
        // Near where the last read ended, or right after a block used
        // lately: the engine's own readahead runs on several threads, so a
        // stream's reads arrive out of order.
        let seq = (prev != u64::MAX && first + SEQ_SLACK >= prev && first <= prev + 1)
            || (first > 0 && self.used_lately(first - 1));
        if !seq {
            self.streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if max == 0 || streak < 2 {
            return;
        }
        let window = (2u64 << streak.min(20)).min(max);
        let nblocks = self.nblocks();
        let end = (last + 1 + window).min(nblocks);
        if last + 1 >= end {
            return;
        }
        // New blocks are read ahead a whole request at a time (up to
        // `max_request`), not a read's worth at a time: a stream costs the
        // store a quarter of the GETs of 1 MiB pieces. Until a request's
        // worth is free, the window is claimed only up to the last block
        // read ahead, which keeps the blocks waiting there recently used.
        let per = (self.shared.client.cfg.max_request / self.block()).max(1);
        // A frontier outside the window is another stream's (or one the
        // reader left): this one starts from its read.
        let f = self.frontier.load(Ordering::Relaxed);
        let front = if f > last + 1 && f <= end {
            f
        } else {
            last + 1
        };
        let unit = per.min(window.div_ceil(2));
        let to = if end >= front + unit || end == nblocks {
            self.frontier.store(end, Ordering::Relaxed);
            end
        } else {
            front
        };
        if last + 1 < to {
            self.claim(last + 1..to, true);
        }
    }

    /// Whether block `i` is in memory and was asked for in the last
    /// [`LATELY`] claims.
    fn used_lately(&self, i: u64) -> bool {
        let now = self.shared.tick.load(Ordering::Relaxed);
        let t = self.shared.table.lock();
        t.get(&i)
            .is_some_and(|s| now.saturating_sub(s.used.load(Ordering::Relaxed)) <= LATELY)
    }

    /// The slots of `range`, claiming and starting what nobody holds.
    /// `ahead`: a guess; skip when memory is short.
    fn claim(&self, range: Range<u64>, ahead: bool) -> Vec<Arc<Slot>> {
        let sh = &self.shared;
        let tick = sh.tick.fetch_add(1, Ordering::Relaxed);
        let cap = (sh.client.cfg.memory / self.block()).max(range.end - range.start + 8);
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut mine = Vec::new();
        {
            let mut t = sh.table.lock();
            // Room first: drop blocks read already (least recently used).
            // A guess that still finds no room (all in flight) is skipped.
            let new = range.clone().filter(|i| !t.contains_key(i)).count() as u64;
            if t.len() as u64 + new > cap {
                evict(&mut t, cap.saturating_sub(new), &range);
            }
            if ahead && t.len() as u64 + new > cap {
                return out;
            }
            for i in range.clone() {
                let slot = t
                    .entry(i)
                    .or_insert_with(|| {
                        mine.push(i);
                        Slot::new()
                    })
                    .clone();
                if mine.last().is_none_or(|&m| m != i) {
                    ObjectCounters::add(&sh.client.counters.memory_hits, u64::from(!ahead));
                }
                slot.used.store(tick, Ordering::Relaxed);
                out.push(slot);
            }
        }
        let mine: Vec<(u64, Arc<Slot>)> = range
            .clone()
            .zip(out.iter())
            .filter(|(i, _)| mine.contains(i))
            .map(|(i, s)| (i, s.clone()))
            .collect();
        if mine.is_empty() {
            return out;
        }
        if ahead && sh.cache.is_some() {
            // A guess reads the disk cache off the reader's thread, a few
            // blocks per blocking thread so that a request's worth (16
            // blocks) loads in parallel; what the cache lacks is gathered
            // and fetched by the last of them, merged into large GETs.
            let parts = mine.len().div_ceil(CACHE_LOAD_GROUP);
            let missing = Arc::new(Mutex::new((parts, Vec::new())));
            let mut mine = mine.into_iter().peekable();
            while mine.peek().is_some() {
                let part: Vec<_> = mine.by_ref().take(CACHE_LOAD_GROUP).collect();
                let (s2, m) = (sh.clone(), missing.clone());
                sh.handle.spawn_blocking(move || {
                    let lacked = s2.from_cache(part);
                    let mut g = m.lock();
                    g.0 -= 1;
                    g.1.extend(lacked);
                    if g.0 == 0 {
                        let mut all = std::mem::take(&mut g.1);
                        drop(g);
                        all.sort_unstable_by_key(|b| b.0);
                        s2.start(all, true);
                    }
                });
            }
        } else {
            sh.load(mine, ahead);
        }
        out
    }

    /// Waits for `slot` (block `i`) until it is ready or failed, at most
    /// until `deadline`.
    fn wait(&self, slot: &Slot, i: u64, deadline: Instant) -> Result<Arc<Vec<u8>>, ObjectError> {
        let mut s = slot.state.lock();
        loop {
            match &*s {
                State::Ready(d) => return Ok(d.clone()),
                State::Failed(e) => return Err(e.clone()),
                State::Pending => {
                    if slot.cv.wait_until(&mut s, deadline).timed_out() {
                        let c = &self.shared.client;
                        let r = self.block_range(i);
                        let e = ObjectError::Failed {
                            url: c.url.to_string(),
                            endpoint: c.endpoint.clone(),
                            start: r.start,
                            end: r.end,
                            attempts: c.cfg.retries + 1,
                            deadline_ms: c.cfg.deadline.as_millis() as u64,
                            detail: "no answer within every attempt's deadline".into(),
                        };
                        c.counters.failed(e.to_string());
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Drops the least recently used ready (or failed) blocks outside `keep`
/// until the table holds at most `cap`.
fn evict(t: &mut HashMap<u64, Arc<Slot>>, cap: u64, keep: &Range<u64>) {
    let mut ready: Vec<(u64, u64)> = t
        .iter()
        .filter(|(i, s)| !keep.contains(i) && !matches!(*s.state.lock(), State::Pending))
        .map(|(i, s)| (s.used.load(Ordering::Relaxed), *i))
        .collect();
    ready.sort_unstable();
    let over = (t.len() as u64).saturating_sub(cap) as usize;
    for (_, i) in ready.into_iter().take(over) {
        t.remove(&i);
    }
}
