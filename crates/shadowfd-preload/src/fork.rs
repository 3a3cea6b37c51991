//! `fork`: the `pthread_atfork` handlers that hold the shim's locks across
//! a fork and give the child its own connection, file table and lazy
//! mappings; and the library constructor that installs them.

use crate::conn::CLIENT;
use crate::cwd::{VCWD, cwd_var_init};
use crate::dirfd::{DIRFDS, DirFd};
use crate::fdtable::{Entry, STATE, State};
use crate::forklock::ForkGuard;
use crate::listing::STREAMS;
use crate::statcache::{STATS, Stats};
use crate::{Busy, audit, exec, map, vfork};
use parking_lot::Mutex;
use shadowfd::remote::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) type Held = (
    ForkGuard<'static, Option<Client>>,
    ForkGuard<'static, State>,
    ForkGuard<'static, Vec<map::Map>>,
);

extern "C" fn before_fork() {
    // Made here, not first in the child: a child would wait forever on a
    // OnceLock another parent thread was initialising at the fork.
    let _ = map::past_eof_fd();
    // Held across fork so the child's copies are consistent; released in
    // both processes below (fork returns in the same thread).
    let held = (CLIENT.lock(), STATE.lock(), map::MAPS.lock());
    let _ = HELD.try_with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn after_fork_parent() {
    // Dropping the guards releases the locks.
    let _ = HELD.try_with(|h| drop(h.borrow_mut().take()));
}

/// In the child: the connection is the parent's (its requests would mix
/// with the parent's). The connection and the open files are forgotten,
/// never dropped (dropping would speak on the parent's connection or join
/// threads the child does not have). The child's copies of descriptors of
/// served files keep working: each opens its path again on the child's own
/// connection (made on first use), at the offset it had at the fork (from
/// then on the parent's and the child's offsets are separate, unlike a
/// shared open file description). Lazy mappings are not inherited
/// (`MADV_DONTFORK`): each is mapped again at its address on the child's
/// own connection before `fork` returns ([`map::remap_in_child`]).
extern "C" fn after_fork_child() {
    vfork::own();
    let mut parent_maps = Vec::new();
    let _ = HELD.try_with(|h| {
        if let Some((mut c, mut st, mut maps)) = h.borrow_mut().take() {
            std::mem::forget(c.take());
            parent_maps = std::mem::take(&mut *maps);
            let old = std::mem::take(&mut st.fds);
            // Descriptors that shared an entry (dups) share the new one.
            let mut fresh: Vec<(*const Entry, Arc<Entry>)> = Vec::new();
            for (fd, e) in old.iter() {
                let key = Arc::as_ptr(e);
                let n = match fresh.iter().find(|(k, _)| *k == key) {
                    Some((_, n)) => n.clone(),
                    None => {
                        let n = Arc::new(Entry {
                            path: e.path.clone(),
                            file: Mutex::new(None),
                            pos: AtomicU64::new(e.pos.load(Ordering::SeqCst)),
                            mapped: Default::default(),
                        });
                        fresh.push((key, n.clone()));
                        n
                    }
                };
                st.fds.insert(*fd, n);
            }
            std::mem::forget(old);
        }
    });
    if parent_maps.is_empty() {
        return;
    }
    match Busy::enter() {
        Some(_b) => map::remap_in_child(parent_maps),
        // Forked from inside the shim: nothing can be mapped again here.
        None => std::mem::forget(parent_maps),
    }
}

extern "C" fn init() {
    if audit::in_audit_namespace() {
        return;
    }
    vfork::own();
    exec::adopt();
    // SAFETY: three valid handlers with no preconditions.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        )
    };
}

#[used]
#[unsafe(link_section = ".init_array")]
pub(crate) static INIT: extern "C" fn() = init;

type HeldDir = (
    ForkGuard<'static, Option<Option<String>>>,
    ForkGuard<'static, BTreeMap<c_int, Arc<DirFd>>>,
    ForkGuard<'static, BTreeSet<usize>>,
    ForkGuard<'static, Option<Stats>>,
    ForkGuard<'static, Option<crate::small::Cache>>,
);

extern "C" fn dir_before_fork() {
    // Never more than one of these is held at a time elsewhere, so taking
    // them all in this order cannot deadlock.
    let held = (
        VCWD.lock(),
        DIRFDS.lock(),
        STREAMS.lock(),
        STATS.lock(),
        crate::small::SMALL.lock(),
    );
    let _ = HELD_DIR.try_with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn dir_after_fork() {
    // In both processes: the tables stay as they were (the child's
    // directory descriptors and streams are copies that keep working).
    let _ = HELD_DIR.try_with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn dir_init() {
    if crate::audit::in_audit_namespace() {
        return;
    }
    cwd_var_init();
    // SAFETY: valid handlers with no preconditions.
    unsafe {
        libc::pthread_atfork(
            Some(dir_before_fork),
            Some(dir_after_fork),
            Some(dir_after_fork),
        )
    };
}

#[used]
#[unsafe(link_section = ".init_array")]
static DIR_INIT: extern "C" fn() = dir_init;

thread_local! {
    /// The locks the forking thread holds across fork.
    static HELD: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// This module's locks, held by the forking thread across fork so that
    /// the child never inherits one held by a thread it does not have.
    static HELD_DIR: std::cell::RefCell<Option<HeldDir>> = const { std::cell::RefCell::new(None) };
}
