//! The fault-service thread pool, the region table and the memory budget.
//!
//! Every worker is also a reader: idle workers all sleep in epoll on the
//! userfaultfd (added `EPOLLEXCLUSIVE`, so one fault wakes one worker, not
//! the pool), and the one that reads a fault message serves it itself. This
//! saves a thread hand-off on every fault (the faulting thread, one worker,
//! done). Further claimed faults from the same batch, and readahead, go
//! through crossbeam channels to whichever worker is free; an eventfd tells
//! sleeping workers that a channel has work.

use super::{FaultTarget, Hit, Work};
use crate::config::Config;
use crate::error::{Cause, Error, Result};
use crate::stats::Counters;
use crate::sys::event::{Epoll, eventfd, eventfd_drain, eventfd_signal};
use crate::sys::uffd_abi::uffd_msg;
use crate::sys::{Fault, Uffd};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

/// Fault messages read at once.
const BATCH: usize = 32;

/// Bytes reserved between two reads of the machine's free memory.
pub const ROOM_EVERY: u64 = 4 << 20;
/// Free memory (MemAvailable, cgroup headroom) fills may not go below.
pub const ROOM_MARGIN: u64 = 64 << 20;

/// The tighter of `MemAvailable` and the memory cgroup's headroom
/// (`u64::MAX` if neither is known).
fn read_room() -> u64 {
    let a = crate::config::mem_available().unwrap_or(u64::MAX);
    let h = crate::config::headroom().unwrap_or(u64::MAX);
    a.min(h)
}

/// A registered address range and what it shows.
struct Region {
    len: u64,
    /// Offset in the target of the range's first byte.
    offset: u64,
    internal: bool,
    target: Weak<dyn FaultTarget>,
}

/// Work queued for any free worker. Claimed faults hold their target (a
/// thread waits on them); readahead does not keep a shadow alive.
struct Job {
    target: Held,
    work: Work,
}

enum Held {
    Strong(Arc<dyn FaultTarget>),
    Weak(Weak<dyn FaultTarget>),
}

/// State shared by the service threads and the shadows.
pub(crate) struct Core {
    pub uffd: Uffd,
    regions: RwLock<BTreeMap<u64, Region>>,
    fault_tx: Sender<Job>,
    fault_rx: Receiver<Job>,
    prefetch_tx: Sender<Job>,
    prefetch_rx: Receiver<Job>,
    /// Signalled whenever a job is queued.
    work: OwnedFd,
    /// Readable once the service stops; never drained.
    stop: OwnedFd,
    stopping: AtomicBool,
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
}

impl Core {
    /// Reserves `n` bytes of the memory budget; false if it would overflow.
    /// Speculative fills (readahead, and the part of a sequential fault's run
    /// beyond the faulting chunk) may only use the first half of the budget,
    /// so that they can never take the bytes a demand fault needs.
    ///
    /// The machine is consulted too, since a budget fixed at start cannot
    /// hold when many processes start at once: every [`ROOM_EVERY`] bytes
    /// reserved, the tighter of `MemAvailable` and the memory cgroup's
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
        if since >= ROOM_EVERY {
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
    /// `internal`: see [`Hit::internal`].
    pub fn add_region(
        &self,
        start: u64,
        len: u64,
        offset: u64,
        internal: bool,
        target: Weak<dyn FaultTarget>,
    ) {
        let r = Region {
            len,
            offset,
            internal,
            target,
        };
        self.regions.write().insert(start, r);
    }

    /// Forgets a range. Call after unregistering it.
    pub fn remove_region(&self, start: u64) {
        self.regions.write().remove(&start);
    }

    /// Queues `work` (readahead) for any free worker.
    pub fn prefetch(&self, target: Weak<dyn FaultTarget>, work: Work) {
        let target = Held::Weak(target);
        let _ = self.prefetch_tx.send(Job { target, work });
        eventfd_signal(self.work.as_fd());
    }

    /// The target at `addr`, the offset it shows there and the bytes left
    /// in the range.
    fn lookup(&self, addr: u64) -> Option<(Arc<dyn FaultTarget>, Hit<'_>)> {
        let regions = self.regions.read();
        let (start, r) = regions.range(..=addr).next_back()?;
        if addr >= start + r.len {
            return None;
        }
        let into = addr - start;
        let hit = Hit {
            uffd: &self.uffd,
            addr,
            offset: r.offset + into,
            limit: r.len - into,
            internal: r.internal,
        };
        Some((r.target.upgrade()?, hit))
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
    fn on_fault(&self, f: Fault) -> Option<(Arc<dyn FaultTarget>, Work)> {
        let addr = f.address & !(self.page - 1);
        let Some((target, hit)) = self.lookup(addr) else {
            let _ = self.refuse(&self.uffd, addr);
            return None;
        };
        let work = target.on_fault(self, hit)?;
        Some((target, work))
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
        let core = Arc::new(Core {
            uffd,
            regions: RwLock::new(BTreeMap::new()),
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
        });
        let service = Arc::new(Service {
            core: core.clone(),
            threads: Mutex::new(Vec::with_capacity(cfg.workers)),
        });
        for i in 0..cfg.workers {
            let c = core.clone();
            let sleep = Sleep::new(&core)?;
            let t = std::thread::Builder::new()
                .name(format!("shadowfd-fault{i}"))
                .spawn(move || worker(c, sleep))
                .map_err(|e| Error::sys("spawn a fault-service thread", e))?;
            service.threads.lock().push(t);
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

/// Where an idle worker sleeps: an epoll set over the userfaultfd (added
/// `EPOLLEXCLUSIVE`, so that a fault wakes one sleeping worker, not all of
/// them), the work eventfd and the stop eventfd.
struct Sleep {
    ep: Epoll,
}

impl Sleep {
    fn new(core: &Core) -> Result<Sleep> {
        let e = |e| Error::sys("epoll set-up for a fault-service thread", e);
        let ep = Epoll::new().map_err(e)?;
        let exclusive = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
        ep.add(core.uffd.as_fd(), exclusive, EV_UFFD).map_err(e)?;
        ep.add(core.work.as_fd(), libc::EPOLLIN as u32, EV_WORK)
            .map_err(e)?;
        ep.add(core.stop.as_fd(), libc::EPOLLIN as u32, EV_STOP)
            .map_err(e)?;
        Ok(Sleep { ep })
    }

    /// Blocks until a fault, queued work or the stop signal.
    fn wait(&self, core: &Core) {
        let mut tags = [0u64; 3];
        let n = self.ep.wait(&mut tags, -1);
        if tags[..n].contains(&EV_WORK) {
            eventfd_drain(core.work.as_fd());
        }
    }
}

/// One fault-service thread: serves the faults it reads itself, runs queued
/// jobs when no fault is pending, and sleeps in epoll otherwise.
fn worker(core: Arc<Core>, sleep: Sleep) {
    let mut raw = vec![uffd_msg::default(); BATCH];
    let mut faults = Vec::with_capacity(BATCH);
    while !core.stopping.load(Ordering::Relaxed) {
        // Claimed faults first: a thread is waiting on each.
        if let Ok(job) = core.fault_rx.try_recv() {
            run_job(&core, job);
            continue;
        }
        faults.clear();
        match core.uffd.read_faults(&mut raw, &mut faults) {
            Ok(()) if !faults.is_empty() => {
                let mut mine = None;
                for f in &faults {
                    if let Some((target, work)) = core.on_fault(*f) {
                        if mine.is_none() {
                            mine = Some((target, work));
                        } else {
                            let target = Held::Strong(target);
                            let _ = core.fault_tx.send(Job { target, work });
                            eventfd_signal(core.work.as_fd());
                        }
                    }
                }
                if let Some((target, work)) = mine {
                    target.run(&core, work);
                }
                continue;
            }
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => return,
        }
        if let Ok(job) = core.prefetch_rx.try_recv() {
            run_job(&core, job);
            continue;
        }
        sleep.wait(&core);
    }
}

fn run_job(core: &Core, job: Job) {
    let target = match job.target {
        Held::Strong(t) => Some(t),
        Held::Weak(w) => w.upgrade(),
    };
    if let Some(t) = target {
        t.run(core, job.work);
    }
}
