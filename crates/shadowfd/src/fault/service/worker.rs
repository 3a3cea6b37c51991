//! A fault-service worker's loop and where it sleeps.

use super::*;

pub(super) const EV_UFFD: u64 = 0;

pub(super) const EV_WORK: u64 = 1;

pub(super) const EV_STOP: u64 = 2;

pub(super) const EV_KICK: u64 = 3;

pub(super) const EV_CHILD: u64 = 4;

/// Tags of children in [`Core::child_ep`] start here.
pub(super) const EV_CHILD_FIRST: u64 = 16;

/// Tags of foreign spaces (`service::foreign`) start here, in the workers'
/// sets and [`Core::foreign_ep`].
pub(super) const EV_FOREIGN_FIRST: u64 = 1 << 32;

/// Where an idle worker sleeps: its epoll set ([`Slot::ep`]) over the
/// userfaultfd (see the module documentation for how it is added and
/// armed) and the foreign spaces' (`service::foreign`, armed with it), the
/// work eventfd (`EPOLLEXCLUSIVE`), the stop eventfd and the worker's own
/// kick eventfd.
pub(super) struct Sleep {
    me: usize,
}

impl Sleep {
    pub(super) fn new(core: &Core, me: usize) -> Result<Sleep> {
        let e = |e| Error::sys("epoll set-up for a fault-service thread", e);
        let ep = &core.slots[me].ep;
        let (inp, excl) = (libc::EPOLLIN as u32, libc::EPOLLEXCLUSIVE as u32);
        let uffd = if core.local { inp } else { inp | excl };
        ep.add(core.uffd.as_fd(), uffd, EV_UFFD).map_err(e)?;
        ep.add(core.work.as_fd(), inp | excl, EV_WORK).map_err(e)?;
        ep.add(core.stop.as_fd(), inp, EV_STOP).map_err(e)?;
        ep.add(core.slots[me].kick.as_fd(), inp, EV_KICK)
            .map_err(e)?;
        // Not EPOLLEXCLUSIVE: the kernel refuses it for a nested epoll set.
        ep.add(core.child_ep.as_fd(), inp, EV_CHILD).map_err(e)?;
        Ok(Sleep { me })
    }

    /// Blocks until a fault (if armed), queued work, a kick, the stop
    /// signal or `timeout_ms` (< 0: none).
    fn wait(&self, core: &Core, timeout_ms: i32) {
        let mut tags = [0u64; 8];
        let ep = &core.slots[self.me].ep;
        // Whether it slept: a client's fault found waiting is served as one
        // found without sleeping (`Core::cpu_of` trusts its thread's CPU
        // longer then).
        // (Looked at only where clients are served: one system call less
        // per sleep for an engine that serves only its own process.)
        let foreign = core.foreign_count.load(Ordering::Relaxed) > 0;
        let mut n = if foreign { ep.wait(&mut tags, 0) } else { 0 };
        let slept = n == 0 && timeout_ms != 0;
        if slept {
            n = ep.wait(&mut tags, timeout_ms);
            // What it serves below is timed from now, not from before it
            // slept.
            crate::sys::clock::refresh();
        }
        for t in &tags[..n] {
            match *t {
                t if t >= EV_FOREIGN_FIRST => {
                    core.serve_foreign(t, Some(self.me), slept);
                }
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
            let _a = slot.arm.lock();
            if slot.ep.modify(uffd, libc::EPOLLIN as u32, EV_UFFD).is_err() {
                return slot.armed.load(Ordering::SeqCst);
            }
            slot.armed.store(true, Ordering::SeqCst);
            core.arm_foreign(self.me, true);
            return true;
        }
        let _g = core.disarming.lock();
        if !core.covered_without(self.me) {
            return true;
        }
        let _a = slot.arm.lock();
        slot.armed.store(false, Ordering::SeqCst);
        if slot.ep.modify(uffd, 0, EV_UFFD).is_err() {
            slot.armed.store(true, Ordering::SeqCst);
            return true;
        }
        core.arm_foreign(self.me, false);
        false
    }
}

thread_local! {
    /// This thread is a fault-service worker.
    static IN_SERVICE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a fault-service worker.
pub(in crate::fault) fn mark_in_service() {
    IN_SERVICE.with(|c| c.set(true));
}

/// Whether the calling thread is a fault-service worker.
pub(crate) fn in_service() -> bool {
    IN_SERVICE.with(Cell::get)
}

/// One fault-service thread: serves the faults it reads itself, runs queued
/// jobs when no fault is pending, and sleeps in epoll otherwise.
pub(super) fn worker(core: Arc<Core>, me: usize, sleep: Sleep) {
    IN_SERVICE.with(|c| c.set(true));
    let slot = &core.slots[me];
    if let Some(cpu) = slot.cpu {
        // Unpinned, it still serves; only less often on the faulting CPU.
        if pin_to(cpu).is_ok() {
            if core.idle_wake {
                crate::sys::sched::enable_idle_wake();
            } else if core.idle_forever {
                crate::sys::sched::idle_for_good();
            }
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
        let deferred = core.flush_deferred();
        // While this process forks, the fork watcher reads the userfaultfd
        // (`fault::forkwatch`); workers take what it read.
        let forking = core.forking.load(Ordering::SeqCst) > 0;
        if armed || forking || !core.ring.is_empty() {
            faults.clear();
            events.clear();
            // EAGAIN is "nothing", as an empty read is.
            let read = match core.read_own(&mut raw, &mut faults, &mut events) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
                r => r,
            };
            match read {
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
                // Nothing of the engine's own (EAGAIN, or only events): a
                // client's next fault, found without sleeping. Looked for
                // here, before `settle(true)`: found only in `Sleep::wait`,
                // every remote fault cost two `sched_setscheduler` calls
                // (back to SCHED_OTHER to sleep, SCHED_IDLE for the wake).
                Ok(()) => {
                    if armed && core.serve_foreign_ready(Some(me)) {
                        woken = false;
                        continue;
                    }
                }
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
            if !core.uffd.has_pending() && !core.foreign_pending() {
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
        crate::fault::buffer::release();
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
