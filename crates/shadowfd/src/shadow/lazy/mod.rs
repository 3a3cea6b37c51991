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

mod answer;
mod changed;
mod consumers;
mod fill;
mod filling;
mod install;
mod populate;
mod readahead;
mod register;
mod replay;
mod target;
mod user;
mod workset;

pub(crate) use register::Registration;
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

const STALE_BEFORE: Cause = Cause::SourceChanged { during_fill: false };
const STALE_DURING: Cause = Cause::SourceChanged { during_fill: true };

/// Bytes read and installed at once by prefetch, populate and materialize,
/// and mapped at once into a consumer range that faults on filled chunks.
pub(crate) const RUN_BYTES: u64 = 1 << 20;

/// Runs copied from a source's mapping above this size have its pages
/// mapped first ([`LazyShadow::copy_mapped`]).
const POPULATE_OVER: u64 = 64 << 10;

/// Pieces of a fill of at least this size are copied from a source's
/// mapping where it offers one ([`LazyShadow::copy_mapped`]); smaller ones
/// are read with `read_at` (a random fault's page, served to another
/// process: 15.8 µs a fault from the mapping, 11.3 µs read, `bench` mode
/// `run` at 1 GiB `random:0.01`, 2026-12-08).
const MAPPED_FROM: u64 = 64 << 10;

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

    /// What the fault service holds this shadow by.
    pub(crate) fn target(&self) -> Weak<dyn FaultTarget> {
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
        self.prefetch_replay(&self.service.core);
        Ok((m, reg))
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
