//! `open`, `openat` and `creat` (and their `64` and fortified twins): a
//! served path opens on the server and the program gets a tracked
//! placeholder; a write, create or truncate is `EROFS`.

use crate::conn::client;
use crate::errno::errno_of;
use crate::fdtable::{Entry, fresh, insert, placeholder};
use crate::route::Route;
use crate::{Busy, set_errno, small, vfork};
use parking_lot::Mutex;
use std::ffi::{c_char, c_int};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Opens `rel` on the server; returns the placeholder descriptor or -1.
pub(crate) fn do_open(rel: &str, flags: c_int) -> c_int {
    let r = (|| -> Result<c_int, c_int> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) != 0 {
            return Err(libc::EROFS);
        }
        if flags & libc::O_TMPFILE == libc::O_TMPFILE {
            return Err(libc::EROFS);
        }
        if flags & libc::O_DIRECTORY != 0 {
            return crate::dirfd::open_dir(rel, flags);
        }
        let file = match small::open(rel) {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(e),
            None => match client()?.open(rel) {
                Ok(f) => f,
                // A directory opens as one (any other kind keeps the error).
                Err(e) if errno_of(&e) == libc::EISDIR => {
                    return crate::dirfd::open_dir(rel, flags).map_err(|_| libc::EISDIR);
                }
                Err(e) => return Err(errno_of(&e)),
            },
        };
        let fd = placeholder(flags)?;
        if vfork::in_child() {
            vfork::opened(fd, vfork::Handed::File(rel.to_string(), 0));
            // The file stays open on the parent's connection; this child
            // only execs or exits.
            std::mem::forget(file);
            return Ok(fd);
        }
        crate::dirfd::forget(fd);
        insert(
            fd,
            Arc::new(Entry {
                path: rel.to_string(),
                file: Mutex::new(Some(file)),
                pos: AtomicU64::new(0),
                mapped: Default::default(),
            }),
        );
        Ok(fd)
    })();
    r.unwrap_or_else(|e| {
        set_errno(e);
        -1
    })
}

/// libc's `open`/`open64`: variadic (the mode).
type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
/// libc's `openat`/`openat64`.
type OpenatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;

/// `openat` of (`dirfd`, `path`): a served path opens on the server; any
/// other goes to `real` (the `open` family when `dirfd` is `AT_FDCWD`).
///
/// # Safety
/// `path` is null or a NUL-terminated string; `real` is the next
/// definition of the entry point called.
unsafe fn open_served_or(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    host: impl FnOnce(*const c_char) -> c_int,
) -> c_int {
    let mut p = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(dirfd, path) } {
            Route::Served(rel) => return do_open(&rel, flags),
            Route::Host(h) => p = h,
        }
    }
    fresh(host(Route::host_path(&p, path)))
}

/// # Safety
/// libc's `open`, with `real` the next `open` or `open64`.
unsafe fn open_common(
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
    real: OpenFn,
) -> c_int {
    // SAFETY: the caller's promise; forwarding the caller's arguments.
    unsafe { open_served_or(libc::AT_FDCWD, path, flags, |p| real(p, flags, mode)) }
}

// The C functions are variadic (the mode); on x86-64 and aarch64 the third
// argument is read from its register, which holds the mode when the caller
// passed one and is ignored otherwise (it matters only with O_CREAT or
// O_TMPFILE, which the shim refuses under the prefix).

twins! {
    [open, open64] fn(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int,
    real: OpenFn => {
        // SAFETY: libc's contract.
        unsafe { open_common(path, flags, mode, real) }
    }
}

twins! {
    [openat, openat64] fn(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int,
    real: OpenatFn => {
        // SAFETY: the caller's promise; forwarding the caller's arguments.
        unsafe { open_served_or(dirfd, path, flags, |p| real(dirfd, p, flags, mode)) }
    }
}

/// # Safety
/// glibc's fortified `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, 0, real!("open", OpenFn)) }
}

/// # Safety
/// glibc's fortified `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, 0, real!("open64", OpenFn)) }
}

/// # Safety
/// glibc's fortified `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let real = real!("openat", OpenatFn);
    // SAFETY: the caller's promise; forwarding the caller's arguments.
    unsafe { open_served_or(dirfd, path, flags, |p| real(dirfd, p, flags, 0)) }
}

/// # Safety
/// glibc's fortified `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let real = real!("openat64", OpenatFn);
    // SAFETY: the caller's promise; forwarding the caller's arguments.
    unsafe { open_served_or(dirfd, path, flags, |p| real(dirfd, p, flags, 0)) }
}

/// `creat` is `open` with `O_CREAT | O_WRONLY | O_TRUNC`.
const CREAT: c_int = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;

/// # Safety
/// libc's `creat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat(path: *const c_char, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, CREAT, mode, real!("open", OpenFn)) }
}

/// # Safety
/// libc's `creat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, CREAT, mode, real!("open64", OpenFn)) }
}
