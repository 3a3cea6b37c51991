//! The fault service's threads: started with the engine (the workers, the
//! watchdog for spare workers, the fork watcher where fork events are
//! granted), stopped when the last shadow or mapping lets go.

use super::*;

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
        let idle_env = std::env::var_os("SHADOWFD_IDLE_READERS");
        let forced = idle_env.as_ref().is_some_and(|v| v == "force");
        let idle_wake = local && !forced && crate::sys::sched::idle_wake_allowed();
        let idle_forever = local
            && !idle_wake
            && idle_env.is_none_or(|v| v != "0")
            && crate::sys::sched::idle_for_good_allowed();
        // The backstop of `idle_forever` readers comes on top.
        let workers = cfg.workers + usize::from(idle_forever);
        let mut by_cpu = vec![None; cpus.iter().max().map_or(0, |m| m + 1)];
        let mut slots = Vec::with_capacity(workers);
        for i in 0..workers {
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
                ep: Epoll::new()
                    .map_err(|e| Error::sys("epoll set-up for a fault-service thread", e))?,
                arm: Mutex::new(()),
            });
        }
        let core = Arc::new(Core {
            uffd,
            regions: RwLock::new(Spans::default()),
            read: ForkSafeLock::new(),
            pending: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            child_ep: Epoll::new()
                .map_err(|e| Error::sys("epoll_create for forked children", e))?,
            next_child: AtomicU64::new(EV_CHILD_FIRST),
            child_count: AtomicUsize::new(0),
            swept_at: AtomicU64::new(0),
            foreign: RwLock::new(HashMap::new()),
            foreign_ep: Epoll::new()
                .map_err(|e| Error::sys("epoll_create for clients' userfaultfds", e))?,
            next_foreign: AtomicU64::new(EV_FOREIGN_FIRST),
            foreign_count: AtomicUsize::new(0),
            inodes: RwLock::new(HashMap::new()),
            maps: crate::sys::maps::Maps::open_self(),
            deferred_at: AtomicU64::new(0),
            forking: AtomicU32::new(0),
            ring: crate::fault::forkwatch::Ring::new(),
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
            idle_wake,
            idle_forever,
            crowded: AtomicBool::new(false),
            crowded_at: AtomicU64::new(0),
            pinned: if local { cpus.len() } else { 0 },
            epoch: Instant::now(),
            reads: AtomicU64::new(0),
            parked: AtomicUsize::new(0),
            tids: Mutex::new(HashMap::new()),
            disarming: Mutex::new(()),
            spares: spare::Spares::new(workers),
        });
        let service = Arc::new(Service {
            core: core.clone(),
            threads: Mutex::new(Vec::with_capacity(workers)),
        });
        // Each thread reports once it has allocated (glibc then has given
        // it its malloc arena and cache): a `fork` of this process holds
        // the arena list lock until the fork event is read, so a thread
        // still starting up then would wait for the fork that waits for it
        // (`fault::forkwatch`).
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<()>();
        let mut started = 0;
        if core.uffd.follows_fork() {
            crate::fault::forkwatch::watch(&core);
            let c = core.clone();
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name("shadowfd-forkwatch".into())
                .spawn(move || {
                    drop(std::hint::black_box(Box::new([0u8; 64])));
                    let _ = ready.send(());
                    crate::fault::forkwatch::watcher(c)
                })
                .map_err(|e| Error::sys("spawn the fork watcher", e))?;
            service.threads.lock().push(t);
            started += 1;
        }
        {
            let c = core.clone();
            let t = std::thread::Builder::new()
                .name("shadowfd-watchdog".into())
                .spawn(move || spare::watchdog(c))
                .map_err(|e| Error::sys("spawn the fault service's watchdog", e))?;
            service.threads.lock().push(t);
        }
        for i in 0..workers {
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
