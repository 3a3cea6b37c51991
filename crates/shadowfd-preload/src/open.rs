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
            }),
        );
        Ok(fd)
    })();
    r.unwrap_or_else(|e| {
        set_errno(e);
        -1
    })
}

/// # Safety
/// `path` is null or a NUL-terminated string.
pub(crate) unsafe fn open_common(
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
    sym: u8,
) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return do_open(&rel, flags),
            Route::Host(p) => host = p,
        }
    }
    let path = Route::host_path(&host, path);
    // SAFETY: forwarding the caller's arguments.
    fresh(unsafe {
        match sym {
            0 => real!(
                "open",
                unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int
            )(path, flags, mode),
            _ => real!(
                "open64",
                unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int
            )(path, flags, mode),
        }
    })
}

/// # Safety
/// `path` is null or a NUL-terminated string.
pub(crate) unsafe fn openat_common(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
    sym: u8,
) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { crate::route::route(dirfd, path) } {
            Route::Served(rel) => return do_open(&rel, flags),
            Route::Host(p) => host = p,
        }
    }
    let path = Route::host_path(&host, path);
    // SAFETY: forwarding the caller's arguments.
    fresh(unsafe {
        match sym {
            0 => real!(
                "openat",
                unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int
            )(dirfd, path, flags, mode),
            _ => real!(
                "openat64",
                unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int
            )(dirfd, path, flags, mode),
        }
    })
}

// The C functions are variadic (the mode); on x86-64 and aarch64 the third
// argument is read from its register, which holds the mode when the caller
// passed one and is ignored otherwise (it matters only with O_CREAT or
// O_TMPFILE, which the shim refuses under the prefix).

/// # Safety
/// libc's `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, mode, 0) }
}

/// # Safety
/// libc's `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, mode, 1) }
}

/// # Safety
/// glibc's fortified `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, 0, 0) }
}

/// # Safety
/// glibc's fortified `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, 0, 1) }
}

/// # Safety
/// libc's `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, mode, 0) }
}

/// # Safety
/// libc's `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, mode, 1) }
}

/// # Safety
/// glibc's fortified `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, 0, 0) }
}

/// # Safety
/// glibc's fortified `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, 0, 1) }
}

/// # Safety
/// libc's `creat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat(path: *const c_char, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe {
        open_common(
            path,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            mode,
            0,
        )
    }
}

/// # Safety
/// libc's `creat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe {
        open_common(
            path,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            mode,
            1,
        )
    }
}
