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
//!
//! With fewer workers than CPUs, one CPU, or no thread ids (no
//! `THREAD_ID`, or no `/proc` to read a thread's CPU from), nothing is
//! pinned and every worker shares the userfaultfd with `EPOLLEXCLUSIVE`
//! (one fault wakes one worker), sleeping with no timeout.

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

/// Fault messages read at once.
const BATCH: usize = 32;

/// Bytes reserved between two reads of the machine's free memory, at
/// most.
pub const ROOM_EVERY: u64 = 4 << 20;
/// ... and at least: near the margin the reads come more often, so that
/// many processes filling at once in one cgroup (each sees only its own
/// reservations between reads) cannot together run past the margin: the
/// window is a [`ROOM_SHARE`]th of the room left above the margin.
pub const ROOM_EVERY_MIN: u64 = 256 << 10;
/// See [`ROOM_EVERY_MIN`].
pub const ROOM_SHARE: u64 = 32;
/// Free memory (MemAvailable, cgroup headroom) fills may not go below.
pub const ROOM_MARGIN: u64 = 64 << 20;

/// Bytes a process may reserve between two reads of the machine's room,
/// given the room last read (see [`ROOM_EVERY_MIN`]).
fn room_window(room: u64) -> u64 {
    (room.saturating_sub(ROOM_MARGIN) / ROOM_SHARE).clamp(ROOM_EVERY_MIN, ROOM_EVERY)
}

/// The tighter of `MemAvailable` and the memory cgroup's headroom
/// (`u64::MAX` if neither is known).
fn read_room() -> u64 {
    let a = crate::config::mem_available().unwrap_or(u64::MAX);
    let h = crate::config::headroom().unwrap_or(u64::MAX);
    a.min(h)
}

const MS: u64 = 1_000_000;
/// A microsecond in [`Core::now`] units.
const US: u64 = 1_000;
/// A reader stays armed while at least 1/SHARE of the recent faults come
/// from its CPU: the others then pay for its wake-ups (an IPI each when its
/// CPU is idle, about 8 µs) less than its own faults gain (a remote answer
/// costs 20-60 µs more).
const SHARE: u64 = 4;
/// A period with this many faults and none from a reader's CPU disarms it
/// at once (its threads have moved away).
const LEFT: u64 = 8;
/// This many faults in a row, none from a reader's CPU, end its period
/// early (and so disarm it): after an idle spell every reader is armed, and
/// until the remote ones disarm each fault pays for waking them (an IPI
/// each), which over a whole period is most of a short burst of faults.
const BURST: u64 = 2 * LEFT;
/// A worker armed because faults starved stays armed this long.
const LINGER: u64 = 50 * MS;
/// While faults come, a worker looks at its arming this often.
const CHECK_MS: i32 = 3;
/// With no fault for this long, workers park.
const IDLE: u64 = 100 * MS;
/// How long a thread's CPU, once read, is trusted by the reader of that CPU
/// when it found the thread's fault without sleeping (runnable there when
/// the thread faulted: the thread is most likely still there).
const REFRESH: u64 = 20 * MS;
/// The same otherwise: a reader woken by the fault (what a remote reader
/// always is), or one the cache says is not the thread's, so that a thread
/// that moved is noticed within this.
const REFRESH_WOKEN: u64 = 2 * MS;
/// The same for a reader the cache names as the thread's own, but which
/// slept until the fault woke it. A thread served on its own CPU finds its
/// reader runnable there (just preempted by the thread's wake), so this
/// mostly means the thread moved to another CPU, and every fault is now
/// answered across CPUs (60–70 µs here instead of 10) until the cache
/// says so and the reader there arms. Reading the thread's CPU costs a few
/// µs, after the answer.
const REFRESH_WOKEN_HERE: u64 = 100 * US;
/// Threads whose stat files are kept open, at most (all are closed beyond).
const TIDS_MAX: usize = 64;

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
    /// read, so that events apply in the kernel's order.
    pub(super) read: Mutex<()>,
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
    /// More threads faulted lately than there are readers pinned: the
    /// `SCHED_IDLE` wakes are then left off (a reader would wait behind
    /// runnable consumers on its CPU; measured 8% fewer faults per second
    /// with 4 and 8 threads on 2 CPUs).
    crowded: AtomicBool,
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
    /// Threads inside fills, and spare workers (`fault::spare`).
    pub(super) spares: super::spare::Spares,
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
    /// Reserves `n` bytes of the memory budget; false if it would overflow.
    /// Speculative fills (readahead, and the part of a sequential fault's run
    /// beyond the faulting chunk) may only use the first half of the budget,
    /// so that they can never take the bytes a demand fault needs.
    ///
    /// The machine is consulted too, since a budget fixed at start cannot
    /// hold when many processes start at once: every [`ROOM_EVERY`] bytes
    /// reserved (fewer near the margin, [`ROOM_EVERY_MIN`]), the tighter of
    /// `MemAvailable` and the memory cgroup's
    /// headroom is read again, and a fill that would leave less than
    /// [`ROOM_MARGIN`] of it is refused too.
    pub fn reserve(&self, n: u64, speculative: bool) -> Result<(), Cause> {
        let limit = if speculative {
            self.budget / 2
        } else {
            self.budget
        };
        let room = self.machine_room(n);
        if room < n.saturating_add(ROOM_MARGIN) {
            return Err(Cause::LowMemory {
                room,
                margin: ROOM_MARGIN,
            });
        }
        self.resident
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(n).filter(|&t| t <= limit)
            })
            .map(|_| ())
            .map_err(|resident| Cause::Budget {
                budget: self.budget,
                resident,
                needed: n,
            })
    }

    /// What the machine has left, as last read, less what was reserved since.
    fn machine_room(&self, n: u64) -> u64 {
        let since = self.since_room.fetch_add(n, Ordering::Relaxed) + n;
        if since >= room_window(self.room.load(Ordering::Relaxed)) {
            self.since_room.store(0, Ordering::Relaxed);
            self.room.store(read_room(), Ordering::Relaxed);
            return self.room.load(Ordering::Relaxed);
        }
        self.room.load(Ordering::Relaxed).saturating_sub(since)
    }

    /// Gives `n` bytes of the budget back; targets that refused fills for
    /// lack of it are told they may retry.
    pub fn release(&self, n: u64) {
        self.resident.fetch_sub(n, Ordering::AcqRel);
        if n > 0 {
            let refused = std::mem::take(&mut *self.refused.lock());
            for t in refused.iter().filter_map(Weak::upgrade) {
                t.memory_freed(self);
            }
        }
    }

    /// Remembers that `target` refused a demand fill for lack of budget.
    pub fn note_refusal(&self, target: Weak<dyn FaultTarget>) {
        self.refused.lock().push(target);
    }

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

    /// Reads and applies every event the kernel has queued, or is about to
    /// queue, on the engine's userfaultfd: call before adding a range of a
    /// mapping just made. The kernel frees an unmapped (or moved) range's
    /// addresses before it queues the event that names them, so a new
    /// mapping can land there first; applied later, that event would cut
    /// the new range out of the table. Waits (at most about 100 ms) while
    /// events are under way (`Uffd::changing`); faults read meanwhile are
    /// left to the workers.
    pub fn sync_events(&self) {
        let mut raw = [uffd_msg::default(); 8];
        for round in 0..200u32 {
            let (mut faults, mut events) = (Vec::new(), Vec::new());
            let g = self.read.lock();
            self.take_ring(&mut faults, &mut events);
            if self.forking.load(Ordering::SeqCst) == 0 {
                while let Ok(n) = self.uffd.read_raw(&mut raw) {
                    if n == 0 {
                        break;
                    }
                    decode(&raw[..n], &mut faults, &mut events);
                    self.apply_events(None, &self.regions, &mut events);
                }
            }
            drop(g);
            self.leave_faults(faults);
            // Read by the fork watcher and not in the ring yet: the event
            // that freed these addresses may be among them.
            let watched = self.ring_filling.load(Ordering::SeqCst) || !self.ring.is_empty();
            if !watched && !self.uffd.changing() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(50 << round.min(4)));
        }
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

    /// Applies mapping events read from the userfaultfd of `regions`
    /// (`uffd`: the engine's, or a child's) in order: the table follows
    /// the consumer's `munmap` and `mremap`, and a `fork` adds the child's
    /// address space. Targets hear of the changes to their ranges.
    fn apply_events(
        &self,
        space: Space<'_>,
        regions: &RwLock<Spans<Region>>,
        events: &mut Vec<Event>,
    ) {
        for ev in events.drain(..) {
            match ev {
                Event::Unmap { start, end } => {
                    let mut r = regions.write();
                    let gone = r.cut(start, end);
                    // Events of several threads interleave: another thread
                    // may have mapped these addresses again, and moved a
                    // range of ours there (its REMAP applied already),
                    // between this munmap and its event. What the kernel
                    // shows there now stays.
                    let (kept, gone): (Vec<_>, Vec<_>) = match space {
                        None => gone.into_iter().partition(|(s, sp)| self.shown(*s, sp)),
                        Some(_) => (Vec::new(), gone),
                    };
                    for (s, sp) in kept {
                        r.insert(s, sp.len, sp.offset, sp.value);
                    }
                    drop(r);
                    for t in distinct_targets(&gone) {
                        t.on_unmap(self, space, start, end);
                    }
                    // Dropped here, outside the lock: an adopted range may
                    // hold the last reference to its shadow.
                    drop(gone);
                }
                Event::Remap { from, to, len } => {
                    let moved = regions.read().moved(from, to, len, Region::adopted);
                    let mut r = regions.write();
                    let mut gone = r.copy(from, to, len, Region::adopted);
                    let adopted = match space {
                        None if len > 0 => self.follow_kernel(&mut r, to, len, &mut gone),
                        _ => Vec::new(),
                    };
                    drop(r);
                    for t in distinct_targets(&gone) {
                        t.on_unmap(self, space, to, to + len);
                    }
                    for t in distinct_targets(&moved) {
                        t.on_remap(self, space, from, to, len);
                    }
                    for (t, at, l, offset, shared) in &adopted {
                        t.on_adopt(self, space, *at, *l, *offset, *shared);
                    }
                    drop((gone, moved, adopted));
                }
                Event::Remove => {
                    // The range stays registered: the next touch faults.
                }
                Event::Fork(fd) => self.add_child(space, regions, fd),
            }
        }
    }

    /// Whether this process's mapping at `start` shows what `span` says:
    /// the same shadow's memfd at the same offset, all the way.
    fn shown(&self, start: u64, span: &Span<Region>) -> bool {
        let Some(vma) = self.maps.as_ref().and_then(|m| m.query(start)) else {
            return false;
        };
        if vma.offset + (start - vma.start) != span.offset || vma.end < start + span.len {
            return false;
        }
        let inodes = self.inodes.read();
        inodes
            .get(&vma.inode)
            .is_some_and(|w| span.value.target.is_at(w.as_ptr()))
    }

    /// After a REMAP into `to..to+len` of this process: the table there is
    /// made to agree with what the kernel shows. The table's copy of the
    /// source is wrong where the source's addresses were reused before the
    /// event came (another thread's munmap and mmap between them); such
    /// parts go to `gone`, and each part that maps a shadow's memfd is
    /// adopted from the kernel's view (a REMAP is only sent for registered
    /// ranges). Returns the adopted parts (target, start, len, offset,
    /// shared) for their targets to hear of.
    fn follow_kernel(
        &self,
        r: &mut Spans<Region>,
        to: u64,
        len: u64,
        gone: &mut Vec<(u64, Span<Region>)>,
    ) -> Vec<Adopted> {
        let Some(maps) = self.maps.as_ref() else {
            return Vec::new();
        };
        let end = to + len;
        let wrong: Vec<(u64, u64)> = r
            .iter()
            .filter(|(s, sp)| *s < end && s + sp.len > to && !self.shown(*s, sp))
            .map(|(s, sp)| (s, s + sp.len))
            .collect();
        for (a, b) in wrong {
            gone.extend(r.cut(a.max(to), b.min(end)));
        }
        let mut adopted = Vec::new();
        let mut at = to;
        while at < end {
            if let Some((s, sp)) = r.find(at) {
                at = s + sp.len;
                continue;
            }
            let next = r.next_after(at).unwrap_or(end).min(end);
            let Some(vma) = maps.query(at) else {
                at = next;
                continue;
            };
            let hi = vma.end.min(next);
            let target = self.inodes.read().get(&vma.inode).and_then(Weak::upgrade);
            if let Some(t) = target {
                let offset = vma.offset + (at - vma.start);
                let region = Region {
                    internal: false,
                    owner: 0,
                    shared: vma.shared,
                    target: Held::Range(RangeHold::new(t.clone())),
                };
                gone.extend(r.insert(at, hi - at, offset, region));
                adopted.push((t, at, hi - at, offset, vma.shared));
                self.counters.adopted_ranges.fetch_add(1, Ordering::Relaxed);
            }
            at = hi;
        }
        adopted
    }

    /// A `fork` of an address space we serve: the child's copies of the
    /// consumer ranges are registered with `fd`. They are served from now
    /// on like the parent's, through the workers, until the child is gone.
    fn add_child(&self, parent: Space<'_>, regions: &RwLock<Spans<Region>>, fd: OwnedFd) {
        let features = parent.map_or(&self.uffd, |u| &**u).features();
        let child = Arc::new(Uffd::from_fd(fd, features));
        let mut table = Spans::default();
        let mut targets = Vec::new();
        for (s, r) in regions.read().iter() {
            // The alias and the template are MADV_DONTFORK: not in the child.
            if r.value.internal {
                continue;
            }
            let a = r.value.adopted();
            if let Held::Range(RangeHold(t)) = &a.target {
                if !targets.iter().any(|x: &Arc<dyn FaultTarget>| same(x, t)) {
                    targets.push(t.clone());
                }
            }
            table.insert(s, r.len, r.offset, a);
        }
        let tag = self.next_child.fetch_add(1, Ordering::Relaxed);
        let child = Arc::new(Child {
            uffd: child,
            regions: RwLock::new(table),
            read: Mutex::new(()),
            tag,
        });
        for t in &targets {
            t.on_fork(self, parent, &child.uffd);
        }
        if self
            .child_ep
            .add(child.uffd.as_fd(), libc::EPOLLIN as u32, tag)
            .is_err()
        {
            // Not served: nothing may fault there unanswered.
            self.abandon(&child);
            return;
        }
        let mut children = self.children.lock();
        children.push(child);
        self.child_count.store(children.len(), Ordering::Relaxed);
        drop(children);
        self.counters.forks_followed.fetch_add(1, Ordering::Relaxed);
        self.kick_all();
    }

    /// Gives up a child: its targets forget its ranges; whatever still
    /// waits there is poisoned.
    fn abandon(&self, child: &Child) {
        let gone = child.regions.write().cut(0, u64::MAX);
        for (s, r) in &gone {
            let _ = child.uffd.poison(*s, r.len);
        }
        for t in distinct_targets(&gone) {
            t.on_unmap(self, Some(&child.uffd), 0, u64::MAX);
        }
    }

    /// Serves the children whose userfaultfds have messages.
    fn serve_children(&self) {
        let mut tags = [0u64; 16];
        let n = self.child_ep.wait(&mut tags, 0);
        if n == 0 {
            return;
        }
        let ready: Vec<Arc<Child>> = {
            let c = self.children.lock();
            c.iter()
                .filter(|c| tags[..n].contains(&c.tag))
                .cloned()
                .collect()
        };
        let mut raw = vec![uffd_msg::default(); BATCH];
        let (mut faults, mut events) = (Vec::new(), Vec::new());
        for child in ready {
            {
                let Some(_g) = child.read.try_lock() else {
                    continue;
                };
                if child
                    .uffd
                    .read_msgs(&mut raw, &mut faults, &mut events)
                    .is_err()
                {
                    continue;
                }
                self.apply_events(Some(&child.uffd), &child.regions, &mut events);
            }
            for f in faults.drain(..) {
                let addr = f.address & !(self.page - 1);
                let regions = child.regions.read();
                let Some((target, hit)) = self.lookup(&child.uffd, &regions, addr) else {
                    let _ = self.refuse(&child.uffd, addr);
                    continue;
                };
                let work = target.on_fault(self, hit);
                drop(regions);
                if let Some(w) = work {
                    self.run_guarded(&*target, w);
                }
            }
        }
    }

    /// Drops the children that exited or exec'd (at most once a second).
    fn sweep_children(&self, now: u64) {
        let then = self.swept_at.load(Ordering::Relaxed);
        if now.saturating_sub(then) < 1000 * MS
            || self
                .swept_at
                .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let dead: Vec<Arc<Child>> = {
            let mut c = self.children.lock();
            let (dead, live): (Vec<_>, Vec<_>) = c.drain(..).partition(|c| !c.uffd.alive());
            *c = live;
            self.child_count.store(c.len(), Ordering::Relaxed);
            dead
        };
        for child in dead {
            let _ = self.child_ep.delete(child.uffd.as_fd());
            let gone = child.regions.write().cut(0, u64::MAX);
            for t in distinct_targets(&gone) {
                t.on_unmap(self, Some(&child.uffd), 0, u64::MAX);
            }
            drop(gone);
        }
    }

    /// Whether children are being served (workers then look at them
    /// every second while parked).
    fn has_children(&self) -> bool {
        self.child_count.load(Ordering::Relaxed) > 0
    }

    /// Reads the engine's userfaultfd: events applied under [`Core::read`],
    /// in order; the faults are returned. Up to the read nothing allocates
    /// (`events` comes with room for a batch): a `fork` of this process may
    /// hold the allocator's locks until the read (`fault::forkwatch`).
    /// Reads nothing while a fork is under way or the watcher holds
    /// messages (they come first).
    fn read_own(
        &self,
        raw: &mut [uffd_msg],
        faults: &mut Vec<Fault>,
        events: &mut Vec<Event>,
    ) -> std::io::Result<()> {
        let _g = self.read.lock();
        if !self.ring.is_empty() {
            // What the fork watcher read comes first.
            self.take_ring(faults, events);
            return Ok(());
        }
        if self.forking.load(Ordering::SeqCst) > 0 {
            return Ok(());
        }
        self.uffd.read_msgs(raw, faults, events)?;
        if !events.is_empty() {
            self.apply_events(None, &self.regions, events);
        }
        Ok(())
    }

    /// A fork of this process is coming (the `pthread_atfork` prepare
    /// handler, before glibc locks the allocator).
    pub(super) fn fork_begins(&self) {
        self.forking.fetch_add(1, Ordering::SeqCst);
        eventfd_signal(self.fork_kick.as_fd());
    }

    /// The fork returned in the parent.
    pub(super) fn fork_ends(&self) {
        let _ = self
            .forking
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Decodes and applies the messages the fork watcher read (call under
    /// [`Core::read`]); their faults go to `faults`.
    fn take_ring(&self, faults: &mut Vec<Fault>, events: &mut Vec<Event>) {
        if self.ring.is_empty() {
            return;
        }
        let mut raw = Vec::new();
        self.ring.take(&mut raw);
        decode(&raw, faults, events);
        self.apply_events(None, &self.regions, events);
    }

    /// Leaves faults read off a worker's path to the workers.
    fn leave_faults(&self, faults: Vec<Fault>) {
        if !faults.is_empty() {
            self.pending.lock().extend(faults);
            eventfd_signal(self.work.as_fd());
        }
    }

    /// For a filler whose `UFFDIO_COPY` met a pending event (`EAGAIN`):
    /// reads the engine's userfaultfd (unless a worker is at it), applies
    /// the events and leaves the faults for the workers, then waits a
    /// little for the event's sender to go on. False once `tries` waits
    /// (about 2 s in all) did not help.
    pub fn await_events(&self, tries: &mut u32) -> bool {
        if let Some(g) = self.read.try_lock() {
            let mut raw = vec![uffd_msg::default(); BATCH];
            let (mut faults, mut events) = (Vec::new(), Vec::new());
            self.take_ring(&mut faults, &mut events);
            if self.forking.load(Ordering::SeqCst) == 0
                && self
                    .uffd
                    .read_msgs(&mut raw, &mut faults, &mut events)
                    .is_ok()
            {
                self.apply_events(None, &self.regions, &mut events);
            }
            drop(g);
            self.leave_faults(faults);
        }
        *tries += 1;
        let wait = 20u64 << (*tries).min(7);
        std::thread::sleep(std::time::Duration::from_micros(wait));
        *tries < 1000
    }

    /// Notes that an answer was deferred; see [`Core::flush_deferred`].
    fn note_deferred(&self, now: u64) {
        let _ = self
            .deferred_at
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Wakes the threads whose answers waited for a pending event
    /// ([`Uffd::flush_deferred`]), once the event had 200 µs to settle.
    /// Returns whether some still wait (the caller sleeps at most 1 ms).
    fn flush_deferred(&self, now: u64) -> bool {
        // No allocation here: workers pass through on their way to the
        // userfaultfd (see `read_own`); and no lock on the common path.
        if !self.uffd.has_deferred()
            && self.deferred_at.load(Ordering::Relaxed) == 0
            && self.child_count.load(Ordering::Relaxed) == 0
        {
            return false;
        }
        let children = self.children.lock();
        let any = self.uffd.has_deferred() || children.iter().any(|c| c.uffd.has_deferred());
        if !any {
            self.deferred_at.store(0, Ordering::Relaxed);
            return false;
        }
        self.note_deferred(now);
        let at = self.deferred_at.load(Ordering::Relaxed);
        if now.saturating_sub(at) < 200 * US {
            return true;
        }
        self.deferred_at.store(0, Ordering::Relaxed);
        self.uffd.flush_deferred();
        for c in children.iter() {
            c.uffd.flush_deferred();
        }
        false
    }

    /// This process is exiting: each forked child that still maps lazy
    /// ranges gets them settled ([`FaultTarget::orphan`]): what its targets
    /// vouch for mapped, the rest poisoned, so that the child reads `SIGBUS`
    /// and never zeros once its userfaultfd closes with this process. Locks
    /// are only tried: a worker may hold one as the process exits.
    pub(super) fn orphan_children(&self) {
        // A fork just before the exit: its event may be read (the fork
        // returned) but not applied yet.
        self.sync_events();
        let Some(children) = self.children.try_lock() else {
            return;
        };
        for c in children.iter() {
            if !c.uffd.alive() {
                continue;
            }
            let Some(regions) = c.regions.try_read() else {
                continue;
            };
            for (s, r) in regions.iter() {
                if let Some(t) = r.value.target() {
                    t.orphan(self, &c.uffd, s, r.len, r.offset);
                } else {
                    let _ = c.uffd.poison(s, r.len);
                }
            }
        }
    }

    /// Kicks every worker (a new child to watch).
    fn kick_all(&self) {
        for i in 0..self.slots.len() {
            self.kick(i);
        }
    }

    /// Nanoseconds since the service started, plus one (0 means never).
    pub(crate) fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// Serves the fault messages worker `me` read (`woken`: after sleeping):
    /// runs the first claimed work itself and queues the rest; then notes
    /// where they came from.
    fn serve(&self, me: Option<usize>, faults: &[Fault], woken: bool) {
        self.reads.fetch_add(faults.len() as u64, Ordering::SeqCst);
        let mut mine = None;
        for f in faults {
            if let Some((target, work)) = self.on_fault(*f) {
                if mine.is_none() {
                    mine = Some((target, work));
                } else {
                    let target = Held::Strong(target);
                    let _ = self.fault_tx.send(Job { target, work });
                    eventfd_signal(self.work.as_fd());
                }
            }
        }
        if let Some((target, work)) = mine {
            self.run_guarded(&*target, work);
        }
        // Bookkeeping after the answers: the faulting threads run meanwhile.
        if self.local
            && let Some(me) = me
        {
            self.attribute(me, faults, woken);
            self.kick_parked(me);
        }
    }

    /// One round of a spare worker's service (`fault::spare`): a claimed
    /// fault's job, faults a filler read, or faults read now. False if
    /// there was none.
    pub(super) fn serve_once(&self, bufs: &mut ReadBufs) -> bool {
        if let Some(job) = self.next_job(&self.fault_rx) {
            self.run_job(job);
            return true;
        }
        let left = std::mem::take(&mut *self.pending.lock());
        if !left.is_empty() {
            self.serve(None, &left, false);
            return true;
        }
        self.flush_deferred(self.now());
        if self.has_children() {
            self.serve_children();
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
        self.uffd.has_pending() || !self.fault_rx.is_empty() || !self.pending.lock().is_empty()
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

    /// Notes the CPU of each fault's thread, as read by worker `me`
    /// (`woken`: it slept before reading them), and kicks the reader of a
    /// CPU that faults while it is disarmed.
    fn attribute(&self, me: usize, faults: &[Fault], woken: bool) {
        let now = self.now();
        let mine = self.slots[me].cpu;
        let mut last = None;
        for f in faults {
            // One look-up per thread and batch.
            let cpu = match last {
                Some((tid, cpu)) if tid == f.tid => cpu,
                _ => {
                    let cpu = self.cpu_of(f.tid, now, mine, woken);
                    last = Some((f.tid, cpu));
                    cpu
                }
            };
            // Not found: a thread that is gone, or of another process
            // (`/proc/PID/mem` on an internal mapping). A CPU with no
            // reader: the affinity mask grew since the start.
            let Some(&Some(i)) = cpu.and_then(|c| self.by_cpu.get(c)) else {
                continue;
            };
            let s = &self.slots[i];
            s.local_faults.fetch_add(1, Ordering::SeqCst);
            if !s.armed.load(Ordering::SeqCst) {
                s.called.store(true, Ordering::SeqCst);
                self.kick(i);
            }
        }
        if self.idle_wake {
            let tids = self.tids.lock();
            let active = tids.values().filter(|s| within(now, s.at, 2 * REFRESH));
            let crowded = active.count() > self.pinned;
            self.crowded.store(crowded, Ordering::Relaxed);
        }
    }

    /// The CPU thread `tid` last ran on, as cached if read lately enough:
    /// within [`REFRESH`] if the reader (on CPU `mine`) found the fault
    /// without sleeping and the cache names its CPU, else [`REFRESH_WOKEN`].
    fn cpu_of(&self, tid: u32, now: u64, mine: Option<usize>, woken: bool) -> Option<usize> {
        if tid == 0 {
            return None;
        }
        let mut tids = self.tids.lock();
        if let Some(s) = tids.get_mut(&tid) {
            let refresh = match (woken, s.cpu == mine) {
                (false, true) => REFRESH,
                (true, true) => REFRESH_WOKEN_HERE,
                _ => REFRESH_WOKEN,
            };
            if now.saturating_sub(s.at) >= refresh {
                // A thread gone (or a tid reused) reads as None: reopen.
                s.cpu = s.stat.as_ref().and_then(ThreadStat::cpu);
                if s.cpu.is_none() {
                    s.stat = ThreadStat::open(tid);
                    s.cpu = s.stat.as_ref().and_then(ThreadStat::cpu);
                }
                s.at = now;
            }
            return s.cpu;
        }
        if tids.len() >= TIDS_MAX {
            tids.clear();
        }
        // Failures are cached too: a thread gone, or of another process.
        let stat = ThreadStat::open(tid);
        let cpu = stat.as_ref().and_then(ThreadStat::cpu);
        tids.insert(tid, Seen { stat, cpu, at: now });
        cpu
    }

    fn kick(&self, i: usize) {
        let s = &self.slots[i];
        if !s.kicked.swap(true, Ordering::SeqCst) {
            eventfd_signal(s.kick.as_fd());
        }
    }

    /// Kicks every parked worker but `me`.
    fn kick_parked(&self, me: usize) {
        if self.parked.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (i, s) in self.slots.iter().enumerate() {
            if i != me && s.parked.load(Ordering::SeqCst) {
                self.kick(i);
            }
        }
    }

    /// Whether a worker other than `me` is armed.
    fn covered_without(&self, me: usize) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(j, o)| j != me && o.armed.load(Ordering::SeqCst))
    }
}

/// The running service: owns the threads; stops them when dropped.
pub(crate) struct Service {
    pub core: Arc<Core>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Service {
    pub fn start(uffd: Uffd, cfg: &Config) -> Result<Arc<Service>> {
        let (fault_tx, fault_rx) = crossbeam_channel::unbounded();
        let (prefetch_tx, prefetch_rx) = crossbeam_channel::unbounded();
        let cpus = allowed_cpus();
        // Local mode needs a reader per CPU and a way to see threads' CPUs.
        let local = cpus.len() >= 2
            && cfg.workers >= cpus.len()
            && uffd.has_thread_id()
            && ThreadStat::open(nix::unistd::gettid().as_raw() as u32)
                .and_then(|s| s.cpu())
                .is_some();
        let mut by_cpu = vec![None; cpus.iter().max().map_or(0, |m| m + 1)];
        let mut slots = Vec::with_capacity(cfg.workers);
        for i in 0..cfg.workers {
            let cpu = cpus.get(i).copied().filter(|_| local);
            if let Some(c) = cpu {
                by_cpu[c] = Some(i);
            }
            slots.push(Slot {
                cpu,
                armed: AtomicBool::new(true),
                local_faults: AtomicU64::new(0),
                called: AtomicBool::new(false),
                parked: AtomicBool::new(false),
                kicked: AtomicBool::new(false),
                kick: eventfd().map_err(|e| Error::sys("eventfd", e))?,
            });
        }
        let core = Arc::new(Core {
            uffd,
            regions: RwLock::new(Spans::default()),
            read: Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            child_ep: Epoll::new()
                .map_err(|e| Error::sys("epoll_create for forked children", e))?,
            next_child: AtomicU64::new(EV_CHILD_FIRST),
            child_count: AtomicUsize::new(0),
            swept_at: AtomicU64::new(0),
            inodes: RwLock::new(HashMap::new()),
            maps: crate::sys::maps::Maps::open_self(),
            deferred_at: AtomicU64::new(0),
            forking: AtomicU32::new(0),
            ring: super::forkwatch::Ring::new(),
            ring_filling: AtomicBool::new(false),
            fork_kick: eventfd().map_err(|e| Error::sys("eventfd", e))?,
            fault_tx,
            fault_rx,
            prefetch_tx,
            prefetch_rx,
            work: eventfd().map_err(|e| Error::sys("eventfd", e))?,
            stop: eventfd().map_err(|e| Error::sys("eventfd", e))?,
            stopping: AtomicBool::new(false),
            counters: Counters::default(),
            refused: Mutex::new(Vec::new()),
            resident: AtomicU64::new(0),
            room: AtomicU64::new(read_room()),
            since_room: AtomicU64::new(0),
            budget: cfg.memory_budget,
            page: crate::page_size() as u64,
            slots,
            by_cpu,
            local,
            idle_wake: local && crate::sys::sched::idle_wake_allowed(),
            crowded: AtomicBool::new(false),
            pinned: if local { cpus.len() } else { 0 },
            epoch: Instant::now(),
            reads: AtomicU64::new(0),
            parked: AtomicUsize::new(0),
            tids: Mutex::new(HashMap::new()),
            disarming: Mutex::new(()),
            spares: super::spare::Spares::new(cfg.workers),
        });
        let service = Arc::new(Service {
            core: core.clone(),
            threads: Mutex::new(Vec::with_capacity(cfg.workers)),
        });
        // Each thread reports once it has allocated (glibc then has given
        // it its malloc arena and cache): a `fork` of this process holds
        // the arena list lock until the fork event is read, so a thread
        // still starting up then would wait for the fork that waits for it
        // (`fault::forkwatch`).
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<()>();
        let mut started = 0;
        if core.uffd.follows_fork() {
            super::forkwatch::watch(&core);
            let c = core.clone();
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name("shadowfd-forkwatch".into())
                .spawn(move || {
                    drop(std::hint::black_box(Box::new([0u8; 64])));
                    let _ = ready.send(());
                    super::forkwatch::watcher(c)
                })
                .map_err(|e| Error::sys("spawn the fork watcher", e))?;
            service.threads.lock().push(t);
            started += 1;
        }
        {
            let c = core.clone();
            let t = std::thread::Builder::new()
                .name("shadowfd-watchdog".into())
                .spawn(move || super::spare::watchdog(c))
                .map_err(|e| Error::sys("spawn the fault service's watchdog", e))?;
            service.threads.lock().push(t);
        }
        for i in 0..cfg.workers {
            let c = core.clone();
            let sleep = Sleep::new(&core, i)?;
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("shadowfd-fault{i}"))
                .spawn(move || {
                    drop(std::hint::black_box(Box::new([0u8; 64])));
                    let _ = ready.send(());
                    worker(c, i, sleep)
                })
                .map_err(|e| Error::sys("spawn a fault-service thread", e))?;
            service.threads.lock().push(t);
            started += 1;
        }
        for _ in 0..started {
            // Bounded: a thread that cannot start in 10 s is a broken system.
            let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(10));
        }
        Ok(service)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Reached only when no shadow or mapping is left, so no range is
        // registered any more and nothing can be waiting on a fault.
        self.core.stopping.store(true, Ordering::SeqCst);
        eventfd_signal(self.core.stop.as_fd());
        self.core.spares.stop();
        let me = std::thread::current().id();
        for t in self.threads.get_mut().drain(..) {
            // The last reference may be dropped by a worker itself; it sees
            // `stopping` and exits on its own.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

const EV_UFFD: u64 = 0;
const EV_WORK: u64 = 1;
const EV_STOP: u64 = 2;
const EV_KICK: u64 = 3;
const EV_CHILD: u64 = 4;
/// Tags of children in [`Core::child_ep`] start here.
const EV_CHILD_FIRST: u64 = 16;

/// Where an idle worker sleeps: an epoll set over the userfaultfd (see the
/// module documentation for how it is added and armed), the work eventfd
/// (`EPOLLEXCLUSIVE`), the stop eventfd and the worker's own kick eventfd.
struct Sleep {
    ep: Epoll,
    me: usize,
}

impl Sleep {
    fn new(core: &Core, me: usize) -> Result<Sleep> {
        let e = |e| Error::sys("epoll set-up for a fault-service thread", e);
        let ep = Epoll::new().map_err(e)?;
        let (inp, excl) = (libc::EPOLLIN as u32, libc::EPOLLEXCLUSIVE as u32);
        let uffd = if core.local { inp } else { inp | excl };
        ep.add(core.uffd.as_fd(), uffd, EV_UFFD).map_err(e)?;
        ep.add(core.work.as_fd(), inp | excl, EV_WORK).map_err(e)?;
        ep.add(core.stop.as_fd(), inp, EV_STOP).map_err(e)?;
        ep.add(core.slots[me].kick.as_fd(), inp, EV_KICK)
            .map_err(e)?;
        // Not EPOLLEXCLUSIVE: the kernel refuses it for a nested epoll set.
        ep.add(core.child_ep.as_fd(), inp, EV_CHILD).map_err(e)?;
        Ok(Sleep { ep, me })
    }

    /// Blocks until a fault (if armed), queued work, a kick, the stop
    /// signal or `timeout_ms` (< 0: none).
    fn wait(&self, core: &Core, timeout_ms: i32) {
        let mut tags = [0u64; 5];
        let n = self.ep.wait(&mut tags, timeout_ms);
        for t in &tags[..n] {
            match *t {
                EV_WORK => eventfd_drain(core.work.as_fd()),
                EV_KICK => {
                    // Cleared first: a kick after this signals again.
                    let s = &core.slots[self.me];
                    s.kicked.store(false, Ordering::SeqCst);
                    eventfd_drain(s.kick.as_fd());
                }
                EV_CHILD => core.serve_children(),
                _ => {}
            }
        }
    }

    /// Arms (`on`) or disarms this worker (local mode); returns whether it
    /// is armed now. It stays armed if no other worker is.
    fn set_armed(&self, core: &Core, on: bool) -> bool {
        let slot = &core.slots[self.me];
        let uffd = core.uffd.as_fd();
        if on {
            if self.ep.modify(uffd, libc::EPOLLIN as u32, EV_UFFD).is_err() {
                return slot.armed.load(Ordering::SeqCst);
            }
            slot.armed.store(true, Ordering::SeqCst);
            return true;
        }
        let _g = core.disarming.lock();
        if !core.covered_without(self.me) {
            return true;
        }
        slot.armed.store(false, Ordering::SeqCst);
        if self.ep.modify(uffd, 0, EV_UFFD).is_err() {
            slot.armed.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }
}

/// Where the faults a worker's CPU has seen lately stand among all faults
/// (local mode): counts smoothed over a few [`CHECK_MS`] periods.
#[derive(Default)]
struct Share {
    /// When last updated, and the two counters then.
    at: u64,
    local_then: u64,
    all_then: u64,
    /// Faults from this CPU, and all faults, each period adding its own and
    /// halving the sum before.
    local: u64,
    all: u64,
    /// Whether the last period had faults, none of them from this CPU.
    left: bool,
}

impl Share {
    /// Starts afresh from the counters `local` and `all`.
    fn reset(&mut self, now: u64, local: u64, all: u64) {
        *self = Share {
            at: now,
            local_then: local,
            all_then: all,
            ..Share::default()
        };
    }

    /// Takes in the counters, at most once per period, or sooner after
    /// [`BURST`] faults none of which came from this CPU.
    fn update(&mut self, now: u64, local: u64, all: u64) {
        let burst = local == self.local_then && all - self.all_then >= BURST;
        if !burst && now.saturating_sub(self.at) < CHECK_MS as u64 * MS {
            return;
        }
        let (l, a) = (local - self.local_then, all - self.all_then);
        self.local = self.local / 2 + l;
        self.all = self.all / 2 + a;
        self.left = l == 0 && a >= LEFT;
        (self.at, self.local_then, self.all_then) = (now, local, all);
    }

    /// Whether this CPU's share of the faults is worth a reader that every
    /// fault wakes: a quarter at least, and some in the last period if it
    /// had a few. With no faults lately, no change.
    fn worth(&self, armed: bool) -> bool {
        if self.all == 0 {
            return armed;
        }
        !self.left && self.local * SHARE >= self.all
    }
}

thread_local! {
    /// This thread is a fault-service worker.
    static IN_SERVICE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a fault-service worker.
pub(super) fn mark_in_service() {
    IN_SERVICE.with(|c| c.set(true));
}

/// Whether the calling thread is a fault-service worker.
pub(crate) fn in_service() -> bool {
    IN_SERVICE.with(Cell::get)
}

/// One fault-service thread: serves the faults it reads itself, runs queued
/// jobs when no fault is pending, and sleeps in epoll otherwise.
fn worker(core: Arc<Core>, me: usize, sleep: Sleep) {
    IN_SERVICE.with(|c| c.set(true));
    let slot = &core.slots[me];
    if let Some(cpu) = slot.cpu {
        // Unpinned, it still serves; only less often on the faulting CPU.
        if pin_to(cpu).is_ok() && core.idle_wake {
            crate::sys::sched::enable_idle_wake();
        }
    }
    let mut raw = vec![uffd_msg::default(); BATCH];
    let mut faults = Vec::with_capacity(BATCH);
    let mut events = Vec::with_capacity(BATCH);
    let mut armed = true;
    // Fault messages read as of the last look, and since when none were.
    let (mut seen, mut quiet_since) = (0u64, 0u64);
    // `reads` when a message was last seen waiting while disarmed, and when
    // faults were last found starving.
    let (mut waiting_at, mut starved_at) = (None, 0u64);
    let mut share = Share::default();
    // Slept since the last fault was read.
    let mut woken = false;
    while !core.stopping.load(Ordering::Relaxed) {
        crate::sys::sched::settle(false);
        if core.idle_wake {
            crate::sys::sched::allow(!core.crowded.load(Ordering::Relaxed));
        }
        // Claimed faults first: a thread is waiting on each.
        if let Some(job) = core.next_job(&core.fault_rx) {
            core.run_job(job);
            continue;
        }
        // Faults a filler read while it waited for an event.
        let left = std::mem::take(&mut *core.pending.lock());
        if !left.is_empty() {
            core.serve(Some(me), &left, false);
            continue;
        }
        let deferred = core.flush_deferred(core.now());
        // While this process forks, the fork watcher reads the userfaultfd
        // (`fault::forkwatch`); workers take what it read.
        let forking = core.forking.load(Ordering::SeqCst) > 0;
        if armed || forking || !core.ring.is_empty() {
            faults.clear();
            events.clear();
            match core.read_own(&mut raw, &mut faults, &mut events) {
                Ok(()) if !faults.is_empty() => {
                    core.serve(Some(me), &faults, woken);
                    woken = false;
                    continue;
                }
                Ok(()) if forking => {
                    // The watcher reads the userfaultfd (it stays readable);
                    // forked children are served meanwhile.
                    core.serve_children();
                    std::thread::sleep(std::time::Duration::from_micros(100));
                    continue;
                }
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // Not expected: say so once, count it, back off and go
                    // on, so that the pool never shrinks in silence.
                    if core.counters.uffd_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("shadowfd: fault service: reading the userfaultfd failed: {e}");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            }
        }
        if let Some(job) = core.next_job(&core.prefetch_rx) {
            core.run_job(job);
            continue;
        }
        crate::sys::sched::settle(true);
        // Children are looked at once a second, whatever else happens.
        let children = core.has_children();
        if children {
            core.sweep_children(core.now());
        }
        if deferred {
            sleep.wait(&core, 1);
            woken = true;
            continue;
        }
        if !core.local {
            sleep.wait(&core, if children { 1000 } else { -1 });
            woken = true;
            continue;
        }
        let now = core.now();
        let reads = core.reads.load(Ordering::SeqCst);
        if reads != seen {
            (seen, quiet_since) = (reads, now);
        }
        if !armed {
            // A message waiting at two looks in a row, nothing read between:
            // the armed workers cannot read.
            if !core.uffd.has_pending() {
                waiting_at = None;
            } else if waiting_at == Some(reads) {
                starved_at = now;
            } else {
                waiting_at = Some(reads);
            }
        }
        let local = slot.local_faults.load(Ordering::SeqCst);
        let called = slot.called.swap(false, Ordering::SeqCst);
        if called {
            share.reset(now, local, reads);
        } else {
            share.update(now, local, reads);
        }
        let idle = !within(now, quiet_since, IDLE);
        let want = idle
            || called
            || (slot.cpu.is_some() && share.worth(armed))
            || within(now, starved_at, LINGER)
            || !core.covered_without(me);
        if want != armed {
            let was = armed;
            armed = sleep.set_armed(&core, want);
            if armed && !was {
                waiting_at = None;
                continue;
            }
        }
        if !idle {
            sleep.wait(&core, CHECK_MS);
            woken = true;
            continue;
        }
        // Park (armed) until a fault, its reader's kick, work or the stop.
        slot.parked.store(true, Ordering::SeqCst);
        core.parked.fetch_add(1, Ordering::SeqCst);
        super::buffer::release();
        // The faulting threads' stat files go too: the threads may be gone
        // (a thread seen again is looked up afresh, a few µs once).
        core.tids.lock().clear();
        if core.reads.load(Ordering::SeqCst) == seen {
            sleep.wait(&core, if children { 1000 } else { -1 });
            woken = true;
        }
        slot.parked.store(false, Ordering::SeqCst);
        core.parked.fetch_sub(1, Ordering::SeqCst);
        let now = core.now();
        share.reset(now, slot.local_faults.load(Ordering::SeqCst), seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_is_read_more_often_near_the_margin() {
        const MIB: u64 = 1 << 20;
        assert_eq!(room_window(u64::MAX), ROOM_EVERY);
        assert_eq!(room_window(ROOM_MARGIN + 32 * ROOM_EVERY), ROOM_EVERY);
        assert_eq!(room_window(ROOM_MARGIN + 64 * MIB), 2 * MIB);
        assert_eq!(room_window(ROOM_MARGIN + MIB), ROOM_EVERY_MIN);
        assert_eq!(room_window(0), ROOM_EVERY_MIN);
        // 32 processes each at a full window stay within the room above
        // the margin, wherever the window is not at its floor.
        for above in [8 * MIB, 64 * MIB, 100 * MIB, 128 * MIB] {
            assert!(ROOM_SHARE * room_window(ROOM_MARGIN + above) <= above);
        }
    }
}
