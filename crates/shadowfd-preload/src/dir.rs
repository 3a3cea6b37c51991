//! Directories and relative paths under the prefix (docs/run.md).
//!
//! - [`route`] decides where a path goes: served (a path inside the tree,
//!   the prefix itself included) or the host. Relative paths resolve
//!   against a tracked directory descriptor or the virtual working
//!   directory, lexically; a result that leaves the prefix through `..` is
//!   handed to the host as the absolute path it names.
//! - A served directory opened with `open`/`openat` is an `O_PATH`
//!   descriptor of `/dev/null` tracked here with its path (like a served
//!   file's placeholder): `fstat`, `fdopendir`, `fchdir` and `*at` calls
//!   with it as `dirfd` come through the shim; anything else on it fails
//!   (`ENOTDIR`, `EBADF`) and never lists the host's `/dev`.
//! - `opendir`/`fdopendir` of a served directory return a pointer to a
//!   [`Stream`] of this shim, kept in a table so that `readdir`,
//!   `closedir`, ... tell it from glibc's own `DIR`: host directories go to
//!   the real functions untouched. The listing is read whole from the
//!   server (LIST, page after page) when the stream is opened.
//! - `chdir`/`fchdir` into the prefix set a virtual working directory
//!   (`getcwd` reports it); it travels to exec'd children in
//!   `SHADOWFD_RUN_CWD`. A `chdir` elsewhere clears it.

use crate::conn::client;
use crate::env::{env, normalize};
use crate::errno::errno_of;
use crate::forklock::{ForkGuard, ForkMutex as Mutex};
use crate::{Busy, fail, set_errno};
use shadowfd::remote::{PathInfo, PathKind};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString, c_char, c_int, c_long, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a path goes.
pub(crate) enum Route {
    /// Inside the served tree: the path below the prefix ("" = the prefix).
    Served(String),
    /// To the host: unchanged (`None`), or as this absolute path (a
    /// relative path from a served directory that left the prefix).
    Host(Option<CString>),
}

impl Route {
    /// The pointer to hand the real function.
    pub(crate) fn host_path(p: &Option<CString>, orig: *const c_char) -> *const c_char {
        p.as_ref().map_or(orig, |c| c.as_ptr())
    }
}

/// A served directory descriptor.
struct DirFd {
    path: String,
}

static DIRFDS: Mutex<BTreeMap<c_int, Arc<DirFd>>> = Mutex::new(BTreeMap::new());
static ANY_DIRFD: AtomicBool = AtomicBool::new(false);

/// The virtual working directory (a path below the prefix), once read from
/// `SHADOWFD_RUN_CWD`.
static VCWD: Mutex<Option<Option<String>>> = Mutex::new(None);
pub(crate) const CWD_VAR: &str = "SHADOWFD_RUN_CWD";

fn prefix_str() -> Option<String> {
    env().map(|e| format!("/{}", e.prefix.join("/")))
}

pub(crate) fn full(rel: &str) -> String {
    let p = prefix_str().unwrap_or_default();
    if rel.is_empty() {
        p
    } else {
        format!("{p}/{rel}")
    }
}

/// The virtual working directory, if there is one.
pub(crate) fn vcwd() -> Option<String> {
    let mut v = VCWD.lock();
    if v.is_none() {
        let from_env = crate::env::getenv(c"SHADOWFD_RUN_CWD").and_then(|s| {
            let env = env()?;
            let comps = normalize(&s)?;
            (comps.len() >= env.prefix.len() && comps[..env.prefix.len()] == env.prefix[..])
                .then(|| comps[env.prefix.len()..].join("/"))
        });
        *v = Some(from_env);
    }
    v.as_ref().and_then(|x| x.clone())
}

fn set_vcwd(rel: Option<String>) {
    let changed = {
        let mut v = VCWD.lock();
        let old = v.clone().flatten();
        *v = Some(rel.clone());
        let in_env = crate::env::getenv(c"SHADOWFD_RUN_CWD").is_some_and(|v| !v.is_empty());
        old != rel || in_env != rel.is_some()
    };
    if changed {
        // environ is kept up to date (not only the execve wrapper's
        // environment) because glibc's execv*, execl*, posix_spawn and
        // system exec with internal calls no preload sees. The variable
        // was added at load ([`cwd_var_init`]), so this only replaces its
        // value (empty: no virtual working directory): glibc then stores
        // one pointer in `environ` and never reallocates the array that
        // other threads' `getenv` may be reading (docs/run.md).
        let v = rel.as_ref().map(|r| full(r)).unwrap_or_default();
        let v = CString::new(v).unwrap_or_default();
        // The environment is only changed here, on a chdir, and at load.
        crate::env::setenv(c"SHADOWFD_RUN_CWD", &v, true);
    }
}

/// At load, under `shadowfd run`: adds `SHADOWFD_RUN_CWD` (empty when it
/// is not set) to `environ`, while the process has one thread, so that a
/// later `chdir` only replaces its value ([`set_vcwd`]).
fn cwd_var_init() {
    if env().is_none() {
        return;
    }
    // No other thread runs yet (library constructors run before main), and
    // no overwrite keeps a value.
    crate::env::setenv(c"SHADOWFD_RUN_CWD", c"", false);
}

fn dirfd_entry(fd: c_int) -> Option<Arc<DirFd>> {
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

/// Tracks `fd` (a placeholder inherited across exec) as the served
/// directory `rel`.
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

/// Where `path` (relative to `dirfd`) goes.
///
/// # Safety
/// `path` is null or a NUL-terminated string.
pub(crate) unsafe fn route(dirfd: c_int, path: *const c_char) -> Route {
    let Some(env) = env() else {
        return Route::Host(None);
    };
    if path.is_null() {
        return Route::Host(None);
    }
    // SAFETY: the caller's promise.
    let Ok(s) = unsafe { CStr::from_ptr(path) }.to_str() else {
        return Route::Host(None);
    };
    if s.is_empty() {
        return Route::Host(None);
    }
    if let Some(rel) = served_fd_path(s) {
        return Route::Served(rel);
    }
    let relative = !s.starts_with('/');
    let abs = if relative {
        let base = if dirfd == libc::AT_FDCWD {
            vcwd()
        } else {
            dirfd_entry(dirfd).map(|d| d.path.clone())
        };
        match base {
            Some(b) => format!("{}/{s}", full(&b)),
            None => return Route::Host(None),
        }
    } else {
        s.to_string()
    };
    let Some(comps) = normalize(&abs) else {
        return Route::Host(None);
    };
    if comps.len() >= env.prefix.len() && comps[..env.prefix.len()] == env.prefix[..] {
        return Route::Served(comps[env.prefix.len()..].join("/"));
    }
    if relative || passes_through(&abs, &env.prefix) {
        let host = format!("/{}", comps.join("/"));
        return Route::Host(Some(CString::new(host).unwrap_or_default()));
    }
    Route::Host(None)
}

/// The served path behind `/dev/stdin`, `/dev/fd/N`, `/proc/self/fd/N`
/// or `/proc/PID/fd/N` (this process's id) when descriptor N is a served
/// file or directory: opening one of those names reopens the file it
/// stands for, as natively (a new open file description: offset 0). The
/// kernel would find the placeholder (`/dev/null`) there.
fn served_fd_path(s: &str) -> Option<String> {
    if !(s.starts_with("/dev/") || s.starts_with("/proc/"))
        || !(crate::fdtable::ANY_FD.load(Ordering::Acquire) || any())
    {
        return None;
    }
    let n = if s == "/dev/stdin" {
        "0"
    } else if let Some(n) = s.strip_prefix("/dev/fd/") {
        n
    } else if let Some(n) = s.strip_prefix("/proc/self/fd/") {
        n
    } else {
        let rest = s.strip_prefix("/proc/")?;
        let (pid, n) = rest.split_once("/fd/")?;
        // SAFETY: getpid has no preconditions.
        if pid.parse::<i32>().ok()? != unsafe { libc::getpid() } {
            return None;
        }
        n
    };
    let fd: c_int = n.parse().ok()?;
    if let Some(e) = crate::fdtable::entry(fd) {
        return Some(e.path.clone());
    }
    dirfd_entry(fd).map(|d| d.path.clone())
}

/// Whether the absolute path `abs`, walked lexically, is inside `prefix`
/// at some point (`/prefix/..` is `/`, as it is across a mount point).
fn passes_through(abs: &str, prefix: &[String]) -> bool {
    let mut at: Vec<&str> = Vec::new();
    for c in abs.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                at.pop();
            }
            c => at.push(c),
        }
        if at.len() >= prefix.len() && at[..prefix.len()] == prefix[..] {
            return true;
        }
    }
    false
}

/// STAT answers by path, kept when the served tree cannot change
/// ([`crate::env::Env::immutable`]): a found path, and a path that is missing
/// or not under a directory. At most [`MAX_STATS`] of them; then all are
/// dropped at once.
type Stats = std::collections::HashMap<String, Result<PathInfo, c_int>>;
static STATS: Mutex<Option<Stats>> = Mutex::new(None);
const MAX_STATS: usize = 1 << 16;

/// STAT of a served path (kept, for an image: see [`STATS`]). The request
/// runs with no lock held. A path the process listed last asks for it and
/// the listed files after it at once ([`crate::small::prefetch`]).
pub(crate) fn stat_info(rel: &str) -> Result<PathInfo, c_int> {
    let keep = env().is_some_and(|e| e.immutable);
    if keep {
        if let Some(r) = kept_stat(rel) {
            return r;
        }
        if crate::small::prefetch(rel, false)
            && let Some(r) = kept_stat(rel)
        {
            return r;
        }
    }
    let r = client()?.stat(rel).map_err(|e| errno_of(&e));
    if keep {
        keep_stat(rel, r.clone());
    }
    r
}

/// The kept STAT answer for `rel`, if any.
pub(crate) fn kept_stat(rel: &str) -> Option<Result<PathInfo, c_int>> {
    STATS.lock().as_ref().and_then(|m| m.get(rel)).cloned()
}

/// Keeps a STAT answer (a found path, a missing one, one under a file;
/// not other errors).
pub(crate) fn keep_stat(rel: &str, r: Result<PathInfo, c_int>) {
    if matches!(r, Ok(_) | Err(libc::ENOENT) | Err(libc::ENOTDIR)) {
        let mut g = STATS.lock();
        let m = g.get_or_insert_with(Stats::new);
        if m.len() >= MAX_STATS {
            *m = Stats::new();
        }
        m.insert(rel.to_string(), r);
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
    let mut t = DIRFDS.lock();
    ANY_DIRFD.store(true, Ordering::Release);
    t.insert(
        fd,
        Arc::new(DirFd {
            path: rel.to_string(),
        }),
    );
    Ok(fd)
}

fn ids() -> (u32, u32) {
    // SAFETY: getuid and getgid have no preconditions.
    unsafe { (libc::getuid(), libc::getgid()) }
}

fn mode_of(info: &PathInfo) -> Result<u32, c_int> {
    match info.kind {
        PathKind::Dir => Ok(libc::S_IFDIR | 0o555),
        PathKind::File => Ok(libc::S_IFREG | 0o444),
        // Served trees hold files and directories only.
        PathKind::Other => Err(libc::ENOENT),
    }
}

/// Fills `st` from a STAT answer: a directory (mode 0555) or a file (0444).
pub(crate) fn fill_stat(info: &PathInfo, st: *mut libc::stat64) -> c_int {
    if st.is_null() {
        return fail(libc::EFAULT);
    }
    let mode = match mode_of(info) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let nlink = if info.kind == PathKind::Dir {
        info.nlink.max(2)
    } else {
        info.nlink.max(1)
    };
    write_stat(
        st,
        (info.device, info.inode),
        nlink,
        mode,
        info.size,
        info.mtime,
    )
}

/// Writes a served file's or directory's `struct stat` to `st` (not null):
/// owned by the caller's uid and gid, with 1 MiB blocks, and its mtime as
/// every time stamp. Returns 0.
pub(crate) fn write_stat(
    st: *mut libc::stat64,
    (dev, ino): (u64, u64),
    nlink: u64,
    mode: u32,
    size: u64,
    (ms, mns): (i64, i64),
) -> c_int {
    // SAFETY: an all-zero stat64 is valid.
    let mut s: libc::stat64 = unsafe { std::mem::zeroed() };
    s.st_dev = dev;
    s.st_ino = ino;
    s.st_nlink = nlink;
    s.st_mode = mode;
    (s.st_uid, s.st_gid) = ids();
    s.st_size = size as i64;
    s.st_blksize = 1 << 20;
    s.st_blocks = size.div_ceil(512) as i64;
    s.st_mtime = ms;
    s.st_mtime_nsec = mns;
    s.st_atime = ms;
    s.st_atime_nsec = mns;
    s.st_ctime = ms;
    s.st_ctime_nsec = mns;
    // SAFETY: the caller's buffer, for a struct stat (== stat64 here).
    unsafe { st.write(s) };
    0
}

/// Fills a `statx` from a STAT answer.
pub(crate) fn fill_statx(info: &PathInfo, st: *mut libc::statx) -> c_int {
    if st.is_null() {
        return fail(libc::EFAULT);
    }
    let mode = match mode_of(info) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    // SAFETY: an all-zero statx is valid.
    let mut s: libc::statx = unsafe { std::mem::zeroed() };
    s.stx_mask = libc::STATX_BASIC_STATS;
    s.stx_blksize = 1 << 20;
    s.stx_nlink = if info.kind == PathKind::Dir {
        info.nlink.max(2) as u32
    } else {
        info.nlink.max(1) as u32
    };
    (s.stx_uid, s.stx_gid) = ids();
    s.stx_mode = mode as u16;
    s.stx_ino = info.inode;
    s.stx_size = info.size;
    s.stx_blocks = info.size.div_ceil(512);
    let (ms, mns) = info.mtime;
    for t in [&mut s.stx_atime, &mut s.stx_mtime, &mut s.stx_ctime] {
        t.tv_sec = ms;
        t.tv_nsec = mns as u32;
    }
    s.stx_dev_major = libc::major(info.device);
    s.stx_dev_minor = libc::minor(info.device);
    // SAFETY: the caller's buffer for a struct statx.
    unsafe { st.write(s) };
    0
}

/// `stat` of a served path.
pub(crate) fn stat_rel(rel: &str, st: *mut libc::stat64) -> c_int {
    match stat_info(rel) {
        Ok(i) => fill_stat(&i, st),
        Err(e) => fail(e),
    }
}

/// `statx` of a served path.
pub(crate) fn statx_rel(rel: &str, st: *mut libc::statx) -> c_int {
    match stat_info(rel) {
        Ok(i) => fill_statx(&i, st),
        Err(e) => fail(e),
    }
}

/// `fstat` of a served directory descriptor; `None` if `fd` is not one.
pub(crate) fn fstat_dirfd(fd: c_int, st: *mut libc::stat64) -> Option<c_int> {
    let d = dirfd_entry(fd)?;
    Some(stat_rel(&d.path, st))
}

/// `statx(fd, "", AT_EMPTY_PATH)` of a served directory descriptor.
pub(crate) fn statx_dirfd(fd: c_int, st: *mut libc::statx) -> Option<c_int> {
    let d = dirfd_entry(fd)?;
    Some(statx_rel(&d.path, st))
}

/// What `access` answers for a served path: reading (and searching a
/// directory) is granted, writing is `EROFS`, executing a file `EACCES`.
pub(crate) fn access_rel(rel: &str, mode: c_int) -> c_int {
    match stat_info(rel) {
        Ok(i) if i.kind == PathKind::Other => fail(libc::ENOENT),
        Ok(_) if mode & libc::W_OK != 0 => fail(libc::EROFS),
        Ok(i) if mode & libc::X_OK != 0 && i.kind != PathKind::Dir => fail(libc::EACCES),
        Ok(_) => 0,
        Err(e) => fail(e),
    }
}

/// `readlink` of a served path: nothing served is a symbolic link.
pub(crate) fn readlink_rel(rel: &str) -> libc::ssize_t {
    match stat_info(rel) {
        Ok(_) => fail(libc::EINVAL) as libc::ssize_t,
        Err(e) => fail(e) as libc::ssize_t,
    }
}

/// `readlink` of `path` (relative to `dirfd`) when it is a served
/// descriptor's `/dev/fd/N`-style name: the link names the served path
/// (`PREFIX/...`), truncated to `n` bytes as `readlink` does. `None` for
/// any other path.
///
/// # Safety
/// `path` is null or NUL-terminated; `buf` holds `n` bytes.
pub(crate) unsafe fn readlink_fd(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    n: libc::size_t,
) -> Option<libc::ssize_t> {
    if path.is_null() || (dirfd != libc::AT_FDCWD && dirfd_entry(dirfd).is_none()) {
        return None;
    }
    // SAFETY: the caller's promise.
    let s = unsafe { CStr::from_ptr(path) }.to_str().ok()?;
    let target = full(&served_fd_path(s)?);
    if buf.is_null() {
        return Some(fail(libc::EFAULT) as libc::ssize_t);
    }
    let len = target.len().min(n);
    // SAFETY: `buf` holds `n` bytes (readlink's contract).
    unsafe { std::ptr::copy_nonoverlapping(target.as_ptr().cast::<c_char>(), buf, len) };
    Some(len as libc::ssize_t)
}

// ---- directory streams ---------------------------------------------------

/// One entry of a stream: name, inode, `d_type`.
struct Ent {
    name: Vec<u8>,
    ino: u64,
    dtype: u8,
}

/// What `opendir` of a served directory returns (as a `DIR *`).
struct Stream {
    fd: c_int,
    entries: Vec<Ent>,
    pos: usize,
    /// Where `readdir` writes the entry it returns.
    ent: Box<libc::dirent64>,
}

/// Addresses of live [`Stream`]s.
static STREAMS: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());
static ANY_STREAM: AtomicBool = AtomicBool::new(false);

fn is_stream(p: *mut libc::DIR) -> bool {
    ANY_STREAM.load(Ordering::Acquire) && STREAMS.lock().contains(&(p as usize))
}

/// A stream over the served directory of `fd` (which it then owns).
fn new_stream(fd: c_int, rel: &str) -> Result<*mut libc::DIR, c_int> {
    let c = client()?;
    let list = c.list(rel).map_err(|e| errno_of(&e))?;
    crate::small::listed(
        rel,
        list.iter()
            .filter(|e| e.kind == shadowfd::remote::wire::KIND_FILE)
            .map(|e| e.name.clone()),
    );
    let here = stat_info(rel)?;
    let up = if rel.is_empty() {
        here.inode
    } else {
        let parent = rel.rsplit_once('/').map_or("", |(p, _)| p);
        stat_info(parent).map(|i| i.inode).unwrap_or(here.inode)
    };
    let mut entries = vec![
        Ent {
            name: b".".to_vec(),
            ino: here.inode,
            dtype: libc::DT_DIR,
        },
        Ent {
            name: b"..".to_vec(),
            ino: up,
            dtype: libc::DT_DIR,
        },
    ];
    entries.extend(list.into_iter().map(|e| Ent {
        name: e.name,
        ino: e.inode.max(1),
        dtype: if e.kind == shadowfd::remote::wire::KIND_DIR {
            libc::DT_DIR
        } else {
            libc::DT_REG
        },
    }));
    let s = Box::new(Stream {
        fd,
        entries,
        pos: 0,
        // SAFETY: an all-zero dirent64 is valid.
        ent: Box::new(unsafe { std::mem::zeroed() }),
    });
    let p = Box::into_raw(s);
    let mut t = STREAMS.lock();
    ANY_STREAM.store(true, Ordering::Release);
    t.insert(p as usize);
    Ok(p.cast())
}

/// Runs `f` on the stream behind `p` (checked to be ours).
fn with_stream<R>(p: *mut libc::DIR, f: impl FnOnce(&mut Stream) -> R) -> R {
    // SAFETY: `p` is in STREAMS: a live Box<Stream> this shim made. glibc's
    // contract: one thread uses a DIR at a time.
    let s = unsafe { &mut *p.cast::<Stream>() };
    f(s)
}

/// Fills `out` with the next entry; false at the end.
fn next_into(s: &mut Stream, out: &mut libc::dirent64) -> bool {
    let Some(e) = s.entries.get(s.pos) else {
        return false;
    };
    s.pos += 1;
    out.d_ino = e.ino;
    out.d_off = s.pos as i64;
    out.d_type = e.dtype;
    let n = e.name.len().min(out.d_name.len() - 1);
    for (d, &b) in out.d_name.iter_mut().zip(&e.name[..n]) {
        *d = b as c_char;
    }
    out.d_name[n] = 0;
    out.d_reclen =
        (std::mem::offset_of!(libc::dirent64, d_name) + n + 1).next_multiple_of(8) as u16;
    true
}

type OpendirFn = unsafe extern "C" fn(*const c_char) -> *mut libc::DIR;

/// # Safety
/// libc's `opendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut libc::DIR {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => {
                let r = open_dir(&rel, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .and_then(|fd| {
                        new_stream(fd, &rel).inspect_err(|_| {
                            // Forgotten here too: this thread is inside
                            // the shim, where `close` keeps no books.
                            crate::fdtable::close_own(fd);
                        })
                    });
                return r.unwrap_or_else(|e| {
                    set_errno(e);
                    std::ptr::null_mut()
                });
            }
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    let d = unsafe { real!("opendir", OpendirFn)(Route::host_path(&host, path)) };
    if !d.is_null() {
        // glibc opened it with an internal call: its descriptor is new.
        // SAFETY: a live host stream.
        crate::fdtable::fresh(unsafe {
            real!("dirfd", unsafe extern "C" fn(*mut libc::DIR) -> c_int)(d)
        });
    }
    d
}

/// # Safety
/// libc's `fdopendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut libc::DIR {
    if let Some(_b) = Busy::enter() {
        if let Some(d) = dirfd_entry(fd) {
            return new_stream(fd, &d.path).unwrap_or_else(|e| {
                set_errno(e);
                std::ptr::null_mut()
            });
        }
        if crate::fdtable::entry(fd).is_some() {
            set_errno(libc::ENOTDIR);
            return std::ptr::null_mut();
        }
    }
    // SAFETY: forwarding.
    unsafe { real!("fdopendir", unsafe extern "C" fn(c_int) -> *mut libc::DIR)(fd) }
}

type ReaddirFn = unsafe extern "C" fn(*mut libc::DIR) -> *mut libc::dirent64;

/// # Safety
/// libc's `readdir` contract.
unsafe fn readdir_common(d: *mut libc::DIR, real: ReaddirFn) -> *mut libc::dirent64 {
    if is_stream(d) {
        return with_stream(d, |s| {
            let mut ent = std::mem::replace(
                &mut s.ent,
                // SAFETY: an all-zero dirent64 is valid.
                Box::new(unsafe { std::mem::zeroed() }),
            );
            let more = next_into(s, &mut ent);
            s.ent = ent;
            if more {
                &mut *s.ent as *mut libc::dirent64
            } else {
                std::ptr::null_mut()
            }
        });
    }
    // SAFETY: forwarding.
    unsafe { real(d) }
}

/// # Safety
/// libc's `readdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readdir(d: *mut libc::DIR) -> *mut libc::dirent64 {
    // SAFETY: forwarding.
    unsafe { readdir_common(d, real!("readdir", ReaddirFn)) }
}

/// # Safety
/// libc's `readdir64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readdir64(d: *mut libc::DIR) -> *mut libc::dirent64 {
    // SAFETY: forwarding.
    unsafe { readdir_common(d, real!("readdir64", ReaddirFn)) }
}

type ReaddirRFn =
    unsafe extern "C" fn(*mut libc::DIR, *mut libc::dirent64, *mut *mut libc::dirent64) -> c_int;

/// # Safety
/// libc's `readdir_r` contract.
unsafe fn readdir_r_common(
    d: *mut libc::DIR,
    ent: *mut libc::dirent64,
    res: *mut *mut libc::dirent64,
    real: ReaddirRFn,
) -> c_int {
    if is_stream(d) {
        if ent.is_null() || res.is_null() {
            return libc::EFAULT;
        }
        // SAFETY: the caller's buffers (readdir_r's contract).
        let (e, r) = unsafe { (&mut *ent, &mut *res) };
        *r = if with_stream(d, |s| next_into(s, e)) {
            ent
        } else {
            std::ptr::null_mut()
        };
        return 0;
    }
    // SAFETY: forwarding.
    unsafe { real(d, ent, res) }
}

/// # Safety
/// libc's `readdir_r`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readdir_r(
    d: *mut libc::DIR,
    ent: *mut libc::dirent64,
    res: *mut *mut libc::dirent64,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { readdir_r_common(d, ent, res, real!("readdir_r", ReaddirRFn)) }
}

/// # Safety
/// libc's `readdir64_r`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readdir64_r(
    d: *mut libc::DIR,
    ent: *mut libc::dirent64,
    res: *mut *mut libc::dirent64,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { readdir_r_common(d, ent, res, real!("readdir64_r", ReaddirRFn)) }
}

/// # Safety
/// libc's `closedir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closedir(d: *mut libc::DIR) -> c_int {
    if is_stream(d) {
        STREAMS.lock().remove(&(d as usize));
        // SAFETY: `d` was a live Box<Stream> of ours, now out of the table.
        let s = unsafe { Box::from_raw(d.cast::<Stream>()) };
        // The stream's own placeholder descriptor.
        return crate::fdtable::close_own(s.fd);
    }
    // SAFETY: forwarding.
    unsafe { real!("closedir", unsafe extern "C" fn(*mut libc::DIR) -> c_int)(d) }
}

/// # Safety
/// libc's `dirfd`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dirfd(d: *mut libc::DIR) -> c_int {
    if is_stream(d) {
        return with_stream(d, |s| s.fd);
    }
    // SAFETY: forwarding.
    unsafe { real!("dirfd", unsafe extern "C" fn(*mut libc::DIR) -> c_int)(d) }
}

/// # Safety
/// libc's `rewinddir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rewinddir(d: *mut libc::DIR) {
    if is_stream(d) {
        return with_stream(d, |s| s.pos = 0);
    }
    // SAFETY: forwarding.
    unsafe { real!("rewinddir", unsafe extern "C" fn(*mut libc::DIR))(d) }
}

/// # Safety
/// libc's `telldir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn telldir(d: *mut libc::DIR) -> c_long {
    if is_stream(d) {
        return with_stream(d, |s| s.pos as c_long);
    }
    // SAFETY: forwarding.
    unsafe { real!("telldir", unsafe extern "C" fn(*mut libc::DIR) -> c_long)(d) }
}

/// # Safety
/// libc's `seekdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn seekdir(d: *mut libc::DIR, pos: c_long) {
    if is_stream(d) {
        return with_stream(d, |s| s.pos = (pos.max(0) as usize).min(s.entries.len()));
    }
    // SAFETY: forwarding.
    unsafe { real!("seekdir", unsafe extern "C" fn(*mut libc::DIR, c_long))(d, pos) }
}

// ---- working directory ---------------------------------------------------

/// # Safety
/// libc's `chdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chdir(path: *const c_char) -> c_int {
    let real_chdir = real!("chdir", unsafe extern "C" fn(*const c_char) -> c_int);
    let Some(_b) = Busy::enter() else {
        // SAFETY: forwarding.
        return unsafe { real_chdir(path) };
    };
    // SAFETY: the caller's promise.
    match unsafe { route(libc::AT_FDCWD, path) } {
        Route::Served(rel) => match stat_info(&rel) {
            Ok(i) if i.kind == PathKind::Dir => {
                set_vcwd(Some(rel));
                0
            }
            Ok(_) => fail(libc::ENOTDIR),
            Err(e) => fail(e),
        },
        Route::Host(p) => {
            // SAFETY: forwarding.
            let r = unsafe { real_chdir(Route::host_path(&p, path)) };
            if r == 0 {
                set_vcwd(None);
            }
            r
        }
    }
}

/// # Safety
/// libc's `fchdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fchdir(fd: c_int) -> c_int {
    let real_fchdir = real!("fchdir", unsafe extern "C" fn(c_int) -> c_int);
    let Some(_b) = Busy::enter() else {
        // SAFETY: forwarding.
        return unsafe { real_fchdir(fd) };
    };
    if let Some(d) = dirfd_entry(fd) {
        set_vcwd(Some(d.path.clone()));
        return 0;
    }
    // SAFETY: forwarding.
    let r = unsafe { real_fchdir(fd) };
    if r == 0 {
        set_vcwd(None);
    }
    r
}

/// # Safety
/// libc's `getcwd`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getcwd(buf: *mut c_char, size: libc::size_t) -> *mut c_char {
    let v = match Busy::enter() {
        Some(_b) => vcwd(),
        None => None,
    };
    let Some(rel) = v else {
        // SAFETY: forwarding.
        return unsafe {
            real!(
                "getcwd",
                unsafe extern "C" fn(*mut c_char, libc::size_t) -> *mut c_char
            )(buf, size)
        };
    };
    let s = full(&rel);
    let need = s.len() + 1;
    let out = if buf.is_null() {
        // glibc's extension: allocate (at least `size` bytes if given).
        // SAFETY: malloc has no preconditions; the caller frees it.
        let p = unsafe { libc::malloc(need.max(size)) }.cast::<c_char>();
        if p.is_null() {
            set_errno(libc::ENOMEM);
            return p;
        }
        p
    } else {
        if size == 0 {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        }
        if size < need {
            set_errno(libc::ERANGE);
            return std::ptr::null_mut();
        }
        buf
    };
    // SAFETY: `out` holds at least `need` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), out, s.len());
        *out.add(s.len()) = 0;
    }
    out
}

// ---- extended attributes -------------------------------------------------

/// `getxattr`/`lgetxattr` of a served path: none (`ENODATA`), or the
/// path's error; `Err` with the path to hand the real function otherwise.
///
/// # Safety
/// `path` is null or a NUL-terminated string.
unsafe fn getxattr_common(path: *const c_char) -> Result<libc::ssize_t, Option<CString>> {
    let Some(_b) = Busy::enter() else {
        return Err(None);
    };
    // SAFETY: the caller's promise.
    match unsafe { route(libc::AT_FDCWD, path) } {
        Route::Served(rel) => Ok(match stat_info(&rel) {
            Ok(_) => fail(libc::ENODATA) as libc::ssize_t,
            Err(e) => fail(e) as libc::ssize_t,
        }),
        Route::Host(p) => Err(p),
    }
}

type GetxattrFn =
    unsafe extern "C" fn(*const c_char, *const c_char, *mut c_void, libc::size_t) -> libc::ssize_t;

/// # Safety
/// libc's `getxattr`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getxattr(
    path: *const c_char,
    name: *const c_char,
    v: *mut c_void,
    n: libc::size_t,
) -> libc::ssize_t {
    // SAFETY: the caller's promise.
    match unsafe { getxattr_common(path) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("getxattr", GetxattrFn)(Route::host_path(&p, path), name, v, n) },
    }
}

/// # Safety
/// libc's `lgetxattr`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lgetxattr(
    path: *const c_char,
    name: *const c_char,
    v: *mut c_void,
    n: libc::size_t,
) -> libc::ssize_t {
    // SAFETY: the caller's promise.
    match unsafe { getxattr_common(path) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("lgetxattr", GetxattrFn)(Route::host_path(&p, path), name, v, n) },
    }
}

// ---- scandir -------------------------------------------------------------

pub(crate) type Filter = Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>;
pub(crate) type Compar =
    Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>;
type ScandirFn =
    unsafe extern "C" fn(*const c_char, *mut *mut *mut libc::dirent64, Filter, Compar) -> c_int;

/// `scandir` of a served directory, through [`opendir`] and [`readdir`]:
/// glibc's own opens the directory with internal calls no preload sees.
///
/// # Safety
/// libc's `scandir` contract.
unsafe fn scandir_common(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: Filter,
    compar: Compar,
    real: ScandirFn,
) -> c_int {
    let served = match Busy::enter() {
        // SAFETY: the caller's promise.
        Some(_b) => matches!(unsafe { route(libc::AT_FDCWD, path) }, Route::Served(_)),
        None => false,
    };
    if !served {
        // SAFETY: forwarding (a relative path leaving the prefix is the
        // host's as given: glibc resolves it).
        return unsafe { real(path, list, filter, compar) };
    }
    if list.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: the caller's path.
    let d = unsafe { opendir(path) };
    if d.is_null() {
        return -1;
    }
    let mut got: Vec<*mut libc::dirent64> = Vec::new();
    let mut oom = false;
    loop {
        // SAFETY: our own stream.
        let e = unsafe { readdir(d) };
        if e.is_null() {
            break;
        }
        if let Some(f) = filter {
            // SAFETY: `e` is the stream's entry; the filter is the caller's.
            if unsafe { f(e) } == 0 {
                continue;
            }
        }
        let n = std::mem::size_of::<libc::dirent64>();
        // SAFETY: malloc has no preconditions; the caller frees each entry.
        let copy = unsafe { libc::malloc(n) }.cast::<libc::dirent64>();
        if copy.is_null() {
            oom = true;
            break;
        }
        // SAFETY: both hold a whole dirent64.
        unsafe { std::ptr::copy_nonoverlapping(e, copy, 1) };
        got.push(copy);
    }
    // SAFETY: our own stream.
    unsafe { closedir(d) };
    let bytes = got.len().max(1) * std::mem::size_of::<*mut libc::dirent64>();
    let arr = if oom {
        std::ptr::null_mut()
    } else {
        // SAFETY: malloc has no preconditions; the caller frees the array.
        unsafe { libc::malloc(bytes) }.cast::<*mut libc::dirent64>()
    };
    if arr.is_null() {
        for p in got {
            // SAFETY: each came from malloc above.
            unsafe { libc::free(p.cast()) };
        }
        return fail(libc::ENOMEM);
    }
    // SAFETY: `arr` holds got.len() pointers.
    unsafe { std::ptr::copy_nonoverlapping(got.as_ptr(), arr, got.len()) };
    if let Some(c) = compar {
        type QsortCmp = unsafe extern "C" fn(*const c_void, *const c_void) -> c_int;
        // SAFETY: qsort calls the comparator with pointers to two elements
        // (pointers to entries), which is what scandir's comparators take.
        unsafe {
            libc::qsort(
                arr.cast(),
                got.len(),
                std::mem::size_of::<*mut libc::dirent64>(),
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(
                        *mut *const libc::dirent64,
                        *mut *const libc::dirent64,
                    ) -> c_int,
                    QsortCmp,
                >(c)),
            )
        };
    }
    // SAFETY: the caller's out-pointer.
    unsafe { *list = arr };
    got.len() as c_int
}

/// # Safety
/// libc's `scandir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scandir(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: Filter,
    compar: Compar,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { scandir_common(path, list, filter, compar, real!("scandir", ScandirFn)) }
}

/// # Safety
/// libc's `scandir64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scandir64(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: Filter,
    compar: Compar,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { scandir_common(path, list, filter, compar, real!("scandir64", ScandirFn)) }
}

// ---- fork ----------------------------------------------------------------

type HeldDir = (
    ForkGuard<'static, Option<Option<String>>>,
    ForkGuard<'static, BTreeMap<c_int, Arc<DirFd>>>,
    ForkGuard<'static, BTreeSet<usize>>,
    ForkGuard<'static, Option<Stats>>,
    ForkGuard<'static, Option<crate::small::Cache>>,
);

thread_local! {
    /// This module's locks, held by the forking thread across fork so that
    /// the child never inherits one held by a thread it does not have.
    static HELD_DIR: std::cell::RefCell<Option<HeldDir>> = const { std::cell::RefCell::new(None) };
}

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

// ---- glob ----------------------------------------------------------------

/// glibc's `glob_t` (and `glob64_t`, the same on 64-bit), with the
/// `GLOB_ALTDIRFUNC` hooks the `libc` crate keeps private.
#[repr(C)]
pub struct GlobT {
    gl_pathc: libc::size_t,
    gl_pathv: *mut *mut c_char,
    gl_offs: libc::size_t,
    gl_flags: c_int,
    gl_closedir: Option<unsafe extern "C" fn(*mut c_void)>,
    gl_readdir: Option<unsafe extern "C" fn(*mut c_void) -> *mut libc::dirent64>,
    gl_opendir: Option<unsafe extern "C" fn(*const c_char) -> *mut c_void>,
    gl_lstat: Option<unsafe extern "C" fn(*const c_char, *mut libc::stat64) -> c_int>,
    gl_stat: Option<unsafe extern "C" fn(*const c_char, *mut libc::stat64) -> c_int>,
}

type GlobErr = Option<unsafe extern "C" fn(*const c_char, c_int) -> c_int>;
type GlobFn = unsafe extern "C" fn(*const c_char, c_int, GlobErr, *mut GlobT) -> c_int;

unsafe extern "C" fn glob_closedir(d: *mut c_void) {
    // SAFETY: a stream `glob_opendir` returned.
    unsafe { closedir(d.cast()) };
}

unsafe extern "C" fn glob_readdir(d: *mut c_void) -> *mut libc::dirent64 {
    // SAFETY: a stream `glob_opendir` returned.
    unsafe { readdir(d.cast()) }
}

unsafe extern "C" fn glob_opendir(p: *const c_char) -> *mut c_void {
    // SAFETY: glob passes a NUL-terminated path.
    unsafe { opendir(p) }.cast()
}

unsafe extern "C" fn glob_stat(p: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: glob passes a path and a stat buffer.
    unsafe { crate::stat(p, st) }
}

unsafe extern "C" fn glob_lstat(p: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: glob passes a path and a stat buffer.
    unsafe { crate::lstat(p, st) }
}

/// Whether a glob pattern may name served paths: it starts with the
/// prefix, or is relative while the working directory is virtual.
///
/// # Safety
/// `pattern` is null or a NUL-terminated string.
unsafe fn glob_served(pattern: *const c_char) -> bool {
    let Some(prefix) = prefix_str() else {
        return false;
    };
    if pattern.is_null() {
        return false;
    }
    // SAFETY: the caller's promise.
    let p = unsafe { CStr::from_ptr(pattern) }.to_bytes();
    if p.first() == Some(&b'/') {
        p.starts_with(prefix.as_bytes())
    } else {
        let _b = Busy::enter();
        vcwd().is_some()
    }
}

/// `glob` with a pattern under the prefix: glibc's own, told to read
/// directories through this shim (`GLOB_ALTDIRFUNC`), since it would
/// otherwise open them with internal calls and find nothing.
///
/// # Safety
/// libc's `glob` contract.
unsafe fn glob_common(
    pattern: *const c_char,
    flags: c_int,
    errfunc: GlobErr,
    g: *mut GlobT,
    real: GlobFn,
) -> c_int {
    // SAFETY: the caller's pattern.
    if flags & libc::GLOB_ALTDIRFUNC == 0 && !g.is_null() && unsafe { glob_served(pattern) } {
        // SAFETY: the caller's glob_t, which glob fills in anyway.
        let gl = unsafe { &mut *g };
        gl.gl_closedir = Some(glob_closedir);
        gl.gl_readdir = Some(glob_readdir);
        gl.gl_opendir = Some(glob_opendir);
        gl.gl_lstat = Some(glob_lstat);
        gl.gl_stat = Some(glob_stat);
        // SAFETY: forwarding, with the hooks set.
        return unsafe { real(pattern, flags | libc::GLOB_ALTDIRFUNC, errfunc, g) };
    }
    // SAFETY: forwarding.
    unsafe { real(pattern, flags, errfunc, g) }
}

/// # Safety
/// libc's `glob`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn glob(
    pattern: *const c_char,
    flags: c_int,
    errfunc: GlobErr,
    g: *mut GlobT,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { glob_common(pattern, flags, errfunc, g, real!("glob", GlobFn)) }
}

/// # Safety
/// libc's `glob64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn glob64(
    pattern: *const c_char,
    flags: c_int,
    errfunc: GlobErr,
    g: *mut GlobT,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { glob_common(pattern, flags, errfunc, g, real!("glob64", GlobFn)) }
}
