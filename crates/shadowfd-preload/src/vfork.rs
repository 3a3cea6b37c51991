//! A `vfork` child's descriptor changes, kept apart from its parent's
//! tables (docs/run.md, "Descriptors across exec").
//!
//! A child made by `vfork` (python's `subprocess`, glibc's `posix_spawn`
//! when it goes through the PLT) runs in its parent's memory until it execs:
//! the `close`, `dup2` and `close_range` it makes on the way (to set up its
//! standard input, to close what it should not inherit) would edit the
//! parent's tables, and the parent would then take its own standard input
//! for a served file, or lose a served descriptor. No atfork handler runs
//! there, so such a child is told apart by its process id: it is not the
//! one the tables belong to ([`in_child`]). Its changes go to an overlay
//! here instead, tagged with its process id, and its `exec` hands over the
//! parent's tables with the overlay applied ([`crate::exec`]).

use crate::forklock::ForkMutex;
use std::collections::BTreeMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicU32, Ordering};

/// What a descriptor is for an exec: a file (path, offset) or a directory.
#[derive(Clone)]
pub(crate) enum Handed {
    File(String, u64),
    Dir(String),
}

/// The process the tables belong to (set at load and in a forked child).
static OWNER: AtomicU32 = AtomicU32::new(0);

/// The overlay of one `vfork` child: its process id and, by descriptor,
/// what it holds now (`None`: nothing served).
type Overlay = (u32, BTreeMap<c_int, Option<Handed>>);

static OVERLAY: ForkMutex<Option<Overlay>> = ForkMutex::new(None);

fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::syscall(libc::SYS_getpid) as u32 }
}

/// Records this process as the owner of the tables.
pub(crate) fn own() {
    OWNER.store(getpid(), Ordering::Relaxed);
}

/// Whether this is a `vfork` child (or a raw `clone`) running in memory
/// whose tables belong to another process.
pub(crate) fn in_child() -> bool {
    let o = OWNER.load(Ordering::Relaxed);
    o != 0 && getpid() != o
}

/// Runs `f` on this child's overlay (a new one for a new child).
fn with<R>(f: impl FnOnce(&mut BTreeMap<c_int, Option<Handed>>) -> R) -> R {
    let me = getpid();
    let mut g = OVERLAY.lock();
    if g.as_ref().is_none_or(|(pid, _)| *pid != me) {
        *g = Some((me, BTreeMap::new()));
    }
    f(&mut g.as_mut().expect("set above").1)
}

/// What `fd` holds in this child: its overlay, else the parent's tables.
fn current(ov: &BTreeMap<c_int, Option<Handed>>, fd: c_int) -> Option<Handed> {
    if let Some(v) = ov.get(&fd) {
        return v.clone();
    }
    crate::fdtable::handed_fd(fd)
}

/// After `dup*(old)` returned `new` in this child.
pub(crate) fn dup(old: c_int, new: c_int) {
    if new < 0 {
        return;
    }
    with(|ov| {
        let h = current(ov, old);
        ov.insert(new, h);
    });
}

/// After `fd` was closed, or reused for a host descriptor, in this child.
pub(crate) fn gone(fd: c_int) {
    with(|ov| {
        ov.insert(fd, None);
    });
}

/// After `first..=last` were closed in this child.
pub(crate) fn gone_range(first: c_int, last: c_int) {
    let known: Vec<c_int> = crate::fdtable::handed_all()
        .into_iter()
        .map(|(fd, _)| fd)
        .filter(|fd| (first..=last).contains(fd))
        .collect();
    with(|ov| {
        for fd in known {
            ov.insert(fd, None);
        }
        for v in ov.range_mut(first..=last) {
            *v.1 = None;
        }
    });
}

/// After this child opened a served file or directory as `fd`.
pub(crate) fn opened(fd: c_int, h: Handed) {
    with(|ov| {
        ov.insert(fd, Some(h));
    });
}

/// The parent's tables as this process sees them now: with this child's
/// overlay applied when it is a `vfork` child.
pub(crate) fn view() -> BTreeMap<c_int, Handed> {
    let mut all: BTreeMap<c_int, Handed> = crate::fdtable::handed_all().into_iter().collect();
    if in_child() {
        let me = getpid();
        let g = OVERLAY.lock();
        if let Some((pid, ov)) = g.as_ref()
            && *pid == me
        {
            for (fd, v) in ov {
                match v {
                    Some(h) => {
                        all.insert(*fd, h.clone());
                    }
                    None => {
                        all.remove(fd);
                    }
                }
            }
        }
    }
    all
}
