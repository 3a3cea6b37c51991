//! Strong holds on a lazy shadow by its owners, and the wait for the last
//! fill when the last one goes.
//!
//! A [`crate::Shadow`] and each of its registered mappings hold the shadow
//! through a [`User`]. Fault-service threads hold it too, but only while
//! they fill it (they keep a `Weak` otherwise). Without more, the last of
//! those to let go drops the shadow, and with it the source: when a fill
//! is in flight as the last mapping goes, that is a fault-service thread a
//! moment later, so a source's clean-up (the C ABI's `release`) could run
//! after the program's last free returned, or not at all if it exits then.
//! So the last [`User`] to go waits, for at most [`LAST_FILL_WAIT`], until
//! the shadow has been dropped by whoever held it last (unless it is a
//! fault-service thread itself: a source callback that drops a mapping).
//! A range the consumer moved (`mremap`) or a child inherited holds the
//! shadow too, for as long as the kernel maps it: while one does, the
//! last user waits only for the fills in flight.

use super::LazyShadow;
use parking_lot::{Condvar, Mutex};
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long the last user waits for a fill in flight to end. A fill reads
/// at most one run of the source; a source slower than this has its shadow
/// (and its clean-up) dropped by the fault-service thread when the fill
/// ends.
pub(crate) const LAST_FILL_WAIT: Duration = Duration::from_secs(2);

/// Set once a lazy shadow has been dropped, source included.
#[derive(Default)]
struct GoneState {
    gone: Mutex<bool>,
    cv: Condvar,
    /// Fills in flight ([`Gone::fill`]).
    fills: AtomicUsize,
    /// Adopted ranges that hold the shadow ([`Gone::hold_range`]).
    ranges: AtomicUsize,
}

/// The last field of [`LazyShadow`]: fields drop in order, so when this
/// drops, everything else (the source too) has been dropped already.
pub(crate) struct Gone(Arc<GoneState>);

impl Gone {
    pub fn new() -> Gone {
        Gone(Arc::default())
    }

    /// Counts an adopted range's hold (`on`) or its end.
    pub fn hold_range(&self, on: bool) {
        if on {
            self.0.ranges.fetch_add(1, Ordering::AcqRel);
        } else {
            self.0.ranges.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Counts a fill in flight until the result drops.
    pub fn fill(&self) -> Filling<'_> {
        self.0.fills.fetch_add(1, Ordering::AcqRel);
        Filling(&self.0)
    }
}

/// A fill in flight ([`Gone::fill`]).
pub(crate) struct Filling<'a>(&'a GoneState);

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        if self.0.fills.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.0.gone.lock();
            self.0.cv.notify_all();
        }
    }
}

impl Drop for Gone {
    fn drop(&mut self) {
        *self.0.gone.lock() = true;
        self.0.cv.notify_all();
    }
}

/// How many [`User`]s a lazy shadow has.
#[derive(Default)]
pub(crate) struct Users(AtomicUsize);

impl Users {
    /// Whether no owner or mapping holds the shadow any more (fills then
    /// have nobody to serve).
    pub fn none(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }
}

/// An owner's or a mapping's hold on a lazy shadow.
pub(crate) struct User(ManuallyDrop<Arc<LazyShadow>>);

impl User {
    pub fn new(shadow: Arc<LazyShadow>) -> User {
        shadow.users.0.fetch_add(1, Ordering::AcqRel);
        User(ManuallyDrop::new(shadow))
    }
}

impl Clone for User {
    fn clone(&self) -> User {
        User::new(Arc::clone(&self.0))
    }
}

impl Deref for User {
    type Target = Arc<LazyShadow>;
    fn deref(&self) -> &Arc<LazyShadow> {
        &self.0
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and `self.0` is not used again.
        let shadow = unsafe { ManuallyDrop::take(&mut self.0) };
        let last = shadow.users.0.fetch_sub(1, Ordering::AcqRel) == 1;
        let gone = Arc::clone(&shadow.gone.0);
        drop(shadow);
        // A fault-service thread never waits: the fill it would wait for
        // may be its own, or queued behind it.
        if last && !crate::fault::in_service() {
            let mut g = gone.gone.lock();
            // Held by a moved range, the shadow stays: only fills in
            // flight are waited for then.
            let busy = |g: &mut bool| {
                !*g && (gone.fills.load(Ordering::Acquire) > 0
                    || gone.ranges.load(Ordering::Acquire) == 0)
            };
            if busy(&mut g) {
                let _ = gone.cv.wait_while_for(&mut g, busy, LAST_FILL_WAIT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_is_set_when_dropped() {
        let g = Gone::new();
        let state = Arc::clone(&g.0);
        assert!(!*state.gone.lock());
        drop(g);
        assert!(*state.gone.lock());
    }

    #[test]
    fn users_counts_none() {
        let u = Users::default();
        assert!(u.none());
        u.0.fetch_add(1, Ordering::AcqRel);
        assert!(!u.none());
    }
}
