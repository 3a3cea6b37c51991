//! Access checks and links of served paths: `access`, `faccessat`,
//! `euidaccess`/`eaccess`, `readlink`/`readlinkat` (nothing served is a
//! symbolic link, but `/dev/fd/N` of a served descriptor names its path).

use crate::dirfd::dirfd_entry;
use crate::route::{Route, full, served_fd_path, with_route};
use crate::statcache::stat_info;
use crate::{Busy, SizeT, SsizeT, fail};
use shadowfd::remote::PathKind;
use std::ffi::{CStr, c_char, c_int};

/// # Safety
/// libc's `access`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return crate::access::access_rel(&rel, mode),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "access",
            unsafe extern "C" fn(*const c_char, c_int) -> c_int
        )(Route::host_path(&host, path), mode)
    }
}

/// # Safety
/// libc's `faccessat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(dirfd, path) } {
            Route::Served(rel) => return crate::access::access_rel(&rel, mode),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "faccessat",
            unsafe extern "C" fn(c_int, *const c_char, c_int, c_int) -> c_int
        )(dirfd, Route::host_path(&host, path), mode, flags)
    }
}

/// # Safety
/// libc's `readlink`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, n: SizeT) -> SsizeT {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        if let Some(r) = unsafe { crate::access::readlink_fd(libc::AT_FDCWD, path, buf, n) } {
            return r;
        }
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return crate::access::readlink_rel(&rel),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "readlink",
            unsafe extern "C" fn(*const c_char, *mut c_char, SizeT) -> SsizeT
        )(Route::host_path(&host, path), buf, n)
    }
}

/// # Safety
/// libc's `readlinkat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlinkat(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    n: SizeT,
) -> SsizeT {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        if let Some(r) = unsafe { crate::access::readlink_fd(dirfd, path, buf, n) } {
            return r;
        }
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(dirfd, path) } {
            Route::Served(rel) => return crate::access::readlink_rel(&rel),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "readlinkat",
            unsafe extern "C" fn(c_int, *const c_char, *mut c_char, SizeT) -> SsizeT
        )(dirfd, Route::host_path(&host, path), buf, n)
    }
}

/// What `access` answers for a served path: reading (and searching a
/// directory) is granted, writing is `EROFS`, executing a file `EACCES`.
fn access_rel(rel: &str, mode: c_int) -> c_int {
    match stat_info(rel) {
        Ok(i) if i.kind == PathKind::Other => fail(libc::ENOENT),
        Ok(_) if mode & libc::W_OK != 0 => fail(libc::EROFS),
        Ok(i) if mode & libc::X_OK != 0 && i.kind != PathKind::Dir => fail(libc::EACCES),
        Ok(_) => 0,
        Err(e) => fail(e),
    }
}

/// `readlink` of a served path: nothing served is a symbolic link.
fn readlink_rel(rel: &str) -> libc::ssize_t {
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
unsafe fn readlink_fd(
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

type AccessFn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;

/// # Safety
/// libc's `euidaccess`/`eaccess`, with `real` its next definition.
unsafe fn eaccess_common(path: *const c_char, mode: c_int, real: AccessFn) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe {
        with_route(libc::AT_FDCWD, path, |rel| {
            crate::access::access_rel(rel, mode)
        })
    } {
        Ok(r) => r,
        // SAFETY: forwarding.
        Err(p) => unsafe { real(Route::host_path(&p, path), mode) },
    }
}

twins! {
    [euidaccess, eaccess] fn(path: *const c_char, mode: c_int) -> c_int,
    real: AccessFn => {
        // SAFETY: forwarding.
        unsafe { eaccess_common(path, mode, real) }
    }
}
