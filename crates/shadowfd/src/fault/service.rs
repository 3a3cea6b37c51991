//! The fault-service thread pool, the region table and the memory budget.
//!
//! Every worker is also a reader: idle workers sleep in epoll on the
//! userfaultfd, and the one that reads a fault message serves it itself
//! (the faulting thread, one worker, done: no hand-off). Further claimed
//! faults of the same batch, and readahead, go through crossbeam channels to
//! whichever worker is free; an eventfd (added `EPOLLEXCLUSIVE`: one worker
//! per signal, and a worker that takes a job while more wait signals again)
//! tells sleeping workers that a channel has work.
//!
//! # Where a fault is served
//!
//! What a fault costs depends above all on the CPU that serves it. On a
//! 2-vCPU VM a 4 KiB fault answered on the faulting thread's own CPU takes
//! 3-7 µs; answered from the other vCPU, 28-71 µs: the wake-up and the answer
//! each cost an IPI, a VM exit and the host waking a halted vCPU. Merely
//! waking a thread that sleeps on the other, idle vCPU costs the waker about
//! 8 µs. Whether the worker waits in `read`, `poll` or `epoll` makes no
//! difference. (Measured with a C probe and `perf sched`; the numbers for
//! this crate are in benches/fault.rs.) Hence, with at least as many
//! workers as CPUs (*local mode*):
//!
//! - Worker *i* is pinned to the *i*-th CPU the process may use: that CPU's
//!   *local reader*. Workers beyond one per CPU stay unpinned (*overflow*).
//! - The userfaultfd is in a reader's epoll set without `EPOLLEXCLUSIVE`,
//!   but only while the reader is *armed*. A thread that faults wakes the
//!   armed readers and blocks; its CPU, now free, runs the local reader next
//!   (woken on that CPU: no IPI), which reads the message and answers, and
//!   the answer wakes the thread on the same CPU. The others find nothing.
//! - A reader is armed while enough of the faults come from threads on its
//!   CPU (a quarter at least, [`SHARE`], smoothed over a few [`CHECK_MS`]
//!   periods, or at once after [`BURST`] faults in a row from elsewhere).
//!   Messages carry the thread id (`UFFD_FEATURE_THREAD_ID`); the
//!   thread's CPU is read from `/proc/self/task/TID/stat` (about 7 µs, so
//!   cached per thread: for [`REFRESH`] while the reader of that CPU keeps
//!   finding the thread's faults without sleeping, else [`REFRESH_WOKEN`]).
//!   Otherwise,
//!   if another worker is armed, it disarms: its epoll entry for the
//!   userfaultfd is set to no events, so a fault no longer wakes it (no IPI
//!   on the faulting thread's path). A fault from a CPU whose reader is
//!   disarmed is served by an armed one, remotely, which then kicks that
//!   CPU's reader (an eventfd) to arm.
//! - Disarmed workers, overflow ones included, look every [`CHECK_MS`] (while
//!   faults come) whether a message has been waiting since their last look
//!   with nothing read meanwhile: all armed workers stuck in slow fills or
//!   kept off their CPU. Then they arm, for [`LINGER`] at least. So a slow
//!   source never leaves faults unread while a worker idles.
//! - A pinned reader wakes the faulting thread as `SCHED_IDLE`
//!   (`sys::sched`), so that the kernel keeps the thread on the reader's
//!   CPU. Otherwise, since the reader still runs there, the wake moves the
//!   thread to the idle CPU (`select_idle_sibling`), whose reader is
//!   disarmed: its next faults are answered remotely until arming catches
//!   up. Held off while more threads fault than readers are pinned
//!   ([`Core::crowded`]).
//! - After [`IDLE`] without a fault, every worker arms and sleeps with no
//!   timeout (*parks*): an idle engine costs no CPU. Whoever reads the next
//!   fault kicks the parked workers so that they resume their checks.
//! - Other processes' userfaultfds (`foreign`: a `serve` client's) sit in
//!   every worker's epoll set too, their entries armed and disarmed with
//!   the engine's own: a client thread's fault is answered by the reader of
//!   its CPU (its CPU read from `/proc/TID/stat`) like a local one.
//! - Without the right to turn back from `SCHED_IDLE` (no `CAP_SYS_NICE`),
//!   `SHADOWFD_IDLE_READERS=1` makes the pinned readers `SCHED_IDLE` for
//!   good, with one more worker, unpinned and of normal priority, as the
//!   backstop for readers kept off busy CPUs (docs/design.md).
//!
//! With fewer workers than CPUs, one CPU, or no thread ids (no
//! `THREAD_ID`, or no `/proc` to read a thread's CPU from), nothing is
//! pinned and every worker shares the userfaultfd with `EPOLLEXCLUSIVE`
//! (one fault wakes one worker), sleeping with no timeout.

use super::forkwatch::ForkSafeLock;
use super::spans::{Span, Spans};
use super::{FaultTarget, Hit, Space, Work};
use crate::config::Config;
use crate::error::{Cause, Error, Result};
use crate::stats::Counters;
use crate::sys::event::{
    Epoll, ThreadStat, allowed_cpus, eventfd, eventfd_drain, eventfd_signal, pin_to,
};
use crate::sys::uffd::decode;
use crate::sys::uffd_abi::uffd_msg;
use crate::sys::{Event, Fault, Uffd};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

mod budget;
mod children;
mod events;
mod foreign;
mod placement;
mod pool;
mod spare;
mod worker;

use budget::read_room;
use foreign::ForeignSpace;
pub(crate) use foreign::{Foreign, Inbox};
use placement::*;
pub(crate) use pool::Service;
pub(crate) use worker::in_service;
pub(in crate::fault) use worker::mark_in_service;
use worker::*;

/// Fault messages read at once.
const BATCH: usize = 32;

const MS: u64 = 1_000_000;

/// What a registered address range shows (its place, length and offset are
/// the [`Span`]'s).
#[derive(Clone)]
struct Region {
    internal: bool,
    /// The [`Core::add_region`] call that made it (its `owner`), or 0 for a
    /// range the engine adopted from the kernel's mapping events (moved,
    /// grown or inherited by a child): no owner will remove it, so it holds
    /// its target until the kernel says the range is gone.
    owner: u64,
    /// A `MAP_SHARED` mapping of the target's memfd.
    shared: bool,
    target: Held,
}

impl Region {
    fn target(&self) -> Option<Arc<dyn FaultTarget>> {
        match &self.target {
            Held::Strong(t) => Some(t.clone()),
            Held::Range(r) => Some(r.0.clone()),
            Held::Weak(w) => w.upgrade(),
        }
    }

    /// The same view for a range the kernel made from this one.
    fn adopted(&self) -> Region {
        Region {
            internal: false,
            owner: 0,
            shared: self.shared,
            target: match self.target() {
                Some(t) => Held::Range(RangeHold::new(t)),
                None => Held::Weak(Weak::<Orphan>::new()),
            },
        }
    }
}

/// A target that is gone: what an adopted range of a dropped shadow shows.
struct Orphan;

impl FaultTarget for Orphan {
    fn on_fault(&self, _: &Core, _: Hit<'_>) -> Option<Work> {
        None
    }
    fn run(&self, _: &Core, _: Work) {}
    fn memory_freed(&self, _: &Core) {}
}

/// The address space of a forked child of this process (or of another
/// child): its copies of the consumer ranges, registered with the
/// userfaultfd the `FORK` event handed over. Served like the engine's own
/// ranges, through the same workers, until the child exits or execs.
struct Child {
    uffd: Arc<Uffd>,
    regions: RwLock<Spans<Region>>,
    /// Held while reading its messages and applying its events, so that
    /// events apply in the kernel's order.
    read: Mutex<()>,
    tag: u64,
}

/// Work queued for any free worker. Claimed faults hold their target (a
/// thread waits on them); readahead does not keep a shadow alive.
struct Job {
    target: Held,
    work: Work,
}

#[derive(Clone)]
enum Held {
    Strong(Arc<dyn FaultTarget>),
    /// A range the engine adopted from the kernel's events (moved, grown,
    /// inherited): it holds its target while the kernel maps it.
    Range(RangeHold),
    Weak(Weak<dyn FaultTarget>),
}

/// A range adopted from the kernel's view: its target, start, length,
/// offset and whether it is a shared mapping.
type Adopted = (Arc<dyn FaultTarget>, u64, u64, u64, bool);

/// An adopted range's hold on its target ([`FaultTarget::hold_range`]
/// counts them, each copy too).
struct RangeHold(Arc<dyn FaultTarget>);

impl RangeHold {
    fn new(t: Arc<dyn FaultTarget>) -> RangeHold {
        t.hold_range(true);
        RangeHold(t)
    }
}

impl Clone for RangeHold {
    fn clone(&self) -> RangeHold {
        RangeHold::new(self.0.clone())
    }
}

impl Drop for RangeHold {
    fn drop(&mut self) {
        self.0.hold_range(false);
    }
}

impl Held {
    /// Whether it is `t`, without taking a reference (which, the last one
    /// dropped under the region lock, would drop a shadow there).
    fn is(&self, t: &Arc<dyn FaultTarget>) -> bool {
        self.is_at(Arc::as_ptr(t))
    }

    /// Whether it is the target at `p`.
    fn is_at(&self, p: *const dyn FaultTarget) -> bool {
        let mine = match self {
            Held::Strong(s) => Arc::as_ptr(s),
            Held::Range(r) => Arc::as_ptr(&r.0),
            Held::Weak(w) => w.as_ptr(),
        };
        std::ptr::addr_eq(mine, p)
    }
}

/// A worker as the others see it.
struct Slot {
    /// The CPU it is pinned to (local mode).
    cpu: Option<usize>,
    /// The userfaultfd is in its epoll set: a fault wakes it.
    armed: AtomicBool,
    /// Faults that came from threads on `cpu`.
    local_faults: AtomicU64,
    /// A fault came from `cpu` while it was disarmed: it should arm.
    called: AtomicBool,
    /// It sleeps with no timeout until a fault's reader kicks it.
    parked: AtomicBool,
    /// A kick is pending: no need to signal again.
    kicked: AtomicBool,
    /// Wakes it to look at its arming again.
    kick: OwnedFd,
    /// Where it sleeps ([`worker::Sleep`]); other threads add and remove
    /// foreign spaces' userfaultfds here.
    ep: Epoll,
    /// Held while its arming changes, and while a foreign space's entry
    /// in `ep` is set, so that the entry follows the arming.
    arm: Mutex<()>,
}

/// A faulting thread's CPU as last read, and when.
struct Seen {
    stat: Option<ThreadStat>,
    cpu: Option<usize>,
    at: u64,
}

/// State shared by the service threads and the shadows.
pub(crate) struct Core {
    pub uffd: Uffd,
    regions: RwLock<Spans<Region>>,
    /// Held while reading the engine's userfaultfd and applying the events
    /// read, so that events apply in the kernel's order. The fork watcher
    /// takes it too, while glibc holds the allocator's locks: see
    /// [`ForkSafeLock`].
    pub(super) read: ForkSafeLock,
    /// Faults read by a filler that drained events ([`Core::await_events`]),
    /// for the workers to serve.
    pending: Mutex<Vec<Fault>>,
    /// Forked children's address spaces, and an epoll set over their
    /// userfaultfds that every worker sleeps on.
    children: Mutex<Vec<Arc<Child>>>,
    child_ep: Epoll,
    next_child: AtomicU64,
    /// How many children are served (read without the lock).
    child_count: AtomicUsize,
    /// When the children were last checked for being alive ([`Core::now`]).
    swept_at: AtomicU64,
    /// Other processes' address spaces handed to the service
    /// (`service::foreign`), by tag; an epoll set over their userfaultfds
    /// (to see whether one has messages waiting); the next tag; how many.
    foreign: RwLock<HashMap<u64, Arc<ForeignSpace>>>,
    foreign_ep: Epoll,
    next_foreign: AtomicU64,
    foreign_count: AtomicUsize,
    /// Shadows by the inode of their memfd, for faults in ranges the kernel
    /// grew in place (`mremap` sends no event for that).
    inodes: RwLock<HashMap<u64, Weak<dyn FaultTarget>>>,
    /// `/proc/self/maps`, asked with `PROCMAP_QUERY` about such ranges.
    maps: Option<crate::sys::maps::Maps>,
    /// When an answer was first deferred for a pending event ([`Core::now`];
    /// 0: none waits).
    deferred_at: AtomicU64,
    /// Forks of this process under way (`fault::forkwatch`): workers leave
    /// the userfaultfd to the watcher meanwhile.
    pub(super) forking: AtomicU32,
    /// Messages the fork watcher read, not yet applied.
    pub(super) ring: super::forkwatch::Ring,
    /// The fork watcher is between reading the userfaultfd and putting
    /// what it read in the ring: what it read is neither there nor applied.
    pub(super) ring_filling: AtomicBool,
    /// Wakes the watcher.
    pub(super) fork_kick: OwnedFd,
    fault_tx: Sender<Job>,
    fault_rx: Receiver<Job>,
    prefetch_tx: Sender<Job>,
    prefetch_rx: Receiver<Job>,
    /// Signalled whenever a job is queued.
    pub(super) work: OwnedFd,
    /// Readable once the service stops; never drained.
    pub(super) stop: OwnedFd,
    pub(super) stopping: AtomicBool,
    pub counters: Counters,
    /// Targets that refused a demand fill for lack of budget since memory
    /// was last given back.
    refused: Mutex<Vec<Weak<dyn FaultTarget>>>,
    /// Bytes resident in all lazy shadows of this engine.
    pub resident: AtomicU64,
    /// The machine's free memory as last read, and bytes reserved since.
    room: AtomicU64,
    since_room: AtomicU64,
    pub budget: u64,
    pub page: u64,
    /// One per worker, in spawn order.
    slots: Vec<Slot>,
    /// The slot of the reader pinned to each CPU.
    by_cpu: Vec<Option<usize>>,
    /// Local mode: readers pinned per CPU, armed by where faults come from.
    local: bool,
    /// Local mode, and pinned readers may go `SCHED_IDLE` for their wakes
    /// (`sys::sched`).
    idle_wake: bool,
    /// Local mode where `idle_wake` is not allowed (no `CAP_SYS_NICE`):
    /// the pinned readers are `SCHED_IDLE` for good instead
    /// (`sys::sched::idle_for_good`), and one more worker, unpinned and of
    /// normal priority, is the backstop: disarmed, it looks every
    /// [`CHECK_MS`] whether faults wait unread (readers kept off busy CPUs)
    /// and serves them.
    idle_forever: bool,
    /// More threads faulted lately than there are readers pinned: the
    /// `SCHED_IDLE` wakes are then left off (a reader would wait behind
    /// runnable consumers on its CPU; measured 8% fewer faults per second
    /// with 4 and 8 threads on 2 CPUs).
    crowded: AtomicBool,
    /// When [`Core::crowded`] was last worked out ([`Core::now`] units).
    crowded_at: AtomicU64,
    /// Readers pinned, one per CPU.
    pinned: usize,
    epoch: Instant,
    /// Fault messages read so far.
    reads: AtomicU64,
    /// Workers parked.
    parked: AtomicUsize,
    /// Faulting threads' CPUs (their stat files open); cleared when a
    /// worker parks, so that threads gone leave no descriptor behind.
    tids: Mutex<HashMap<u32, Seen>>,
    /// Held to disarm, so that two workers never both leave at once.
    disarming: Mutex<()>,
    /// Threads inside fills, and spare workers (`service::spare`).
    spares: spare::Spares,
}

/// A worker's buffers for reading the userfaultfd.
pub(super) struct ReadBufs {
    raw: Vec<uffd_msg>,
    faults: Vec<Fault>,
    events: Vec<Event>,
}

impl ReadBufs {
    pub(super) fn new() -> ReadBufs {
        ReadBufs {
            raw: vec![uffd_msg::default(); BATCH],
            faults: Vec::with_capacity(BATCH),
            events: Vec::with_capacity(BATCH),
        }
    }
}

/// Whether `a` and `b` are the same target.
fn same(a: &Arc<dyn FaultTarget>, b: &Arc<dyn FaultTarget>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// The targets of `spans`, each once.
fn distinct_targets(spans: &[(u64, Span<Region>)]) -> Vec<Arc<dyn FaultTarget>> {
    let mut out: Vec<Arc<dyn FaultTarget>> = Vec::new();
    for (_, s) in spans {
        if let Some(t) = s.value.target() {
            if !out.iter().any(|x| same(x, &t)) {
                out.push(t);
            }
        }
    }
    out
}

/// Whether `then` (a [`Core::now`] time; 0: never) lies within `span`
/// before `now`.
fn within(now: u64, then: u64, span: u64) -> bool {
    then != 0 && now.saturating_sub(then) < span
}

impl Core {
    /// Records that `start..start+len`, registered with the engine's
    /// userfaultfd, shows `target` from `offset`. Call before registering.
    /// `internal`: see [`Hit::internal`]; `shared`: a `MAP_SHARED` mapping
    /// of the target's memfd. Returns the owner key for
    /// [`Core::release_owned`].
    pub fn add_region(
        &self,
        start: u64,
        len: u64,
        offset: u64,
        internal: bool,
        shared: bool,
        target: Weak<dyn FaultTarget>,
    ) -> u64 {
        static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
        let owner = NEXT_OWNER.fetch_add(1, Ordering::Relaxed);
        let r = Region {
            internal,
            owner,
            shared,
            target: Held::Weak(target),
        };
        let gone = self.regions.write().insert(start, len, offset, r);
        drop(gone);
        owner
    }

    /// Forgets what is left of the range `owner` added at `start..start+len`
    /// and returns those parts, for the caller to unregister and unmap. A
    /// part the consumer moved away or unmapped (the kernel's events said
    /// so) is not returned: what lies there now is not the owner's.
    pub fn release_owned(&self, owner: u64, start: u64, len: u64) -> Vec<(u64, u64)> {
        let mut regions = self.regions.write();
        let mine: Vec<(u64, u64)> = regions
            .iter()
            .filter(|(s, r)| *s >= start && *s < start + len && r.value.owner == owner)
            .map(|(s, r)| (s, r.len))
            .collect();
        for &(s, _) in &mine {
            regions.remove(s);
        }
        mine
    }

    /// Forgets a range. Call after unregistering it.
    pub fn remove_region(&self, start: u64) {
        let gone = self.regions.write().remove(start);
        drop(gone);
    }

    /// Makes faults in ranges of the memfd with inode `ino` that the kernel
    /// grew in place reach `target` ([`Core::adopt_grown`]).
    pub fn add_inode(&self, ino: u64, target: Weak<dyn FaultTarget>) {
        self.inodes.write().insert(ino, target);
    }

    pub fn remove_inode(&self, ino: u64) {
        self.inodes.write().remove(&ino);
    }

    /// Queues `work` (readahead) for any free worker.
    pub fn prefetch(&self, target: Weak<dyn FaultTarget>, work: Work) {
        let target = Held::Weak(target);
        let _ = self.prefetch_tx.send(Job { target, work });
        eventfd_signal(self.work.as_fd());
    }

    /// The target at `addr` in `regions` (of userfaultfd `uffd`), the
    /// offset it shows there and the bytes left in the range.
    fn lookup<'u>(
        &self,
        uffd: &'u Uffd,
        regions: &Spans<Region>,
        addr: u64,
    ) -> Option<(Arc<dyn FaultTarget>, Hit<'u>)> {
        let (start, r) = regions.find(addr)?;
        let into = addr - start;
        let hit = Hit {
            uffd,
            addr,
            offset: r.offset + into,
            limit: r.len - into,
            internal: r.value.internal,
        };
        Some((r.value.target()?, hit))
    }

    /// Ends a fault that no registered region explains: SIGBUS for the
    /// faulting thread if the range is still registered, a wake if it is
    /// gone (the thread then finds the range unregistered). Never a plain
    /// wake of a registered range, which would fault again for ever.
    /// Returns false if even the poison failed.
    pub fn refuse(&self, uffd: &Uffd, page_addr: u64) -> bool {
        self.counters.unknown_faults.fetch_add(1, Ordering::Relaxed);
        if uffd.poison(page_addr, self.page).is_err() {
            let _ = uffd.wake(page_addr, self.page);
            return false;
        }
        true
    }

    /// Answers one fault message on the engine's userfaultfd. Returns the
    /// target and work to run if the target claimed chunks.
    ///
    /// The region table stays read-locked until the answer is given. A
    /// message can be stale: its thread was woken by a fill of the same
    /// pages and has since unmapped the range, and the address may already
    /// be another range's (ranges are added to the table before they are
    /// registered and removed after they are unregistered, and unmapped
    /// only then). Under the lock the answer cannot land in a range that
    /// the lookup did not see: a poison for an address with no region would
    /// otherwise mark a page of a range registered there just after, a
    /// SIGBUS for a thread that never faulted wrongly (seen: 1 run in 20 of
    /// the C ABI test that maps and unmaps from four threads). Internal
    /// ranges (alias, template) live as long as the shadow, which `target`
    /// holds, and their faults may fill in place: the lock is let go first.
    fn on_fault(&self, f: Fault) -> Option<(Arc<dyn FaultTarget>, Work)> {
        let addr = f.address & !(self.page - 1);
        let mut regions = self.regions.read();
        if regions.find(addr).is_none() {
            drop(regions);
            self.adopt_grown(addr);
            regions = self.regions.read();
        }
        let Some((target, hit)) = self.lookup(&self.uffd, &regions, addr) else {
            let _ = self.refuse(&self.uffd, addr);
            return None;
        };
        let work = if hit.internal {
            drop(regions);
            target.on_fault(self, hit)
        } else {
            let work = target.on_fault(self, hit);
            // Before `target` may drop: a shadow's drop removes its regions.
            drop(regions);
            work
        };
        Some((target, work?))
    }

    /// A fault at `addr`, which no region covers, may be in a range the
    /// consumer grew with `mremap` (in place the kernel sends no event; a
    /// range grown as it moved reports its old length): the kernel still
    /// registers the grown part, with our userfaultfd, so the fault came
    /// to us. `/proc/self/maps` (`PROCMAP_QUERY`) names the mapping there:
    /// if it is of a shadow's memfd, the part around `addr` that no region
    /// covers is adopted as a consumer range of that shadow, at the offset
    /// the kernel shows there. Otherwise nothing changes (the fault is
    /// refused: SIGBUS, or a wake if the range is gone).
    fn adopt_grown(&self, addr: u64) {
        let Some(vma) = self.maps.as_ref().and_then(|m| m.query(addr)) else {
            return;
        };
        let Some(target) = self.inodes.read().get(&vma.inode).and_then(Weak::upgrade) else {
            return;
        };
        let mut regions = self.regions.write();
        if regions.find(addr).is_some() {
            return;
        }
        // Only a mapping that already holds a range of ours, of the same
        // shadow at the offsets the kernel shows, grew. A message can be
        // stale (its thread was answered and has since unmapped the range),
        // and a new mapping of a shadow's memfd may be there now that is
        // not registered yet (it is added to the table first): not ours.
        let grew = regions.iter().any(|(s, r)| {
            s >= vma.start
                && s + r.len <= vma.end
                && r.offset == vma.offset + (s - vma.start)
                && !r.value.internal
                && r.value.target.is(&target)
        });
        if !grew {
            return;
        }
        let lo = regions
            .iter()
            .filter(|(s, r)| s + r.len <= addr && s + r.len > vma.start)
            .map(|(s, r)| s + r.len)
            .max()
            .unwrap_or(vma.start);
        let hi = regions.next_after(addr).unwrap_or(vma.end).min(vma.end);
        let offset = vma.offset + (lo - vma.start);
        let r = Region {
            internal: false,
            owner: 0,
            shared: vma.shared,
            target: Held::Range(RangeHold::new(target.clone())),
        };
        regions.insert(lo, hi - lo, offset, r);
        drop(regions);
        target.on_adopt(self, None, lo, hi - lo, offset, vma.shared);
        self.counters.adopted_ranges.fetch_add(1, Ordering::Relaxed);
    }

    /// Nanoseconds since the service started, plus one (0 means never).
    pub(crate) fn now(&self) -> u64 {
        self.since_epoch(Instant::now())
    }

    /// [`Core::now`] as of the calling thread's last clock reading
    /// ([`crate::sys::clock::recent`]: a worker's takes one a turn): for
    /// the fault path's rate limits and accounting, not for timeouts.
    pub(crate) fn now_recent(&self) -> u64 {
        self.since_epoch(crate::sys::clock::recent())
    }

    /// `t` in [`Core::now`]'s units (ns since the start, never 0).
    fn since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// Serves the fault messages worker `me` read (`woken`: after sleeping):
    /// runs the first claimed work itself and queues the rest; then notes
    /// where they came from.
    fn serve(&self, me: Option<usize>, faults: &[Fault], woken: bool) {
        self.reads.fetch_add(faults.len() as u64, Ordering::SeqCst);
        self.run_claimed(faults.iter().filter_map(|f| self.on_fault(*f)));
        // Bookkeeping after the answers: the faulting threads run meanwhile.
        if self.local
            && let Some(me) = me
        {
            self.attribute(me, faults, woken);
            self.kick_parked(me);
        }
    }

    /// Runs the first of the `claimed` fills here and queues the others
    /// for whichever worker is free (a thread waits on each). `claimed` is
    /// drawn whole before the first runs.
    fn run_claimed(&self, claimed: impl IntoIterator<Item = (Arc<dyn FaultTarget>, Work)>) {
        let mut mine = None;
        for (target, work) in claimed {
            if mine.is_none() {
                mine = Some((target, work));
                continue;
            }
            let target = Held::Strong(target);
            let _ = self.fault_tx.send(Job { target, work });
            eventfd_signal(self.work.as_fd());
        }
        if let Some((target, work)) = mine {
            self.run_guarded(&*target, work);
        }
    }

    /// One round of a spare worker's service (`service::spare`): a claimed
    /// fault's job, faults a filler read, or faults read now. False if
    /// there was none.
    pub(super) fn serve_once(&self, bufs: &mut ReadBufs) -> bool {
        crate::sys::clock::refresh();
        if let Some(job) = self.next_job(&self.fault_rx) {
            self.run_job(job);
            return true;
        }
        let left = std::mem::take(&mut *self.pending.lock());
        if !left.is_empty() {
            self.serve(None, &left, false);
            return true;
        }
        self.flush_deferred();
        if self.has_children() {
            self.serve_children();
        }
        if self.serve_foreign_ready(None) {
            return true;
        }
        bufs.faults.clear();
        bufs.events.clear();
        match self.read_own(&mut bufs.raw, &mut bufs.faults, &mut bufs.events) {
            Ok(()) if !bufs.faults.is_empty() => {
                self.serve(None, &bufs.faults, false);
                true
            }
            _ => false,
        }
    }

    /// Whether a fault message, a claimed fault's job or faults a filler
    /// read wait to be served.
    pub(super) fn work_waits(&self) -> bool {
        self.uffd.has_pending()
            || self.foreign_pending()
            || !self.fault_rx.is_empty()
            || !self.pending.lock().is_empty()
    }

    /// The next job of `rx`; signals the work eventfd if more wait, so
    /// that another sleeping worker takes them.
    fn next_job(&self, rx: &Receiver<Job>) -> Option<Job> {
        let job = rx.try_recv().ok()?;
        if !self.fault_rx.is_empty() || !self.prefetch_rx.is_empty() {
            eventfd_signal(self.work.as_fd());
        }
        Some(job)
    }

    fn run_job(&self, job: Job) {
        let target = match job.target {
            Held::Strong(t) => Some(t),
            Held::Range(r) => Some(r.0.clone()),
            Held::Weak(w) => w.upgrade(),
        };
        if let Some(t) = target {
            self.run_guarded(&*t, job.work);
        }
    }

    /// Runs `work`; a panic that escapes the target (whose fills contain
    /// their own) is counted and the worker goes on.
    fn run_guarded(&self, target: &dyn FaultTarget, work: Work) {
        let _filling = self.spares.enter();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(self, work)));
        if r.is_err() {
            self.counters.worker_panics.fetch_add(1, Ordering::Relaxed);
        }
    }
}
