//! Served directory descriptors: an `O_PATH` descriptor of `/dev/null`
//! tracked with its path (like a served file's placeholder), so that
//! `fstat`, `fdopendir`, `fchdir` and `*at` calls with it as `dirfd` come
//! through the shim; anything else on it fails and never lists the host's
//! `/dev`.

use crate::forklock::ForkMutex as Mutex;
use crate::statcache::stat_info;
use shadowfd::remote::PathKind;
use std::collections::BTreeMap;
use std::ffi::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A served directory descriptor.
pub(crate) struct DirFd {
    pub(crate) path: String,
}

pub(crate) static DIRFDS: Mutex<BTreeMap<c_int, Arc<DirFd>>> = Mutex::new(BTreeMap::new());

static ANY_DIRFD: AtomicBool = AtomicBool::new(false);

/// The served directory behind descriptor `fd`, if it is one.
pub(crate) fn dirfd_entry(fd: c_int) -> Option<Arc<DirFd>> {
    if !ANY_DIRFD.load(Ordering::Acquire) {
        return None;
    }
    DIRFDS.lock().get(&fd).cloned()
}

/// The served directory descriptors and their paths (for an exec).
pub(crate) fn dirfds() -> Vec<(c_int, String)> {
    if !ANY_DIRFD.load(Ordering::Acquire) {
        return Vec::new();
    }
    DIRFDS
        .lock()
        .iter()
        .map(|(fd, d)| (*fd, d.path.clone()))
        .collect()
}

/// Tracks `fd` (a placeholder: new, or inherited across exec) as the
/// served directory `rel`.
pub(crate) fn adopt(fd: c_int, rel: &str) {
    let mut t = DIRFDS.lock();
    ANY_DIRFD.store(true, Ordering::Release);
    t.insert(
        fd,
        Arc::new(DirFd {
            path: rel.to_string(),
        }),
    );
}

/// The served path of directory descriptor `fd`, if it is one.
pub(crate) fn dirfd_path(fd: c_int) -> Option<String> {
    dirfd_entry(fd).map(|d| d.path.clone())
}

/// Whether any served directory descriptor may be tracked.
pub(crate) fn any() -> bool {
    ANY_DIRFD.load(Ordering::Acquire)
}

/// Forgets the descriptors `first..=last` (closed together).
pub(crate) fn forget_range(first: c_int, last: c_int) {
    if ANY_DIRFD.load(Ordering::Acquire) && first <= last {
        let mut t = DIRFDS.lock();
        let fds: Vec<c_int> = t.range(first..=last).map(|(k, _)| *k).collect();
        for k in fds {
            t.remove(&k);
        }
    }
}

/// Forgets `fd` (it was closed, or reused for something else).
pub(crate) fn forget(fd: c_int) {
    if ANY_DIRFD.load(Ordering::Acquire) {
        DIRFDS.lock().remove(&fd);
    }
}

/// After a successful `dup` of `old` into `new`.
pub(crate) fn after_dup(old: c_int, new: c_int) {
    if new < 0 || !ANY_DIRFD.load(Ordering::Acquire) {
        return;
    }
    let mut t = DIRFDS.lock();
    match t.get(&old).cloned() {
        Some(d) => {
            t.insert(new, d);
        }
        None => {
            t.remove(&new);
        }
    }
}

/// A placeholder descriptor for the served directory `rel` (checked to be
/// one), tracked here.
pub(crate) fn open_dir(rel: &str, flags: c_int) -> Result<c_int, c_int> {
    let info = stat_info(rel)?;
    if info.kind != PathKind::Dir {
        return Err(libc::ENOTDIR);
    }
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(libc::EISDIR);
    }
    let fd = crate::fdtable::placeholder(flags)?;
    drop(crate::fdtable::remove(fd));
    adopt(fd, rel);
    Ok(fd)
}
