//! Path-taking libc functions whose glibc definitions reach the kernel
//! through internal calls no preload sees: the access checks by effective
//! ids, `realpath`, file-system statistics, `truncate`,
//! `name_to_handle_at`, and `freopen` (docs/run.md, "Intercepted").

use crate::route::{Route, route, with_route};
use crate::statcache::stat_info;
use crate::{Busy, fail, set_errno};
use shadowfd::remote::PathKind;
use std::ffi::{CString, c_char, c_int, c_void};

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

twins! {
    [getxattr, lgetxattr] fn(path: *const c_char, name: *const c_char, v: *mut c_void, n: libc::size_t) -> libc::ssize_t,
    real: GetxattrFn => {
        // SAFETY: the caller's promise.
        match unsafe { getxattr_common(path) } {
            Ok(r) => r,
            // SAFETY: forwarding.
            Err(p) => unsafe { real(Route::host_path(&p, path), name, v, n) },
        }
    }
}
/// The canonical name of a served path (`PREFIX/rel`, which exists), in
/// `out` (at least `cap` bytes) or, if `out` is null, in memory from
/// `malloc`.
fn resolved_into(rel: &str, out: *mut c_char, cap: usize) -> *mut c_char {
    match crate::statcache::stat_info(rel) {
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
    let s = crate::route::full(rel);
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

type TruncateFn = unsafe extern "C" fn(*const c_char, libc::off_t) -> c_int;

/// A served file cannot be written: `EROFS` (or the path's own error).
fn erofs(rel: &str) -> c_int {
    match crate::statcache::stat_info(rel) {
        Ok(_) => fail(libc::EROFS),
        Err(e) => fail(e),
    }
}

twins! {
    [truncate, truncate64] fn(path: *const c_char, len: libc::off_t) -> c_int,
    real: TruncateFn => {
        // SAFETY: the caller's promise.
        match unsafe { with_route(libc::AT_FDCWD, path, erofs) } {
            Ok(r) => r,
            // SAFETY: forwarding.
            Err(p) => unsafe { real(Route::host_path(&p, path), len) },
        }
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
    let served = |rel: &str| match crate::statcache::stat_info(rel) {
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
