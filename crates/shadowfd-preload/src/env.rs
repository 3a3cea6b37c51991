//! The environment `shadowfd run` sets for the shim: the mount prefix,
//! the server socket, and whether the served tree can change (an image
//! cannot). Read and set with glibc's own `getenv`/`setenv`.

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

/// The prefix, as path components, and the socket: from the environment.
pub(crate) struct Env {
    pub(crate) prefix: Vec<String>,
    pub(crate) socket: String,
    /// `SHADOWFD_RUN_NO_USERFAULTFD=1`: connect without a userfaultfd, so
    /// every mapping is the server's sealed eager fallback (what a process
    /// that may not create one gets anyway).
    pub(crate) no_uffd: bool,
    /// `SHADOWFD_RUN_IMMUTABLE=1` (set by `run --image`): the served tree
    /// cannot change while served, so STAT answers may be kept.
    pub(crate) immutable: bool,
}

/// The environment of `shadowfd run`, read once; `None` outside it.
pub(crate) fn env() -> Option<&'static Env> {
    static ENV: OnceLock<Option<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let prefix = getenv(c"SHADOWFD_RUN_MOUNT")?;
        let socket = getenv(c"SHADOWFD_RUN_SOCKET")?;
        let prefix = normalize(&prefix)?;
        if prefix.is_empty() {
            return None;
        }
        let no_uffd = getenv(c"SHADOWFD_RUN_NO_USERFAULTFD").is_some_and(|v| v == "1");
        let immutable = getenv(c"SHADOWFD_RUN_IMMUTABLE").is_some_and(|v| v == "1");
        Some(Env {
            prefix,
            socket,
            no_uffd,
            immutable,
        })
    })
    .as_ref()
}

/// An environment variable (UTF-8), read with glibc's own `getenv`, the
/// next definition after this library, never the program's: bash defines
/// `getenv` and `setenv` of its own, backed by its shell variables, which
/// are not set up while library constructors run (there its `setenv`
/// would leave them half made, and its `getenv` then finds nothing).
pub(crate) fn getenv(name: &CStr) -> Option<String> {
    let f = real!("getenv", unsafe extern "C" fn(*const c_char) -> *mut c_char);
    // SAFETY: a NUL-terminated name; glibc returns null or a string in
    // `environ`.
    let p = unsafe { f(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .ok()
        .map(str::to_string)
}

/// Sets an environment variable with glibc's own `setenv` (see
/// [`getenv`]).
pub(crate) fn setenv(name: &CStr, value: &CStr, overwrite: bool) {
    let f = real!(
        "setenv",
        unsafe extern "C" fn(*const c_char, *const c_char, c_int) -> c_int
    );
    // SAFETY: NUL-terminated strings.
    unsafe { f(name.as_ptr(), value.as_ptr(), c_int::from(overwrite)) };
}

/// The components of an absolute path, `.` and `..` resolved lexically.
pub(crate) fn normalize(p: &str) -> Option<Vec<String>> {
    if !p.starts_with('/') {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c.to_string()),
        }
    }
    Some(out)
}
