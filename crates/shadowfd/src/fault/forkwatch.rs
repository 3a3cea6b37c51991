//! The engine's own process forks: who reads the `FORK` event.
//!
//! glibc's `fork()` takes every malloc arena lock before the `clone`
//! system call and lets go only after it returns; with
//! `UFFD_FEATURE_EVENT_FORK`, that `clone` does not return until the
//! fork event has been read from the userfaultfd. A fault-service worker
//! that needs the allocator in the meantime (a fill, the handling of an
//! event) waits for the fork, which waits for it: both workers of a 2-CPU
//! engine were seen stuck so, one fork in two.
//!
//! So a `pthread_atfork` prepare handler (which glibc runs before it locks
//! the allocator) tells every engine of the process that a fork is coming.
//! While one is, workers leave the engine's userfaultfd alone, and a
//! watcher thread of each engine reads it with no allocation at all, into
//! a ring of atomics: the `FORK` event among the messages, so the `clone`
//! completes. Workers take the ring under the read lock, in order, before
//! they read the userfaultfd again; a worker stuck in the allocator until
//! the fork returns holds up nobody the fork needs. A raw `SYS_fork`/`clone` runs no
//! handlers, but takes no allocator lock either: the workers read its
//! event as usual.

use super::Core;
use crate::sys::event::{Epoll, eventfd_drain, eventfd_signal};
use crate::sys::uffd_abi::uffd_msg;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, Once, Weak};

/// The lock the fork watcher takes and lets go of while the process forks
/// ([`Core`]'s `read`): std's mutex, a futex word and nothing else, so that
/// letting it go with waiters queued is one `futex` wake. parking_lot's
/// mutex lets go through a process-wide table of queues instead, whose
/// locks a thread parking for the first time holds while it grows the
/// table with the allocator: during a fork, glibc holds the allocator's
/// locks until the `FORK` event is read, so the watcher, letting go of
/// this lock before the workers read on, waited for the grower, which
/// waited for the fork, which waited for the watcher (seen in CI,
/// 2026-12-07: the C ABI stress test of threads that map, fork and unmap).
#[derive(Default)]
pub(crate) struct ForkSafeLock(std::sync::Mutex<()>);

impl ForkSafeLock {
    pub(crate) fn new() -> ForkSafeLock {
        ForkSafeLock::default()
    }

    /// Blocks until held. A holder that panicked left nothing to repair
    /// (the lock guards no data), so its poison is ignored.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held now, or `None` if another thread holds it.
    pub(crate) fn try_lock(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// Every engine of the process, for the fork handlers.
static CORES: Mutex<Vec<Weak<Core>>> = Mutex::new(Vec::new());

/// Messages the watcher can hold before the workers take them.
const HELD: usize = 1024;

/// Messages the watcher read, for the workers to decode and apply in
/// order: a ring of one writer (the watcher, which must not allocate or
/// share a lock with anyone who might) and one reader at a time (a worker
/// holding `Core::read`), of plain atomics.
pub(crate) struct Ring {
    words: Box<[AtomicU64]>,
    head: AtomicUsize,
    tail: AtomicUsize,
}

impl Ring {
    pub(crate) fn new() -> Ring {
        Ring {
            words: (0..HELD * 4).map(|_| AtomicU64::new(0)).collect(),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    /// Whether messages wait in it.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Acquire) == self.tail.load(Ordering::Acquire)
    }

    /// Room left (the writer's view).
    fn room(&self) -> usize {
        HELD - (self.tail.load(Ordering::Acquire) - self.head.load(Ordering::Acquire))
    }

    /// Appends `msgs` (the caller checked the room). Allocates nothing.
    fn push(&self, msgs: &[uffd_msg]) {
        let tail = self.tail.load(Ordering::Acquire);
        for (i, m) in msgs.iter().enumerate() {
            let at = ((tail + i) % HELD) * 4;
            let first = u64::from(m.event)
                | u64::from(m.reserved1) << 8
                | u64::from(m.reserved2) << 16
                | u64::from(m.reserved3) << 32;
            for (w, v) in [first, m.arg0, m.arg1, m.arg2].into_iter().enumerate() {
                self.words[at + w].store(v, Ordering::Relaxed);
            }
        }
        self.tail.store(tail + msgs.len(), Ordering::Release);
    }

    /// Takes every message in it, in order (the one reader at a time).
    pub(crate) fn take(&self, out: &mut Vec<uffd_msg>) {
        let (head, tail) = (
            self.head.load(Ordering::Acquire),
            self.tail.load(Ordering::Acquire),
        );
        for n in head..tail {
            let at = (n % HELD) * 4;
            let w = |i: usize| self.words[at + i].load(Ordering::Relaxed);
            let first = w(0);
            out.push(uffd_msg {
                event: first as u8,
                reserved1: (first >> 8) as u8,
                reserved2: (first >> 16) as u16,
                reserved3: (first >> 32) as u32,
                arg0: w(1),
                arg1: w(2),
                arg2: w(3),
            });
        }
        self.head.store(tail, Ordering::Release);
    }
}

/// Makes the fork handlers tell `core` of forks.
pub(crate) fn watch(core: &Arc<Core>) {
    static HANDLERS: Once = Once::new();
    HANDLERS.call_once(|| {
        // SAFETY: the handlers are plain `extern "C"` functions that live for
        // the whole program.
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        // SAFETY: as above, a plain function that lives for the program.
        unsafe { libc::atexit(at_exit) };
    });
    let mut cores = CORES.lock().unwrap_or_else(|e| e.into_inner());
    cores.retain(|c| c.strong_count() > 0);
    cores.push(Arc::downgrade(core));
}

fn each(f: impl Fn(&Core)) {
    let cores = CORES.lock().unwrap_or_else(|e| e.into_inner());
    for c in cores.iter().filter_map(Weak::upgrade) {
        f(&c);
    }
}

/// Before glibc locks the allocator: a fork is coming.
extern "C" fn prepare() {
    each(|c| c.fork_begins());
}

/// In the parent, after the fork returned.
extern "C" fn parent() {
    each(|c| c.fork_ends());
}

/// In the child: its copies of the engines have no threads; nothing waits.
extern "C" fn child() {}

/// When the process exits (`exit`, or returning from `main`): forked
/// children that still map lazy ranges lose their service with it
/// ([`Core::orphan_children`]). A process killed outright cannot do this:
/// docs/kernel.md.
extern "C" fn at_exit() {
    let cores = match CORES.try_lock() {
        Ok(c) => c.iter().filter_map(Weak::upgrade).collect::<Vec<_>>(),
        Err(_) => return,
    };
    for c in cores {
        c.orphan_children();
    }
}

/// The watcher thread of `core`: sleeps until a fork is announced, then,
/// until the fork has returned, reads the userfaultfd into the ring
/// without allocating, and wakes the workers to take it.
pub(crate) fn watcher(core: Arc<Core>) {
    let Ok(ep) = Epoll::new() else { return };
    let inp = libc::EPOLLIN as u32;
    if ep.add(core.fork_kick.as_fd(), inp, 0).is_err() || ep.add(core.stop.as_fd(), inp, 1).is_err()
    {
        return;
    }
    let mut raw = [uffd_msg::default(); 64];
    let mut tags = [0u64; 2];
    loop {
        let n = ep.wait(&mut tags, -1);
        if core.stopping.load(Ordering::SeqCst) {
            return;
        }
        if n == 0 {
            continue;
        }
        eventfd_drain(core.fork_kick.as_fd());
        while core.forking.load(Ordering::SeqCst) > 0 {
            let room = core.ring.room().min(raw.len());
            if room == 0 {
                nap(1000);
                continue;
            }
            if !core.uffd.wait_readable(2) {
                continue;
            }
            // A worker that took the read lock is about to read, or has read
            // (its messages come first): let it, for up to a millisecond; one
            // stuck in the allocator holds the lock with its batch read.
            let mut guard = None;
            for _ in 0..20 {
                guard = core.read.try_lock();
                if guard.is_some() {
                    break;
                }
                nap(50);
            }
            core.ring_filling.store(true, Ordering::SeqCst);
            if let Ok(k) = core.uffd.read_raw(&mut raw[..room]) {
                core.ring.push(&raw[..k]);
            }
            core.ring_filling.store(false, Ordering::SeqCst);
            drop(guard);
            eventfd_signal(core.work.as_fd());
        }
        eventfd_signal(core.work.as_fd());
    }
}

/// Sleeps `us` microseconds; allocates nothing.
fn nap(us: i64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: us * 1000,
    };
    // SAFETY: nanosleep with a valid timespec and no remainder pointer.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}
