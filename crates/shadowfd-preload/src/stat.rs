//! `stat` and its kin (`lstat`, `fstat`, `fstatat`, `statx`, the
//! `__xstat` family) of served paths and descriptors, and how a served
//! file or directory's attributes fill a `struct stat` or `struct statx`.

use crate::dirfd::dirfd_entry;
use crate::fdtable::{entry, tracked};
use crate::route::Route;
use crate::statcache::stat_info;
use crate::{Busy, fail};
use shadowfd::remote::{PathInfo, PathKind, RemoteFile};
use std::ffi::{CString, c_char, c_int};

/// The link count of an open file: as SMALL said, else as the kept STAT
/// answer of its path says (the tree cannot change), else 1 (OPEN's reply
/// has none).
fn nlink_of(f: &RemoteFile) -> u64 {
    f.nlink()
        .or_else(|| match crate::statcache::kept_stat(f.path()) {
            Some(Ok(i)) if (i.device, i.inode) == (f.identity().0, f.identity().1) => Some(i.nlink),
            _ => None,
        })
        .unwrap_or(1)
}

/// `fstat` of an open served file.
fn file_stat(f: &RemoteFile, st: *mut libc::stat64) -> c_int {
    fill_stat(&Attrs::of_file(f), st)
}

/// `statx` of an open served file.
fn file_statx(f: &RemoteFile, st: *mut libc::statx) -> c_int {
    fill_statx(&Attrs::of_file(f), st)
}

type StatFn = unsafe extern "C" fn(*const c_char, *mut libc::stat64) -> c_int;

/// # Safety
/// libc's `stat`/`lstat` contract.
unsafe fn stat_common(path: *const c_char, st: *mut libc::stat64, real: StatFn) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return crate::stat::stat_rel(&rel, st),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe { real(Route::host_path(&host, path), st) }
}

twins! {
    [stat, stat64, lstat, lstat64] fn(path: *const c_char, st: *mut libc::stat64) -> c_int,
    real: StatFn => {
        // SAFETY: forwarding.
        unsafe { stat_common(path, st, real) }
    }
}

type FstatFn = unsafe extern "C" fn(c_int, *mut libc::stat64) -> c_int;

/// `fstat`/`fstat64`: a served descriptor reports the served file; any
/// other goes to `real`.
///
/// # Safety
/// libc's `fstat`, with `real` its next definition.
unsafe fn fstat_common(fd: c_int, st: *mut libc::stat64, real: FstatFn) -> c_int {
    if let Some((_b, e)) = tracked(fd) {
        return match e.file() {
            Ok(f) => file_stat(&f, st),
            Err(err) => fail(err),
        };
    }
    if let Some(_b) = Busy::enter()
        && let Some(r) = crate::stat::fstat_dirfd(fd, st)
    {
        return r;
    }
    // SAFETY: forwarding.
    unsafe { real(fd, st) }
}

twins! {
    [fstat, fstat64] fn(fd: c_int, st: *mut libc::stat64) -> c_int,
    real: FstatFn => {
        // SAFETY: forwarding.
        unsafe { fstat_common(fd, st, real) }
    }
}

type FstatatFn = unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat64, c_int) -> c_int;

/// # Safety
/// libc's `fstatat` contract.
unsafe fn fstatat_common(
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
    flags: c_int,
    real: FstatatFn,
) -> c_int {
    let fills = StatFills {
        file: file_stat,
        dirfd: crate::stat::fstat_dirfd,
        rel: crate::stat::stat_rel,
    };
    // SAFETY: the caller's promise.
    let host = match unsafe { stat_served(dirfd, path, flags, st, fills) } {
        Ok(r) => return r,
        Err(host) => host,
    };
    // SAFETY: forwarding.
    unsafe { real(dirfd, Route::host_path(&host, path), st, flags) }
}

/// How a stat-like call fills its buffer `S` for a served file descriptor,
/// a served directory descriptor (`None`: not one) and a served path.
struct StatFills<S> {
    file: fn(&RemoteFile, *mut S) -> c_int,
    dirfd: fn(c_int, *mut S) -> Option<c_int>,
    rel: fn(&str, *mut S) -> c_int,
}

/// The served part of `fstatat`/`statx` on (`dirfd`, `path`, `flags`):
/// `AT_EMPTY_PATH` on a tracked descriptor, or a path that routes into the
/// served tree, is answered here (`Ok`); anything else goes to the host,
/// as the path [`crate::route::route`] says (`Err`).
///
/// # Safety
/// `path` is null or NUL-terminated, as `fstatat` requires.
unsafe fn stat_served<S>(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    st: *mut S,
    fills: StatFills<S>,
) -> Result<c_int, Option<CString>> {
    let Some(_b) = Busy::enter() else {
        return Err(None);
    };
    // SAFETY: the caller's promise.
    let empty = !path.is_null() && unsafe { *path } == 0;
    if empty && flags & libc::AT_EMPTY_PATH != 0 {
        if let Some(e) = entry(dirfd) {
            return Ok(match e.file() {
                Ok(f) => (fills.file)(&f, st),
                Err(err) => fail(err),
            });
        }
        return (fills.dirfd)(dirfd, st).ok_or(None);
    }
    // SAFETY: the caller's promise.
    match unsafe { crate::route::route(dirfd, path) } {
        Route::Served(rel) => Ok((fills.rel)(&rel, st)),
        Route::Host(p) => Err(p),
    }
}

twins! {
    [fstatat, fstatat64] fn(dirfd: c_int, path: *const c_char, st: *mut libc::stat64, flags: c_int) -> c_int,
    real: FstatatFn => {
        // SAFETY: forwarding.
        unsafe { fstatat_common(dirfd, path, st, flags, real) }
    }
}

/// # Safety
/// libc's `statx`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: libc::c_uint,
    st: *mut libc::statx,
) -> c_int {
    let fills = StatFills {
        file: file_statx,
        dirfd: crate::stat::statx_dirfd,
        rel: crate::stat::statx_rel,
    };
    // SAFETY: the caller's promise.
    let host = match unsafe { stat_served(dirfd, path, flags, st, fills) } {
        Ok(r) => return r,
        Err(host) => host,
    };
    let path = Route::host_path(&host, path);
    // SAFETY: forwarding.
    unsafe {
        real!(
            "statx",
            unsafe extern "C" fn(
                c_int,
                *const c_char,
                c_int,
                libc::c_uint,
                *mut libc::statx,
            ) -> c_int
        )(dirfd, path, flags, mask, st)
    }
}

/// What a `struct stat` or `struct statx` says of a served file or
/// directory: owned by the caller's uid and gid, with 1 MiB blocks, its
/// mtime as every time stamp.
struct Attrs {
    dev: u64,
    ino: u64,
    nlink: u64,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
}

impl Attrs {
    /// An open file (a regular file, 0444).
    fn of_file(f: &RemoteFile) -> Attrs {
        let (dev, ino, ms, mns) = f.identity();
        Attrs {
            dev,
            ino,
            nlink: nlink_of(f),
            mode: libc::S_IFREG | 0o444,
            size: f.size(),
            mtime: (ms, mns),
        }
    }

    /// A STAT answer: a directory (0555, at least 2 links) or a file (0444).
    fn of_info(info: &PathInfo) -> Result<Attrs, c_int> {
        let (mode, nlink) = match info.kind {
            PathKind::Dir => (libc::S_IFDIR | 0o555, info.nlink.max(2)),
            PathKind::File => (libc::S_IFREG | 0o444, info.nlink.max(1)),
            // Served trees hold files and directories only.
            PathKind::Other => return Err(libc::ENOENT),
        };
        Ok(Attrs {
            dev: info.device,
            ino: info.inode,
            nlink,
            mode,
            size: info.size,
            mtime: info.mtime,
        })
    }
}

fn ids() -> (u32, u32) {
    // SAFETY: getuid and getgid have no preconditions.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Writes `a` to the caller's `struct stat` (`EFAULT` for null).
fn fill_stat(a: &Attrs, st: *mut libc::stat64) -> c_int {
    if st.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: an all-zero stat64 is valid.
    let mut s: libc::stat64 = unsafe { std::mem::zeroed() };
    s.st_dev = a.dev;
    s.st_ino = a.ino;
    s.st_nlink = a.nlink;
    s.st_mode = a.mode;
    (s.st_uid, s.st_gid) = ids();
    s.st_size = a.size as i64;
    s.st_blksize = 1 << 20;
    s.st_blocks = a.size.div_ceil(512) as i64;
    let (ms, mns) = a.mtime;
    (s.st_mtime, s.st_mtime_nsec) = (ms, mns);
    (s.st_atime, s.st_atime_nsec) = (ms, mns);
    (s.st_ctime, s.st_ctime_nsec) = (ms, mns);
    // SAFETY: the caller's buffer, for a struct stat (== stat64 here).
    unsafe { st.write(s) };
    0
}

/// Writes `a` to the caller's `struct statx` (`EFAULT` for null).
fn fill_statx(a: &Attrs, st: *mut libc::statx) -> c_int {
    if st.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: an all-zero statx is valid.
    let mut s: libc::statx = unsafe { std::mem::zeroed() };
    s.stx_mask = libc::STATX_BASIC_STATS;
    s.stx_blksize = 1 << 20;
    s.stx_nlink = a.nlink as u32;
    (s.stx_uid, s.stx_gid) = ids();
    s.stx_mode = a.mode as u16;
    s.stx_ino = a.ino;
    s.stx_size = a.size;
    s.stx_blocks = a.size.div_ceil(512);
    let (ms, mns) = a.mtime;
    for t in [&mut s.stx_atime, &mut s.stx_mtime, &mut s.stx_ctime] {
        t.tv_sec = ms;
        t.tv_nsec = mns as u32;
    }
    s.stx_dev_major = libc::major(a.dev);
    s.stx_dev_minor = libc::minor(a.dev);
    // SAFETY: the caller's buffer for a struct statx.
    unsafe { st.write(s) };
    0
}

/// `stat` of a served path.
fn stat_rel(rel: &str, st: *mut libc::stat64) -> c_int {
    match stat_info(rel).and_then(|i| Attrs::of_info(&i)) {
        Ok(a) => fill_stat(&a, st),
        Err(e) => fail(e),
    }
}

/// `statx` of a served path.
fn statx_rel(rel: &str, st: *mut libc::statx) -> c_int {
    match stat_info(rel).and_then(|i| Attrs::of_info(&i)) {
        Ok(a) => fill_statx(&a, st),
        Err(e) => fail(e),
    }
}

/// `fstat` of a served directory descriptor; `None` if `fd` is not one.
fn fstat_dirfd(fd: c_int, st: *mut libc::stat64) -> Option<c_int> {
    let d = dirfd_entry(fd)?;
    Some(stat_rel(&d.path, st))
}

/// `statx(fd, "", AT_EMPTY_PATH)` of a served directory descriptor.
fn statx_dirfd(fd: c_int, st: *mut libc::statx) -> Option<c_int> {
    let d = dirfd_entry(fd)?;
    Some(statx_rel(&d.path, st))
}

/// The `__xstat` family (what programs built against glibc before 2.33
/// call for `stat`): the version argument is ignored, and each is the
/// shim's function named after `=>`.
macro_rules! xstat {
    ($($name:ident => $to:ident($($arg:ident: $ty:ty),*);)+) => {$(
        /// # Safety
        #[doc = concat!("glibc's `", stringify!($name), "`: `", stringify!($to), "`.")]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(_ver: c_int, $($arg: $ty),*) -> c_int {
            // SAFETY: the contract of the call it stands for.
            unsafe { $to($($arg),*) }
        }
    )+};
}

xstat! {
    __xstat => stat(path: *const c_char, st: *mut libc::stat64);
    __xstat64 => stat64(path: *const c_char, st: *mut libc::stat64);
    __lxstat => lstat(path: *const c_char, st: *mut libc::stat64);
    __lxstat64 => lstat64(path: *const c_char, st: *mut libc::stat64);
    __fxstat => fstat(fd: c_int, st: *mut libc::stat64);
    __fxstat64 => fstat64(fd: c_int, st: *mut libc::stat64);
    __fxstatat => fstatat(dirfd: c_int, path: *const c_char, st: *mut libc::stat64, flags: c_int);
    __fxstatat64 => fstatat64(dirfd: c_int, path: *const c_char, st: *mut libc::stat64, flags: c_int);
}
