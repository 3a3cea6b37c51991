//! The reader thread, the worker pool and the region table.

use super::lazy::{ChunkState, LazyShadow, run_chunks};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::uffd::{Fault, Uffd, sys::uffd_msg};
use crossbeam_channel::{Receiver, Sender, TryRecvError, select};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

/// A registered address range and the shadow it shows (from offset 0).
struct Region {
    len: u64,
    shadow: Weak<LazyShadow>,
}

pub(crate) enum Job {
    /// A chunk someone is waiting for; already marked `Filling`.
    Fault(Weak<LazyShadow>, u64),
    /// Chunks read ahead; claimed (Empty -> Filling) by the worker.
    Prefetch(Weak<LazyShadow>, Range<u64>),
    Stop,
}

/// State shared by the service threads and the shadows.
pub(crate) struct Core {
    pub uffd: Uffd,
    regions: RwLock<BTreeMap<u64, Region>>,
    pub fault_tx: Sender<Job>,
    pub prefetch_tx: Sender<Job>,
    pub counters: Counters,
    /// Bytes resident in all lazy shadows of this engine.
    pub resident: AtomicU64,
    pub budget: u64,
    pub page: u64,
}

impl Core {
    /// Reserves `n` bytes of the memory budget; false if it would overflow.
    pub fn reserve(&self, n: u64) -> bool {
        self.resident
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(n).filter(|&t| t <= self.budget)
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

    fn lookup(&self, addr: u64) -> Option<(u64, Arc<LazyShadow>)> {
        let regions = self.regions.read();
        let (start, r) = regions.range(..=addr).next_back()?;
        if addr >= start + r.len {
            return None;
        }
        Some((*start, r.shadow.upgrade()?))
    }

    /// Answers one fault message.
    fn handle_fault(&self, f: Fault) {
        let page_addr = f.address & !(self.page - 1);
        let Some((start, shadow)) = self.lookup(page_addr) else {
            // A range being torn down, or a stale message: let the thread retry.
            let _ = self.uffd.wake(page_addr, self.page);
            return;
        };
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        shadow.counters.faults.fetch_add(1, Ordering::Relaxed);
        let offset = page_addr - start;
        let chunk = offset / shadow.chunk;
        if let Some(ahead) = shadow.readahead.lock().on_fault(chunk) {
            let run = run_chunks(shadow.chunk);
            for r in ahead {
                let mut c = r.start;
                while c < r.end {
                    let e = r.end.min(c + run);
                    let _ = self
                        .prefetch_tx
                        .send(Job::Prefetch(Arc::downgrade(&shadow), c..e));
                    c = e;
                }
            }
        }
        loop {
            match shadow.state(chunk) {
                ChunkState::Empty => {
                    if shadow.claim(chunk) {
                        let _ = self
                            .fault_tx
                            .send(Job::Fault(Arc::downgrade(&shadow), chunk));
                        return;
                    }
                }
                // The filler wakes every mapping once it is done.
                ChunkState::Filling => return,
                ChunkState::Filled => {
                    shadow.answer_filled(start, offset);
                    return;
                }
            }
        }
    }
}

/// The running service: owns the threads; stops them when dropped.
pub(crate) struct Service {
    pub core: Arc<Core>,
    stop: OwnedFd,
    threads: Mutex<Vec<JoinHandle<()>>>,
    workers: usize,
}

impl Service {
    pub fn start(uffd: Uffd, cfg: &Config) -> Result<Arc<Service>> {
        let (fault_tx, fault_rx) = crossbeam_channel::unbounded();
        let (prefetch_tx, prefetch_rx) = crossbeam_channel::unbounded();
        let core = Arc::new(Core {
            uffd,
            regions: RwLock::new(BTreeMap::new()),
            fault_tx,
            prefetch_tx,
            counters: Counters::default(),
            resident: AtomicU64::new(0),
            budget: cfg.memory_budget,
            page: crate::page_size() as u64,
        });
        // SAFETY: eventfd(2) with valid flags; returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::sys("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this descriptor; we are its only owner.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_dup = stop.try_clone().map_err(|e| Error::sys("dup eventfd", e))?;
        let mut threads = Vec::with_capacity(cfg.workers + 1);
        let c = core.clone();
        threads.push(spawn("shadowfd-uffd", move || reader(c, stop_dup))?);
        for i in 0..cfg.workers {
            let c = core.clone();
            let (f, p) = (fault_rx.clone(), prefetch_rx.clone());
            let chunk = cfg.chunk_size;
            threads.push(spawn(&format!("shadowfd-fill{i}"), move || {
                worker(c, f, p, chunk)
            })?);
        }
        Ok(Arc::new(Service {
            core,
            stop,
            threads: Mutex::new(threads),
            workers: cfg.workers,
        }))
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::sys(format!("spawn thread {name}"), e))
}

impl Drop for Service {
    fn drop(&mut self) {
        // Reached only when no shadow or mapping is left, so no range is
        // registered any more and nothing can be waiting on a fault.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
        for _ in 0..self.workers {
            let _ = self.core.fault_tx.send(Job::Stop);
        }
        let me = std::thread::current().id();
        for t in self.threads.get_mut().drain(..) {
            // The last reference may be dropped by a worker itself; it exits
            // on its own when it reads its Stop.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// Waits on the userfaultfd and the stop eventfd; reads faults in batches.
fn reader(core: Arc<Core>, stop: OwnedFd) {
    let mut raw = vec![uffd_msg::default(); 64];
    let mut faults = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: core.uffd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            break;
        }
        faults.clear();
        match core.uffd.read_faults(&mut raw, &mut faults) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => break,
        }
        for f in &faults {
            core.handle_fault(*f);
        }
    }
}

/// Fills chunks: faults first, prefetch when no fault is waiting.
fn worker(core: Arc<Core>, faults: Receiver<Job>, prefetch: Receiver<Job>, chunk: u64) {
    let run = run_chunks(chunk);
    let mut buf = vec![0u8; (run * chunk) as usize];
    loop {
        let job = match faults.try_recv() {
            Ok(j) => j,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => select! {
                recv(faults) -> j => match j { Ok(j) => j, Err(_) => return },
                recv(prefetch) -> j => match j { Ok(j) => j, Err(_) => return },
            },
        };
        match job {
            Job::Stop => return,
            Job::Fault(w, c) => {
                if let Some(s) = w.upgrade() {
                    s.fill(&core, c..c + 1, &mut buf, false);
                }
            }
            Job::Prefetch(w, r) => {
                if let Some(s) = w.upgrade() {
                    s.fill_empty(&core, r, run, &mut buf, true);
                }
            }
        }
    }
}
