//! A lazy shadow: a sized, empty memfd filled chunk by chunk on first touch.
//!
//! How a byte reaches a consumer (docs/design.md, docs/security.md):
//! 1. Every consumer range is registered for MISSING *and* MINOR faults, so
//!    no page of the memfd is mapped into it without a fault, whether or not
//!    the page is in the page cache already.
//! 2. A fault on an unfilled chunk claims it ([`ChunkTable`]), reads the
//!    source straight into the memfd through `alias`, an unregistered
//!    writable mapping made before sealing, publishes the chunk `Filled`, and
//!    maps it into every consumer range with `UFFDIO_CONTINUE` (which also
//!    wakes the waiting threads); bad pages are poisoned instead.
//! 3. A fault on a filled chunk is answered with `UFFDIO_CONTINUE` at once.
//!
//! Only the engine decides what is `Filled`, and it writes every byte of a
//! chunk before publishing it. A page another process planted in the memfd
//! (`fallocate`, or an unregistered touch that leaves a zero page) is
//! overwritten by the fill like any other; until then every consumer range
//! faults on it. After `F_SEAL_FUTURE_WRITE|GROW|SHRINK` nobody but the
//! alias can change a page, and `PUNCH_HOLE` is refused, so a filled page
//! stays what the source held.

mod consumers;
mod fill;
mod readahead;
mod user;
mod workset;

pub(crate) use user::User;

use crate::config::{Config, StalePolicy};
use crate::error::{Cause, Error, Result};
use crate::fault::chunks::{ChunkState, ChunkTable};
use crate::fault::{Core, Direct, FaultTarget, Hit, Service, Space, Why, Work, buffer};
use crate::source::{Source, SourceMeta};
use crate::stats::Counters;
use crate::sys::memfd::{LAZY_SEALS, Memfd};
use crate::sys::mmap::RawMap;
use crate::sys::{Advice, Uffd, UncheckedAdvice};
use consumers::{Consumer, Consumers, Waiter, space_key, uffd_key};
use fill::BadRange;
use parking_lot::{Condvar, Mutex, RwLock};
use readahead::Readahead;
use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub(crate) struct LazyShadow {
    pub name: String,
    pub source: Arc<dyn Source>,
    pub meta: SourceMeta,
    pub memfd: Memfd,
    pub size: u64,
    pub chunk: u64,
    stale: StalePolicy,
    /// The engine's writable `MAP_SHARED` mapping of the whole memfd, made
    /// before sealing and never registered: the only way bytes get into the
    /// memfd. Written only by the thread that claimed a chunk.
    alias: Option<RawMap>,
    /// A `PROT_NONE` `MAP_SHARED` mapping made before sealing, never
    /// registered, which shared consumer mappings are duplicated from (a
    /// fresh shared mapping of a sealed memfd lacks `VM_MAYWRITE` and cannot
    /// be registered).
    template: Option<RawMap>,
    chunks: ChunkTable,
    /// Pages that could not be filled, with the reason.
    bad: Mutex<BTreeMap<u64, Cause>>,
    /// Consumer ranges to map and poison into, local and remote.
    consumers: RwLock<Consumers>,
    next_id: AtomicU64,
    /// Poison markers left by budget refusals in this process's consumer
    /// ranges: (consumer id, address, length), dropped once memory is free.
    refused: Mutex<Vec<(u64, u64, u64)>>,
    /// Why the last demand fill was refused, for `populate`.
    refused_cause: Mutex<Option<Cause>>,
    done_lock: Mutex<()>,
    done_cv: Condvar,
    /// Faults that wait on a chunk being filled: chunk → (the range's
    /// userfaultfd, [`space_key`], faulting address). Of other processes'
    /// ranges, only these are answered when a fill ends; a remote range
    /// nobody waits in gets its pages on its own MINOR faults. So a client
    /// that attaches many ranges of one file costs fills nothing until it
    /// faults in them (its own threads, one message each). This process's
    /// ranges are all answered, but a direct fill's range only where a
    /// fault waits: the pages the fill put there may be gone again (the
    /// woken thread discarded them with `MADV_DONTNEED`) before the chunk
    /// is published.
    waiters: Mutex<BTreeMap<u64, Vec<Waiter>>>,
    readahead: Mutex<Readahead>,
    pub counters: Counters,
    resident: AtomicU64,
    changed: AtomicBool,
    /// Set once `open` registered the alias and the template. Until then a
    /// fault message naming them is stale (of the ranges that were at
    /// those addresses before): it is woken, never filled. A fill then
    /// would find the alias unregistered and record its pages as bad.
    ready: AtomicBool,
    /// When [`LazyShadow::check_changed_lately`] last read the metadata
    /// ([`Core::now`]; 0: never).
    checked_at: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub service: Arc<Service>,
    /// Its working set: recording and replay (docs/worksets.md).
    workset: Option<workset::Workset>,
    me: Weak<LazyShadow>,
    /// Owners and mappings holding it ([`User`]).
    users: user::Users,
    /// Must stay the last field: set once every other one has dropped.
    gone: user::Gone,
}

/// A consumer range's registration with the engine's userfaultfd;
/// unregisters on drop what is still its own (see [`Registration::release`]).
pub(crate) struct Registration {
    shadow: User,
    start: u64,
    len: u64,
    /// Key of its region ([`Core::add_region`]).
    owner: u64,
    /// The process that registered it: a forked child's copy of this
    /// handle must not touch the parent's registration (userfaultfd
    /// ioctls act on the address space that made the userfaultfd).
    pid: u32,
    released: bool,
}

impl Registration {
    /// Unregisters and forgets the parts of the range that are still this
    /// registration's, and returns them. A part the consumer moved away or
    /// unmapped itself (the kernel's events said so) is not returned: what
    /// lies at that address now is not ours to unmap. In a forked child,
    /// nothing is done and nothing returned.
    pub fn release(mut self) -> Vec<(u64, u64)> {
        self.release_now()
    }

    fn release_now(&mut self) -> Vec<(u64, u64)> {
        if std::mem::replace(&mut self.released, true) || std::process::id() != self.pid {
            return Vec::new();
        }
        let core = &self.shadow.service.core;
        // The events of the consumer's own munmap or mremap of the range may
        // have been read but not applied yet (the kernel lets the caller go
        // on when they are read): applied first, so that what is returned
        // is what is still the range's.
        core.sync_events();
        let parts = core.release_owned(self.owner, self.start, self.len);
        for &(a, l) in &parts {
            let _ = core.uffd.unregister(a, l);
            self.shadow.cut_consumers(0, a, a + l);
        }
        parts
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release_now();
    }
}

const STALE_BEFORE: Cause = Cause::SourceChanged { during_fill: false };
const STALE_DURING: Cause = Cause::SourceChanged { during_fill: true };

/// Bytes read and installed at once by prefetch, populate and materialize,
/// and mapped at once into a consumer range that faults on filled chunks.
pub(crate) const RUN_BYTES: u64 = 1 << 20;

/// Runs copied from a source's mapping above this size have its pages
/// mapped first ([`LazyShadow::copy_mapped`]).
const POPULATE_OVER: u64 = 64 << 10;

/// How often, at most, a `detect` shadow's fills read the source's
/// metadata when nothing depends on the answer (ns).
const DETECT_EVERY: u64 = 1_000_000;

/// The work item of a working-set replay step ([`LazyShadow::replay_step`]
/// keeps its place itself).
fn replay_work() -> Work {
    Work {
        chunks: 0..0,
        why: Why::Replay,
        direct: None,
    }
}

/// How many chunks make one run.
pub(crate) fn run_chunks(chunk: u64) -> u64 {
    (RUN_BYTES / chunk).max(1)
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// A `PROT_NONE` `MAP_SHARED` mapping of the whole memfd (so that
/// `mlockall(MCL_FUTURE)` does not populate it), excluded from `fork`
/// children.
fn whole_shared(memfd: &Memfd, len: usize) -> Result<RawMap> {
    let m = RawMap::new(memfd.as_fd(), 0, len, libc::PROT_NONE, libc::MAP_SHARED)
        .map_err(|e| Error::sys("mmap lazy memfd", e))?;
    m.advise(Advice::DontFork)
        .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
    Ok(m)
}

impl LazyShadow {
    /// Creates the sparse memfd and its alias and template mappings,
    /// registers both, then seals the memfd. Nothing is read from the source.
    pub fn open(
        service: Arc<Service>,
        source: Arc<dyn Source>,
        meta: SourceMeta,
        cfg: &Config,
    ) -> Result<Arc<LazyShadow>> {
        let name = source.name();
        let size = meta.size;
        let ws = if cfg.workset == crate::config::WorksetMode::Off {
            None
        } else {
            let id = catch_unwind(AssertUnwindSafe(|| source.identity()))
                .ok()
                .flatten();
            Some(workset::Workset::open(cfg, id, cfg.chunk_size, size))
        };
        let (ws, discarded) = ws.map_or((None, false), |o| (o.workset, o.discarded));
        let memfd = Memfd::create(&name, size)?;
        let core = &service.core;
        let chunk = cfg.chunk_size;
        let nchunks = size.div_ceil(chunk);
        let (alias, template) = if size > 0 {
            let len = round_up(size, core.page) as usize;
            (
                Some(whole_shared(&memfd, len)?),
                Some(whole_shared(&memfd, len)?),
            )
        } else {
            (None, None)
        };
        let shadow = Arc::new_cyclic(|me| LazyShadow {
            name,
            source,
            meta,
            memfd,
            size,
            chunk,
            stale: cfg.stale,
            alias,
            template,
            chunks: ChunkTable::new(nchunks),
            bad: Mutex::new(BTreeMap::new()),
            consumers: RwLock::new(Consumers::default()),
            next_id: AtomicU64::new(1),
            refused: Mutex::new(Vec::new()),
            refused_cause: Mutex::new(None),
            done_lock: Mutex::new(()),
            done_cv: Condvar::new(),
            waiters: Mutex::new(BTreeMap::new()),
            readahead: Mutex::new(Readahead::new(
                cfg.readahead / chunk,
                run_chunks(chunk),
                nchunks,
            )),
            counters: Counters::default(),
            resident: AtomicU64::new(0),
            changed: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            checked_at: AtomicU64::new(0),
            last_error: Mutex::new(None),
            service: service.clone(),
            workset: ws,
            me: me.clone(),
            users: user::Users::default(),
            gone: user::Gone::new(),
        });
        if let (Some(alias), Some(template)) = (&shadow.alias, &shadow.template) {
            // Both are registered, and in the region table, so that an
            // access that ignores their protection (/proc/PID/mem,
            // process_vm_readv) is served like a consumer's fault instead of
            // reading a hole as zeros. The alias is registered for MISSING
            // faults only: the fill makes its pages present before writing
            // them, so its own writes never fault.
            let len = round_up(size, core.page);
            let (a, t) = (alias.addr(), template.addr());
            // Events from before these addresses were ours must not cut
            // them out (see `LazyShadow::claim`).
            core.sync_events();
            core.add_region(a, len, 0, true, true, shadow.target());
            core.add_region(t, len, 0, true, true, shadow.target());
            core.uffd
                .register_missing(a, len)
                .map_err(|e| Error::sys("UFFDIO_REGISTER of the fill alias", e))?;
            core.uffd
                .register(t, len)
                .map_err(|e| Error::sys("UFFDIO_REGISTER of the template mapping", e))?;
            // SAFETY: the alias was just made; nothing refers into it.
            unsafe { alias.protect(libc::PROT_READ | libc::PROT_WRITE) }
                .map_err(|e| Error::sys("mprotect the fill alias writable", e))?;
        }
        // Sealed only now: F_SEAL_FUTURE_WRITE stops write(2) and new
        // writable mappings; the alias made before it keeps writing.
        shadow.memfd.add_seals(LAZY_SEALS)?;
        if let Ok(ino) = shadow.memfd.inode() {
            core.add_inode(ino, shadow.target());
        }
        shadow.ready.store(true, Ordering::Release);
        if discarded {
            workset::count(
                [&shadow.counters, &core.counters],
                |c| &c.workset_discarded,
                1,
            );
        }
        if let Some(ws) = &shadow.workset {
            if ws.has_plan() {
                // Chains of steps sharing one cursor: one per worker but
                // one (at most two), so that a worker is always free for
                // faults even while replay reads are slow.
                for _ in 0..cfg.workers.saturating_sub(1).clamp(1, 2) {
                    core.prefetch(shadow.target(), replay_work());
                }
            }
            if let Some(d) = ws.deadline() {
                workset::close_at(d, shadow.me.clone());
            }
        }
        Ok(shadow)
    }

    /// Notes that a consumer needed chunks `first..end` (a fault's answer
    /// mapped them, `populate` asked for them, or readahead filled them),
    /// for the working set.
    fn need(&self, core: &Core, first: u64, end: u64) {
        let Some(ws) = &self.workset else {
            return;
        };
        let n = ws.need(first, end);
        let both = [&self.counters, &core.counters];
        workset::count(both, |c| &c.workset_recorded, n.recorded);
        workset::count(both, |c| &c.workset_hits, n.hits);
        workset::count(both, |c| &c.workset_used, n.hits);
        if n.diverged {
            workset::count(both, |c| &c.workset_diverged, 1);
        }
        if let Some(r) = n.store {
            // The window closed: stored off the fault path.
            let dir = ws.dir();
            let _ = std::thread::Builder::new()
                .name("shadowfd-workset".into())
                .spawn(move || {
                    let _ = workset::store_in(&dir, &r);
                });
        }
    }

    /// Ends the working-set recording now and stores the record (see
    /// [`crate::Shadow::save_workset`]).
    pub fn save_workset(&self) -> std::io::Result<Option<std::path::PathBuf>> {
        match &self.workset {
            Some(ws) => match ws.finish() {
                Some(r) => ws.store(&r).map(Some),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Recorded chunks the replay has still to look at (0 once it ended
    /// or stopped).
    pub fn workset_pending(&self) -> u64 {
        match &self.workset {
            Some(ws) if ws.replaying() && !self.users.none() => {
                (ws.plan().len() - ws.done.load(Ordering::Acquire).min(ws.plan().len())) as u64
            }
            _ => 0,
        }
    }

    /// Notes bytes `offset..offset+len` asked for by `populate` or
    /// `read_at`, for the working set.
    pub fn need_bytes(&self, offset: u64, len: u64) {
        if self.workset.is_none() || len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let (first, last) = (offset / self.chunk, (end - 1) / self.chunk);
        self.need(&self.service.core, first, last + 1);
    }

    /// One step of the working-set replay: takes the next recorded chunks
    /// (at most [`workset::STEP_CHUNKS`]) from the shared cursor and fills
    /// them in recorded order, consecutive ones in runs, as speculative
    /// fills (the budget's first half only), then queues the next step
    /// behind whatever faults wait. Each fill
    /// maps its chunks into every consumer range of this process
    /// ([`LazyShadow::answer_all`]), ahead of the touch. Stops for good at
    /// the first fill the budget refuses, or once the run diverged.
    fn replay_step(&self, core: &Core) {
        let Some(ws) = &self.workset else {
            return;
        };
        let plan = ws.plan();
        let mut pos = ws
            .cursor
            .fetch_add(workset::STEP_CHUNKS, Ordering::AcqRel)
            .min(plan.len());
        let start = pos;
        let step_end = (pos + workset::STEP_CHUNKS).min(plan.len());
        let run = run_chunks(self.chunk);
        while pos < step_end {
            if !ws.replaying() {
                return;
            }
            let c = plan[pos];
            let mut e = c + 1;
            pos += 1;
            while pos < step_end && plan[pos] == e && e - c < run {
                e += 1;
                pos += 1;
            }
            let mut x = c;
            while x < e {
                let Some(r) = self.chunks.claim_run(x, e) else {
                    x += 1;
                    continue;
                };
                x = r.end;
                self.fill(core, r.clone(), Why::Replay);
                if self.chunks.get(r.start) != ChunkState::Filled {
                    // Given back: the budget has no room for more.
                    ws.stop();
                    return;
                }
                self.note_replayed(core, ws, r);
            }
        }
        ws.done.fetch_add(step_end - start, Ordering::AcqRel);
        if step_end < plan.len() && ws.replaying() {
            core.prefetch(self.target(), replay_work());
        }
    }

    /// Counts the chunks of `run` the replay filled, and those of them
    /// its fill mapped into a consumer range of this process.
    fn note_replayed(&self, core: &Core, ws: &workset::Workset, run: Range<u64>) {
        let (off, end) = self.run_range(&run);
        let shown = self
            .consumers
            .read()
            .local()
            .iter()
            .any(|m| m.overlap(off, end).is_some());
        let both = [&self.counters, &core.counters];
        for c in run {
            if ws.replayed(c) {
                workset::count(both, |x| &x.workset_replayed, 1);
            }
            if shown && ws.used(c) {
                workset::count(both, |x| &x.workset_mapped_ahead, 1);
                workset::count(both, |x| &x.workset_used, 1);
            }
        }
    }

    /// Maps the filled chunks of the new consumer range `start..start+len`
    /// (this process's, showing the shadow from `offset`) into it now,
    /// while a working set is replayed: what the replay filled before the
    /// range was made then costs no fault either. Only Filled chunks, and
    /// not their bad pages (those fault, and are poisoned then).
    fn map_ahead(&self, start: u64, len: u64, offset: u64) {
        let Some(ws) = self.workset.as_ref().filter(|w| w.has_plan()) else {
            return;
        };
        let core = &self.service.core;
        let page = core.page;
        let end_off = (offset + len).min(round_up(self.size, page));
        if end_off <= offset {
            return;
        }
        let bad = self.bad.lock().clone();
        let both = [&self.counters, &core.counters];
        let (first, last) = (offset / self.chunk, (end_off - 1) / self.chunk);
        let mut c = first;
        while c <= last {
            if self.chunks.get(c) != ChunkState::Filled {
                c += 1;
                continue;
            }
            let e = self.chunks.filled_until(c, last + 1);
            for x in c..e {
                if ws.used(x) {
                    workset::count(both, |k| &k.workset_mapped_ahead, 1);
                    workset::count(both, |k| &k.workset_used, 1);
                }
            }
            let a = (c * self.chunk).max(offset);
            let b = round_up((e * self.chunk).min(self.size), page).min(end_off);
            let mut at = a;
            for (&p, _) in bad.range(a..b) {
                if p > at {
                    let _ = core.uffd.continue_range(start + at - offset, p - at);
                }
                at = p + page;
            }
            if at < b {
                let _ = core.uffd.continue_range(start + at - offset, b - at);
            }
            c = e;
        }
    }

    fn target(&self) -> Weak<dyn FaultTarget> {
        self.me.clone()
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// Whether a fill has seen the source changed, or the source differs
    /// now: fills may have skipped their check
    /// ([`LazyShadow::check_changed_lately`]), so the source is read again
    /// here, and the answer covers every fill made before the call.
    pub fn source_changed(&self) -> bool {
        self.check_changed()
    }

    pub fn bad_pages(&self) -> BTreeMap<u64, Cause> {
        self.bad.lock().clone()
    }

    /// See [`crate::Shadow::unfillable_cause`].
    pub fn unfillable_cause(&self, offset: u64) -> Option<Cause> {
        let page = self.service.core.page;
        if let Some(c) = self.bad.lock().get(&(offset / page * page)) {
            return Some(c.clone());
        }
        // Not a bad page: the fill was refused for memory. By the time this
        // is asked (a SIGBUS handler's helper thread) another thread may be
        // filling the chunk again, once memory was given back; the refusal
        // is still why the page raised SIGBUS.
        let chunk = offset / self.chunk;
        if chunk < self.chunks.len() && self.chunks.get(chunk) != ChunkState::Filled {
            return self.refused_cause.lock().clone();
        }
        None
    }

    /// Whether every chunk is filled and no page is poisoned.
    pub fn fully_filled(&self) -> bool {
        self.chunks.all_filled() && self.bad.lock().is_empty()
    }

    /// Byte range of chunks `run`, clipped to the shadow's size.
    fn run_range(&self, run: &Range<u64>) -> (u64, u64) {
        (
            run.start * self.chunk,
            (run.end * self.chunk).min(self.size),
        )
    }

    /// Fills whatever chunks of `range` are still empty, in runs of at most
    /// `run_chunks`.
    fn fill_empty(&self, core: &Core, range: Range<u64>, run_chunks: u64, why: Why) {
        let mut c = range.start;
        while c < range.end {
            match self.chunks.claim_run(c, range.end.min(c + run_chunks)) {
                Some(run) => {
                    c = run.end;
                    self.fill(core, run, why);
                }
                None => c += 1,
            }
        }
    }

    fn record_error(&self, core_counters: &Counters, msg: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        core_counters.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(msg);
    }

    /// Compares the source with its recorded metadata; true if it changed.
    fn check_changed(&self) -> bool {
        self.check_source().0
    }

    /// [`LazyShadow::check_changed`] for a fill whose result does not
    /// depend on it (`detect`, and bytes read with `read_at`, whose short
    /// reads say where the source ends): the metadata is read at most once
    /// per [`DETECT_EVERY`] per shadow, so a stream of faults pays one
    /// `fstat` per millisecond, not one per fault. A change is seen by the
    /// first fill a millisecond after it, or by the next
    /// [`LazyShadow::source_changed`], whichever comes first; one undone
    /// within the millisecond may go unseen.
    fn check_changed_lately(&self, core: &Core) -> bool {
        if self.changed.load(Ordering::Relaxed) {
            return true;
        }
        let now = core.now();
        let last = self.checked_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < DETECT_EVERY {
            return false;
        }
        self.checked_at.store(now, Ordering::Relaxed);
        self.check_changed()
    }

    /// [`LazyShadow::check_changed`], with the source's size as just read
    /// (`None` if it was not read: a change was seen before, or the read
    /// failed).
    fn check_source(&self) -> (bool, Option<u64>) {
        if self.changed.load(Ordering::Relaxed) {
            return (true, None);
        }
        let (changed, size) = match self.source_meta() {
            Some(now) => (now != self.meta, Some(now.size)),
            None => (true, None),
        };
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
        (changed, size)
    }

    /// The source's fill metadata; `None` on an error or a panic (a
    /// panicking backend must not take a fault-service thread down).
    fn source_meta(&self) -> Option<SourceMeta> {
        catch_unwind(AssertUnwindSafe(|| self.source.fill_metadata()))
            .ok()?
            .ok()
    }

    /// The source's mapping ([`Source::mapped`]) and the end of the whole
    /// pages of the shadow it holds: a partial last page is read with
    /// `read_at`, so that its tail stays zero whatever the file holds there
    /// now.
    fn mapped_source(&self, page: u64) -> Option<(crate::source::Mapped, u64)> {
        let m = self.source.mapped()?;
        Some((m, self.size.min(m.len()) / page * page))
    }

    /// Installs what it can of `at..end` (page-aligned `at`) with one
    /// `UFFDIO_COPY` from the source's mapping into `dst` (`wake`: waking
    /// the threads waiting there). Returns where it stopped: `end` rounded
    /// down to a page or the mapping's end, or the first page the copy
    /// failed on (present already, or past the file's end now); the rest is
    /// for `read_at`.
    fn copy_mapped(&self, core: &Core, dst: u64, at: u64, end: u64, wake: bool) -> u64 {
        let Some((m, full)) = self.mapped_source(core.page) else {
            return at;
        };
        let stop = end.min(full);
        if stop <= at {
            return at;
        }
        if stop - at > POPULATE_OVER {
            // Maps the run's pages of the file in one call. Without it the
            // copy finds them unmapped every 16 pages (the kernel's
            // fault-around), drops its locks, faults them in and starts
            // again, which made 1 MiB fills slower than pread and copy. A
            // page past the file's end is an error here, not a signal; the
            // copy then stops there.
            let _ = crate::sys::mmap::madvise(
                (m.addr() + at) as *mut u8,
                (stop - at) as usize,
                libc::MADV_POPULATE_READ,
            );
        }
        // SAFETY: `dst..dst + (stop - at)` lies in a range registered with
        // the engine's userfaultfd (the caller's), and the source is only
        // read by the kernel: the mapping stays mapped while `self.source`
        // lives, and `at..stop` lies within it.
        match unsafe { core.uffd.copy_from(dst, m.addr() + at, stop - at, wake) } {
            Ok(()) => stop,
            Err((_, n)) => at + n,
        }
    }

    /// Reads `off..end` of the source piece by piece into this thread's
    /// bounded buffer and installs it in the memfd with `UFFDIO_COPY` into
    /// the alias. A page that is present already was planted by someone else
    /// (the chunk was never filled): it is overwritten through the alias and
    /// counted. A source that offers its bytes in memory is copied from
    /// there in one step instead, the buffer kept for what that copy cannot
    /// place. Returns the bytes read from the source, and the end of what
    /// was copied from its mapping (`off` if nothing was): the caller must
    /// check the source's size against it before anyone sees those pages
    /// ([`LazyShadow::recheck_mapped`]).
    fn read_and_install(
        &self,
        core: &Core,
        off: u64,
        end: u64,
        bad: &mut Vec<BadRange>,
    ) -> (u64, u64) {
        let alias = self
            .alias
            .as_ref()
            .expect("a non-empty shadow has an alias");
        let (mut good_bytes, mut mapped_end) = (0, off);
        let mut at = off;
        while at < end {
            let piece_end = end.min(at + buffer::PIECE as u64);
            let copied = self.copy_mapped(core, alias.addr() + at, at, piece_end, false);
            if copied > at {
                good_bytes += copied - at;
                mapped_end = copied;
            }
            if copied < piece_end {
                good_bytes += self.bounce(core, alias, copied, piece_end, bad);
            }
            at = piece_end;
        }
        (good_bytes, mapped_end)
    }

    /// Reads `at..end` (at most one buffer) into this thread's buffer and
    /// installs it through the alias; returns the bytes read.
    fn bounce(
        &self,
        core: &Core,
        alias: &RawMap,
        at: u64,
        end: u64,
        bad: &mut Vec<BadRange>,
    ) -> u64 {
        let page = core.page;
        let span = round_up(end - at, page);
        buffer::with(span as usize, |data| {
            let good = fill::read_chunk(&*self.source, data, at, end, page, self.size, bad);
            for &(a, b) in &good {
                let piece = &data[(a - at) as usize..(b - at) as usize];
                self.install(core, alias, piece, a, bad);
            }
            good.iter().map(|(a, b)| b - a).sum::<u64>()
        })
    }

    /// After pages `off..mapped_end` were copied from the source's mapping:
    /// if the source is now shorter (`size`, as just read; `None`: read it),
    /// the pages from its end on may have been copied after the cut, as
    /// zeros the source never held. They are read again with `read_at`,
    /// which finds the end of the data and poisons what is missing, exactly
    /// as a fill that started after the cut. Returns the bytes to take off
    /// the fill's count.
    fn recheck_mapped(
        &self,
        core: &Core,
        off: u64,
        mapped_end: u64,
        size: Option<u64>,
        bad: &mut Vec<BadRange>,
    ) -> u64 {
        if mapped_end <= off {
            return 0;
        }
        let size = size
            .or_else(|| self.source_meta().map(|m| m.size))
            .unwrap_or(0);
        if size >= mapped_end {
            return 0;
        }
        let alias = self
            .alias
            .as_ref()
            .expect("a non-empty shadow has an alias");
        let page = core.page;
        let mut at = (size / page * page).max(off);
        let mut lost = 0;
        while at < mapped_end {
            let e = mapped_end.min(at + buffer::PIECE as u64);
            lost += (e - at) - self.bounce(core, alias, at, e, bad);
            at = e;
        }
        lost
    }

    /// Where a fault's fill of `chunks` may go straight into the faulting
    /// range: a `MAP_SHARED` consumer range of this process that shows the
    /// whole run, for a run that fits in one fill buffer. `UFFDIO_COPY` into
    /// it puts the pages into the memfd and maps them there in one call, and
    /// wakes the faulting thread; the alias and `UFFDIO_CONTINUE` are then
    /// needed only for the other consumer ranges.
    fn direct_for(&self, core: &Core, hit: &Hit<'_>, chunks: &Range<u64>) -> Option<Direct> {
        if hit.internal || !std::ptr::eq(hit.uffd, &core.uffd) {
            return None;
        }
        let (off, end) = self.run_range(chunks);
        let end = round_up(end, core.page);
        if end - off > buffer::PIECE as u64 {
            return None;
        }
        let consumers = self.consumers.read();
        let m = consumers
            .local()
            .iter()
            .find(|m| m.shared && hit.addr >= m.start && hit.addr < m.end())?;
        (off >= m.offset && end <= m.offset + m.len).then(|| Direct {
            consumer: m.id,
            addr: m.start + off - m.offset,
        })
    }

    /// Reads `off..end` (at most one fill buffer) and installs it straight
    /// into the consumer range `d` with `UFFDIO_COPY`, which wakes the
    /// threads waiting there. The source's metadata is checked between the
    /// read and the copy, so that a strict shadow installs nothing a change
    /// may have torn, and a change is recorded before the faulting thread
    /// runs again. A page the copy cannot place there (present in the memfd
    /// already, or the range going away) goes through the alias with the
    /// rest of the run, for [`LazyShadow::answer_all`] to map. A run the
    /// source could not wholly give goes through the alias. `count` is
    /// called with the bytes read before the copy wakes anyone, so that a
    /// woken thread sees the fill in the statistics. Returns the bytes read,
    /// and `d`'s consumer if it holds every good page now.
    fn read_and_install_direct(
        &self,
        core: &Core,
        off: u64,
        end: u64,
        d: Direct,
        bad: &mut Vec<BadRange>,
        count: impl FnOnce(u64),
    ) -> (u64, Option<u64>) {
        let page = core.page;
        let alias = self
            .alias
            .as_ref()
            .expect("a non-empty shadow has an alias");
        let span = round_up(end - off, page);
        let strict = self.stale == StalePolicy::Strict;
        buffer::with(span as usize, |data| {
            let good = fill::read_chunk(&*self.source, data, off, end, page, self.size, bad);
            let changed = if strict {
                self.check_changed()
            } else {
                self.check_changed_lately(core)
            };
            if strict && changed {
                *bad = vec![(off, end, STALE_DURING)];
                return (0, None);
            }
            let good_bytes = good.iter().map(|(a, b)| b - a).sum::<u64>();
            let slice = |a: u64, b: u64| &data[(a - off) as usize..(b - off) as usize];
            // The read lock keeps the range mapped (it is removed from the
            // list before it is unmapped).
            let consumers = self.consumers.read();
            let m = consumers.local().iter().find(|m| m.id == d.consumer);
            let Some(m) = m.filter(|_| bad.is_empty()) else {
                drop(consumers);
                for &(a, b) in &good {
                    self.install(core, alias, slice(a, b), a, bad);
                }
                return (good_bytes, None);
            };
            count(good_bytes);
            let id = m.id;
            let mut left = Vec::new();
            for &(a, b) in &good {
                let piece = slice(a, b);
                // SAFETY: `d.addr + (a - off)..+piece.len()` lies in the
                // consumer range `m` (direct_for checked that it shows the
                // whole run), a shared mapping of the memfd registered with
                // the engine's userfaultfd and kept mapped by the read lock;
                // `piece` is this thread's heap buffer.
                if let Err((_, n)) = unsafe { core.uffd.copy_waking(d.addr + (a - off), piece) } {
                    left.push((a + n, b));
                }
            }
            // Through the alias what the copy could not place, without the
            // lock: installing may wait for the kernel's mapping events,
            // whose handling takes it.
            drop(consumers);
            for &(a, b) in &left {
                self.install(core, alias, slice(a, b), a, bad);
            }
            (good_bytes, left.is_empty().then_some(id))
        })
    }

    /// Installs `data` at shadow offset `off` (page-aligned).
    fn install(&self, core: &Core, alias: &RawMap, data: &[u8], off: u64, bad: &mut Vec<BadRange>) {
        let page = core.page as usize;
        let mut done = 0usize;
        let mut tries = 0u32;
        while done < data.len() {
            let dst = alias.addr() + off + done as u64;
            // SAFETY: the destination lies in the alias, registered with the
            // engine's userfaultfd; `data` is this thread's heap buffer.
            match unsafe { core.uffd.copy(dst, &data[done..]) } {
                Ok(()) => return,
                Err((e, n)) if e.raw_os_error() == Some(libc::EAGAIN) && tries < u32::MAX => {
                    // An event is pending on the engine's userfaultfd: read
                    // it (unless a worker does), give its sender time to go
                    // on, and copy the rest. Never a spin.
                    done += n as usize;
                    if !core.await_events(&mut tries) {
                        tries = u32::MAX;
                    }
                }
                Err((e, n)) => {
                    done += n as usize;
                    let p = off + done as u64;
                    let piece = &data[done..(done + page).min(data.len())];
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        // SAFETY: the page at `p` is present in the memfd
                        // (EEXIST), so writing it through the alias maps it
                        // without a userfault (the alias is registered for
                        // MISSING faults only); the chunk is claimed by this
                        // thread and no consumer range has been given it.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                piece.as_ptr(),
                                alias.as_ptr().add(p as usize),
                                piece.len(),
                            );
                        }
                        for ctr in [&self.counters, &core.counters] {
                            ctr.healed_pages.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        let cause = Cause::Allocate {
                            errno: e.raw_os_error(),
                            message: format!("UFFDIO_COPY into the memfd: {e}"),
                        };
                        bad.push((p, p + page as u64, cause));
                    }
                    done += piece.len();
                }
            }
        }
    }

    /// Fills the chunks `run`, which the caller has claimed (Filling), then
    /// publishes them and answers the consumer ranges
    /// ([`LazyShadow::answer_all`]): filled pages are mapped
    /// (`UFFDIO_CONTINUE`), bad ones poisoned. For prefetch, a full
    /// budget gives the chunks back (Empty) instead of poisoning them.
    fn fill(&self, core: &Core, run: Range<u64>, why: Why) {
        self.fill_into(core, run, why, None)
    }

    /// [`LazyShadow::fill`], straight into the faulting consumer range
    /// `direct` where it can ([`LazyShadow::direct_for`]).
    fn fill_into(&self, core: &Core, run: Range<u64>, why: Why, direct: Option<Direct>) {
        let r = catch_unwind(AssertUnwindSafe(|| {
            self.fill_claimed(core, run.clone(), why, direct)
        }));
        if r.is_err() {
            // A bug, not a source error (those are caught where the source
            // is called): the run's chunks are still claimed by this thread.
            // Resolve them as bad so that nobody waits on them for ever.
            for ctr in [&self.counters, &core.counters] {
                ctr.worker_panics.fetch_add(1, Ordering::Relaxed);
            }
            let still: Vec<u64> = run
                .clone()
                .filter(|&c| self.chunks.get(c) == ChunkState::Filling)
                .collect();
            if let (Some(&a), Some(&b)) = (still.first(), still.last()) {
                let (off, end) = self.run_range(&(a..b + 1));
                let bad = fill::bad_pages(&[(off, end, Cause::FillPanicked)], core.page);
                self.record_error(
                    &core.counters,
                    format!("{}: {}", self.name, Cause::FillPanicked),
                );
                {
                    let mut m = self.bad.lock();
                    for (p, c) in &bad {
                        m.insert(*p, c.clone());
                    }
                }
                for c in still {
                    self.chunks.publish(c..c + 1);
                }
                self.answer_all(core, off, round_up(end, core.page), &bad, None);
            }
        }
    }

    fn fill_claimed(&self, core: &Core, run: Range<u64>, why: Why, direct: Option<Direct>) {
        #[cfg(feature = "failpoints")]
        if let Some(at) = std::env::var("SHADOWFD_FAILPOINT_FILL_PANIC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let (off, end) = self.run_range(&run);
            assert!(
                !(off..end).contains(&at),
                "failpoint: a fill over offset {at}"
            );
        }
        // A replay step is as speculative as readahead.
        let prefetch = matches!(why, Why::Prefetch | Why::Replay);
        let readahead = why == Why::Prefetch;
        // A fault needs its first chunk; the rest of its run is a guess.
        let speculative = prefetch || (why == Why::Fault && run.end - run.start > 1);
        let t0 = std::time::Instant::now();
        let (off, end) = self.run_range(&run);
        let page = core.page;
        let span = round_up(end - off, page);
        let strict = self.stale == StalePolicy::Strict;
        let mut bad: Vec<BadRange> = Vec::new();
        let mut good_bytes = 0u64;
        let mut reserved = 0u64;
        // The consumer range every good page was installed in directly, and
        // whether the fill was counted already (before that woke anyone).
        let (mut mapped, mut accounted) = (None, false);
        if strict && self.check_changed() {
            bad.push((off, end, STALE_BEFORE));
        } else if let Err(cause) = core.reserve(span, speculative) {
            if !prefetch && run.end - run.start > 1 {
                // Give back all but the faulting chunk and try with that alone.
                let rest = run.start + 1..run.end;
                self.give_back(core, rest);
                let direct = direct.filter(|_| self.chunk <= buffer::PIECE as u64);
                return self.fill_into(core, run.start..run.start + 1, why, direct);
            }
            if prefetch {
                return self.give_back(core, run);
            }
            return self.refuse_for_now(core, run, cause);
        } else {
            reserved = span;
            match direct.filter(|_| span <= buffer::PIECE as u64) {
                Some(d) => {
                    let count = |good| {
                        self.account(core, &run, readahead, good, span, t0);
                        accounted = true;
                    };
                    (good_bytes, mapped) =
                        self.read_and_install_direct(core, off, end, d, &mut bad, count);
                }
                None => {
                    let mapped_end;
                    (good_bytes, mapped_end) = self.read_and_install(core, off, end, &mut bad);
                    let (changed, size) = self.check_source();
                    if strict && changed {
                        bad = vec![(off, end, STALE_DURING)];
                        good_bytes = 0;
                    } else {
                        good_bytes -= self.recheck_mapped(core, off, mapped_end, size, &mut bad);
                    }
                }
            }
        }
        let bad_pages = fill::bad_pages(&bad, page);
        if !bad_pages.is_empty() {
            let first = &bad_pages[0].1;
            self.record_error(&core.counters, format!("{}: {first}", self.name));
            let n = bad_pages.len() as u64;
            self.counters.poisoned_pages.fetch_add(n, Ordering::Relaxed);
            core.counters.poisoned_pages.fetch_add(n, Ordering::Relaxed);
            let mut b = self.bad.lock();
            for (p, r) in &bad_pages {
                b.insert(*p, r.clone());
            }
        }
        if !accounted {
            self.account(core, &run, readahead, good_bytes, reserved, t0);
        }
        // Publish before answering: a fault message read after this sees
        // Filled and is answered by whoever reads it.
        self.chunks.publish(run);
        self.answer_all(core, off, off + span, &bad_pages, mapped);
    }

    /// Counts a fill of `run` (`good` bytes read, `reserved` resident;
    /// `prefetch`: readahead).
    fn account(
        &self,
        core: &Core,
        run: &Range<u64>,
        prefetch: bool,
        good: u64,
        reserved: u64,
        t0: std::time::Instant,
    ) {
        self.resident.fetch_add(reserved, Ordering::Relaxed);
        let ns = t0.elapsed().as_nanos() as u64;
        let nchunks = run.end - run.start;
        for ctr in [&self.counters, &core.counters] {
            ctr.chunks_filled.fetch_add(nchunks, Ordering::Relaxed);
            ctr.bytes_filled.fetch_add(good, Ordering::Relaxed);
            if prefetch {
                ctr.readahead_chunks.fetch_add(nchunks, Ordering::Relaxed);
            }
            ctr.fill_latency.record(ns);
        }
    }

    /// A demand fill the memory budget has no room for: the faulting threads
    /// get SIGBUS now, but nothing is recorded as bad. The chunk goes back to
    /// Empty, so a later fault or `populate` fills it normally once memory is
    /// free; the poison markers left in this process's consumer ranges are
    /// dropped when the engine's memory is given back
    /// ([`FaultTarget::memory_freed`]). A consumer range in another process
    /// keeps its marker until some fill of the chunk maps it there: its
    /// fault stays recorded as waiting on the run's chunks (a marked page
    /// raises `SIGBUS` without a fault, so nothing else would record it).
    fn refuse_for_now(&self, core: &Core, run: Range<u64>, cause: Cause) {
        let (off, end) = self.run_range(&run);
        let end = round_up(end, core.page);
        self.record_error(&core.counters, format!("{}: {cause}", self.name));
        for ctr in [&self.counters, &core.counters] {
            ctr.budget_refusals.fetch_add(1, Ordering::Relaxed);
        }
        *self.refused_cause.lock() = Some(cause);
        self.chunks.release(run.clone());
        let waiting = self.take_waiters(off, end);
        {
            let mut refused = self.refused.lock();
            let consumers = self.consumers.read();
            for m in consumers.answering(off, end, &waiting).0 {
                if let Some((addr, len)) = m.overlap(off, end) {
                    let _ = m.uffd(&core.uffd).poison(addr, len);
                    if m.remote.is_none() {
                        refused.push((m.id, addr, len));
                    }
                }
            }
        }
        // A fault of this process that waits where no listed range says
        // (the list lags the kernel, see `answer_all`) is refused too,
        // rather than left waiting; its marker is not among those
        // `memory_freed` drops (that page raises SIGBUS until unmapped).
        // One in a listed range finds its marker there (`EEXIST`, woken).
        for w in waiting.iter().filter(|w| w.key == 0) {
            let _ = core.uffd.poison(w.addr, core.page);
        }
        // Remote faults stay recorded (their markers stay, see above); this
        // process's ranges are all answered when the chunks fill.
        let waiting: Vec<Waiter> = waiting.into_iter().filter(|w| w.key != 0).collect();
        if !waiting.is_empty() {
            let mut w = self.waiters.lock();
            for c in run {
                w.entry(c).or_default().extend_from_slice(&waiting);
            }
        }
        core.note_refusal(self.target());
        self.notify();
    }

    /// Returns claimed chunks to Empty and wakes whoever waits on them: they
    /// fault again and claim the chunks themselves.
    fn give_back(&self, core: &Core, run: Range<u64>) {
        let (off, end) = self.run_range(&run);
        self.chunks.release(run);
        let end = round_up(end, core.page);
        let waiting = self.take_waiters(off, end);
        let consumers = self.consumers.read();
        let (ranges, unlisted) = consumers.answering(off, end, &waiting);
        for m in ranges {
            if let Some((addr, len)) = m.overlap(off, end) {
                let _ = m.uffd(&core.uffd).wake(addr, len);
            }
        }
        // Waiting faults in no listed range (see `answer_all`): this
        // process's, and other processes' through the userfaultfd they
        // came on.
        for w in waiting.iter().filter(|w| w.key == 0) {
            let _ = core.uffd.wake(w.addr, core.page);
        }
        for w in unlisted {
            if let Some(u) = &w.uffd {
                let _ = u.wake(w.addr, core.page);
            }
        }
        drop(consumers);
        self.notify();
    }

    /// Takes the faults waiting on the chunks of bytes `a..b`. Called
    /// after those chunks left Filling, so that a fault that saw Filling
    /// under the lock ([`LazyShadow::wait_on`]) is always taken.
    fn take_waiters(&self, a: u64, b: u64) -> Vec<Waiter> {
        let (first, last) = (a / self.chunk, b.saturating_sub(1) / self.chunk);
        let mut w = self.waiters.lock();
        if w.is_empty() || b <= a {
            return Vec::new();
        }
        let keys: Vec<u64> = w.range(first..=last).map(|(&c, _)| c).collect();
        keys.into_iter()
            .filter_map(|c| w.remove(&c))
            .flatten()
            .collect()
    }

    /// Records a fault as waiting on `chunk` if it is still being filled;
    /// false if it is not (the caller looks at the chunk again). `remote`:
    /// the fault is not on the engine's own userfaultfd.
    fn wait_on(&self, chunk: u64, hit: &Hit<'_>, remote: bool) -> bool {
        let (key, uffd) = if remote {
            let key = uffd_key(hit.uffd);
            let consumers = self.consumers.read();
            let uffd = consumers
                .containing(key, hit.addr)
                .and_then(|m| m.remote.clone());
            (key, uffd)
        } else {
            (0, None)
        };
        let mut w = self.waiters.lock();
        if self.chunks.get(chunk) != ChunkState::Filling {
            return false;
        }
        w.entry(chunk).or_default().push(Waiter {
            key,
            addr: hit.addr,
            offset: hit.offset,
            uffd,
        });
        true
    }

    fn notify(&self) {
        let _g = self.done_lock.lock();
        self.done_cv.notify_all();
    }

    /// Maps filled bytes `a..b` into every consumer range of this process
    /// that shows them, and every remote one where a fault waits on them
    /// (waking its waiting threads), and poisons the bad pages there. The
    /// consumer range `mapped` has every good page of `a..b` already (a
    /// direct fill): only its bad pages are poisoned.
    fn answer_all(&self, core: &Core, a: u64, b: u64, bad: &[(u64, Cause)], mapped: Option<u64>) {
        let page = core.page;
        let waiting = self.take_waiters(a, b);
        let consumers = self.consumers.read();
        let (ranges, unlisted) = consumers.answering(a, b, &waiting);
        for m in ranges {
            let Some((addr, len)) = m.overlap(a, b) else {
                continue;
            };
            let uffd = m.uffd(&core.uffd);
            if mapped == Some(m.id) {
                for (p, _) in bad {
                    if (m.offset..m.offset + m.len).contains(p) {
                        let _ = uffd.poison(m.start + p - m.offset, page);
                    }
                }
                // A fault there came after the direct copy woke the range
                // (its page was discarded since, `MADV_DONTNEED`): it is
                // answered with the other waiters below.
                continue;
            }
            // Runs of good pages between the bad ones.
            let mut at = addr;
            let end = addr + len;
            let to_addr = |off: u64| m.start + off - m.offset;
            for (p, _) in bad {
                let pa = to_addr(*p);
                if *p < m.offset || pa < at || pa >= end {
                    continue;
                }
                if pa > at {
                    let _ = uffd.continue_range(at, pa - at);
                }
                let _ = uffd.poison(pa, page);
                at = pa + page;
            }
            if at < end {
                let _ = uffd.continue_range(at, end - at);
            }
        }
        // Every fault of this process that waits is answered here: one may
        // wait where no consumer range says (the list lags the kernel when
        // events of several threads interleave), or in the range a direct
        // fill skipped above. `UFFDIO_CONTINUE` maps the page the mapping
        // there shows, and only if it is in the memfd; a page mapped above
        // already is only woken (`EEXIST`), any other failure wakes it to
        // fault again.
        for w in waiting.iter().filter(|w| w.key == 0) {
            if bad.iter().any(|(p, _)| *p == w.offset) {
                let _ = core.uffd.poison(w.addr, page);
            } else {
                let _ = core.uffd.continue_range(w.addr, page);
            }
        }
        // Another process's fault in a range no longer listed (detached or
        // moved since it was recorded): its page is mapped if it is in the
        // memfd, else woken to fault again (and be refused or served as the
        // range now stands). Never poisoned: what that address shows now
        // may be another range.
        for w in unlisted {
            if let Some(u) = &w.uffd
                && (bad.iter().any(|(p, _)| *p == w.offset)
                    || u.continue_range(w.addr, page).is_err())
            {
                let _ = u.wake(w.addr, page);
            }
        }
        drop(consumers);
        self.notify();
    }

    /// Answers a fault on a filled chunk: poisons a bad page, or maps the
    /// run of filled chunks from the faulting page (up to [`RUN_BYTES`], the
    /// end of the range and the next bad page). Returns the end of the
    /// chunks it mapped, if it mapped any.
    fn answer_filled(&self, core: &Core, hit: &Hit<'_>) -> Option<u64> {
        let page = core.page;
        let bad = self.bad.lock();
        if bad.contains_key(&hit.offset) {
            drop(bad);
            let _ = hit.uffd.poison(hit.addr, page);
            return None;
        }
        let c = hit.offset / self.chunk;
        let filled = self.chunks.filled_until(c, c + run_chunks(self.chunk));
        let mut end = round_up((filled * self.chunk).min(self.size), page);
        end = end.min(hit.offset + hit.limit);
        if let Some((p, _)) = bad.range(hit.offset..end).next() {
            end = *p;
        }
        drop(bad);
        let mut len = end.max(hit.offset + page) - hit.offset;
        // The run ends where the table says the range ends, and the table
        // lags the kernel: if the consumer has since unmapped a part of the
        // range (its event not applied yet), the run spans a hole and the
        // kernel refuses all of it (`ENOENT`: one call, one mapping). Then
        // the faulting page alone; only if that fails too is the page not
        // in the memfd, and nothing can be vouched for.
        if hit.uffd.continue_range(hit.addr, len).is_err() {
            if len == page || hit.uffd.continue_range(hit.addr, page).is_err() {
                let _ = core.refuse(hit.uffd, hit.addr);
                return None;
            }
            len = page;
        }
        Some((hit.offset + len).div_ceil(self.chunk))
    }

    /// Registers `start..start+len` of this process, a mapping of the memfd
    /// from `offset`, with the engine's userfaultfd. The caller made it
    /// `PROT_NONE`, or vouches that nobody touches it until this returns.
    pub fn register(self: &Arc<Self>, start: u64, len: u64, offset: u64) -> Result<Registration> {
        self.register_as(start, len, offset, false)
    }

    /// Claims `start..start+len` (a mapping of the memfd from `offset`) as a
    /// consumer range: in the table before the kernel can send a fault from
    /// it, so that no answer meant for a range that was there before lands
    /// in it unseen (an answer to an address no region covers poisons it).
    /// The caller registers it next; dropping the result forgets it.
    fn claim(self: &Arc<Self>, start: u64, len: u64, offset: u64, shared: bool) -> Registration {
        let core = &self.service.core;
        // An event naming these addresses from before they were ours
        // (another range's munmap or move) must not cut this range out.
        core.sync_events();
        self.add_consumer(None, start, len, offset, shared);
        let owner = core.add_region(start, len, offset, false, shared, self.target());
        Registration {
            shadow: User::new(self.clone()),
            start,
            len,
            owner,
            pid: std::process::id(),
            released: false,
        }
    }

    fn register_as(
        self: &Arc<Self>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) -> Result<Registration> {
        let reg = self.claim(start, len, offset, shared);
        self.service
            .core
            .uffd
            .register(start, len)
            .map_err(|e| Error::sys("UFFDIO_REGISTER of a consumer mapping", e))?;
        self.map_ahead(start, len, offset);
        Ok(reg)
    }

    /// Whether lazy mappings follow a `fork` into the child (the engine
    /// negotiated `UFFD_FEATURE_EVENT_FORK`); if not, they are kept out of
    /// children with `MADV_DONTFORK`, since a child's copy would be
    /// unregistered and read its holes as zeros.
    pub fn follows_fork(&self) -> bool {
        self.service.core.uffd.follows_fork()
    }

    /// A new `MAP_SHARED` consumer mapping of `len` bytes from `offset`,
    /// registered but still `PROT_NONE` (the caller makes it readable): a
    /// duplicate of the template, which fills may install straight into.
    /// In place of `into` (a reservation of `len` bytes, replaced).
    ///
    /// The duplicate comes registered (it keeps the template's registration
    /// where `EVENT_REMAP` was negotiated), so its range is claimed
    /// ([`LazyShadow::claim`]) first, on the reservation.
    ///
    /// # Safety
    /// `into` is the caller's to replace: nothing borrows or touches it.
    pub unsafe fn map_shared(
        self: &Arc<Self>,
        offset: u64,
        into: RawMap,
    ) -> Result<(RawMap, Registration)> {
        let len = into.len();
        let t = self.template.as_ref().ok_or(Error::Range {
            offset,
            len: len as u64,
            size: 0,
        })?;
        let reg = self.claim(into.addr(), len as u64, offset, true);
        // SAFETY: forwarded from the caller.
        let m = unsafe { t.duplicate_shared(offset as usize, into) }
            .map_err(|e| Error::sys("mremap a shared consumer mapping", e))?;
        self.service
            .core
            .uffd
            .register(m.addr(), len as u64)
            .map_err(|e| Error::sys("UFFDIO_REGISTER of a consumer mapping", e))?;
        if self.follows_fork() {
            // The duplicate inherits the template's MADV_DONTFORK; a
            // consumer range goes to children like a file mapping.
            // SAFETY: fork events are negotiated, so a child's copy stays
            // registered (with the child's userfaultfd) and is served.
            unsafe { m.advise_unchecked(UncheckedAdvice::DoFork) }
                .map_err(|e| Error::sys("madvise(MADV_DOFORK)", e))?;
        }
        self.map_ahead(m.addr(), len as u64, offset);
        Ok((m, reg))
    }

    fn add_consumer(
        &self,
        remote: Option<Arc<Uffd>>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.consumers.write().insert(Consumer {
            id,
            start,
            len,
            offset,
            remote,
            shared,
        });
        id
    }

    fn remove_consumer(&self, id: u64) {
        self.consumers.write().remove(id);
    }

    /// Removes `lo..hi` of the address space of the userfaultfd `key` from
    /// the consumer ranges; what sticks out on either side stays.
    fn cut_consumers(&self, key: usize, lo: u64, hi: u64) {
        let next = || self.next_id.fetch_add(1, Ordering::Relaxed);
        self.consumers.write().cut(key, lo, hi, next);
    }

    /// Adds a consumer range registered with another process's userfaultfd,
    /// showing the shadow from `offset`; returns a key for
    /// [`LazyShadow::remove_remote`]. Its faults are answered with
    /// `UFFDIO_CONTINUE` after the fill (never a direct copy: the server
    /// cannot see whether the client's mapping is shared).
    pub fn add_remote(&self, uffd: Arc<Uffd>, start: u64, len: u64, offset: u64) -> u64 {
        self.add_consumer(Some(uffd), start, len, offset, false)
    }

    pub fn remove_remote(&self, key: u64) {
        self.remove_consumer(key);
    }

    /// How many consumer ranges in other processes are attached.
    pub fn remote_consumers(&self) -> usize {
        self.consumers.read().remote_len()
    }

    /// Fills every chunk overlapping `offset..offset+len`, in this thread
    /// where possible, and waits for chunks other threads are filling.
    /// Errors if any page in the range could not be filled.
    pub fn populate(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.populate_here(offset, len);
        // A caller's thread keeps no fill buffer (workers free theirs when
        // they park).
        buffer::release();
        r
    }

    fn populate_here(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::Range {
                offset,
                len,
                size: self.size,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let core = &self.service.core;
        let (first, last) = (offset / self.chunk, (offset + len - 1) / self.chunk);
        let run = run_chunks(self.chunk).min(last - first + 1);
        // Fill what is empty in runs, then wait for what others are filling.
        let mut c = first;
        while c <= last {
            match self.chunks.claim_run(c, (last + 1).min(c + run)) {
                Some(r) => {
                    let next = r.end;
                    self.fill(core, r, Why::Populate);
                    self.check_refused(c, offset)?;
                    c = next;
                }
                None => c += 1,
            }
        }
        for c in first..=last {
            loop {
                if let Some(r) = self.chunks.claim_run(c, c + 1) {
                    self.fill(core, r, Why::Populate);
                    self.check_refused(c, offset)?;
                }
                match self.chunks.get(c) {
                    ChunkState::Filled => break,
                    ChunkState::Empty => continue,
                    ChunkState::Filling => {
                        let mut g = self.done_lock.lock();
                        if self.chunks.get(c) == ChunkState::Filling {
                            self.done_cv.wait(&mut g);
                        }
                    }
                }
            }
        }
        self.check_bad(offset, offset + len)
    }

    /// Fills the whole shadow using this thread and the idle workers.
    pub fn materialize(&self) -> Result<()> {
        let n = self.chunks.len();
        // The workers take the second half while this thread does the first.
        let core = &self.service.core;
        let run = run_chunks(self.chunk);
        let mut c = n / 2;
        while c < n {
            let e = n.min(c + run);
            let work = Work {
                chunks: c..e,
                why: Why::Prefetch,
                direct: None,
            };
            core.prefetch(self.target(), work);
            c = e;
        }
        self.populate(0, self.size)
    }

    /// After this thread's fill of chunk `c`: an error if the budget
    /// refused it (the chunk is Empty again; nothing was recorded as bad).
    fn check_refused(&self, c: u64, offset: u64) -> Result<()> {
        if self.chunks.get(c) != ChunkState::Empty {
            return Ok(());
        }
        let core = &self.service.core;
        let cause = self.refused_cause.lock().clone().unwrap_or(Cause::Budget {
            budget: core.budget,
            resident: core.resident.load(Ordering::Relaxed),
            needed: self.chunk,
        });
        Err(Error::Unfillable {
            what: self.name.clone(),
            offset: (c * self.chunk).max(offset) / core.page * core.page,
            end: ((c + 1) * self.chunk).min(self.size),
            cause,
        })
    }

    fn check_bad(&self, from: u64, to: u64) -> Result<()> {
        let bad = self.bad.lock();
        let page = self.service.core.page;
        if let Some((p, cause)) = bad.range(from / page * page..to).next() {
            return Err(Error::Unfillable {
                what: self.name.clone(),
                offset: *p,
                end: (*p + page).min(self.size),
                cause: cause.clone(),
            });
        }
        Ok(())
    }
}

impl LazyShadow {
    /// A kernel-mediated access to the alias or the template: fill (or wait
    /// for) the page here, then map it (template) or let the access retry
    /// on the now present page (alias, registered MISSING only).
    fn serve_internal(&self, core: &Core, hit: &Hit<'_>) {
        let len = core.page.min(self.size - hit.offset);
        if self.populate(hit.offset, len).is_err() {
            let _ = core.refuse(hit.uffd, hit.addr);
        } else if hit.uffd.continue_range(hit.addr, core.page).is_err() {
            let _ = hit.uffd.wake(hit.addr, core.page);
        }
    }
}

impl FaultTarget for LazyShadow {
    fn on_fault(&self, core: &Core, hit: Hit<'_>) -> Option<Work> {
        if !self.ready.load(Ordering::Acquire) {
            let _ = hit.uffd.wake(hit.addr, core.page);
            return None;
        }
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        core.counters.faults.fetch_add(1, Ordering::Relaxed);
        if hit.offset >= self.size {
            let _ = core.refuse(hit.uffd, hit.addr);
            return None;
        }
        if hit.internal {
            self.serve_internal(core, &hit);
            return None;
        }
        let chunk = hit.offset / self.chunk;
        let plan = self.readahead.lock().on_fault(chunk);
        let remote = !std::ptr::eq(hit.uffd, &core.uffd);
        let mut mine = None;
        let mut filled_to = None;
        loop {
            match self.chunks.get(chunk) {
                ChunkState::Empty => {
                    if let Some(r) = self.chunks.claim_run(chunk, plan.now.end) {
                        if remote {
                            // Ours to fill: nobody else can take it, so
                            // it is still Filling here.
                            let ok = self.wait_on(chunk, &hit, true);
                            debug_assert!(ok, "a claimed chunk is Filling");
                        }
                        mine = Some(r);
                        break;
                    }
                }
                // The filler answers every range where a fault waits, and
                // every other range of this process but the one it filled
                // directly, once it is done.
                ChunkState::Filling => {
                    if self.wait_on(chunk, &hit, remote) {
                        break;
                    }
                }
                ChunkState::Filled => {
                    filled_to = self.answer_filled(core, &hit);
                    break;
                }
            }
        }
        for a in plan.ahead {
            let work = Work {
                chunks: a,
                why: Why::Prefetch,
                direct: None,
            };
            core.prefetch(self.target(), work);
        }
        match (&mine, filled_to) {
            (Some(r), _) => self.need(core, r.start, r.end),
            (None, Some(e)) => self.need(core, chunk, e.max(chunk + 1)),
            (None, None) => self.need(core, chunk, chunk + 1),
        }
        mine.map(|chunks| {
            let direct = self.direct_for(core, &hit, &chunks);
            Work {
                chunks,
                why: Why::Fault,
                direct,
            }
        })
    }

    fn memory_freed(&self, _core: &Core) {
        let refused = std::mem::take(&mut *self.refused.lock());
        // The read lock keeps every listed range mapped: a consumer range is
        // removed from the list (write lock) before it is unmapped.
        let consumers = self.consumers.read();
        for (id, addr, len) in refused {
            if consumers.contains_id(id) {
                // Drops the poison markers only: these pages were never mapped.
                let _ =
                    crate::sys::mmap::madvise(addr as *mut u8, len as usize, libc::MADV_DONTNEED);
            }
        }
    }

    fn on_unmap(&self, _core: &Core, space: Space<'_>, lo: u64, hi: u64) {
        self.cut_consumers(space_key(space), lo, hi);
    }

    fn on_remap(&self, _core: &Core, space: Space<'_>, from: u64, to: u64, len: u64) {
        let key = space_key(space);
        let next = || self.next_id.fetch_add(1, Ordering::Relaxed);
        let moved = (self.consumers.read()).moved(key, from, to, len, space.cloned(), next);
        let mut cs = self.consumers.write();
        cs.drop_overlapping(key, to, to + len);
        for m in moved {
            cs.insert(m);
        }
    }

    fn on_fork(&self, _core: &Core, parent: Space<'_>, child: &Arc<Uffd>) {
        let next = || self.next_id.fetch_add(1, Ordering::Relaxed);
        let (key, child) = (space_key(parent), Some(child.clone()));
        let copies = (self.consumers.read()).moved(key, 0, 0, u64::MAX, child, next);
        let mut cs = self.consumers.write();
        for m in copies {
            cs.insert(m);
        }
    }

    fn on_adopt(
        &self,
        _core: &Core,
        space: Space<'_>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) {
        self.add_consumer(space.cloned(), start, len, offset, shared);
    }

    fn hold_range(&self, on: bool) {
        self.gone.hold_range(on);
    }

    fn orphan(&self, core: &Core, uffd: &Uffd, start: u64, len: u64, offset: u64) {
        let page = core.page;
        // Fills in flight end first (for at most a second): the pages the
        // parent itself just read are among them.
        let (c0, c1) = (
            offset / self.chunk,
            (offset + len).min(self.size).div_ceil(self.chunk),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while (c0..c1).any(|c| self.chunks.get(c) == ChunkState::Filling)
            && std::time::Instant::now() < deadline
        {
            let mut g = self.done_lock.lock();
            let _ = self
                .done_cv
                .wait_for(&mut g, std::time::Duration::from_millis(10));
        }
        let bad = self.bad.lock().clone();
        let mut at = 0;
        while at < len {
            let off = offset + at;
            let good = off < self.size
                && self.chunks.get(off / self.chunk) == ChunkState::Filled
                && !bad.contains_key(&off);
            // A page mapped there already is only woken (`EEXIST`).
            if good {
                let _ = uffd.continue_range(start + at, page);
            } else {
                let _ = uffd.poison(start + at, page);
            }
            at += page;
        }
    }

    fn run(&self, core: &Core, work: Work) {
        // A replay is queued by `open` before the first user holds the
        // shadow; once the last one goes, the shadow drops and the queued
        // step finds nothing (it holds the shadow weakly).
        if work.why == Why::Prefetch && self.users.none() {
            return; // nobody left to read what it would fill
        }
        let _busy = self.gone.fill();
        match work.why {
            Why::Prefetch => {
                let chunks = work.chunks.clone();
                self.fill_empty(core, work.chunks, run_chunks(self.chunk), Why::Prefetch);
                // Readahead maps its chunks into this process's consumer
                // ranges, which then never fault on them: recorded as
                // needed when filled, or a sequential reader's record
                // would hold one chunk in a window. Only what was filled:
                // a full budget gives chunks back.
                if self.workset.is_some() {
                    let mut c = chunks.start;
                    while c < chunks.end {
                        let e = self.chunks.filled_until(c, chunks.end);
                        if e > c {
                            self.need(core, c, e);
                        }
                        c = e + 1;
                    }
                }
            }
            Why::Replay => self.replay_step(core),
            why => self.fill_into(core, work.chunks, why, work.direct),
        }
    }
}

impl Drop for LazyShadow {
    fn drop(&mut self) {
        let _ = self.save_workset();
        let core = &self.service.core;
        if let Ok(ino) = self.memfd.inode() {
            core.remove_inode(ino);
        }
        for m in [&self.alias, &self.template].into_iter().flatten() {
            let _ = core
                .uffd
                .unregister(m.addr(), round_up(self.size, core.page));
            core.remove_region(m.addr());
        }
        core.release(self.resident.load(Ordering::Relaxed));
    }
}
