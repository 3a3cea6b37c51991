//! `nftw` and `ftw` (and their `64` twins) over a served tree: glibc's own
//! walk with internal calls no preload sees, so the shim walks it through
//! its own `stat64`, `opendir` and `readdir64`.

use crate::route::with_route;
use std::ffi::{CStr, CString, c_char, c_int};

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
    if unsafe { crate::stat::stat64(c.as_ptr(), &mut st) } != 0 {
        return next(cb(&c, &st, FTW_NS, ftw()), flags);
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return next(cb(&c, &st, FTW_F, ftw()), flags);
    }
    // SAFETY: a NUL-terminated path (the shim's opendir).
    let d = unsafe { crate::listing::opendir(c.as_ptr()) };
    if d.is_null() {
        return next(cb(&c, &st, FTW_DNR, ftw()), flags);
    }
    let mut result = Next::Go;
    if flags & FTW_DEPTH == 0 {
        match next(cb(&c, &st, FTW_D, ftw()), flags) {
            Next::Go => {}
            Next::SkipSubtree => {
                // SAFETY: the stream opened above.
                unsafe { crate::listing::closedir(d) };
                return Next::Go;
            }
            other => {
                // SAFETY: as above.
                unsafe { crate::listing::closedir(d) };
                return other;
            }
        }
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: a live stream of the shim's.
        let e = unsafe { crate::listing::readdir64(d) };
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
    unsafe { crate::listing::closedir(d) };
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

twins! {
    [nftw, nftw64] fn(path: *const c_char, f: Option<NftwFn>, fds: c_int, flags: c_int) -> c_int,
    real: NftwReal => {
        // SAFETY: forwarding.
        unsafe { nftw_common(path, f, fds, flags, real) }
    }
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

twins! {
    [ftw, ftw64] fn(path: *const c_char, f: Option<FtwFn>, fds: c_int) -> c_int,
    real: FtwReal => {
        // SAFETY: forwarding.
        unsafe { ftw_common(path, f, fds, real) }
    }
}
