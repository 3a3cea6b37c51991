//! Path-taking libc functions whose glibc definitions reach the kernel
//! through internal calls no preload sees: the access checks by effective
//! ids, `realpath`, file-system statistics, `truncate`,
//! `name_to_handle_at`, and `freopen` (docs/run.md, "Intercepted").

use crate::dir::{self, Route};
use crate::{Busy, fail, set_errno};
use shadowfd::remote::PathKind;
use std::ffi::{CStr, CString, c_char, c_int, c_void};

/// Runs `served` for a path under the prefix (with this thread marked
/// busy), or gives back the path to hand the real function.
///
/// # Safety
/// `path` is null or NUL-terminated.
unsafe fn with_route<R>(
    dirfd: c_int,
    path: *const c_char,
    served: impl FnOnce(&str) -> R,
) -> Result<R, Option<std::ffi::CString>> {
    let Some(_b) = Busy::enter() else {
        return Err(None);
    };
    // SAFETY: the caller's promise.
    match unsafe { dir::route(dirfd, path) } {
        Route::Served(rel) => Ok(served(&rel)),
        Route::Host(p) => Err(p),
    }
}

type AccessFn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;

/// # Safety
/// libc's `euidaccess`/`eaccess`, with `real` its next definition.
unsafe fn eaccess_common(path: *const c_char, mode: c_int, real: AccessFn) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |rel| dir::access_rel(rel, mode)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real(Route::host_path(&p, path), mode) },
    }
}

/// # Safety
/// glibc's `euidaccess`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn euidaccess(path: *const c_char, mode: c_int) -> c_int {
    // SAFETY: forwarding.
    unsafe { eaccess_common(path, mode, real!("euidaccess", AccessFn)) }
}

/// # Safety
/// glibc's `eaccess`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn eaccess(path: *const c_char, mode: c_int) -> c_int {
    // SAFETY: forwarding.
    unsafe { eaccess_common(path, mode, real!("eaccess", AccessFn)) }
}

// ---- realpath ------------------------------------------------------------

/// The canonical name of a served path (`PREFIX/rel`, which exists), in
/// `out` (at least `cap` bytes) or, if `out` is null, in memory from
/// `malloc`.
fn resolved_into(rel: &str, out: *mut c_char, cap: usize) -> *mut c_char {
    match dir::stat_info(rel) {
        Ok(i) if i.kind != PathKind::Other => {}
        Ok(_) => {
            set_errno(libc::ENOENT);
            return std::ptr::null_mut();
        }
        Err(e) => {
            set_errno(e);
            return std::ptr::null_mut();
        }
    }
    let s = dir::full(rel);
    let need = s.len() + 1;
    let out = if out.is_null() {
        // SAFETY: malloc has no preconditions; the caller frees it.
        let p = unsafe { libc::malloc(need) }.cast::<c_char>();
        if p.is_null() {
            set_errno(libc::ENOMEM);
            return p;
        }
        p
    } else if need > cap {
        set_errno(libc::ENAMETOOLONG);
        return std::ptr::null_mut();
    } else {
        out
    };
    // SAFETY: `out` holds at least `need` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), out, s.len());
        *out.add(s.len()) = 0;
    }
    out
}

type RealpathFn = unsafe extern "C" fn(*const c_char, *mut c_char) -> *mut c_char;

/// # Safety
/// libc's `realpath`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realpath(path: *const c_char, out: *mut c_char) -> *mut c_char {
    let cap = libc::PATH_MAX as usize;
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |rel| resolved_into(rel, out, cap)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("realpath", RealpathFn)(Route::host_path(&p, path), out) },
    }
}

/// # Safety
/// glibc's fortified `realpath`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __realpath_chk(
    path: *const c_char,
    out: *mut c_char,
    outlen: libc::size_t,
) -> *mut c_char {
    let cap = outlen.min(libc::PATH_MAX as usize);
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |rel| resolved_into(rel, out, cap)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe {
            real!(
                "__realpath_chk",
                unsafe extern "C" fn(*const c_char, *mut c_char, libc::size_t) -> *mut c_char
            )(Route::host_path(&p, path), out, outlen)
        },
    }
}

/// # Safety
/// glibc's `canonicalize_file_name`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn canonicalize_file_name(path: *const c_char) -> *mut c_char {
    let served = |rel: &str| resolved_into(rel, std::ptr::null_mut(), 0);
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, served) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe {
            real!(
                "canonicalize_file_name",
                unsafe extern "C" fn(*const c_char) -> *mut c_char
            )(Route::host_path(&p, path))
        },
    }
}

// ---- truncate, name_to_handle_at ------------------------------------------

type TruncateFn = unsafe extern "C" fn(*const c_char, libc::off_t) -> c_int;

/// A served file cannot be written: `EROFS` (or the path's own error).
fn erofs(rel: &str) -> c_int {
    match dir::stat_info(rel) {
        Ok(_) => fail(libc::EROFS),
        Err(e) => fail(e),
    }
}

/// # Safety
/// libc's `truncate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn truncate(path: *const c_char, len: libc::off_t) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, erofs) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("truncate", TruncateFn)(Route::host_path(&p, path), len) },
    }
}

/// # Safety
/// libc's `truncate64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn truncate64(path: *const c_char, len: libc::off_t) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, erofs) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("truncate64", TruncateFn)(Route::host_path(&p, path), len) },
    }
}

/// # Safety
/// libc's `name_to_handle_at`: a served path has no kernel file handle
/// (`EOPNOTSUPP`, as on a file system without export support).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn name_to_handle_at(
    dirfd: c_int,
    path: *const c_char,
    handle: *mut c_void,
    mount_id: *mut c_int,
    flags: c_int,
) -> c_int {
    let served = |rel: &str| match dir::stat_info(rel) {
        Ok(_) => fail(libc::EOPNOTSUPP),
        Err(e) => fail(e),
    };
    // SAFETY: the caller's promise.
    match unsafe { with_route(dirfd, path, served) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe {
            real!(
                "name_to_handle_at",
                unsafe extern "C" fn(c_int, *const c_char, *mut c_void, *mut c_int, c_int) -> c_int
            )(dirfd, Route::host_path(&p, path), handle, mount_id, flags)
        },
    }
}

// ---- statvfs, statfs -----------------------------------------------------

/// A served tree's file-system statistics: read-only, 4 KiB blocks, names
/// up to 255 bytes, nothing free; sizes and counts are not known (0).
fn fill_statvfs(rel: &str, st: *mut libc::statvfs) -> c_int {
    if let Err(e) = dir::stat_info(rel) {
        return fail(e);
    }
    if st.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: an all-zero statvfs is valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    s.f_bsize = 4096;
    s.f_frsize = 4096;
    s.f_namemax = 255;
    s.f_flag = libc::ST_RDONLY | libc::ST_NOSUID | libc::ST_NODEV;
    // SAFETY: the caller's buffer for a struct statvfs.
    unsafe { st.write(s) };
    0
}

/// As [`fill_statvfs`], for `statfs` (type "SHDF").
fn fill_statfs(rel: &str, st: *mut libc::statfs) -> c_int {
    if let Err(e) = dir::stat_info(rel) {
        return fail(e);
    }
    if st.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: an all-zero statfs is valid.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    s.f_type = 0x5348_4446;
    s.f_bsize = 4096;
    s.f_frsize = 4096;
    s.f_namelen = 255;
    // SAFETY: the caller's buffer for a struct statfs.
    unsafe { st.write(s) };
    0
}

type StatvfsFn = unsafe extern "C" fn(*const c_char, *mut libc::statvfs) -> c_int;
type StatfsFn = unsafe extern "C" fn(*const c_char, *mut libc::statfs) -> c_int;

/// # Safety
/// libc's `statvfs`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statvfs(path: *const c_char, st: *mut libc::statvfs) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |r| fill_statvfs(r, st)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("statvfs", StatvfsFn)(Route::host_path(&p, path), st) },
    }
}

/// # Safety
/// libc's `statvfs64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statvfs64(path: *const c_char, st: *mut libc::statvfs) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |r| fill_statvfs(r, st)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("statvfs64", StatvfsFn)(Route::host_path(&p, path), st) },
    }
}

/// # Safety
/// libc's `statfs`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statfs(path: *const c_char, st: *mut libc::statfs) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |r| fill_statfs(r, st)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("statfs", StatfsFn)(Route::host_path(&p, path), st) },
    }
}

/// # Safety
/// libc's `statfs64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statfs64(path: *const c_char, st: *mut libc::statfs) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(libc::AT_FDCWD, path, |r| fill_statfs(r, st)) } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real!("statfs64", StatfsFn)(Route::host_path(&p, path), st) },
    }
}

// ---- freopen -------------------------------------------------------------

unsafe extern "C" {
    static mut stdin: *mut libc::FILE;
}

type FreopenFn =
    unsafe extern "C" fn(*const c_char, *const c_char, *mut libc::FILE) -> *mut libc::FILE;

/// `freopen` of a served path: the old stream is closed (as glibc's does),
/// the file opened through the shim under the old stream's descriptor
/// number, and a new stream returned that reads through the shim, as
/// `fopen`'s does. glibc's `FILE` of the old stream cannot be turned into
/// such a stream in place: when it is `stdin`, `stdin` is pointed at the
/// new one; any other copy of the old pointer reads a closed stream
/// (docs/run.md).
///
/// # Safety
/// libc's `freopen`, with `real` its next definition.
unsafe fn freopen_common(
    path: *const c_char,
    mode: *const c_char,
    old: *mut libc::FILE,
    real: FreopenFn,
) -> *mut libc::FILE {
    let rel = if path.is_null() {
        None
    } else {
        // SAFETY: the caller's promise.
        match unsafe { with_route(libc::AT_FDCWD, path, |r| r.to_string()) } {
            Ok(r) => Some(r),
            Err(p) => {
                // SAFETY: forwarding.
                let f = unsafe { real(Route::host_path(&p, path), mode, old) };
                if !f.is_null() {
                    // SAFETY: a live stream.
                    crate::fdtable::fresh(unsafe { libc::fileno(f) });
                }
                return f;
            }
        }
    };
    let Some(rel) = rel else {
        // SAFETY: forwarding (a mode change of the same file).
        return unsafe { real(path, mode, old) };
    };
    if old.is_null() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller's promise.
    let cloexec = match unsafe { crate::read_mode(mode) } {
        Ok(c) => c,
        Err(e) => {
            set_errno(e);
            return std::ptr::null_mut();
        }
    };
    // SAFETY: a live stream.
    let was = unsafe { libc::fileno(old) };
    // SAFETY: freopen closes the old stream first, whatever happens next.
    unsafe { libc::fclose(old) };
    let fd = {
        let _b = Busy::enter();
        crate::do_open(&rel, libc::O_RDONLY | cloexec)
    };
    if fd < 0 {
        return std::ptr::null_mut();
    }
    let fd = if was >= 0 && fd != was {
        // SAFETY: descriptors of this process; the shim's dup2 and close
        // keep the table right.
        unsafe {
            if crate::dup2(fd, was) < 0 {
                crate::close(fd);
                return std::ptr::null_mut();
            }
            crate::close(fd);
        }
        was
    } else {
        fd
    };
    let f = crate::cookie_stream(fd);
    if f.is_null() {
        // SAFETY: our own descriptor.
        unsafe { crate::close(fd) };
        return f;
    }
    // SAFETY: `stdin` is glibc's stream pointer; replacing it is what a
    // program that reopens standard input expects to read from.
    unsafe {
        if stdin == old {
            stdin = f;
        }
    }
    f
}

/// # Safety
/// libc's `freopen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn freopen(
    path: *const c_char,
    mode: *const c_char,
    old: *mut libc::FILE,
) -> *mut libc::FILE {
    // SAFETY: forwarding.
    unsafe { freopen_common(path, mode, old, real!("freopen", FreopenFn)) }
}

/// # Safety
/// libc's `freopen64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn freopen64(
    path: *const c_char,
    mode: *const c_char,
    old: *mut libc::FILE,
) -> *mut libc::FILE {
    // SAFETY: forwarding.
    unsafe { freopen_common(path, mode, old, real!("freopen64", FreopenFn)) }
}

// ---- the __xstat family ----------------------------------------------------

// glibc before 2.33 had `stat` and friends call these, and programs built
// then (Debian's make 4.3, among others) still bind to them as compat
// symbols (`__xstat@GLIBC_2.2.5`). The version argument is the layout of
// `struct stat`, which on x86-64 and aarch64 is the one `stat` fills: each
// goes to the shim's own `stat`, `lstat`, `fstat` or `fstatat`.

/// # Safety
/// glibc's `__xstat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __xstat(_ver: c_int, path: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: as stat.
    unsafe { crate::stat(path, st) }
}

/// # Safety
/// glibc's `__xstat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __xstat64(
    _ver: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
) -> c_int {
    // SAFETY: as stat64.
    unsafe { crate::stat64(path, st) }
}

/// # Safety
/// glibc's `__lxstat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __lxstat(
    _ver: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
) -> c_int {
    // SAFETY: as lstat.
    unsafe { crate::lstat(path, st) }
}

/// # Safety
/// glibc's `__lxstat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __lxstat64(
    _ver: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
) -> c_int {
    // SAFETY: as lstat64.
    unsafe { crate::lstat64(path, st) }
}

/// # Safety
/// glibc's `__fxstat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstat(_ver: c_int, fd: c_int, st: *mut libc::stat64) -> c_int {
    // SAFETY: as fstat.
    unsafe { crate::fstat(fd, st) }
}

/// # Safety
/// glibc's `__fxstat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstat64(_ver: c_int, fd: c_int, st: *mut libc::stat64) -> c_int {
    // SAFETY: as fstat64.
    unsafe { crate::fstat64(fd, st) }
}

/// # Safety
/// glibc's `__fxstatat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstatat(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
    flags: c_int,
) -> c_int {
    // SAFETY: as fstatat.
    unsafe { crate::fstatat(dirfd, path, st, flags) }
}

/// # Safety
/// glibc's `__fxstatat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstatat64(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
    flags: c_int,
) -> c_int {
    // SAFETY: as fstatat64.
    unsafe { crate::fstatat64(dirfd, path, st, flags) }
}

/// # Safety
/// glibc's `get_current_dir_name`: the virtual working directory when
/// there is one (glibc's own asks the kernel, which knows only the real
/// one).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn get_current_dir_name() -> *mut c_char {
    let v = match Busy::enter() {
        Some(_b) => dir::vcwd(),
        None => None,
    };
    match v {
        Some(rel) => {
            let s = dir::full(&rel);
            // SAFETY: malloc has no preconditions; the caller frees it.
            let p = unsafe { libc::malloc(s.len() + 1) }.cast::<c_char>();
            if p.is_null() {
                set_errno(libc::ENOMEM);
                return p;
            }
            // SAFETY: `p` holds s.len() + 1 bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), p, s.len());
                *p.add(s.len()) = 0;
            }
            p
        }
        // SAFETY: forwarding.
        None => unsafe {
            real!(
                "get_current_dir_name",
                unsafe extern "C" fn() -> *mut c_char
            )()
        },
    }
}

// ---- nftw, ftw -------------------------------------------------------------

/// glibc's `struct FTW`.
#[repr(C)]
pub struct Ftw {
    base: c_int,
    level: c_int,
}

type NftwFn = unsafe extern "C" fn(*const c_char, *const libc::stat64, c_int, *mut Ftw) -> c_int;
type FtwFn = unsafe extern "C" fn(*const c_char, *const libc::stat64, c_int) -> c_int;

const FTW_F: c_int = 0;
const FTW_D: c_int = 1;
const FTW_DNR: c_int = 2;
const FTW_NS: c_int = 3;
const FTW_DP: c_int = 5;
const FTW_CHDIR: c_int = 4;
const FTW_DEPTH: c_int = 8;
const FTW_ACTIONRETVAL: c_int = 16;
const FTW_STOP: c_int = 1;
const FTW_SKIP_SUBTREE: c_int = 2;
const FTW_SKIP_SIBLINGS: c_int = 3;

/// What the walk does after a callback.
enum Next {
    Go,
    /// Stop the walk, returning this.
    Stop(c_int),
    SkipSubtree,
    SkipSiblings,
}

/// The callback's answer, read as `flags` say.
fn next(r: c_int, flags: c_int) -> Next {
    if flags & FTW_ACTIONRETVAL == 0 {
        return if r == 0 { Next::Go } else { Next::Stop(r) };
    }
    match r {
        FTW_STOP => Next::Stop(FTW_STOP),
        FTW_SKIP_SUBTREE => Next::SkipSubtree,
        FTW_SKIP_SIBLINGS => Next::SkipSiblings,
        _ => Next::Go,
    }
}

/// Walks the served tree at `path` (level `level`) through the shim's own
/// `stat64`, `opendir`, `readdir64` and `closedir`, calling `cb` as glibc's
/// `nftw` would: each directory before its entries (after them with
/// `FTW_DEPTH`, as `FTW_DP`), entries in the listing's order.
fn walk(
    path: &[u8],
    level: c_int,
    flags: c_int,
    cb: &mut dyn FnMut(&CString, *const libc::stat64, c_int, Ftw) -> c_int,
) -> Next {
    let Ok(c) = CString::new(path) else {
        return Next::Go;
    };
    let base = path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1) as c_int;
    let ftw = || Ftw { base, level };
    // SAFETY: an all-zero stat64 is valid.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a live buffer (the shim's stat64).
    if unsafe { crate::stat64(c.as_ptr(), &mut st) } != 0 {
        return next(cb(&c, &st, FTW_NS, ftw()), flags);
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return next(cb(&c, &st, FTW_F, ftw()), flags);
    }
    // SAFETY: a NUL-terminated path (the shim's opendir).
    let d = unsafe { dir::opendir(c.as_ptr()) };
    if d.is_null() {
        return next(cb(&c, &st, FTW_DNR, ftw()), flags);
    }
    let mut result = Next::Go;
    if flags & FTW_DEPTH == 0 {
        match next(cb(&c, &st, FTW_D, ftw()), flags) {
            Next::Go => {}
            Next::SkipSubtree => {
                // SAFETY: the stream opened above.
                unsafe { dir::closedir(d) };
                return Next::Go;
            }
            other => {
                // SAFETY: as above.
                unsafe { dir::closedir(d) };
                return other;
            }
        }
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: a live stream of the shim's.
        let e = unsafe { dir::readdir64(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir's entry, a NUL-terminated name.
        let n = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }.to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    // SAFETY: the stream opened above.
    unsafe { dir::closedir(d) };
    for n in names {
        let mut child = path.to_vec();
        if child.last() != Some(&b'/') {
            child.push(b'/');
        }
        child.extend_from_slice(&n);
        match walk(&child, level + 1, flags, cb) {
            Next::Go | Next::SkipSubtree => {}
            Next::SkipSiblings => break,
            Next::Stop(r) => {
                result = Next::Stop(r);
                break;
            }
        }
    }
    if let Next::Stop(_) = result {
        return result;
    }
    if flags & FTW_DEPTH != 0 {
        return next(cb(&c, &st, FTW_DP, ftw()), flags);
    }
    Next::Go
}

/// Whether `path` is served (and so walked here).
///
/// # Safety
/// `path` is null or NUL-terminated.
pub(crate) unsafe fn served_path(path: *const c_char) -> bool {
    // SAFETY: the caller's promise.
    unsafe { with_route(libc::AT_FDCWD, path, |_| ()) }.is_ok()
}

/// # Safety
/// libc's `nftw`, with `real` its next definition.
unsafe fn nftw_common(
    path: *const c_char,
    f: Option<NftwFn>,
    fds: c_int,
    flags: c_int,
    real: unsafe extern "C" fn(*const c_char, Option<NftwFn>, c_int, c_int) -> c_int,
) -> c_int {
    // `FTW_CHDIR` is left to glibc (the host path: an error).
    // SAFETY: the caller's promise.
    let (Some(f), true) = (f, flags & FTW_CHDIR == 0 && unsafe { served_path(path) }) else {
        // SAFETY: forwarding.
        return unsafe { real(path, f, fds, flags) };
    };
    // SAFETY: the caller's promise.
    let p = unsafe { CStr::from_ptr(path) }.to_bytes().to_vec();
    let mut cb = |c: &CString, st: *const libc::stat64, ty: c_int, mut w: Ftw| {
        // SAFETY: the program's callback with nftw's arguments.
        unsafe { f(c.as_ptr(), st, ty, &mut w) }
    };
    match walk(&p, 0, flags, &mut cb) {
        Next::Stop(r) => r,
        _ => 0,
    }
}

type NftwReal = unsafe extern "C" fn(*const c_char, Option<NftwFn>, c_int, c_int) -> c_int;

/// # Safety
/// libc's `nftw`: a served tree is walked through the shim (glibc's opens
/// and reads directories with internal calls).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nftw(
    path: *const c_char,
    f: Option<NftwFn>,
    fds: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { nftw_common(path, f, fds, flags, real!("nftw", NftwReal)) }
}

/// # Safety
/// libc's `nftw64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nftw64(
    path: *const c_char,
    f: Option<NftwFn>,
    fds: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { nftw_common(path, f, fds, flags, real!("nftw64", NftwReal)) }
}

type FtwReal = unsafe extern "C" fn(*const c_char, Option<FtwFn>, c_int) -> c_int;

/// # Safety
/// libc's `ftw`, with `real` its next definition.
unsafe fn ftw_common(path: *const c_char, f: Option<FtwFn>, fds: c_int, real: FtwReal) -> c_int {
    // SAFETY: the caller's promise.
    let (Some(f), true) = (f, unsafe { served_path(path) }) else {
        // SAFETY: forwarding.
        return unsafe { real(path, f, fds) };
    };
    // SAFETY: the caller's promise.
    let p = unsafe { CStr::from_ptr(path) }.to_bytes().to_vec();
    let mut cb = |c: &CString, st: *const libc::stat64, ty: c_int, _w: Ftw| {
        // SAFETY: the program's callback with ftw's arguments.
        unsafe { f(c.as_ptr(), st, ty) }
    };
    match walk(&p, 0, 0, &mut cb) {
        Next::Stop(r) => r,
        _ => 0,
    }
}

/// # Safety
/// libc's `ftw`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftw(path: *const c_char, f: Option<FtwFn>, fds: c_int) -> c_int {
    // SAFETY: forwarding.
    unsafe { ftw_common(path, f, fds, real!("ftw", FtwReal)) }
}

/// # Safety
/// libc's `ftw64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftw64(path: *const c_char, f: Option<FtwFn>, fds: c_int) -> c_int {
    // SAFETY: forwarding.
    unsafe { ftw_common(path, f, fds, real!("ftw64", FtwReal)) }
}

// ---- scandirat, fstatfs, fstatvfs ------------------------------------------

type ScandiratFn = unsafe extern "C" fn(
    c_int,
    *const c_char,
    *mut *mut *mut libc::dirent64,
    dir::Filter,
    dir::Compar,
) -> c_int;

/// # Safety
/// libc's `scandirat`, with `real` its next definition.
unsafe fn scandirat_common(
    dirfd: c_int,
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: dir::Filter,
    compar: dir::Compar,
    real: ScandiratFn,
) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(dirfd, path, |rel| CString::new(dir::full(rel))) } {
        // SAFETY: the shim's scandir of the served directory's full path.
        Ok(Ok(full)) => unsafe { dir::scandir(full.as_ptr(), list, filter, compar) },
        Ok(Err(_)) => fail(libc::EINVAL),
        // SAFETY: forwarding.
        Err(p) => unsafe { real(dirfd, Route::host_path(&p, path), list, filter, compar) },
    }
}

/// # Safety
/// libc's `scandirat`: a served directory is listed through the shim
/// (glibc's opens it with internal calls).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scandirat(
    dirfd: c_int,
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: dir::Filter,
    compar: dir::Compar,
) -> c_int {
    // SAFETY: forwarding.
    unsafe {
        scandirat_common(
            dirfd,
            path,
            list,
            filter,
            compar,
            real!("scandirat", ScandiratFn),
        )
    }
}

/// # Safety
/// libc's `scandirat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scandirat64(
    dirfd: c_int,
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: dir::Filter,
    compar: dir::Compar,
) -> c_int {
    // SAFETY: forwarding.
    unsafe {
        scandirat_common(
            dirfd,
            path,
            list,
            filter,
            compar,
            real!("scandirat64", ScandiratFn),
        )
    }
}

/// The served path of descriptor `fd` (a file's or a directory's), with
/// this thread marked busy while the caller answers for it.
fn served_fd(fd: c_int) -> Option<(Busy, String)> {
    let b = Busy::enter()?;
    let rel = match crate::fdtable::entry(fd) {
        Some(e) => e.path.clone(),
        None => dir::dirfd_path(fd)?,
    };
    Some((b, rel))
}

type FstatvfsFn = unsafe extern "C" fn(c_int, *mut libc::statvfs) -> c_int;
type FstatfsFn = unsafe extern "C" fn(c_int, *mut libc::statfs) -> c_int;

/// # Safety
/// libc's `fstatvfs`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstatvfs(fd: c_int, st: *mut libc::statvfs) -> c_int {
    match served_fd(fd) {
        Some((_b, rel)) => fill_statvfs(&rel, st),
        // SAFETY: forwarding.
        None => unsafe { real!("fstatvfs", FstatvfsFn)(fd, st) },
    }
}

/// # Safety
/// libc's `fstatvfs64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstatvfs64(fd: c_int, st: *mut libc::statvfs) -> c_int {
    match served_fd(fd) {
        Some((_b, rel)) => fill_statvfs(&rel, st),
        // SAFETY: forwarding.
        None => unsafe { real!("fstatvfs64", FstatvfsFn)(fd, st) },
    }
}

/// # Safety
/// libc's `fstatfs`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstatfs(fd: c_int, st: *mut libc::statfs) -> c_int {
    match served_fd(fd) {
        Some((_b, rel)) => fill_statfs(&rel, st),
        // SAFETY: forwarding.
        None => unsafe { real!("fstatfs", FstatfsFn)(fd, st) },
    }
}

/// # Safety
/// libc's `fstatfs64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstatfs64(fd: c_int, st: *mut libc::statfs) -> c_int {
    match served_fd(fd) {
        Some((_b, rel)) => fill_statfs(&rel, st),
        // SAFETY: forwarding.
        None => unsafe { real!("fstatfs64", FstatfsFn)(fd, st) },
    }
}
