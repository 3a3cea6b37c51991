//! File-system statistics of served paths and descriptors: `statvfs`,
//! `statfs`, `fstatvfs`, `fstatfs` (and their `64` twins) answer a
//! read-only file system.

use crate::route::{Route, with_route};
use crate::{Busy, fail};
use std::ffi::{c_char, c_int};

/// A served tree's file-system statistics: read-only, 4 KiB blocks, names
/// up to 255 bytes, nothing free; sizes and counts are not known (0).
fn fill_statvfs(rel: &str, st: *mut libc::statvfs) -> c_int {
    if let Err(e) = crate::statcache::stat_info(rel) {
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
    if let Err(e) = crate::statcache::stat_info(rel) {
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

twins! {
    [statvfs, statvfs64] fn(path: *const c_char, st: *mut libc::statvfs) -> c_int,
    real: StatvfsFn => {
        // SAFETY: the caller's promise.
        match unsafe { with_route(libc::AT_FDCWD, path, |r| fill_statvfs(r, st)) } {
            Ok(r) => r,
            // SAFETY: forwarding.
            Err(p) => unsafe { real(Route::host_path(&p, path), st) },
        }
    }
}

twins! {
    [statfs, statfs64] fn(path: *const c_char, st: *mut libc::statfs) -> c_int,
    real: StatfsFn => {
        // SAFETY: the caller's promise.
        match unsafe { with_route(libc::AT_FDCWD, path, |r| fill_statfs(r, st)) } {
            Ok(r) => r,
            // SAFETY: forwarding.
            Err(p) => unsafe { real(Route::host_path(&p, path), st) },
        }
    }
}

/// The served path of descriptor `fd` (a file's or a directory's), with
/// this thread marked busy while the caller answers for it.
fn served_fd(fd: c_int) -> Option<(Busy, String)> {
    let b = Busy::enter()?;
    let rel = match crate::fdtable::entry(fd) {
        Some(e) => e.path.clone(),
        None => crate::dirfd::dirfd_path(fd)?,
    };
    Some((b, rel))
}

type FstatvfsFn = unsafe extern "C" fn(c_int, *mut libc::statvfs) -> c_int;

type FstatfsFn = unsafe extern "C" fn(c_int, *mut libc::statfs) -> c_int;

twins! {
    [fstatvfs, fstatvfs64] fn(fd: c_int, st: *mut libc::statvfs) -> c_int,
    real: FstatvfsFn => {
        match served_fd(fd) {
            Some((_b, rel)) => fill_statvfs(&rel, st),
            // SAFETY: forwarding.
            None => unsafe { real(fd, st) },
        }
    }
}

twins! {
    [fstatfs, fstatfs64] fn(fd: c_int, st: *mut libc::statfs) -> c_int,
    real: FstatfsFn => {
        match served_fd(fd) {
            Some((_b, rel)) => fill_statfs(&rel, st),
            // SAFETY: forwarding.
            None => unsafe { real(fd, st) },
        }
    }
}
