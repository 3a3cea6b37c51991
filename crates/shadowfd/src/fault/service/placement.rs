//! Where a fault is served: which worker is armed on which CPU, the
//! faulting threads' CPUs, and the share of faults that keeps a reader
//! armed (the module documentation of `service` explains why).

use super::*;

/// A microsecond in [`Core::now`] units.
pub(super) const US: u64 = 1_000;

/// A reader stays armed while at least 1/SHARE of the recent faults come
/// from its CPU: the others then pay for its wake-ups (an IPI each when its
/// CPU is idle, about 8 µs) less than its own faults gain (a remote answer
/// costs 20-60 µs more).
pub(super) const SHARE: u64 = 4;

/// A period with this many faults and none from a reader's CPU disarms it
/// at once (its threads have moved away).
pub(super) const LEFT: u64 = 8;

/// This many faults in a row, none from a reader's CPU, end its period
/// early (and so disarm it): after an idle spell every reader is armed, and
/// until the remote ones disarm each fault pays for waking them (an IPI
/// each), which over a whole period is most of a short burst of faults.
pub(super) const BURST: u64 = 2 * LEFT;

/// A worker armed because faults starved stays armed this long.
pub(super) const LINGER: u64 = 50 * MS;

/// While faults come, a worker looks at its arming this often.
pub(super) const CHECK_MS: i32 = 3;

/// With no fault for this long, workers park.
pub(super) const IDLE: u64 = 100 * MS;

/// How long a thread's CPU, once read, is trusted by the reader of that CPU
/// when it found the thread's fault without sleeping (runnable there when
/// the thread faulted: the thread is most likely still there).
pub(super) const REFRESH: u64 = 20 * MS;

/// The same otherwise: a reader woken by the fault (what a remote reader
/// always is), or one the cache says is not the thread's, so that a thread
/// that moved is noticed within this.
pub(super) const REFRESH_WOKEN: u64 = 2 * MS;

/// The same for a reader the cache names as the thread's own, but which
/// slept until the fault woke it. A thread served on its own CPU finds its
/// reader runnable there (just preempted by the thread's wake), so this
/// mostly means the thread moved to another CPU, and every fault is now
/// answered across CPUs (60–70 µs here instead of 10) until the cache
/// says so and the reader there arms. Reading the thread's CPU costs a few
/// µs, after the answer.
pub(super) const REFRESH_WOKEN_HERE: u64 = 100 * US;

/// Threads whose stat files are kept open, at most (all are closed beyond).
pub(super) const TIDS_MAX: usize = 64;

/// Where the faults a worker's CPU has seen lately stand among all faults
/// (local mode): counts smoothed over a few [`CHECK_MS`] periods.
#[derive(Default)]
pub(super) struct Share {
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
    pub(super) fn reset(&mut self, now: u64, local: u64, all: u64) {
        *self = Share {
            at: now,
            local_then: local,
            all_then: all,
            ..Share::default()
        };
    }

    /// Takes in the counters, at most once per period, or sooner after
    /// [`BURST`] faults none of which came from this CPU.
    pub(super) fn update(&mut self, now: u64, local: u64, all: u64) {
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
    pub(super) fn worth(&self, armed: bool) -> bool {
        if self.all == 0 {
            return armed;
        }
        !self.left && self.local * SHARE >= self.all
    }
}

impl Core {
    /// Notes the CPU of each fault's thread, as read by worker `me`
    /// (`woken`: it slept before reading them), and kicks the reader of a
    /// CPU that faults while it is disarmed.
    pub(super) fn attribute(&self, me: usize, faults: &[Fault], woken: bool) {
        let now = self.now_recent();
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
        // Whether more threads fault than readers are pinned, looked at
        // once a millisecond, not at every fault (a lock and a walk of
        // every thread seen).
        let at = self.crowded_at.load(Ordering::Relaxed);
        if self.idle_wake && now.saturating_sub(at) >= MS {
            self.crowded_at.store(now, Ordering::Relaxed);
            let tids = self.tids.lock();
            let active = tids.values().filter(|s| within(now, s.at, 2 * REFRESH));
            let crowded = active.count() > self.pinned;
            self.crowded.store(crowded, Ordering::Relaxed);
        }
    }

    /// The CPU thread `tid` last ran on, as cached if read lately enough:
    /// within [`REFRESH`] if the reader (on CPU `mine`) found the fault
    /// without sleeping and the cache names its CPU, else [`REFRESH_WOKEN`].
    pub(super) fn cpu_of(
        &self,
        tid: u32,
        now: u64,
        mine: Option<usize>,
        woken: bool,
    ) -> Option<usize> {
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

    pub(super) fn kick(&self, i: usize) {
        let s = &self.slots[i];
        if !s.kicked.swap(true, Ordering::SeqCst) {
            eventfd_signal(s.kick.as_fd());
        }
    }

    /// Kicks every parked worker but `me`.
    pub(super) fn kick_parked(&self, me: usize) {
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
    pub(super) fn covered_without(&self, me: usize) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(j, o)| j != me && o.armed.load(Ordering::SeqCst))
    }
}
