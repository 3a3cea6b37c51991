//! Sources whose bytes come from C callbacks.

use crate::SHADOWFD_SOURCE_SERIALIZED;
use crate::errors::{Failure, InCallback};
use libc::{c_char, c_int, c_void};
use sfd::source::{FileKind, Timestamp};
use sfd::{Source, SourceMeta};
use std::ffi::CStr;
use std::io;
use std::sync::Mutex;

/// What a callback source's `stat` fills in: the source's size and
/// identity. A lazy shadow calls `stat` again on later fills and compares
/// every field with the values at open to notice that the source changed
/// (the stale policy decides what follows). Report the same values for as
/// long as the bytes do not change.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct shadowfd_meta {
    /// Size in bytes. The shadow has exactly this many.
    pub size: u64,
    /// Modification time (seconds, nanoseconds); 0 if there is none.
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    /// Status-change time; 0 if there is none.
    pub ctime_sec: i64,
    pub ctime_nsec: i64,
    /// Identity of the container (a device number, say); any value.
    pub device: u64,
    /// Identity of the file in its container (an inode number); any value.
    pub inode: u64,
}

/// The callbacks of a source (`shadowfd_open_source`). The struct is copied
/// at open; `ctx` is passed to every callback.
///
/// Callbacks are called from the engine's fault-service threads (lazy) or
/// the opening thread (eager, and `stat` at open), possibly from several
/// threads at once unless `flags` has `SHADOWFD_SOURCE_SERIALIZED`. They
/// may block (a fault on a page waits until `read_at` returns). They must
/// not unwind (C++ exceptions, `longjmp`) out of the callback.
///
/// **Callbacks must not touch lazy mappings, nor call `shadowfd_open_*`,
/// `shadowfd_map`, `shadowfd_register`, `shadowfd_fill`, `shadowfd_read`
/// or `shadowfd_materialize`**: a callback runs on a fault-service thread,
/// and waiting there for a fill served by the same threads can deadlock.
/// The calls are detected and fail with -EDEADLK; a touch of a lazy mapping
/// cannot be detected and may hang the thread that faulted.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shadowfd_source_ops {
    /// Reads up to `len` bytes at `offset` into `buf`, like `pread(2)`.
    /// Returns the count read (short reads are retried; 0 is end of file),
    /// or a negative errno. Bytes that cannot be read are never replaced by
    /// zeros: an error, or an end before the size `stat` gave, makes exactly
    /// the pages concerned unreadable (SIGBUS in a mapping, the errno from
    /// `shadowfd_read` / `shadowfd_fill`, -EIO when the callback gave none).
    /// Required.
    pub read_at: Option<
        unsafe extern "C" fn(ctx: *mut c_void, buf: *mut c_void, len: usize, offset: u64) -> i64,
    >,
    /// Fills `*out` with the source's size and identity; returns 0 or a
    /// negative errno (-ENOENT: the source is gone). Required.
    pub stat: Option<unsafe extern "C" fn(ctx: *mut c_void, out: *mut shadowfd_meta) -> c_int>,
    /// Called once when the source is no longer needed (may be NULL). Any
    /// thread.
    pub release: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
    /// `SHADOWFD_SOURCE_SERIALIZED` or 0.
    pub flags: u32,
    /// A name for messages (may be NULL: "callback source"); copied at open.
    pub name: *const c_char,
}

type ReadFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, u64) -> i64;
type StatFn = unsafe extern "C" fn(*mut c_void, *mut shadowfd_meta) -> c_int;
type ReleaseFn = unsafe extern "C" fn(*mut c_void);

/// A [`Source`] over C callbacks. Owns `ctx`: releases it when dropped.
pub(crate) struct CSource {
    read: ReadFn,
    stat: StatFn,
    release: Option<ReleaseFn>,
    ctx: *mut c_void,
    /// Held around every callback when the source is serialized.
    lock: Option<Mutex<()>>,
    name: String,
}

// SAFETY: the contract of `shadowfd_source_ops` (in the header) requires the
// callbacks to accept `ctx` from any thread; a serialized source is never
// entered by two threads at once (`lock`).
unsafe impl Send for CSource {}
// SAFETY: as above: concurrent calls are allowed by the contract unless the
// source asked to be serialized, which `lock` enforces.
unsafe impl Sync for CSource {}

impl CSource {
    /// Takes `ctx` over: on failure it is released before this returns.
    ///
    /// # Safety
    /// `ops` is NULL or points to a valid `shadowfd_source_ops`, and its
    /// callbacks honour that struct's contract for `ctx`.
    pub unsafe fn new(
        func: &str,
        ops: *const shadowfd_source_ops,
        ctx: *mut c_void,
    ) -> Result<CSource, Failure> {
        // SAFETY: the caller vouches `ops` is NULL or valid.
        let Some(ops) = (unsafe { ops.as_ref() }).copied() else {
            return Err(Failure::einval(format!(
                "{func}: ops is NULL (ctx was not released: there is no release callback)"
            )));
        };
        let release = ops.release;
        let fail = |msg: String| {
            if let Some(r) = release {
                let _in = InCallback::enter();
                // SAFETY: the source owns ctx from the start; this is its
                // single release.
                unsafe { r(ctx) };
            }
            Err(Failure::einval(msg))
        };
        let (Some(read), Some(stat)) = (ops.read_at, ops.stat) else {
            return fail(format!(
                "{func}: ops->read_at and ops->stat are required (ctx was released)"
            ));
        };
        if ops.flags & !SHADOWFD_SOURCE_SERIALIZED != 0 {
            return fail(format!(
                "{func}: unknown ops->flags {:#x}; the only flag is SHADOWFD_SOURCE_SERIALIZED \
                 (ctx was released)",
                ops.flags
            ));
        }
        let name = if ops.name.is_null() {
            "callback source".to_string()
        } else {
            // SAFETY: the contract: NULL or a NUL-terminated string.
            unsafe { CStr::from_ptr(ops.name) }
                .to_string_lossy()
                .into_owned()
        };
        Ok(CSource {
            read,
            stat,
            release,
            ctx,
            lock: (ops.flags & SHADOWFD_SOURCE_SERIALIZED != 0).then(|| Mutex::new(())),
            name,
        })
    }

    /// Runs `f` as one callback: under the lock if serialized, marked as
    /// inside a callback on this thread.
    fn call<R>(&self, f: impl FnOnce() -> R) -> R {
        // The guarded section only calls C, which cannot panic, so the lock
        // is never poisoned; take it anyway if it were.
        let _g = self
            .lock
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        let _in = InCallback::enter();
        f()
    }
}

/// A negative return of a callback as an `io::Error`.
fn errno_error(r: i64) -> io::Error {
    match r.checked_neg().map(i32::try_from) {
        Some(Ok(e)) if e > 0 && e < 4096 => io::Error::from_raw_os_error(e),
        _ => io::Error::other(format!(
            "the callback returned {r}, which is not a negative errno"
        )),
    }
}

impl Source for CSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let (ptr, len) = (buf.as_mut_ptr().cast::<c_void>(), buf.len());
        // SAFETY: `buf` is writable for `len` bytes for the whole call; the
        // callback's contract is to write at most that many.
        let r = self.call(|| unsafe { (self.read)(self.ctx, ptr, len, offset) });
        if r < 0 {
            return Err(errno_error(r));
        }
        if r as u64 > len as u64 {
            return Err(io::Error::other(format!(
                "read_at returned {r} for a buffer of {len} bytes"
            )));
        }
        Ok(r as usize)
    }

    fn metadata(&self) -> io::Result<SourceMeta> {
        let mut m = shadowfd_meta::default();
        let out = &mut m as *mut shadowfd_meta;
        // SAFETY: `out` points to a live, writable shadowfd_meta.
        let r = self.call(|| unsafe { (self.stat)(self.ctx, out) });
        if r < 0 {
            return Err(errno_error(i64::from(r)));
        }
        Ok(SourceMeta {
            size: m.size,
            mtime: Timestamp {
                sec: m.mtime_sec,
                nsec: m.mtime_nsec,
            },
            ctime: Timestamp {
                sec: m.ctime_sec,
                nsec: m.ctime_nsec,
            },
            device: m.device,
            inode: m.inode,
            kind: FileKind::Regular,
        })
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

impl Drop for CSource {
    fn drop(&mut self) {
        if let Some(r) = self.release {
            let _in = InCallback::enter();
            // SAFETY: the single release of ctx, which this source owned;
            // no callback of it runs any more (we hold it exclusively).
            unsafe { r(self.ctx) };
        }
    }
}
