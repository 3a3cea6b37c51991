//! A mutex the forking thread may release in a forked child.
//!
//! The `pthread_atfork` handlers hold the shim's central locks across
//! `fork` and release them in the child. A `parking_lot` mutex that another
//! parent thread was queued on at the fork unlocks through parking_lot's
//! slow path: its global table of parked threads, whose bucket locks
//! another parent thread may have held at the fork (the child then waits
//! forever), and whose queue names threads the child does not have (a fair
//! hand-off to one leaves the mutex locked for good). This one is a plain
//! futex word (0 free, 1 locked, 2 locked with waiters): unlocking stores 0
//! and, if there were waiters, wakes one through the kernel, which in a
//! child wakes nobody. No state outside the word.

use std::sync::atomic::{AtomicU32, Ordering};

/// The raw lock of [`ForkMutex`].
pub(crate) struct RawForkMutex {
    state: AtomicU32,
}

/// A `lock_api` mutex over [`RawForkMutex`]: the API of `parking_lot::Mutex`.
pub(crate) type ForkMutex<T> = lock_api::Mutex<RawForkMutex, T>;
/// Its guard.
pub(crate) type ForkGuard<'a, T> = lock_api::MutexGuard<'a, RawForkMutex, T>;

impl RawForkMutex {
    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0;
        loop {
            // Spin briefly while it is held without waiters.
            if spins < 100 && self.state.load(Ordering::Relaxed) == 1 {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if self.state.swap(2, Ordering::Acquire) == 0 {
                return;
            }
            // SAFETY: FUTEX_WAIT on a live aligned u32 that outlives the
            // call; it returns at once if the word is no longer 2.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    2u32,
                    std::ptr::null::<libc::timespec>(),
                )
            };
        }
    }
}

// SAFETY: `lock` and `try_lock` return holding the lock exclusively (a
// compare-exchange or swap from 0 with Acquire), `unlock` releases it with
// Release ordering, and waiters are woken after the word is 0: a correct
// mutual exclusion lock. Guards carry no state and are not `Send`.
unsafe impl lock_api::RawMutex for RawForkMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawForkMutex = RawForkMutex {
        state: AtomicU32::new(0),
    };
    type Guard = lock_api::GuardNoSend;

    fn lock(&self) -> Self::Guard {
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        lock_api::GuardNoSend::default()
    }

    fn try_lock(&self) -> Option<Self::Guard> {
        self.state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(lock_api::GuardNoSend::default)
    }

    unsafe fn unlock(&self, _guard: Self::Guard) {
        if self.state.swap(0, Ordering::Release) == 2 {
            // SAFETY: FUTEX_WAKE of one waiter on a live aligned u32.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                )
            };
        }
    }

    fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != 0
    }
}

/// Writes `line` and a newline to standard error with plain `write(2)`
/// calls: no lock (Rust's stderr lock may have been held by another thread
/// of the parent at a fork, and a forked child would wait on it forever).
pub(crate) fn say(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: writes from a live buffer of `buf.len() - at` bytes.
        let n = unsafe { libc::write(2, buf[at..].as_ptr().cast(), buf.len() - at) };
        if n > 0 {
            at += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
}
