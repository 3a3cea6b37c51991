//! The fault-service thread pool and the region table.
//!
//! Every worker is also a reader: idle workers all wait in `poll(2)` on the
//! userfaultfd, and the one that reads a fault message fills that chunk
//! itself. This saves a thread hand-off on every fault (the faulting thread,
//! one worker, done), which is what a random 4 KiB fault costs most. Further
//! claimed faults from the same batch, and readahead, go through crossbeam
//! channels to whichever worker is free; an eventfd tells sleeping workers
//! that a channel has work. Workers sleep in epoll with the userfaultfd
//! added `EPOLLEXCLUSIVE`, so one fault wakes one worker, not the pool.

use super::lazy::{LazyShadow, Why, run_chunks};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::uffd::{Fault, Uffd, sys::uffd_msg};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

/// Fault messages read at once.
const BATCH: usize = 32;

/// A registered address range and the shadow it shows (from offset 0).
struct Region {
    len: u64,
    shadow: Weak<LazyShadow>,
}

pub(crate) enum Job {
    /// Chunks someone is waiting for; already marked `Filling`.
    Fault(Arc<LazyShadow>, Range<u64>),
    /// Chunks read ahead; claimed (Empty -> Filling) by the worker.
    Prefetch(Weak<LazyShadow>, Range<u64>),
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd(2) with valid flags; returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::sys("eventfd", std::io::Error::last_os_error()));
    }
    // SAFETY: eventfd just returned this descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
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
    /// Bytes resident in all lazy shadows of this engine.
    pub resident: AtomicU64,
    pub budget: u64,
    pub page: u64,
}

impl Core {
    /// Reserves `n` bytes of the memory budget; false if it would overflow.
    /// Speculative fills (readahead, and the part of a sequential fault's run
    /// beyond the faulting chunk) may only use the first half of the budget,
    /// so that they can never take the bytes a demand fault needs.
    pub fn reserve(&self, n: u64, speculative: bool) -> bool {
        let limit = if speculative {
            self.budget / 2
        } else {
            self.budget
        };
        self.resident
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(n).filter(|&t| t <= limit)
            })
            .is_ok()
    }

    pub fn release(&self, n: u64) {
        self.resident.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn add_region(&self, start: u64, len: u64, shadow: Weak<LazyShadow>) {
        self.regions.write().insert(start, Region { len, shadow });
    }

    pub fn remove_region(&self, start: u64) {
        self.regions.write().remove(&start);
    }

    /// Queues chunks for readahead, in runs.
    pub fn prefetch(&self, shadow: &LazyShadow, range: Range<u64>) {
        let run = run_chunks(shadow.chunk);
        let mut c = range.start;
        while c < range.end {
            let e = range.end.min(c + run);
            let _ = self.prefetch_tx.send(Job::Prefetch(shadow.weak(), c..e));
            c = e;
        }
        eventfd_signal(self.work.as_fd());
    }

    fn lookup(&self, addr: u64) -> Option<(u64, Arc<LazyShadow>)> {
        let regions = self.regions.read();
        let (start, r) = regions.range(..=addr).next_back()?;
        if addr >= start + r.len {
            return None;
        }
        Some((*start, r.shadow.upgrade()?))
    }

    /// Answers one fault message on the engine's userfaultfd. Returns the
    /// chunks to fill if this call claimed them.
    fn on_fault(&self, f: Fault) -> Option<(Arc<LazyShadow>, Range<u64>)> {
        let page_addr = f.address & !(self.page - 1);
        let Some((start, shadow)) = self.lookup(page_addr) else {
            // A range being torn down, or a stale message: let the thread retry.
            let _ = self.uffd.wake(page_addr, self.page);
            return None;
        };
        let run = shadow.on_fault(self, &self.uffd, start, page_addr - start)?;
        Some((shadow, run))
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
            work: eventfd()?,
            stop: eventfd()?,
            stopping: AtomicBool::new(false),
            counters: Counters::default(),
            resident: AtomicU64::new(0),
            budget: cfg.memory_budget,
            page: crate::page_size() as u64,
        });
        let service = Arc::new(Service {
            core: core.clone(),
            threads: Mutex::new(Vec::with_capacity(cfg.workers)),
        });
        for i in 0..cfg.workers {
            let c = core.clone();
            let chunk = cfg.chunk_size;
            let sleep = Sleep::new(&core)?;
            let t = std::thread::Builder::new()
                .name(format!("shadowfd-fault{i}"))
                .spawn(move || worker(c, chunk, sleep))
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

/// One fault-service thread: reads faults and fills chunks inline; runs
/// queued jobs when no fault is pending; sleeps in poll otherwise.
/// Where an idle worker sleeps: an epoll set over the userfaultfd, the work
/// eventfd and the stop eventfd. The userfaultfd is added with
/// `EPOLLEXCLUSIVE`, so a fault wakes one sleeping worker, not all of them.
struct Sleep {
    ep: OwnedFd,
}

const EV_UFFD: u64 = 0;
const EV_WORK: u64 = 1;
const EV_STOP: u64 = 2;

impl Sleep {
    fn new(core: &Core) -> Result<Sleep> {
        // SAFETY: epoll_create1 with a valid flag; returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(Error::sys("epoll_create1", std::io::Error::last_os_error()));
        }
        // SAFETY: epoll_create1 just returned this descriptor; we own it.
        let ep = unsafe { OwnedFd::from_raw_fd(fd) };
        let add = |target: BorrowedFd<'_>, events: u32, tag: u64| {
            let mut ev = libc::epoll_event { events, u64: tag };
            // SAFETY: `ev` is a live epoll_event; both descriptors are open.
            let r = unsafe {
                libc::epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    target.as_raw_fd(),
                    &mut ev,
                )
            };
            if r < 0 {
                return Err(Error::sys("epoll_ctl", std::io::Error::last_os_error()));
            }
            Ok(())
        };
        let exclusive = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
        add(core.uffd.as_fd(), exclusive, EV_UFFD)?;
        add(core.work.as_fd(), libc::EPOLLIN as u32, EV_WORK)?;
        add(core.stop.as_fd(), libc::EPOLLIN as u32, EV_STOP)?;
        Ok(Sleep { ep })
    }

    /// Blocks until a fault, queued work or the stop signal.
    fn wait(&self, core: &Core) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 3];
        // SAFETY: `evs` is a live array of 3 epoll_event structs.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), 3, -1) };
        for ev in evs.iter().take(n.max(0) as usize) {
            if ev.u64 == EV_WORK {
                eventfd_drain(core.work.as_fd());
            }
        }
    }
}

fn worker(core: Arc<Core>, chunk: u64, sleep: Sleep) {
    let run = run_chunks(chunk);
    let mut buf = vec![0u8; (run * chunk) as usize];
    let mut raw = vec![uffd_msg::default(); BATCH];
    let mut faults = Vec::with_capacity(BATCH);
    while !core.stopping.load(Ordering::Relaxed) {
        // Claimed faults first: a thread is waiting on each.
        if let Ok(job) = core.fault_rx.try_recv() {
            run_job(&core, job, run, &mut buf);
            continue;
        }
        faults.clear();
        match core.uffd.read_faults(&mut raw, &mut faults) {
            Ok(()) if !faults.is_empty() => {
                let mut mine = None;
                for f in &faults {
                    if let Some((s, c)) = core.on_fault(*f) {
                        if mine.is_none() {
                            mine = Some((s, c));
                        } else {
                            let _ = core.fault_tx.send(Job::Fault(s, c));
                            eventfd_signal(core.work.as_fd());
                        }
                    }
                }
                if let Some((s, r)) = mine {
                    s.fill(&core, r, &mut buf, Why::Fault);
                }
                continue;
            }
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => return,
        }
        if let Ok(job) = core.prefetch_rx.try_recv() {
            run_job(&core, job, run, &mut buf);
            continue;
        }
        sleep.wait(&core);
    }
}

fn run_job(core: &Core, job: Job, run: u64, buf: &mut [u8]) {
    match job {
        Job::Fault(s, r) => s.fill(core, r, buf, Why::Fault),
        Job::Prefetch(w, r) => {
            if let Some(s) = w.upgrade() {
                s.fill_empty(core, r, run, buf, Why::Prefetch);
            }
        }
    }
}
