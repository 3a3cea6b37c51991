//! Keeping a woken faulting thread on the CPU that answered it.
//!
//! A fault-service worker answers a fault with an ioctl that wakes the
//! faulting thread. The kernel places the woken thread while the worker
//! still runs: its CPU is busy, so `select_idle_sibling` moves the thread
//! to any idle CPU. On a VM that is an IPI and a host wake-up of a halted
//! vCPU (tens of µs), paid on every fault, and the thread's next fault then
//! comes from the CPU it was moved to, whose reader moves it back. A CPU
//! whose only runnable tasks are `SCHED_IDLE` counts as idle to that search
//! (`sched_idle_cpu`), so a pinned reader of the thread's own CPU makes
//! itself `SCHED_IDLE` for the waking ioctl: the thread stays and preempts
//! the reader at once. The reader stays `SCHED_IDLE` while it serves a
//! stream of faults (two `sched_setscheduler` calls per fault cost about
//! 3 µs here) and turns back to `SCHED_OTHER` before it sleeps ([`settle`]).
//!
//! Turning back needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows nice 0
//! (the kernel treats `SCHED_IDLE` as nice 20), which [`idle_wake_allowed`]
//! checks in a throwaway thread; without it, wakes stay as they are. A
//! reader that finds that more than [`STALL`] passed since its last such
//! wake turns back. One such spell is what a thread that stops faulting
//! for a while looks like (it ran; nobody waited on the reader); after
//! [`STALLS`] in a row (other busy tasks on its CPU keep it off) it stops
//! doing this for [`BACKOFF`], so that busy neighbours can starve it for a
//! short while at most.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Off the CPU this long after a wake: stop for a while.
const STALL: Duration = Duration::from_millis(2);
/// Stalls in a row that stop it.
const STALLS: u8 = 2;
/// How long to stop for.
const BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
struct State {
    on: bool,
    /// Not held off by the caller ([`allow`]).
    allowed: bool,
    /// `SCHED_IDLE` since a wake at this time.
    idle_since: Option<Instant>,
    off_until: Option<Instant>,
    /// Stalls in a row: wakes after which the reader was off the CPU for
    /// over [`STALL`].
    stalls: u8,
}

thread_local! {
    static STATE: Cell<State> = const {
        Cell::new(State { on: false, allowed: true, idle_since: None, off_until: None, stalls: 0 })
    };
}

fn set_policy(policy: libc::c_int) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is a valid `sched_param`; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, policy, &p) == 0 }
}

/// Whether this thread runs `SCHED_OTHER` and a thread of this process can
/// go `SCHED_IDLE` and back (tried in a throwaway thread).
pub(crate) fn idle_wake_allowed() -> bool {
    // SAFETY: no arguments; pid 0 is the calling thread.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return false;
    }
    std::thread::Builder::new()
        .name("shadowfd-probe".into())
        .spawn(|| set_policy(libc::SCHED_IDLE) && set_policy(libc::SCHED_OTHER))
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

/// Whether a thread of this process may make itself `SCHED_IDLE` for good
/// (anyone may, unless a seccomp profile refuses `sched_setscheduler`):
/// tried in a throwaway thread.
pub(crate) fn idle_for_good_allowed() -> bool {
    // SAFETY: no arguments; pid 0 is the calling thread.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return false;
    }
    std::thread::Builder::new()
        .name("shadowfd-probe".into())
        .spawn(|| set_policy(libc::SCHED_IDLE))
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

/// Makes the calling thread (a reader pinned to its CPU, in a process
/// that could not turn back from `SCHED_IDLE`) `SCHED_IDLE` for good: every
/// wake it issues then keeps the woken thread on its CPU, at the price of
/// running only when its CPU has nothing else to run. The fault service
/// keeps a normal-priority worker as a backstop for that (see
/// `fault::service`). False if the kernel refused.
pub(crate) fn idle_for_good() -> bool {
    set_policy(libc::SCHED_IDLE)
}

/// Makes the calling thread (a reader pinned to its CPU) go `SCHED_IDLE`
/// for the wakes it issues; see the module documentation.
pub(crate) fn enable_idle_wake() {
    let on = State {
        on: true,
        allowed: true,
        idle_since: None,
        off_until: None,
        stalls: 0,
    };
    STATE.with(|s| s.set(on));
}

/// Runs `wake`, an ioctl that may wake a faulting thread, as the module
/// documentation says.
pub(crate) fn waking<R>(wake: impl FnOnce() -> R) -> R {
    let mut st = STATE.with(Cell::get);
    if !st.on || !st.allowed {
        return wake();
    }
    if st.idle_since.is_none() {
        let now = super::clock::recent();
        if st.off_until.is_some_and(|t| now < t) || !set_policy(libc::SCHED_IDLE) {
            return wake();
        }
    }
    let r = wake();
    // After the woken thread let this one back on its CPU: the time the
    // rest of this turn uses too.
    st.idle_since = Some(super::clock::refresh());
    STATE.with(|s| s.set(st));
    r
}

/// Turns the calling thread back to `SCHED_OTHER` if a wake left it
/// `SCHED_IDLE` and it is about to sleep (`sleeping`) or [`STALL`] has
/// passed since; in the latter case stops the `SCHED_IDLE` wakes for
/// [`BACKOFF`]. Cheap when there is nothing to do.
///
/// Reads the clock for the caller's turn ([`super::clock::refresh`]): a
/// worker calls this where each turn of its loop starts.
pub(crate) fn settle(sleeping: bool) {
    let now = super::clock::refresh();
    let mut st = STATE.with(Cell::get);
    let Some(since) = st.idle_since else {
        return;
    };
    let stalled = now.saturating_duration_since(since) > STALL;
    if !stalled {
        st.stalls = 0;
    }
    if !sleeping && !stalled {
        STATE.with(|s| s.set(st));
        return;
    }
    st.idle_since = None;
    if stalled {
        // One long spell off the CPU is what a thread that stops faulting
        // for a while looks like (it ran; nobody waited). Busy neighbours
        // keep the reader off after every wake: two in a row.
        st.stalls = st.stalls.saturating_add(1);
        if st.stalls >= STALLS {
            st.stalls = 0;
            st.off_until = Some(now + BACKOFF);
        }
    }
    // Could not turn back (RLIMIT_NICE lowered since): stop for good.
    st.on = set_policy(libc::SCHED_OTHER);
    STATE.with(|s| s.set(st));
}

/// Lets the calling thread's wakes go `SCHED_IDLE` (`on`) or holds them off.
pub(crate) fn allow(on: bool) {
    STATE.with(|s| {
        let mut st = s.get();
        st.allowed = on;
        s.set(st);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: no arguments; pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// Runs `f` in a fresh thread (the state and the policy are per thread).
    fn in_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    fn allowed() -> bool {
        // SAFETY: no arguments.
        let root = unsafe { libc::geteuid() } == 0;
        let ok = idle_wake_allowed();
        assert!(ok || !root, "root may always go SCHED_IDLE and back");
        ok
    }

    #[test]
    fn a_wake_goes_idle_and_sleeping_turns_back() {
        if !allowed() {
            return;
        }
        in_thread(|| {
            enable_idle_wake();
            waking(|| assert_eq!(policy(), libc::SCHED_IDLE));
            assert_eq!(policy(), libc::SCHED_IDLE, "stays idle while serving");
            settle(false);
            assert_eq!(policy(), libc::SCHED_IDLE);
            settle(true);
            assert_eq!(policy(), libc::SCHED_OTHER, "back before it sleeps");
        });
    }

    #[test]
    fn one_stall_turns_back_and_two_in_a_row_stop_the_idle_wakes() {
        if !allowed() {
            return;
        }
        in_thread(|| {
            enable_idle_wake();
            let stall = || std::thread::sleep(STALL + Duration::from_millis(1));
            // One long spell: back to SCHED_OTHER, and the next wake is
            // idle again.
            waking(|| ());
            stall();
            settle(false);
            assert_eq!(policy(), libc::SCHED_OTHER);
            waking(|| assert_eq!(policy(), libc::SCHED_IDLE, "one stall stops nothing"));
            // A wake answered in time clears the count.
            settle(false);
            stall();
            settle(false);
            waking(|| assert_eq!(policy(), libc::SCHED_IDLE));
            // Two in a row: the wakes stay plain for BACKOFF.
            stall();
            settle(false);
            waking(|| ());
            stall();
            settle(false);
            waking(|| assert_eq!(policy(), libc::SCHED_OTHER, "stopped after two stalls"));
            settle(true);
        });
    }
}
