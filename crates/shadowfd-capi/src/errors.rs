//! Errors across the boundary: negative errno values, a thread-local
//! message, and `catch_unwind` around every exported function.

use libc::{c_char, c_int};
use sfd::{Cause, Error};
use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// How many source callbacks this thread is inside of.
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// A failure on its way to C: the errno (positive here) and the message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub errno: c_int,
    pub msg: String,
}

impl Failure {
    pub fn new(errno: c_int, msg: String) -> Failure {
        Failure { errno, msg }
    }

    pub fn einval(msg: String) -> Failure {
        Failure::new(libc::EINVAL, msg)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(errno_of(&e), e.to_string())
    }
}

/// The errno for an I/O error: its own, or one for its kind.
fn io_errno(e: &io::Error) -> c_int {
    if let Some(n) = e.raw_os_error() {
        return n;
    }
    use io::ErrorKind as K;
    match e.kind() {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::InvalidInput | K::InvalidData => libc::EINVAL,
        K::Unsupported => libc::EOPNOTSUPP,
        K::OutOfMemory => libc::ENOMEM,
        K::WouldBlock => libc::EAGAIN,
        K::Interrupted => libc::EINTR,
        K::ConnectionRefused => libc::ECONNREFUSED,
        K::ConnectionReset => libc::ECONNRESET,
        K::BrokenPipe => libc::EPIPE,
        K::TimedOut => libc::ETIMEDOUT,
        _ => libc::EIO,
    }
}

fn cause_errno(c: &Cause) -> c_int {
    match c {
        Cause::SourceRead { errno, .. } => errno.unwrap_or(libc::EIO),
        Cause::SourceChanged { .. } => libc::ESTALE,
        Cause::Budget { .. } | Cause::LowMemory { .. } => libc::ENOMEM,
        Cause::Allocate { errno, .. } => errno.unwrap_or(libc::ENOMEM),
        _ => libc::EIO,
    }
}

/// The errno a C caller gets for `e`; docs/c-api.md has the table.
pub(crate) fn errno_of(e: &Error) -> c_int {
    match e {
        Error::Open { source, .. }
        | Error::SourceRead { source, .. }
        | Error::Sys { source, .. } => io_errno(source),
        Error::NotRegular { kind, .. } if *kind == sfd::source::FileKind::Directory => libc::EISDIR,
        Error::NotRegular { .. } => libc::EINVAL,
        Error::TooLarge { .. } => libc::EFBIG,
        Error::Config { .. } | Error::Align { .. } => libc::EINVAL,
        Error::LazyUnavailable(_) => libc::EOPNOTSUPP,
        Error::Unfillable { cause, .. } => cause_errno(cause),
        Error::NotMaterialized { .. } => libc::EBUSY,
        Error::SourceChanged { .. } => libc::ESTALE,
        Error::Range { .. } => libc::ERANGE,
        Error::Protocol { .. } | Error::Refused { .. } => libc::EPROTO,
        Error::Connection { why, .. } => match why {
            sfd::Connection::TimedOut => libc::ETIMEDOUT,
            _ => libc::ECONNRESET,
        },
        Error::Object(o) => io_errno(&o.clone().into_io()),
        _ => libc::EIO,
    }
}

/// Records `msg` as this thread's last error.
fn set_error(msg: &str) {
    // A NUL inside the message (from a path, say) would cut it short.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(c));
}

pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// What a C function returns on failure.
pub(crate) trait FailValue {
    fn fail(errno: c_int) -> Self;
}

impl FailValue for c_int {
    fn fail(errno: c_int) -> c_int {
        -errno
    }
}

impl FailValue for i64 {
    fn fail(errno: c_int) -> i64 {
        -i64::from(errno)
    }
}

impl FailValue for u64 {
    /// `shadowfd_shadow_size` cannot fail but by a panic: 0.
    fn fail(_: c_int) -> u64 {
        0
    }
}

impl FailValue for () {
    fn fail(_: c_int) {}
}

impl<T> FailValue for *mut T {
    fn fail(_: c_int) -> *mut T {
        std::ptr::null_mut()
    }
}

/// Runs `f`, turning an error or a panic into the C failure value and a
/// message for `shadowfd_last_error`.
pub(crate) fn guard<T: FailValue>(f: impl FnOnce() -> Result<T, Failure>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(&e.msg);
            set_errno(e.errno);
            T::fail(e.errno)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!(
                "internal error in libshadowfd (a bug; please report it): {what}"
            ));
            set_errno(libc::EIO);
            T::fail(libc::EIO)
        }
    }
}

/// Sets C's `errno` too, so that a function returning NULL says why.
fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always
    // valid for writes.
    unsafe { *libc::__errno_location() = e };
}

/// Marks the current thread as inside a source callback while it lives.
pub(crate) struct InCallback(());

impl InCallback {
    pub fn enter() -> InCallback {
        IN_CALLBACK.with(|c| c.set(c.get() + 1));
        InCallback(())
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// Refuses a call that could wait for a fill while inside a callback.
pub(crate) fn in_callback_refusal(func: &str) -> Result<(), Failure> {
    if IN_CALLBACK.with(Cell::get) == 0 {
        return Ok(());
    }
    Err(Failure::new(
        libc::EDEADLK,
        format!(
            "{func} was called from inside a source callback. Callbacks run on the engine's \
             fault-service threads (or the opening thread), and a call that opens, maps or \
             fills a shadow there may wait for that same service and deadlock; make the call \
             outside the callback (the rules are under \"Callbacks\" in shadowfd.h)"
        ),
    ))
}
