//! Per-shadow state of a lazy shadow: the memfd, its registered fill mapping,
//! the chunk table, poisoned pages and the consumer mappings to wake.

use super::fill::{self, BadRange};
use super::readahead::Readahead;
use super::service::{Core, Service};
use crate::config::{Config, StalePolicy};
use crate::error::{Error, Result};
use crate::shadow::RawMap;
use crate::shadow::memfd::{LAZY_SEALS, Memfd};
use crate::source::{Source, SourceMeta};
use crate::stats::Counters;
use crate::uffd::Uffd;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
    Empty = 0,
    Filling = 1,
    /// Resolved: every page is installed or recorded in `bad`.
    Filled = 2,
}

pub(crate) struct LazyShadow {
    pub name: String,
    pub source: Arc<dyn Source>,
    pub meta: SourceMeta,
    pub memfd: Memfd,
    pub size: u64,
    pub chunk: u64,
    stale: StalePolicy,
    /// The engine's own registered MAP_SHARED mapping: the target of every
    /// UFFDIO_COPY. Never read or written by any thread.
    fill_map: Option<RawMap>,
    /// A registered PROT_NONE MAP_SHARED mapping made before sealing, which
    /// shared consumer mappings are duplicated from (see `shared_mapping`).
    /// PROT_NONE, so `mlockall` does not populate it or its duplicates.
    template: Option<RawMap>,
    states: Box<[AtomicU8]>,
    /// Pages that could not be filled, with the reason.
    bad: Mutex<BTreeMap<u64, String>>,
    /// Consumer mappings to wake and poison, local and remote.
    mappings: RwLock<Vec<Consumer>>,
    done_lock: Mutex<()>,
    done_cv: Condvar,
    pub readahead: Mutex<Readahead>,
    pub counters: Counters,
    resident: AtomicU64,
    changed: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    pub service: Arc<Service>,
    me: Weak<LazyShadow>,
}

/// A registered consumer range: in this process (through the engine's
/// userfaultfd) or in another one (through the userfaultfd it sent us).
pub(crate) struct Consumer {
    pub start: u64,
    pub len: u64,
    /// `None`: the engine's own userfaultfd.
    pub remote: Option<Arc<Uffd>>,
}

impl Consumer {
    fn uffd<'a>(&'a self, core: &'a Core) -> &'a Uffd {
        self.remote.as_deref().unwrap_or(&core.uffd)
    }
}

/// A consumer mapping's registration; unregisters on drop.
pub(crate) struct Registration {
    shadow: Arc<LazyShadow>,
    start: u64,
    len: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let core = &self.shadow.service.core;
        let _ = core.uffd.unregister(self.start, self.len);
        core.remove_region(self.start);
        self.shadow
            .mappings
            .write()
            .retain(|m| m.remote.is_some() || m.start != self.start);
    }
}

const STALE_BEFORE: &str = "the source changed since open (stale policy strict)";
const STALE_DURING: &str = "the source changed during the fill (stale policy strict)";

/// Why chunks are being filled: decides what the memory budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// A thread is waiting on the first chunk of the run.
    Fault,
    /// Readahead: nobody is waiting; a full budget gives the chunks back.
    Prefetch,
    /// `populate`/`materialize`: the caller asked for these bytes.
    Populate,
}

/// Bytes read and installed at once by prefetch, populate and materialize.
pub(crate) const RUN_BYTES: u64 = 1 << 20;

/// How many chunks make one run.
pub(crate) fn run_chunks(chunk: u64) -> u64 {
    (RUN_BYTES / chunk).max(1)
}

/// A zeroed chunk table (all Empty). Allocated zeroed, so that the kernel
/// hands out zero pages lazily and opening a huge sparse source costs no
/// more than a small one until its chunks are touched.
fn zeroed_states(n: usize) -> Box<[AtomicU8]> {
    let zeros: Box<[u8]> = vec![0u8; n].into_boxed_slice();
    let len = zeros.len();
    let ptr = Box::into_raw(zeros) as *mut u8;
    // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8
    // (documented), so a boxed [u8] of `len` zeros is a valid boxed
    // [AtomicU8] of `len` Empty states; the allocation's layout is unchanged.
    unsafe {
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(
            ptr.cast::<AtomicU8>(),
            len,
        ))
    }
}

/// Registers `map` (PROT_NONE) with `uffd`, then makes it PROT_READ. In this
/// order no access, `mlockall(MCL_FUTURE)` population or forked child can
/// reach the memfd through it unregistered; the mremap duplicate and mmap of
/// a locked mapping would otherwise be populated with zero pages.
pub(crate) fn register_readable(uffd: &Uffd, map: &RawMap, what: &str) -> Result<()> {
    let len = map.len().div_ceil(crate::page_size()) * crate::page_size();
    uffd.register(map.addr(), len as u64)
        .map_err(|e| Error::sys(format!("UFFDIO_REGISTER of {what}"), e))?;
    map.protect(libc::PROT_READ)
        .map_err(|e| Error::sys(format!("mprotect {what} readable"), e))
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

impl LazyShadow {
    /// Creates the sparse memfd, maps and registers its fill mapping, then
    /// seals it. Nothing is read from the source.
    pub fn open(
        service: Arc<Service>,
        source: Arc<dyn Source>,
        meta: SourceMeta,
        cfg: &Config,
    ) -> Result<Arc<LazyShadow>> {
        let name = source.name();
        let size = meta.size;
        let memfd = Memfd::create(&name, size)?;
        let core = &service.core;
        let chunk = cfg.chunk_size;
        let nchunks = size.div_ceil(chunk);
        let (fill_map, template) = if size > 0 {
            let len = round_up(size, core.page) as usize;
            let shared = || {
                let m = RawMap::new(memfd.as_fd(), len, libc::PROT_NONE, libc::MAP_SHARED)
                    .map_err(|e| Error::sys("mmap lazy memfd", e))?;
                m.advise(libc::MADV_DONTFORK)
                    .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
                Ok::<_, Error>(m)
            };
            let (fill, template) = (shared()?, shared()?);
            register_readable(&core.uffd, &fill, "the fill mapping")?;
            // The template stays PROT_NONE but is registered too: an access
            // that ignores protections (ptrace, /proc/pid/mem) is then served
            // like any fault instead of leaving a zero page behind.
            core.uffd
                .register(template.addr(), len as u64)
                .map_err(|e| Error::sys("UFFDIO_REGISTER of the template mapping", e))?;
            (Some(fill), Some(template))
        } else {
            (None, None)
        };
        // Sealed only now: F_SEAL_FUTURE_WRITE keeps UFFDIO_COPY working but
        // stops write(2) and new writable mappings.
        memfd.add_seals(LAZY_SEALS)?;
        let max_window = cfg.readahead / chunk;
        Ok(Arc::new_cyclic(|me| LazyShadow {
            name,
            source,
            meta,
            memfd,
            size,
            chunk,
            stale: cfg.stale,
            fill_map,
            template,
            states: zeroed_states(nchunks as usize),
            bad: Mutex::new(BTreeMap::new()),
            mappings: RwLock::new(Vec::new()),
            done_lock: Mutex::new(()),
            done_cv: Condvar::new(),
            readahead: Mutex::new(Readahead::new(max_window, run_chunks(chunk), nchunks)),
            counters: Counters::default(),
            resident: AtomicU64::new(0),
            changed: AtomicBool::new(false),
            last_error: Mutex::new(None),
            service,
            me: me.clone(),
        }))
    }

    pub fn weak(&self) -> Weak<LazyShadow> {
        self.me.clone()
    }

    pub fn nchunks(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn state(&self, c: u64) -> ChunkState {
        match self.states[c as usize].load(Ordering::Acquire) {
            0 => ChunkState::Empty,
            1 => ChunkState::Filling,
            _ => ChunkState::Filled,
        }
    }

    /// Empty -> Filling; true if this caller now owns the fill.
    pub fn claim(&self, c: u64) -> bool {
        self.states[c as usize]
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    pub fn source_changed(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }

    pub fn bad_pages(&self) -> BTreeMap<u64, String> {
        self.bad.lock().clone()
    }

    /// Whether every chunk is filled and no page is poisoned.
    pub fn fully_filled(&self) -> bool {
        (0..self.nchunks()).all(|c| self.state(c) == ChunkState::Filled)
            && self.bad.lock().is_empty()
    }

    /// Byte range of chunks `run`, clipped to the shadow's size.
    fn run_range(&self, run: &Range<u64>) -> (u64, u64) {
        (
            run.start * self.chunk,
            (run.end * self.chunk).min(self.size),
        )
    }

    /// Claims consecutive empty chunks from `start`, at most up to `end`.
    pub fn claim_run(&self, start: u64, end: u64) -> Option<Range<u64>> {
        if !self.claim(start) {
            return None;
        }
        let mut e = start + 1;
        while e < end && self.claim(e) {
            e += 1;
        }
        Some(start..e)
    }

    /// Fills whatever chunks of `range` are still empty, in runs of at most
    /// `run_chunks`, with `buf` (at least `run_chunks` chunks long).
    pub fn fill_empty(
        &self,
        core: &Core,
        range: Range<u64>,
        run_chunks: u64,
        buf: &mut [u8],
        why: Why,
    ) {
        let mut c = range.start;
        while c < range.end {
            match self.claim_run(c, range.end.min(c + run_chunks)) {
                Some(run) => {
                    c = run.end;
                    self.fill(core, run, buf, why);
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
        if self.changed.load(Ordering::Relaxed) {
            return true;
        }
        // A panicking backend must not take a fault-service thread down.
        let now = catch_unwind(AssertUnwindSafe(|| self.source.fill_metadata()));
        let changed = match now {
            Ok(Ok(now)) => now != self.meta,
            Ok(Err(_)) | Err(_) => true,
        };
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
        changed
    }

    /// Fills the chunks `run`, which the caller has claimed (state Filling), then
    /// publishes it and wakes every waiter. `buf` is the caller's own heap
    /// buffer of at least `run` chunks. For prefetch, a full budget gives the
    /// chunk back (Empty) instead of poisoning it.
    pub fn fill(&self, core: &Core, run: Range<u64>, buf: &mut [u8], why: Why) {
        let prefetch = why == Why::Prefetch;
        // A fault needs its first chunk; the rest of its run is a guess.
        let speculative = prefetch || (why == Why::Fault && run.end - run.start > 1);
        let t0 = std::time::Instant::now();
        let (off, end) = self.run_range(&run);
        let page = core.page;
        let span = round_up(end - off, page);
        let strict = self.stale == StalePolicy::Strict;
        let mut bad: Vec<BadRange> = Vec::new();
        let mut installed = 0u64;
        if strict && self.check_changed() {
            bad.push((off, end, STALE_BEFORE.into()));
        } else if !core.reserve(span, speculative) {
            if !prefetch && run.end - run.start > 1 {
                // Give back all but the faulting chunk and try with that alone.
                for c in run.start + 1..run.end {
                    self.states[c as usize].store(0, Ordering::Release);
                }
                let rest = (run.start + 1) * self.chunk;
                self.wake_all(core, rest, span - (rest - off));
                return self.fill(core, run.start..run.start + 1, buf, why);
            }
            if prefetch {
                for c in run {
                    self.states[c as usize].store(0, Ordering::Release);
                }
                self.wake_all(core, off, span);
                return;
            }
            let resident = core.resident.load(Ordering::Relaxed);
            let e = Error::Budget {
                what: self.name.clone(),
                budget: core.budget,
                resident,
            };
            bad.push((off, end, e.to_string()));
        } else {
            let data = &mut buf[..span as usize];
            let good = fill::read_chunk(&*self.source, data, off, end, page, self.size, &mut bad);
            if strict && self.check_changed() {
                bad = vec![(off, end, STALE_DURING.into())];
            } else {
                if !strict {
                    self.check_changed();
                }
                installed = fill::install(core, self.fill_addr(), data, off, &good, &mut bad);
            }
            core.release(span - installed);
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
        self.resident.fetch_add(installed, Ordering::Relaxed);
        let ns = t0.elapsed().as_nanos() as u64;
        let nchunks = run.end - run.start;
        for ctr in [&self.counters, &core.counters] {
            ctr.chunks_filled.fetch_add(nchunks, Ordering::Relaxed);
            ctr.bytes_filled.fetch_add(installed, Ordering::Relaxed);
            if prefetch {
                ctr.readahead_chunks.fetch_add(nchunks, Ordering::Relaxed);
            }
            ctr.fill_latency.record(ns);
        }
        // Publish before waking: a fault message read after this sees Filled.
        for c in run {
            self.states[c as usize].store(2, Ordering::Release);
        }
        if !bad_pages.is_empty() {
            for m in self.mappings.read().iter() {
                for (p, _) in bad_pages.iter().filter(|(p, _)| *p < m.len) {
                    let _ = m.uffd(core).poison(m.start + p, page);
                }
            }
        }
        self.wake_all(core, off, span);
    }

    /// Wakes `off..off+span` in every consumer mapping and every thread
    /// waiting in `populate`.
    fn wake_all(&self, core: &super::service::Core, off: u64, span: u64) {
        for m in self.mappings.read().iter() {
            if off < m.len {
                let _ = m.uffd(core).wake(m.start + off, span.min(m.len - off));
            }
        }
        let _g = self.done_lock.lock();
        self.done_cv.notify_all();
    }

    /// A new `MAP_SHARED` consumer mapping, still PROT_NONE: a duplicate of
    /// the template, since a fresh shared mapping of a memfd sealed with
    /// `F_SEAL_FUTURE_WRITE` lacks `VM_MAYWRITE` and cannot be registered.
    pub fn shared_mapping(&self) -> Result<RawMap> {
        let t = self
            .template
            .as_ref()
            .expect("non-empty lazy shadow has a template mapping");
        t.duplicate_shared()
            .map_err(|e| Error::sys("mremap a shared consumer mapping", e))
    }

    fn fill_addr(&self) -> u64 {
        self.fill_map.as_ref().map_or(0, |m| m.addr())
    }

    /// Answers a fault at `offset` of the consumer range at `start`
    /// (registered with `uffd`). Returns the chunks to fill if it claimed
    /// them; otherwise the fault is answered already, or will be woken by
    /// whoever is filling its chunk.
    pub fn on_fault(
        &self,
        core: &Core,
        uffd: &Uffd,
        start: u64,
        offset: u64,
    ) -> Option<Range<u64>> {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        core.counters.faults.fetch_add(1, Ordering::Relaxed);
        let chunk = offset / self.chunk;
        let plan = self.readahead.lock().on_fault(chunk);
        let mut mine = None;
        loop {
            match self.state(chunk) {
                ChunkState::Empty => {
                    if let Some(r) = self.claim_run(chunk, plan.now.end) {
                        mine = Some(r);
                        break;
                    }
                }
                // The filler wakes every consumer once it is done.
                ChunkState::Filling => break,
                ChunkState::Filled => {
                    if self.bad.lock().contains_key(&offset) {
                        let _ = uffd.poison(start + offset, core.page);
                    } else {
                        let _ = uffd.wake(start + offset, core.page);
                    }
                    break;
                }
            }
        }
        for a in plan.ahead {
            core.prefetch(self, a);
        }
        mine
    }

    /// Adds a consumer range registered with another process's userfaultfd;
    /// returns a key for [`LazyShadow::remove_remote`].
    pub fn add_remote(&self, uffd: Arc<Uffd>, start: u64, len: u64) -> usize {
        let key = Arc::as_ptr(&uffd) as usize;
        self.mappings.write().push(Consumer {
            start,
            len,
            remote: Some(uffd),
        });
        key
    }

    pub fn remove_remote(&self, key: usize) {
        self.mappings.write().retain(|m| {
            m.remote
                .as_ref()
                .is_none_or(|u| Arc::as_ptr(u) as usize != key)
        });
    }

    /// How many consumer ranges in other processes are attached.
    pub fn remote_consumers(&self) -> usize {
        self.mappings
            .read()
            .iter()
            .filter(|m| m.remote.is_some())
            .count()
    }

    /// Registers a consumer mapping of this shadow (made PROT_NONE) with the
    /// engine, then makes it readable.
    pub fn register(self: &Arc<Self>, map: &RawMap) -> Result<Registration> {
        let core = &self.service.core;
        let len = round_up(map.len() as u64, core.page);
        map.advise(libc::MADV_DONTFORK)
            .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
        self.mappings.write().push(Consumer {
            start: map.addr(),
            len,
            remote: None,
        });
        core.add_region(map.addr(), len, Arc::downgrade(self));
        let reg = Registration {
            shadow: self.clone(),
            start: map.addr(),
            len,
        };
        register_readable(&core.uffd, map, "a consumer mapping")?;
        Ok(reg)
    }

    /// Fills every chunk overlapping `offset..offset+len`, in this thread
    /// where possible, and waits for chunks other threads are filling.
    /// Errors if any page in the range could not be filled.
    pub fn populate(&self, offset: u64, len: u64) -> Result<()> {
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
        let run_chunks = run_chunks(self.chunk);
        let mut buf = vec![0u8; (run_chunks.min(last - first + 1) * self.chunk) as usize];
        self.fill_empty(
            core,
            first..last + 1,
            run_chunks.min(last - first + 1),
            &mut buf,
            Why::Populate,
        );
        for c in first..=last {
            loop {
                if let Some(run) = self.claim_run(c, c + 1) {
                    self.fill(core, run, &mut buf, Why::Populate);
                }
                match self.state(c) {
                    ChunkState::Filled => break,
                    ChunkState::Empty => continue,
                    ChunkState::Filling => {
                        let mut g = self.done_lock.lock();
                        if self.state(c) == ChunkState::Filling {
                            self.done_cv.wait(&mut g);
                        }
                    }
                }
            }
        }
        self.check_bad(offset, offset + len)
    }

    /// Fills the whole shadow using this thread and the idle workers.
    pub fn materialize(self: &Arc<Self>) -> Result<()> {
        let n = self.nchunks();
        // The workers take the second half while this thread does the first.
        self.service.core.prefetch(self, n / 2..n);
        self.populate(0, self.size)
    }

    fn check_bad(&self, from: u64, to: u64) -> Result<()> {
        let bad = self.bad.lock();
        let page = self.service.core.page;
        if let Some((p, reason)) = bad.range(from / page * page..to).next() {
            return Err(Error::Unfillable {
                what: self.name.clone(),
                offset: *p,
                end: (*p + page).min(self.size),
                reason: reason.clone(),
            });
        }
        Ok(())
    }
}

impl Drop for LazyShadow {
    fn drop(&mut self) {
        let core = &self.service.core;
        for m in [&self.fill_map, &self.template].into_iter().flatten() {
            let _ = core
                .uffd
                .unregister(m.addr(), round_up(m.len() as u64, core.page));
        }
        core.release(self.resident.load(Ordering::Relaxed));
    }
}
