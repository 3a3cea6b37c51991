//! Where a path goes: served (inside the tree under the prefix) or to the
//! host. Relative paths resolve against a tracked directory descriptor or
//! the virtual working directory, lexically; a result that leaves the
//! prefix through `..` goes to the host as the absolute path it names.

use crate::Busy;
use crate::cwd::vcwd;
use crate::dirfd::{any, dirfd_entry};
use crate::env::{env, normalize};
use std::ffi::{CStr, CString, c_char, c_int};
use std::sync::atomic::Ordering;

/// Where a path goes.
pub(crate) enum Route {
    /// Inside the served tree: the path below the prefix ("" = the prefix).
    Served(String),
    /// To the host: unchanged (`None`), or as this absolute path (a
    /// relative path from a served directory that left the prefix).
    Host(Option<CString>),
}

impl Route {
    /// The pointer to hand the real function.
    pub(crate) fn host_path(p: &Option<CString>, orig: *const c_char) -> *const c_char {
        p.as_ref().map_or(orig, |c| c.as_ptr())
    }
}

/// The prefix as a path (`/mnt/x`).
pub(crate) fn prefix_str() -> Option<String> {
    env().map(|e| format!("/{}", e.prefix.join("/")))
}

/// The absolute path the program sees for the served path `rel`.
pub(crate) fn full(rel: &str) -> String {
    let p = prefix_str().unwrap_or_default();
    if rel.is_empty() {
        p
    } else {
        format!("{p}/{rel}")
    }
}

/// Where `path` (relative to `dirfd`) goes.
///
/// # Safety
/// `path` is null or a NUL-terminated string.
pub(crate) unsafe fn route(dirfd: c_int, path: *const c_char) -> Route {
    let Some(env) = env() else {
        return Route::Host(None);
    };
    if path.is_null() {
        return Route::Host(None);
    }
    // SAFETY: the caller's promise.
    let Ok(s) = unsafe { CStr::from_ptr(path) }.to_str() else {
        return Route::Host(None);
    };
    if s.is_empty() {
        return Route::Host(None);
    }
    if let Some(rel) = served_fd_path(s) {
        return Route::Served(rel);
    }
    let relative = !s.starts_with('/');
    let abs = if relative {
        let base = if dirfd == libc::AT_FDCWD {
            vcwd()
        } else {
            dirfd_entry(dirfd).map(|d| d.path.clone())
        };
        match base {
            Some(b) => format!("{}/{s}", full(&b)),
            None => return Route::Host(None),
        }
    } else {
        s.to_string()
    };
    let Some(comps) = normalize(&abs) else {
        return Route::Host(None);
    };
    if comps.len() >= env.prefix.len() && comps[..env.prefix.len()] == env.prefix[..] {
        return Route::Served(comps[env.prefix.len()..].join("/"));
    }
    if relative || passes_through(&abs, &env.prefix) {
        let host = format!("/{}", comps.join("/"));
        return Route::Host(Some(CString::new(host).unwrap_or_default()));
    }
    Route::Host(None)
}

/// The served path behind `/dev/stdin`, `/dev/fd/N`, `/proc/self/fd/N`
/// or `/proc/PID/fd/N` (this process's id) when descriptor N is a served
/// file or directory: opening one of those names reopens the file it
/// stands for, as natively (a new open file description: offset 0). The
/// kernel would find the placeholder (`/dev/null`) there.
pub(crate) fn served_fd_path(s: &str) -> Option<String> {
    if !(s.starts_with("/dev/") || s.starts_with("/proc/"))
        || !(crate::fdtable::ANY_FD.load(Ordering::Acquire) || any())
    {
        return None;
    }
    let n = if s == "/dev/stdin" {
        "0"
    } else if let Some(n) = s.strip_prefix("/dev/fd/") {
        n
    } else if let Some(n) = s.strip_prefix("/proc/self/fd/") {
        n
    } else {
        let rest = s.strip_prefix("/proc/")?;
        let (pid, n) = rest.split_once("/fd/")?;
        // SAFETY: getpid has no preconditions.
        if pid.parse::<i32>().ok()? != unsafe { libc::getpid() } {
            return None;
        }
        n
    };
    let fd: c_int = n.parse().ok()?;
    if let Some(e) = crate::fdtable::entry(fd) {
        return Some(e.path.clone());
    }
    dirfd_entry(fd).map(|d| d.path.clone())
}

/// Whether the absolute path `abs`, walked lexically, is inside `prefix`
/// at some point (`/prefix/..` is `/`, as it is across a mount point).
fn passes_through(abs: &str, prefix: &[String]) -> bool {
    let mut at: Vec<&str> = Vec::new();
    for c in abs.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                at.pop();
            }
            c => at.push(c),
        }
        if at.len() >= prefix.len() && at[..prefix.len()] == prefix[..] {
            return true;
        }
    }
    false
}

/// Runs `served` for a path under the prefix (with this thread marked
/// busy), or gives back the path to hand the real function.
///
/// # Safety
/// `path` is null or NUL-terminated.
pub(crate) unsafe fn with_route<R>(
    dirfd: c_int,
    path: *const c_char,
    served: impl FnOnce(&str) -> R,
) -> Result<R, Option<std::ffi::CString>> {
    let Some(_b) = Busy::enter() else {
        return Err(None);
    };
    // SAFETY: the caller's promise.
    match unsafe { crate::route::route(dirfd, path) } {
        Route::Served(rel) => Ok(served(&rel)),
        Route::Host(p) => Err(p),
    }
}
