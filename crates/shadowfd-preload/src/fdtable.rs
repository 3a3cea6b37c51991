//! The descriptor table: which descriptor numbers are served files (a
//! placeholder `O_PATH` of `/dev/null` the program holds), their paths and
//! offsets, and the bookkeeping when they are closed, duplicated, or their
//! numbers reused by the host.

use crate::conn::client;
use crate::errno::errno_of;
use crate::forklock::ForkMutex;
use crate::{Busy, set_errno, vfork};
use std::ffi::c_char;

use parking_lot::Mutex;
use shadowfd::remote::RemoteFile;
use std::collections::BTreeMap;
use std::ffi::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A file open through the shim; `dup`s share one (and its offset).
pub(crate) struct Entry {
    /// The path inside the served tree (a forked child opens it again).
    pub(crate) path: String,
    /// The open file; `None` in a forked child until its first use.
    pub(crate) file: Mutex<Option<RemoteFile>>,
    pub(crate) pos: AtomicU64,
    /// Random reads through a mapping (`mapread.rs`).
    pub(crate) mapped: crate::mapread::MapRead,
}

impl Entry {
    /// The open file, opened again on this process's connection first if
    /// this is a forked child's copy.
    pub(crate) fn file(&self) -> Result<RemoteFile, c_int> {
        let mut f = self.file.lock();
        if let Some(f) = f.as_ref() {
            return Ok(f.clone());
        }
        let n = client()?.open(&self.path).map_err(|e| errno_of(&e))?;
        *f = Some(n.clone());
        Ok(n)
    }
}

pub(crate) struct State {
    pub(crate) fds: BTreeMap<c_int, Arc<Entry>>,
}

// Held across fork and released in the child: fork-safe locks (forklock).
pub(crate) static STATE: ForkMutex<State> = ForkMutex::new(State {
    fds: BTreeMap::new(),
});

/// Whether `STATE.fds` may be non-empty: the fast path for every other
/// descriptor.
pub(crate) static ANY_FD: AtomicBool = AtomicBool::new(false);

/// The served file behind descriptor `fd`, if it is one.
pub(crate) fn entry(fd: c_int) -> Option<Arc<Entry>> {
    if !ANY_FD.load(Ordering::Acquire) {
        return None;
    }
    STATE.lock().fds.get(&fd).cloned()
}

/// This thread marked busy and `fd`'s entry, when `fd` is ours and the
/// thread was not already inside the shim.
pub(crate) fn tracked(fd: c_int) -> Option<(Busy, Arc<Entry>)> {
    if !ANY_FD.load(Ordering::Acquire) {
        return None;
    }
    let b = Busy::enter()?;
    let e = entry(fd)?;
    Some((b, e))
}

/// Tracks `fd` as `e`; returns what was tracked there before.
pub(crate) fn insert(fd: c_int, e: Arc<Entry>) -> Option<Arc<Entry>> {
    let mut st = STATE.lock();
    ANY_FD.store(true, Ordering::Release);
    st.fds.insert(fd, e)
}

/// Every served descriptor in this process's tables, files (path,
/// offset) and directories (for an exec).
pub(crate) fn handed_all() -> Vec<(c_int, vfork::Handed)> {
    let mut out: Vec<(c_int, vfork::Handed)> = if ANY_FD.load(Ordering::Acquire) {
        STATE
            .lock()
            .fds
            .iter()
            .map(|(fd, e)| {
                let h = vfork::Handed::File(e.path.clone(), e.pos.load(Ordering::SeqCst));
                (*fd, h)
            })
            .collect()
    } else {
        Vec::new()
    };
    out.extend(
        crate::dirfd::dirfds()
            .into_iter()
            .map(|(fd, p)| (fd, vfork::Handed::Dir(p))),
    );
    out
}

/// What the tables say `fd` is.
pub(crate) fn handed_fd(fd: c_int) -> Option<vfork::Handed> {
    if let Some(e) = entry(fd) {
        return Some(vfork::Handed::File(
            e.path.clone(),
            e.pos.load(Ordering::SeqCst),
        ));
    }
    crate::dirfd::dirfds()
        .into_iter()
        .find(|(d, _)| *d == fd)
        .map(|(_, p)| vfork::Handed::Dir(p))
}

/// After a `dup*` of `old` returned `new`: the tables follow (or, in a
/// `vfork` child, its overlay).
pub(crate) fn dup_done(old: c_int, new: c_int) {
    if vfork::in_child() {
        vfork::dup(old, new);
        return;
    }
    after_dup(&entry(old), new);
    crate::dirfd::after_dup(old, new);
}

/// Tracks `fd` (a placeholder inherited across exec) as the served file
/// `path` at offset `pos`; it opens on this process's connection on first
/// use, as a forked child's copies do.
pub(crate) fn adopt_file(fd: c_int, path: String, pos: u64) {
    drop(insert(
        fd,
        Arc::new(Entry {
            path,
            file: Mutex::new(None),
            pos: AtomicU64::new(pos),
            mapped: Default::default(),
        }),
    ));
}

/// Stops tracking `fd`; returns what was tracked there.
pub(crate) fn remove(fd: c_int) -> Option<Arc<Entry>> {
    if !ANY_FD.load(Ordering::Acquire) {
        return None;
    }
    STATE.lock().fds.remove(&fd)
}

/// Forgets whatever this shim tracked under the descriptor number `fd`
/// (a served file's entry and a served directory's). For a number the
/// kernel has just handed out (a host `open`, `socket`, `dup`, ...): it
/// can never be a descriptor of ours, so an entry left there by a close
/// the shim did not see (`close_range`, glibc's internal closes, `fclose`
/// of an `fdopen`ed placeholder) must not make the host descriptor look
/// served. Dropping a file's last reference sends CLOSE, with the thread
/// marked busy. Calls made inside the shim (the client's own sockets) are
/// left alone: the shim forgets its placeholders' numbers itself.
fn forget_fd(fd: c_int) {
    let Some(_b) = Busy::enter() else {
        return;
    };
    if vfork::in_child() {
        vfork::gone(fd);
        return;
    }
    let gone = remove(fd);
    crate::dirfd::forget(fd);
    drop(gone);
}

/// A new `O_PATH` descriptor of `/dev/null` (close-on-exec as `flags`
/// asks): what a program holds for a served file or directory, so that a
/// call the shim misses fails instead of reading anything. Made with the
/// real `open`, so it is not taken for a host descriptor; `Err(errno)`.
pub(crate) fn placeholder(flags: c_int) -> Result<c_int, c_int> {
    let open = real!(
        "open",
        unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int
    );
    // SAFETY: a NUL-terminated path and valid flags.
    let fd = unsafe {
        open(
            c"/dev/null".as_ptr(),
            libc::O_PATH | (flags & libc::O_CLOEXEC),
        )
    };
    if fd < 0 {
        // SAFETY: reads this thread's errno.
        return Err(unsafe { *libc::__errno_location() });
    }
    Ok(fd)
}

/// After a call that returned a new descriptor `fd` made by the host
/// (see [`forget_fd`]); returns `fd`.
pub(crate) fn fresh(fd: c_int) -> c_int {
    if fd >= 0 && (ANY_FD.load(Ordering::Acquire) || crate::dirfd::any()) {
        // SAFETY: reads this thread's errno.
        let saved = unsafe { *libc::__errno_location() };
        forget_fd(fd);
        set_errno(saved);
    }
    fd
}

/// Closes a placeholder descriptor of this shim's own and forgets it in
/// both tables, whether or not this thread is already inside the shim
/// (the `close` interposer skips its bookkeeping there).
pub(crate) fn close_own(fd: c_int) -> c_int {
    close_forgetting(fd, true)
}

/// Closes `fd` and forgets it in both tables: always (`own`), or only when
/// this thread is not inside the shim already (a program's `close`).
pub(crate) fn close_forgetting(fd: c_int, own: bool) -> c_int {
    let b = Busy::enter();
    let mut forget = own || b.is_some();
    if forget && vfork::in_child() {
        // The tables are the parent's.
        vfork::gone(fd);
        forget = false;
    }
    let gone = if forget { remove(fd) } else { None };
    if forget {
        crate::dirfd::forget(fd);
    }
    // SAFETY: closes the caller's descriptor.
    let r = unsafe { real!("close", unsafe extern "C" fn(c_int) -> c_int)(fd) };
    // SAFETY: reads this thread's errno.
    let saved = unsafe { *libc::__errno_location() };
    // The last reference sends CLOSE, with this thread marked busy.
    drop(gone);
    drop(b);
    set_errno(saved);
    r
}

/// Records `new` as another descriptor of `old`'s entry (after a
/// successful dup), or forgets `new` if `old` is not ours.
pub(crate) fn after_dup(old: &Option<Arc<Entry>>, new: c_int) {
    if new < 0 {
        return;
    }
    let prev = match old {
        Some(e) => insert(new, e.clone()),
        None => remove(new),
    };
    drop(prev);
}

/// Forgets the entries of the descriptors `first..=last` (after they
/// were closed by a call the `close` interposer does not see).
pub(crate) fn forget_range(first: c_int, last: c_int) {
    let Some(_b) = Busy::enter() else {
        return;
    };
    if vfork::in_child() {
        vfork::gone_range(first, last);
        return;
    }
    let gone: Vec<Arc<Entry>> = if ANY_FD.load(Ordering::Acquire) {
        let mut st = STATE.lock();
        let fds: Vec<c_int> = st.fds.range(first..=last).map(|(k, _)| *k).collect();
        fds.iter().filter_map(|k| st.fds.remove(k)).collect()
    } else {
        Vec::new()
    };
    crate::dirfd::forget_range(first, last);
    // The last references send CLOSE, outside the table's lock.
    drop(gone);
}
