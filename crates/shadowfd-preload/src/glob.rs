//! `glob` with a pattern under the prefix: glibc's own, told to read
//! directories through this shim (`GLOB_ALTDIRFUNC`).

use crate::Busy;
use crate::cwd::vcwd;
use crate::listing::{closedir, opendir, readdir};
use crate::route::prefix_str;
use std::ffi::{CStr, c_char, c_int, c_void};

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

pub(crate) unsafe extern "C" fn glob_closedir(d: *mut c_void) {
    // SAFETY: a stream `glob_opendir` returned.
    unsafe { closedir(d.cast()) };
}

pub(crate) unsafe extern "C" fn glob_readdir(d: *mut c_void) -> *mut libc::dirent64 {
    // SAFETY: a stream `glob_opendir` returned.
    unsafe { readdir(d.cast()) }
}

pub(crate) unsafe extern "C" fn glob_opendir(p: *const c_char) -> *mut c_void {
    // SAFETY: glob passes a NUL-terminated path.
    unsafe { opendir(p) }.cast()
}

pub(crate) unsafe extern "C" fn glob_stat(p: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: glob passes a path and a stat buffer.
    unsafe { crate::stat::stat(p, st) }
}

pub(crate) unsafe extern "C" fn glob_lstat(p: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: glob passes a path and a stat buffer.
    unsafe { crate::stat::lstat(p, st) }
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

twins! {
    [glob, glob64] fn(pattern: *const c_char, flags: c_int, errfunc: GlobErr, g: *mut GlobT) -> c_int,
    real: GlobFn => {
        // SAFETY: forwarding.
        unsafe { glob_common(pattern, flags, errfunc, g, real) }
    }
}
