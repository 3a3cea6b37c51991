//! The virtual working directory: `chdir`/`fchdir` into the prefix set it
//! (`getcwd` reports it); it travels to exec'd children in
//! `SHADOWFD_RUN_CWD`. A `chdir` elsewhere clears it.

use crate::dirfd::dirfd_entry;
use crate::env::{env, normalize};
use crate::forklock::ForkMutex as Mutex;
use crate::route::{Route, full, route};
use crate::statcache::stat_info;
use crate::{Busy, fail, set_errno};
use shadowfd::remote::PathKind;
use std::ffi::{CString, c_char, c_int};

/// The virtual working directory (a path below the prefix), once read from
/// `SHADOWFD_RUN_CWD`.
pub(crate) static VCWD: Mutex<Option<Option<String>>> = Mutex::new(None);

pub(crate) const CWD_VAR: &str = "SHADOWFD_RUN_CWD";

/// The virtual working directory, if there is one.
pub(crate) fn vcwd() -> Option<String> {
    let mut v = VCWD.lock();
    if v.is_none() {
        let from_env = crate::env::getenv(c"SHADOWFD_RUN_CWD").and_then(|s| {
            let env = env()?;
            let comps = normalize(&s)?;
            (comps.len() >= env.prefix.len() && comps[..env.prefix.len()] == env.prefix[..])
                .then(|| comps[env.prefix.len()..].join("/"))
        });
        *v = Some(from_env);
    }
    v.as_ref().and_then(|x| x.clone())
}

fn set_vcwd(rel: Option<String>) {
    let changed = {
        let mut v = VCWD.lock();
        let old = v.clone().flatten();
        *v = Some(rel.clone());
        let in_env = crate::env::getenv(c"SHADOWFD_RUN_CWD").is_some_and(|v| !v.is_empty());
        old != rel || in_env != rel.is_some()
    };
    if changed {
        // environ is kept up to date (not only the execve wrapper's
        // environment) because glibc's execv*, execl*, posix_spawn and
        // system exec with internal calls no preload sees. The variable
        // was added at load ([`cwd_var_init`]), so this only replaces its
        // value (empty: no virtual working directory): glibc then stores
        // one pointer in `environ` and never reallocates the array that
        // other threads' `getenv` may be reading (docs/run.md).
        let v = rel.as_ref().map(|r| full(r)).unwrap_or_default();
        let v = CString::new(v).unwrap_or_default();
        // The environment is only changed here, on a chdir, and at load.
        crate::env::setenv(c"SHADOWFD_RUN_CWD", &v, true);
    }
}

/// At load, under `shadowfd run`: adds `SHADOWFD_RUN_CWD` (empty when it
/// is not set) to `environ`, while the process has one thread, so that a
/// later `chdir` only replaces its value ([`set_vcwd`]).
pub(crate) fn cwd_var_init() {
    if env().is_none() {
        return;
    }
    // No other thread runs yet (library constructors run before main), and
    // no overwrite keeps a value.
    crate::env::setenv(c"SHADOWFD_RUN_CWD", c"", false);
}

/// # Safety
/// libc's `chdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chdir(path: *const c_char) -> c_int {
    let real_chdir = real!("chdir", unsafe extern "C" fn(*const c_char) -> c_int);
    let Some(_b) = Busy::enter() else {
        // SAFETY: forwarding.
        return unsafe { real_chdir(path) };
    };
    // SAFETY: the caller's promise.
    match unsafe { route(libc::AT_FDCWD, path) } {
        Route::Served(rel) => match stat_info(&rel) {
            Ok(i) if i.kind == PathKind::Dir => {
                set_vcwd(Some(rel));
                0
            }
            Ok(_) => fail(libc::ENOTDIR),
            Err(e) => fail(e),
        },
        Route::Host(p) => {
            // SAFETY: forwarding.
            let r = unsafe { real_chdir(Route::host_path(&p, path)) };
            if r == 0 {
                set_vcwd(None);
            }
            r
        }
    }
}

/// # Safety
/// libc's `fchdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fchdir(fd: c_int) -> c_int {
    let real_fchdir = real!("fchdir", unsafe extern "C" fn(c_int) -> c_int);
    let Some(_b) = Busy::enter() else {
        // SAFETY: forwarding.
        return unsafe { real_fchdir(fd) };
    };
    if let Some(d) = dirfd_entry(fd) {
        set_vcwd(Some(d.path.clone()));
        return 0;
    }
    // SAFETY: forwarding.
    let r = unsafe { real_fchdir(fd) };
    if r == 0 {
        set_vcwd(None);
    }
    r
}

/// # Safety
/// libc's `getcwd`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getcwd(buf: *mut c_char, size: libc::size_t) -> *mut c_char {
    let v = match Busy::enter() {
        Some(_b) => vcwd(),
        None => None,
    };
    let Some(rel) = v else {
        // SAFETY: forwarding.
        return unsafe {
            real!(
                "getcwd",
                unsafe extern "C" fn(*mut c_char, libc::size_t) -> *mut c_char
            )(buf, size)
        };
    };
    let s = full(&rel);
    let need = s.len() + 1;
    let out = if buf.is_null() {
        // glibc's extension: allocate (at least `size` bytes if given).
        // SAFETY: malloc has no preconditions; the caller frees it.
        let p = unsafe { libc::malloc(need.max(size)) }.cast::<c_char>();
        if p.is_null() {
            set_errno(libc::ENOMEM);
            return p;
        }
        p
    } else {
        if size == 0 {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        }
        if size < need {
            set_errno(libc::ERANGE);
            return std::ptr::null_mut();
        }
        buf
    };
    // SAFETY: `out` holds at least `need` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), out, s.len());
        *out.add(s.len()) = 0;
    }
    out
}

/// # Safety
/// glibc's `get_current_dir_name`: the virtual working directory when
/// there is one (glibc's own asks the kernel, which knows only the real
/// one).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn get_current_dir_name() -> *mut c_char {
    let v = match Busy::enter() {
        Some(_b) => crate::cwd::vcwd(),
        None => None,
    };
    match v {
        Some(rel) => {
            let s = crate::route::full(&rel);
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
