//! stdio streams of served files: `fopen`, `fdopen` and `freopen` make a
//! cookie stream whose reads, seeks and close come back through the shim,
//! with `fileno()` answering the tracked descriptor.

use crate::fdops::close;
use crate::fdtable::{fresh, tracked};
use crate::open::do_open;
use crate::read::{lseek, read};
use crate::route::{Route, with_route};
use crate::{Busy, SizeT, SsizeT, set_errno};
use std::ffi::{CStr, c_char, c_int, c_void};

#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, SizeT) -> SsizeT>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, SizeT) -> SsizeT>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

/// # Safety
/// `cookie` is a descriptor this shim made.
pub(crate) unsafe extern "C" fn cookie_read(
    cookie: *mut c_void,
    buf: *mut c_char,
    n: SizeT,
) -> SsizeT {
    let fd = cookie as usize as c_int;
    // SAFETY: read(2)'s contract, passed on from the stream's buffer.
    unsafe { read(fd, buf.cast(), n) }
}

/// # Safety
/// `cookie` is a descriptor this shim made; `off` is valid.
pub(crate) unsafe extern "C" fn cookie_seek(
    cookie: *mut c_void,
    off: *mut i64,
    whence: c_int,
) -> c_int {
    let fd = cookie as usize as c_int;
    // SAFETY: glibc passes a valid pointer.
    let r = unsafe { lseek(fd, *off, whence) };
    if r < 0 {
        return -1;
    }
    // SAFETY: as above.
    unsafe { *off = r };
    0
}

/// # Safety
/// `cookie` is a descriptor this shim made.
pub(crate) unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: closes the stream's own descriptor.
    unsafe { close(cookie as usize as c_int) }
}

type FopenFn = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;

/// # Safety
/// libc's `fopen` contract.
unsafe fn fopen_common(path: *const c_char, mode: *const c_char, real: FopenFn) -> *mut libc::FILE {
    let route = match Busy::enter() {
        // SAFETY: the caller's promise.
        Some(_b) => unsafe { crate::route::route(libc::AT_FDCWD, path) },
        None => Route::Host(None),
    };
    let rel = match route {
        Route::Served(rel) => rel,
        Route::Host(p) => {
            // SAFETY: forwarding.
            let f = unsafe { real(Route::host_path(&p, path), mode) };
            if !f.is_null() {
                // glibc opened it with an internal call: a new descriptor.
                // SAFETY: a live stream.
                fresh(unsafe { libc::fileno(f) });
            }
            return f;
        }
    };
    // SAFETY: the caller's promise.
    let cloexec = match unsafe { read_mode(mode) } {
        Ok(c) => c,
        Err(e) => {
            set_errno(e);
            return std::ptr::null_mut();
        }
    };
    let fd = {
        let _b = Busy::enter();
        do_open(&rel, libc::O_RDONLY | cloexec)
    };
    if fd < 0 {
        return std::ptr::null_mut();
    }
    let f = cookie_stream(fd);
    if f.is_null() {
        // SAFETY: our own descriptor.
        unsafe { close(fd) };
    }
    f
}

/// The `open` flag a stdio mode adds (`O_CLOEXEC` for `e`) when it only
/// reads; `EROFS` for a mode that writes, `EINVAL` for none.
///
/// # Safety
/// `mode` is null or NUL-terminated.
unsafe fn read_mode(mode: *const c_char) -> Result<c_int, c_int> {
    if mode.is_null() {
        return Err(libc::EINVAL);
    }
    // SAFETY: the caller's promise.
    let m = unsafe { CStr::from_ptr(mode) }.to_bytes();
    if m.first() != Some(&b'r') || m.contains(&b'+') {
        return Err(libc::EROFS);
    }
    Ok(if m.contains(&b'e') {
        libc::O_CLOEXEC
    } else {
        0
    })
}

/// Where glibc keeps a stream's descriptor: `_fileno` of `struct
/// _IO_FILE` (x86-64 and aarch64: after the `int` flags, padded, and
/// twelve pointers).
const FILENO_AT: usize = 112;

/// A read-only stream whose reads, seeks and close come back through the
/// shim for `fd`, with `fileno()` answering `fd`.
///
/// glibc's `fopencookie` stores -2 as the descriptor (so `fileno` fails
/// with `EBADF`, and git's `fstat(fileno(fp))` with it). A cookie stream's
/// I/O goes through its cookie functions only, never through the stored
/// descriptor: glibc uses the descriptor just for `fileno` and for "is
/// this stream open" (not -1). So the shim stores `fd` there, after
/// checking that the word holds the -2 it expects (else it leaves it, and
/// `fileno` stays -1, rather than write into a layout it does not know).
pub(crate) fn cookie_stream(fd: c_int) -> *mut libc::FILE {
    let io = CookieIo {
        read: Some(cookie_read),
        write: None,
        seek: Some(cookie_seek),
        close: Some(cookie_close),
    };
    // SAFETY: the cookie is the descriptor, passed back to the functions
    // above; "r" is a valid mode.
    let f = unsafe { fopencookie(fd as usize as *mut c_void, c"r".as_ptr(), io) };
    if !f.is_null() {
        // SAFETY: `f` is a live glibc stream, a `struct _IO_FILE` of more
        // than FILENO_AT + 4 bytes with `_fileno` (an aligned int) there.
        unsafe {
            let at = f.cast::<u8>().add(FILENO_AT).cast::<c_int>();
            if *at == -2 {
                *at = fd;
            }
        }
    }
    f
}

/// # Safety
/// libc's `fdopen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut libc::FILE {
    if let Some((_b, _e)) = tracked(fd) {
        if mode.is_null() {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        }
        // SAFETY: a NUL-terminated mode string (fdopen's contract).
        let m = unsafe { CStr::from_ptr(mode) }.to_bytes();
        if m.first() != Some(&b'r') || m.contains(&b'+') {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        }
        return cookie_stream(fd);
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "fdopen",
            unsafe extern "C" fn(c_int, *const c_char) -> *mut libc::FILE
        )(fd, mode)
    }
}

twins! {
    [fopen, fopen64] fn(path: *const c_char, mode: *const c_char) -> *mut libc::FILE,
    real: FopenFn => {
        // SAFETY: forwarding.
        unsafe { fopen_common(path, mode, real) }
    }
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
    let cloexec = match unsafe { crate::stdio::read_mode(mode) } {
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
        crate::open::do_open(&rel, libc::O_RDONLY | cloexec)
    };
    if fd < 0 {
        return std::ptr::null_mut();
    }
    let fd = if was >= 0 && fd != was {
        // SAFETY: descriptors of this process; the shim's dup2 and close
        // keep the table right.
        unsafe {
            if crate::fdops::dup2(fd, was) < 0 {
                crate::fdops::close(fd);
                return std::ptr::null_mut();
            }
            crate::fdops::close(fd);
        }
        was
    } else {
        fd
    };
    let f = crate::stdio::cookie_stream(fd);
    if f.is_null() {
        // SAFETY: our own descriptor.
        unsafe { crate::fdops::close(fd) };
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

twins! {
    [freopen, freopen64] fn(path: *const c_char, mode: *const c_char, old: *mut libc::FILE) -> *mut libc::FILE,
    real: FreopenFn => {
        // SAFETY: forwarding.
        unsafe { freopen_common(path, mode, old, real) }
    }
}

// glibc before 2.33 had `stat` and friends call these, and programs built
// then (Debian's make 4.3, among others) still bind to them as compat
// symbols (`__xstat@GLIBC_2.2.5`). The version argument is the layout of
// `struct stat`, which on x86-64 and aarch64 is the one `stat` fills: each
// goes to the shim's own `stat`, `lstat`, `fstat` or `fstatat`.

unsafe extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut libc::FILE;
}

unsafe extern "C" {
    static mut stdin: *mut libc::FILE;
}
