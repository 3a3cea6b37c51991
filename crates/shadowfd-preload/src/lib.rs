//! `libshadowfd_preload.so`: the `LD_PRELOAD` shim `shadowfd run` loads
//! into the command it starts (docs/run.md).
//!
//! For paths under the mount prefix (`SHADOWFD_RUN_MOUNT`), the libc entry
//! points below open, read, stat and map files through a shadowfd server
//! (`SHADOWFD_RUN_SOCKET`) instead of the host's file system; the module
//! `dir` adds directories, relative paths and the working directory.
//! Everything else goes to the real functions (`dlsym(RTLD_NEXT)`).
//!
//! What the program holds for such a file is an `O_PATH` descriptor of
//! `/dev/null` that this shim tracks: a read, write or map of it that does
//! not come through the shim (a raw system call, a `dup` in a child after
//! `exec`) fails with `EBADF`; it never reads zeros. Reads go to the server
//! with FILL; maps are the server's lazy mappings (this process's own
//! userfaultfd), filled on first touch.
//!
//! Re-entrancy: the client calls libc itself (sockets, `mmap`, `read` of
//! its userfaultfd); a thread-local flag sends every call made while the
//! shim is at work straight to the real function.

use crate::conn::{CLIENT, client};
use crate::errno::{errno_of, io_err};
use crate::fdtable::{
    Entry, STATE, State, close_forgetting, dup_done, entry, fresh, insert, placeholder, tracked,
};
use forklock::ForkGuard;
use parking_lot::Mutex;
use shadowfd::remote::{Client, RemoteFile};
use std::cell::Cell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

type SizeT = libc::size_t;
type SsizeT = libc::ssize_t;
type OffT = libc::off_t;

/// Resolves the next definition of a libc function once, as a typed
/// function pointer.
macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static P: ::std::sync::atomic::AtomicUsize = ::std::sync::atomic::AtomicUsize::new(0);
        let p = $crate::resolve(&P, concat!($name, "\0"));
        #[allow(unused_unsafe)]
        // SAFETY: `p` is glibc's definition of this symbol, whose C type is
        // `$ty`.
        let f = unsafe { std::mem::transmute::<usize, $ty>(p) };
        f
    }};
}

/// The next definition of `name` (NUL-terminated), cached in `slot`.
fn resolve(slot: &AtomicUsize, name: &'static str) -> usize {
    let p = slot.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    // SAFETY: a NUL-terminated symbol name; dlsym has no other precondition.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
    if p == 0 {
        // Nothing to fall back on: say so and stop.
        let msg = format!(
            "shadowfd-preload: no next definition of {}\n",
            name.trim_end_matches('\0')
        );
        // SAFETY: writes a live buffer to stderr.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
    slot.store(p, Ordering::Relaxed);
    p
}

mod audit;
mod conn;
mod dir;
mod env;
mod errno;
mod exec;
mod fdtable;
mod fts;
mod paths;
mod prefault;
mod small;
mod vfork;
use dir::Route;

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside the shim until dropped.
struct Busy;

impl Busy {
    /// `None` when this thread is already inside the shim (or its
    /// thread-locals are gone): the caller must use the real function.
    fn enter() -> Option<Busy> {
        BUSY.try_with(|b| {
            if b.get() {
                None
            } else {
                b.set(true);
                Some(Busy)
            }
        })
        .ok()
        .flatten()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

mod forklock;
mod map;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Opens `rel` on the server; returns the placeholder descriptor or -1.
fn do_open(rel: &str, flags: c_int) -> c_int {
    let r = (|| -> Result<c_int, c_int> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) != 0 {
            return Err(libc::EROFS);
        }
        if flags & libc::O_TMPFILE == libc::O_TMPFILE {
            return Err(libc::EROFS);
        }
        if flags & libc::O_DIRECTORY != 0 {
            return dir::open_dir(rel, flags);
        }
        let file = match small::open(rel) {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(e),
            None => match client()?.open(rel) {
                Ok(f) => f,
                // A directory opens as one (any other kind keeps the error).
                Err(e) if errno_of(&e) == libc::EISDIR => {
                    return dir::open_dir(rel, flags).map_err(|_| libc::EISDIR);
                }
                Err(e) => return Err(errno_of(&e)),
            },
        };
        let fd = placeholder(flags)?;
        if vfork::in_child() {
            vfork::opened(fd, vfork::Handed::File(rel.to_string(), 0));
            // The file stays open on the parent's connection; this child
            // only execs or exits.
            std::mem::forget(file);
            return Ok(fd);
        }
        dir::forget(fd);
        insert(
            fd,
            Arc::new(Entry {
                path: rel.to_string(),
                file: Mutex::new(Some(file)),
                pos: AtomicU64::new(0),
            }),
        );
        Ok(fd)
    })();
    r.unwrap_or_else(|e| {
        set_errno(e);
        -1
    })
}

fn read_entry(e: &Entry, buf: *mut c_void, n: SizeT, at: Option<u64>) -> SsizeT {
    if n == 0 {
        return 0;
    }
    if buf.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    let n = n.min(isize::MAX as usize);
    let file = match e.file() {
        Ok(f) => f,
        Err(err) => return fail(err) as SsizeT,
    };
    let off = at.unwrap_or_else(|| e.pos.load(Ordering::SeqCst));
    // SAFETY: read(2)'s contract: `buf` is writable for `n` bytes.
    let slice = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), n) };
    match read_ahead(&file, slice, off) {
        Ok(got) => {
            if at.is_none() {
                e.pos.store(off + got as u64, Ordering::SeqCst);
            }
            got as SsizeT
        }
        Err(err) => {
            set_errno(io_err(&err));
            -1
        }
    }
}

/// Read-ahead of the read path: bytes one thread fetched past what a
/// sequential reader asked for, kept for its next reads of the same file.
///
/// A served file's bytes never change under a handle (a changed source is
/// refused by the server, never served), so bytes fetched once stay right.
/// Each thread keeps a few of these, with no lock: a forked child (one
/// thread, a copy of the forking thread's) finds its parent's and forgets
/// them without using them (the file belongs to the parent's connection).
struct Ahead {
    pid: u32,
    /// Held so that its handle is not reused on the connection while these
    /// bytes are kept; `None` only while being forgotten.
    file: Option<RemoteFile>,
    /// `data` holds the file's bytes from `start`.
    start: u64,
    data: Vec<u8>,
    /// Where the last read through this slot ended.
    next: u64,
    /// The next fetch size for a sequential reader.
    window: usize,
    /// For least-recently-used replacement.
    used: u64,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        // SAFETY: getpid has no preconditions.
        if self.pid != unsafe { libc::getpid() } as u32 {
            // The parent's file: dropping it would speak on the parent's
            // connection.
            std::mem::forget(self.file.take());
        }
    }
}

/// Slots per thread; the first and the largest sequential fetch.
const AHEAD_SLOTS: usize = 4;
const AHEAD_FIRST: usize = 128 << 10;
const AHEAD_MAX: usize = shadowfd::remote::wire::MAX_FILL as usize;

thread_local! {
    static AHEAD: std::cell::RefCell<(u64, Vec<Ahead>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
}

/// Reads `buf.len()` bytes at `off` (short only at the end of the file):
/// from this thread's read-ahead when it holds them, else through FILL. A
/// read that starts where the last one of the same file ended is a
/// sequential reader: it fetches a window ahead (128 KiB, doubling to
/// 1 MiB), so that small reads (`dd bs=4k`, 8 KiB stdio buffers) cost one
/// request per window instead of one each. Other reads, and reads of 1 MiB
/// or more, fetch exactly what was asked.
fn read_ahead(file: &RemoteFile, buf: &mut [u8], off: u64) -> shadowfd::Result<usize> {
    // A file read whole (handle 0) reads from memory.
    if buf.len() >= AHEAD_MAX || file.inline_bytes().is_some() {
        return file.read_at(buf, off);
    }
    let r = AHEAD.try_with(|a| {
        let Ok(mut a) = a.try_borrow_mut() else {
            return None;
        };
        Some(read_ahead_in(&mut a, file, buf, off))
    });
    match r {
        Ok(Some(r)) => r,
        // Thread teardown or re-entry: no read-ahead.
        _ => file.read_at(buf, off),
    }
}

fn read_ahead_in(
    a: &mut (u64, Vec<Ahead>),
    file: &RemoteFile,
    buf: &mut [u8],
    off: u64,
) -> shadowfd::Result<usize> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    a.0 += 1;
    let tick = a.0;
    let slots = &mut a.1;
    // A forked child's copies of its parent's slots go (forgotten by Drop).
    slots.retain(|s| s.pid == pid);
    let size = file.size();
    let handle = file.handle();
    let i = slots
        .iter()
        .position(|s| s.file.as_ref().is_some_and(|f| f.handle() == handle));
    if let Some(i) = i {
        let s = &mut slots[i];
        s.used = tick;
        let end = s.start + s.data.len() as u64;
        if off >= s.start && off < end {
            // Held: copy what is there (up to the end of the window).
            let from = (off - s.start) as usize;
            let n = buf.len().min(s.data.len() - from);
            buf[..n].copy_from_slice(&s.data[from..from + n]);
            s.next = off + n as u64;
            if n < buf.len() && end < size {
                // The rest comes with the next window (a sequential read).
                return match read_ahead_in(a, file, &mut buf[n..], end) {
                    Ok(m) => Ok(n + m),
                    Err(_) if n > 0 => Ok(n),
                    Err(e) => Err(e),
                };
            }
            return Ok(n);
        }
    }
    let sequential = i.is_some_and(|i| slots[i].next == off);
    if !sequential {
        if let Some(i) = i {
            // Random access: keep the slot (a later sequential run reuses
            // it) but start its window again.
            slots[i].window = AHEAD_FIRST;
            slots[i].next = off + buf.len() as u64;
        } else {
            // Remember where this read ends: a next read there is
            // sequential. No bytes are kept yet.
            if slots.len() >= AHEAD_SLOTS {
                let lru = (0..slots.len()).min_by_key(|&k| slots[k].used).unwrap_or(0);
                slots.swap_remove(lru);
            }
            slots.push(Ahead {
                pid,
                file: Some(file.clone()),
                start: 0,
                data: Vec::new(),
                next: off + buf.len() as u64,
                window: AHEAD_FIRST,
                used: tick,
            });
        }
        let got = file.read_at(buf, off)?;
        return Ok(got);
    }
    let i = i.expect("sequential implies a slot");
    let s = &mut slots[i];
    let want = s.window.max(buf.len()).min(AHEAD_MAX);
    let want = (want as u64).min(size.saturating_sub(off)) as usize;
    s.data.resize(want, 0);
    let got = match file.read_at(&mut s.data, off) {
        Ok(g) => g,
        Err(e) => {
            s.data.clear();
            return Err(e);
        }
    };
    s.data.truncate(got);
    s.start = off;
    s.window = (s.window * 2).min(AHEAD_MAX);
    let n = buf.len().min(got);
    buf[..n].copy_from_slice(&s.data[..n]);
    s.next = off + n as u64;
    Ok(n)
}

fn seek_entry(e: &Entry, off: i64, whence: c_int) -> i64 {
    let size = match e.file() {
        Ok(f) => f.size() as i64,
        Err(err) => return fail(err) as i64,
    };
    let base = match whence {
        libc::SEEK_SET => 0,
        libc::SEEK_CUR => e.pos.load(Ordering::SeqCst) as i64,
        libc::SEEK_END => size,
        libc::SEEK_DATA => {
            if off < 0 || off >= size {
                set_errno(libc::ENXIO);
                return -1;
            }
            e.pos.store(off as u64, Ordering::SeqCst);
            return off;
        }
        libc::SEEK_HOLE => {
            if off < 0 || off > size {
                set_errno(libc::ENXIO);
                return -1;
            }
            e.pos.store(size as u64, Ordering::SeqCst);
            return size;
        }
        _ => {
            set_errno(libc::EINVAL);
            return -1;
        }
    };
    match base.checked_add(off) {
        Some(p) if p >= 0 => {
            e.pos.store(p as u64, Ordering::SeqCst);
            p
        }
        _ => {
            set_errno(libc::EINVAL);
            -1
        }
    }
}

/// The link count of an open file: as SMALL said, else as the kept STAT
/// answer of its path says (the tree cannot change), else 1 (OPEN's reply
/// has none).
fn nlink_of(f: &RemoteFile) -> u64 {
    f.nlink()
        .or_else(|| match dir::kept_stat(f.path()) {
            Some(Ok(i)) if (i.device, i.inode) == (f.identity().0, f.identity().1) => Some(i.nlink),
            _ => None,
        })
        .unwrap_or(1)
}

fn fill_stat(f: &RemoteFile, st: *mut libc::stat64) -> c_int {
    if st.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    let (dev, ino, ms, mns) = f.identity();
    dir::write_stat(
        st,
        (dev, ino),
        nlink_of(f),
        libc::S_IFREG | 0o444,
        f.size(),
        (ms, mns),
    )
}

fn fill_statx(f: &RemoteFile, st: *mut libc::statx) -> c_int {
    if st.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    let (dev, ino, ms, mns) = f.identity();
    // SAFETY: an all-zero statx is valid.
    let mut s: libc::statx = unsafe { std::mem::zeroed() };
    s.stx_mask = libc::STATX_BASIC_STATS;
    s.stx_blksize = 1 << 20;
    s.stx_nlink = nlink_of(f) as u32;
    // SAFETY: getuid and getgid have no preconditions.
    s.stx_uid = unsafe { libc::getuid() };
    // SAFETY: as above.
    s.stx_gid = unsafe { libc::getgid() };
    s.stx_mode = (libc::S_IFREG | 0o444) as u16;
    s.stx_ino = ino;
    s.stx_size = f.size();
    s.stx_blocks = f.size().div_ceil(512);
    for t in [&mut s.stx_atime, &mut s.stx_mtime, &mut s.stx_ctime] {
        t.tv_sec = ms;
        t.tv_nsec = mns as u32;
    }
    s.stx_dev_major = libc::major(dev);
    s.stx_dev_minor = libc::minor(dev);
    // SAFETY: the caller's buffer for a struct statx.
    unsafe { st.write(s) };
    0
}

fn fail(e: c_int) -> c_int {
    set_errno(e);
    -1
}

// ---- open ----------------------------------------------------------------

/// # Safety
/// `path` is null or a NUL-terminated string.
unsafe fn open_common(path: *const c_char, flags: c_int, mode: libc::mode_t, sym: u8) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { dir::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return do_open(&rel, flags),
            Route::Host(p) => host = p,
        }
    }
    let path = Route::host_path(&host, path);
    // SAFETY: forwarding the caller's arguments.
    fresh(unsafe {
        match sym {
            0 => real!(
                "open",
                unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int
            )(path, flags, mode),
            _ => real!(
                "open64",
                unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int
            )(path, flags, mode),
        }
    })
}

/// # Safety
/// `path` is null or a NUL-terminated string.
unsafe fn openat_common(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
    sym: u8,
) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { dir::route(dirfd, path) } {
            Route::Served(rel) => return do_open(&rel, flags),
            Route::Host(p) => host = p,
        }
    }
    let path = Route::host_path(&host, path);
    // SAFETY: forwarding the caller's arguments.
    fresh(unsafe {
        match sym {
            0 => real!(
                "openat",
                unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int
            )(dirfd, path, flags, mode),
            _ => real!(
                "openat64",
                unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int
            )(dirfd, path, flags, mode),
        }
    })
}

// The C functions are variadic (the mode); on x86-64 and aarch64 the third
// argument is read from its register, which holds the mode when the caller
// passed one and is ignored otherwise (it matters only with O_CREAT or
// O_TMPFILE, which the shim refuses under the prefix).

/// # Safety
/// libc's `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, mode, 0) }
}

/// # Safety
/// libc's `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, mode, 1) }
}

/// # Safety
/// glibc's fortified `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, 0, 0) }
}

/// # Safety
/// glibc's fortified `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { open_common(path, flags, 0, 1) }
}

/// # Safety
/// libc's `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, mode, 0) }
}

/// # Safety
/// libc's `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, mode, 1) }
}

/// # Safety
/// glibc's fortified `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, 0, 0) }
}

/// # Safety
/// glibc's fortified `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: libc's contract.
    unsafe { openat_common(dirfd, path, flags, 0, 1) }
}

/// # Safety
/// libc's `creat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat(path: *const c_char, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe {
        open_common(
            path,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            mode,
            0,
        )
    }
}

/// # Safety
/// libc's `creat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: libc::mode_t) -> c_int {
    // SAFETY: libc's contract.
    unsafe {
        open_common(
            path,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            mode,
            1,
        )
    }
}

// ---- read, seek, close, dup ----------------------------------------------

/// # Safety
/// libc's `read`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: SizeT) -> SsizeT {
    if let Some((_b, e)) = tracked(fd) {
        return read_entry(&e, buf, n, None);
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "read",
            unsafe extern "C" fn(c_int, *mut c_void, SizeT) -> SsizeT
        )(fd, buf, n)
    }
}

type PreadFn = unsafe extern "C" fn(c_int, *mut c_void, SizeT, OffT) -> SsizeT;

/// `pread`/`pread64`: a served descriptor is read through the server;
/// any other goes to `real`.
///
/// # Safety
/// libc's `pread`, with `real` its next definition.
unsafe fn pread_common(fd: c_int, buf: *mut c_void, n: SizeT, off: OffT, real: PreadFn) -> SsizeT {
    if let Some((_b, e)) = tracked(fd) {
        if off < 0 {
            return fail(libc::EINVAL) as SsizeT;
        }
        return read_entry(&e, buf, n, Some(off as u64));
    }
    // SAFETY: forwarding.
    unsafe { real(fd, buf, n, off) }
}

/// # Safety
/// libc's `pread`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: SizeT, off: OffT) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { pread_common(fd, buf, n, off, real!("pread", PreadFn)) }
}

/// # Safety
/// libc's `pread64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: SizeT, off: OffT) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { pread_common(fd, buf, n, off, real!("pread64", PreadFn)) }
}

/// # Safety
/// libc's `lseek`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lseek(fd: c_int, off: OffT, whence: c_int) -> OffT {
    if let Some((_b, e)) = tracked(fd) {
        return seek_entry(&e, off, whence);
    }
    // SAFETY: forwarding.
    unsafe { real!("lseek", unsafe extern "C" fn(c_int, OffT, c_int) -> OffT)(fd, off, whence) }
}

/// # Safety
/// libc's `lseek64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lseek64(fd: c_int, off: OffT, whence: c_int) -> OffT {
    if let Some((_b, e)) = tracked(fd) {
        return seek_entry(&e, off, whence);
    }
    // SAFETY: forwarding.
    unsafe { real!("lseek64", unsafe extern "C" fn(c_int, OffT, c_int) -> OffT)(fd, off, whence) }
}

/// # Safety
/// libc's `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    close_forgetting(fd, false)
}

/// # Safety
/// libc's `dup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let b = Busy::enter();
    // SAFETY: forwarding.
    let r = unsafe { real!("dup", unsafe extern "C" fn(c_int) -> c_int)(fd) };
    if b.is_some() {
        dup_done(fd, r);
    }
    r
}

/// # Safety
/// libc's `dup2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(fd: c_int, new: c_int) -> c_int {
    let b = Busy::enter();
    // SAFETY: forwarding.
    let r = unsafe { real!("dup2", unsafe extern "C" fn(c_int, c_int) -> c_int)(fd, new) };
    if b.is_some() && fd != new {
        dup_done(fd, r);
    }
    r
}

/// # Safety
/// libc's `dup3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int {
    let b = Busy::enter();
    // SAFETY: forwarding.
    let r = unsafe {
        real!("dup3", unsafe extern "C" fn(c_int, c_int, c_int) -> c_int)(fd, new, flags)
    };
    if b.is_some() {
        dup_done(fd, r);
    }
    r
}

/// # Safety
/// libc's `close_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(
    first: libc::c_uint,
    last: libc::c_uint,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding.
    let r = unsafe {
        real!(
            "close_range",
            unsafe extern "C" fn(libc::c_uint, libc::c_uint, c_int) -> c_int
        )(first, last, flags)
    };
    // With CLOSE_RANGE_CLOEXEC the descriptors stay open.
    if r == 0 && flags & (libc::CLOSE_RANGE_CLOEXEC as c_int) == 0 && first <= last {
        // SAFETY: reads this thread's errno.
        let saved = unsafe { *libc::__errno_location() };
        let hi = last.min(c_int::MAX as libc::c_uint) as c_int;
        if first <= c_int::MAX as libc::c_uint {
            crate::fdtable::forget_range(first as c_int, hi);
        }
        set_errno(saved);
    }
    r
}

/// # Safety
/// libc's `closefrom` (glibc 2.34 and later).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(low: c_int) {
    // SAFETY: forwarding.
    unsafe { real!("closefrom", unsafe extern "C" fn(c_int))(low) };
    crate::fdtable::forget_range(low.max(0), c_int::MAX);
}

/// # Safety
/// libc's `socket`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int {
    // SAFETY: forwarding.
    fresh(unsafe {
        real!("socket", unsafe extern "C" fn(c_int, c_int, c_int) -> c_int)(domain, ty, proto)
    })
}

/// # Safety
/// libc's `accept`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> c_int {
    // SAFETY: forwarding.
    fresh(unsafe {
        real!(
            "accept",
            unsafe extern "C" fn(c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> c_int
        )(fd, addr, len)
    })
}

/// # Safety
/// libc's `accept4`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding.
    fresh(unsafe {
        real!(
            "accept4",
            unsafe extern "C" fn(c_int, *mut libc::sockaddr, *mut libc::socklen_t, c_int) -> c_int
        )(fd, addr, len, flags)
    })
}

/// Forgets both descriptors of a pair the host just made (`pipe`,
/// `socketpair`) when the call succeeded; returns `r`.
///
/// # Safety
/// `fds` points to two descriptors when `r` is 0.
unsafe fn fresh_pair(r: c_int, fds: *const c_int) -> c_int {
    if r == 0 && !fds.is_null() {
        // SAFETY: the call filled both on success.
        let (a, b) = unsafe { (*fds, *fds.add(1)) };
        fresh(a);
        fresh(b);
    }
    r
}

/// # Safety
/// libc's `pipe`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pipe(fds: *mut c_int) -> c_int {
    // SAFETY: forwarding.
    let r = unsafe { real!("pipe", unsafe extern "C" fn(*mut c_int) -> c_int)(fds) };
    // SAFETY: pipe's contract.
    unsafe { fresh_pair(r, fds) }
}

/// # Safety
/// libc's `pipe2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pipe2(fds: *mut c_int, flags: c_int) -> c_int {
    // SAFETY: forwarding.
    let r = unsafe { real!("pipe2", unsafe extern "C" fn(*mut c_int, c_int) -> c_int)(fds, flags) };
    // SAFETY: pipe2's contract.
    unsafe { fresh_pair(r, fds) }
}

/// # Safety
/// libc's `socketpair`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn socketpair(
    domain: c_int,
    ty: c_int,
    proto: c_int,
    fds: *mut c_int,
) -> c_int {
    // SAFETY: forwarding.
    let r = unsafe {
        real!(
            "socketpair",
            unsafe extern "C" fn(c_int, c_int, c_int, *mut c_int) -> c_int
        )(domain, ty, proto, fds)
    };
    // SAFETY: socketpair's contract.
    unsafe { fresh_pair(r, fds) }
}

/// # Safety
/// libc's `memfd_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memfd_create(name: *const c_char, flags: libc::c_uint) -> c_int {
    // SAFETY: forwarding.
    fresh(unsafe {
        real!(
            "memfd_create",
            unsafe extern "C" fn(*const c_char, libc::c_uint) -> c_int
        )(name, flags)
    })
}

/// # Safety
/// libc's `eventfd`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn eventfd(init: libc::c_uint, flags: c_int) -> c_int {
    // SAFETY: forwarding.
    fresh(unsafe {
        real!(
            "eventfd",
            unsafe extern "C" fn(libc::c_uint, c_int) -> c_int
        )(init, flags)
    })
}

/// Record locks on a served file: nobody can write it, so a read lock is
/// always granted (and an unlock always succeeds); a write lock fails with
/// `EBADF`, as on a descriptor opened read-only; a query answers "unlocked".
fn lock(cmd: c_int, fl: *mut libc::flock) -> c_int {
    if fl.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: fcntl's contract for the lock commands: a struct flock.
    let f = unsafe { &mut *fl };
    if cmd == libc::F_GETLK || cmd == libc::F_OFD_GETLK {
        f.l_type = libc::F_UNLCK as i16;
        return 0;
    }
    match f.l_type as c_int {
        libc::F_RDLCK | libc::F_UNLCK => 0,
        libc::F_WRLCK => fail(libc::EBADF),
        _ => fail(libc::EINVAL),
    }
}

/// # Safety
/// libc's `fcntl` (the third argument read as a long, as glibc does).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: forwarding.
    unsafe { fcntl_common(fd, cmd, arg, 0) }
}

/// # Safety
/// libc's `fcntl64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: forwarding.
    unsafe { fcntl_common(fd, cmd, arg, 1) }
}

/// # Safety
/// libc's `fcntl`.
unsafe fn fcntl_common(fd: c_int, cmd: c_int, arg: libc::c_long, sym: u8) -> c_int {
    let lock_cmd = matches!(
        cmd,
        libc::F_GETLK
            | libc::F_SETLK
            | libc::F_SETLKW
            | libc::F_OFD_GETLK
            | libc::F_OFD_SETLK
            | libc::F_OFD_SETLKW
    );
    if (cmd == libc::F_GETFL || lock_cmd)
        && let Some((_b, _e)) = tracked(fd)
    {
        if cmd == libc::F_GETFL {
            // What the program opened: read-only (the placeholder says O_PATH).
            return libc::O_RDONLY | libc::O_LARGEFILE;
        }
        return lock(cmd, arg as *mut libc::flock);
    }
    let b = Busy::enter();
    // SAFETY: forwarding.
    let r = unsafe {
        match sym {
            0 => real!("fcntl", unsafe extern "C" fn(c_int, c_int, ...) -> c_int)(fd, cmd, arg),
            _ => real!("fcntl64", unsafe extern "C" fn(c_int, c_int, ...) -> c_int)(fd, cmd, arg),
        }
    };
    if b.is_some() && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        dup_done(fd, r);
    }
    r
}

/// Reads into each buffer of `iov` in turn (at `at`, or the offset).
///
/// # Safety
/// `iov` points to `cnt` iovecs whose buffers are writable (readv's
/// contract).
unsafe fn readv_entry(e: &Entry, iov: *const libc::iovec, cnt: c_int, at: Option<u64>) -> SsizeT {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) {
        return fail(libc::EINVAL) as SsizeT;
    }
    if cnt > 0 && iov.is_null() {
        return fail(libc::EFAULT) as SsizeT;
    }
    let mut done: usize = 0;
    for i in 0..cnt as usize {
        // SAFETY: the caller's promise.
        let v = unsafe { *iov.add(i) };
        if v.iov_len == 0 {
            continue;
        }
        let off = at.map(|a| a + done as u64);
        let got = read_entry(e, v.iov_base, v.iov_len, off);
        if got < 0 {
            return if done > 0 { done as SsizeT } else { -1 };
        }
        done += got as usize;
        if (got as usize) < v.iov_len {
            break;
        }
    }
    done as SsizeT
}

/// # Safety
/// libc's `readv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> SsizeT {
    if let Some((_b, e)) = tracked(fd) {
        // SAFETY: the caller's promise.
        return unsafe { readv_entry(&e, iov, cnt, None) };
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "readv",
            unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> SsizeT
        )(fd, iov, cnt)
    }
}

type PreadvFn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int, OffT) -> SsizeT;

/// # Safety
/// libc's `preadv` contract.
unsafe fn preadv_common(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: c_int,
    off: OffT,
    real: PreadvFn,
) -> SsizeT {
    if let Some((_b, e)) = tracked(fd) {
        if off < 0 {
            return fail(libc::EINVAL) as SsizeT;
        }
        // SAFETY: the caller's promise.
        return unsafe { readv_entry(&e, iov, cnt, Some(off as u64)) };
    }
    // SAFETY: forwarding.
    unsafe { real(fd, iov, cnt, off) }
}

/// # Safety
/// libc's `preadv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: c_int,
    off: OffT,
) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { preadv_common(fd, iov, cnt, off, real!("preadv", PreadvFn)) }
}

/// # Safety
/// libc's `preadv64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv64(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: c_int,
    off: OffT,
) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { preadv_common(fd, iov, cnt, off, real!("preadv64", PreadvFn)) }
}

type Preadv2Fn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int, OffT, c_int) -> SsizeT;

/// # Safety
/// libc's `preadv2` contract.
unsafe fn preadv2_common(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: c_int,
    off: OffT,
    flags: c_int,
    real: Preadv2Fn,
) -> SsizeT {
    if let Some((_b, e)) = tracked(fd) {
        // Hints only (RWF_HIPRI); anything else is not supported here.
        if flags & !libc::RWF_HIPRI != 0 {
            return fail(libc::EOPNOTSUPP) as SsizeT;
        }
        let at = match off {
            -1 => None,
            o if o < 0 => return fail(libc::EINVAL) as SsizeT,
            o => Some(o as u64),
        };
        // SAFETY: the caller's promise.
        return unsafe { readv_entry(&e, iov, cnt, at) };
    }
    // SAFETY: forwarding.
    unsafe { real(fd, iov, cnt, off, flags) }
}

/// # Safety
/// libc's `preadv2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv2(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: c_int,
    off: OffT,
    flags: c_int,
) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { preadv2_common(fd, iov, cnt, off, flags, real!("preadv2", Preadv2Fn)) }
}

/// # Safety
/// libc's `preadv64v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv64v2(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: c_int,
    off: OffT,
    flags: c_int,
) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { preadv2_common(fd, iov, cnt, off, flags, real!("preadv64v2", Preadv2Fn)) }
}

// ---- access --------------------------------------------------------------

/// # Safety
/// libc's `access`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { dir::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return dir::access_rel(&rel, mode),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "access",
            unsafe extern "C" fn(*const c_char, c_int) -> c_int
        )(Route::host_path(&host, path), mode)
    }
}

/// # Safety
/// libc's `faccessat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { dir::route(dirfd, path) } {
            Route::Served(rel) => return dir::access_rel(&rel, mode),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "faccessat",
            unsafe extern "C" fn(c_int, *const c_char, c_int, c_int) -> c_int
        )(dirfd, Route::host_path(&host, path), mode, flags)
    }
}

/// # Safety
/// libc's `readlink`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, n: SizeT) -> SsizeT {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        if let Some(r) = unsafe { dir::readlink_fd(libc::AT_FDCWD, path, buf, n) } {
            return r;
        }
        // SAFETY: the caller's promise.
        match unsafe { dir::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return dir::readlink_rel(&rel),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "readlink",
            unsafe extern "C" fn(*const c_char, *mut c_char, SizeT) -> SsizeT
        )(Route::host_path(&host, path), buf, n)
    }
}

/// # Safety
/// libc's `readlinkat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlinkat(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    n: SizeT,
) -> SsizeT {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        if let Some(r) = unsafe { dir::readlink_fd(dirfd, path, buf, n) } {
            return r;
        }
        // SAFETY: the caller's promise.
        match unsafe { dir::route(dirfd, path) } {
            Route::Served(rel) => return dir::readlink_rel(&rel),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "readlinkat",
            unsafe extern "C" fn(c_int, *const c_char, *mut c_char, SizeT) -> SsizeT
        )(dirfd, Route::host_path(&host, path), buf, n)
    }
}

// ---- copy_file_range, sendfile -------------------------------------------

/// Copies up to `len` bytes of `e` (at `*off` or its offset) to `out`.
///
/// # Safety
/// `off` is null or points to a readable and writable offset; `out_off`
/// likewise.
unsafe fn copy_out(e: &Entry, off: *mut i64, out: c_int, out_off: *mut i64, len: usize) -> SsizeT {
    let n = len.min(1 << 20);
    let mut buf = vec![0u8; n];
    // SAFETY: the caller's promise.
    let at = (!off.is_null()).then(|| unsafe { *off });
    if at.is_some_and(|a| a < 0) {
        return fail(libc::EINVAL) as SsizeT;
    }
    let got = read_entry(e, buf.as_mut_ptr().cast(), n, at.map(|a| a as u64));
    if got <= 0 {
        return got;
    }
    let got = got as usize;
    // SAFETY: `buf` holds `got` bytes; `out_off`: the caller's promise.
    let w = unsafe {
        if out_off.is_null() {
            libc::write(out, buf.as_ptr().cast(), got)
        } else {
            let w = libc::pwrite(out, buf.as_ptr().cast(), got, *out_off);
            if w > 0 {
                *out_off += w as i64;
            }
            w
        }
    };
    if w < 0 {
        // Give back what was not written.
        if at.is_none() {
            e.pos.fetch_sub(got as u64, Ordering::SeqCst);
        }
        return -1;
    }
    if let Some(a) = at {
        // SAFETY: the caller's promise.
        unsafe { *off = a + w as i64 };
    } else if (w as usize) < got {
        e.pos.fetch_sub((got - w as usize) as u64, Ordering::SeqCst);
    }
    w
}

/// # Safety
/// libc's `copy_file_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn copy_file_range(
    fd_in: c_int,
    off_in: *mut i64,
    fd_out: c_int,
    off_out: *mut i64,
    len: SizeT,
    flags: libc::c_uint,
) -> SsizeT {
    if let Some(_b) = Busy::enter() {
        if entry(fd_out).is_some() {
            return fail(libc::EBADF) as SsizeT;
        }
        if let Some(e) = entry(fd_in) {
            // SAFETY: the caller's pointers.
            return unsafe { copy_out(&e, off_in, fd_out, off_out, len) };
        }
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "copy_file_range",
            unsafe extern "C" fn(c_int, *mut i64, c_int, *mut i64, SizeT, libc::c_uint) -> SsizeT
        )(fd_in, off_in, fd_out, off_out, len, flags)
    }
}

type SendfileFn = unsafe extern "C" fn(c_int, c_int, *mut OffT, SizeT) -> SsizeT;

/// `sendfile`/`sendfile64` from a served descriptor: emulated (read, then
/// write); any other goes to `real`.
///
/// # Safety
/// libc's `sendfile`, with `real` its next definition.
unsafe fn sendfile_common(
    out: c_int,
    fd: c_int,
    off: *mut OffT,
    n: SizeT,
    real: SendfileFn,
) -> SsizeT {
    if let Some((_b, e)) = tracked(fd) {
        // SAFETY: the caller's pointer.
        return unsafe { copy_out(&e, off, out, std::ptr::null_mut(), n) };
    }
    // SAFETY: forwarding.
    unsafe { real(out, fd, off, n) }
}

/// # Safety
/// libc's `sendfile`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(out: c_int, fd: c_int, off: *mut OffT, n: SizeT) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { sendfile_common(out, fd, off, n, real!("sendfile", SendfileFn)) }
}

/// # Safety
/// libc's `sendfile64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(out: c_int, fd: c_int, off: *mut OffT, n: SizeT) -> SsizeT {
    // SAFETY: forwarding.
    unsafe { sendfile_common(out, fd, off, n, real!("sendfile64", SendfileFn)) }
}

// ---- stat ----------------------------------------------------------------

type StatFn = unsafe extern "C" fn(*const c_char, *mut libc::stat64) -> c_int;

/// # Safety
/// libc's `stat`/`lstat` contract.
unsafe fn stat_common(path: *const c_char, st: *mut libc::stat64, real: StatFn) -> c_int {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { dir::route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => return dir::stat_rel(&rel, st),
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    unsafe { real(Route::host_path(&host, path), st) }
}

/// # Safety
/// libc's `stat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn stat(path: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: forwarding.
    unsafe { stat_common(path, st, real!("stat", StatFn)) }
}

/// # Safety
/// libc's `stat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn stat64(path: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: forwarding.
    unsafe { stat_common(path, st, real!("stat64", StatFn)) }
}

/// # Safety
/// libc's `lstat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lstat(path: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: forwarding.
    unsafe { stat_common(path, st, real!("lstat", StatFn)) }
}

/// # Safety
/// libc's `lstat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lstat64(path: *const c_char, st: *mut libc::stat64) -> c_int {
    // SAFETY: forwarding.
    unsafe { stat_common(path, st, real!("lstat64", StatFn)) }
}

type FstatFn = unsafe extern "C" fn(c_int, *mut libc::stat64) -> c_int;

/// `fstat`/`fstat64`: a served descriptor reports the served file; any
/// other goes to `real`.
///
/// # Safety
/// libc's `fstat`, with `real` its next definition.
unsafe fn fstat_common(fd: c_int, st: *mut libc::stat64, real: FstatFn) -> c_int {
    if let Some((_b, e)) = tracked(fd) {
        return match e.file() {
            Ok(f) => fill_stat(&f, st),
            Err(err) => fail(err),
        };
    }
    if let Some(_b) = Busy::enter()
        && let Some(r) = dir::fstat_dirfd(fd, st)
    {
        return r;
    }
    // SAFETY: forwarding.
    unsafe { real(fd, st) }
}

/// # Safety
/// libc's `fstat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstat(fd: c_int, st: *mut libc::stat64) -> c_int {
    // SAFETY: forwarding.
    unsafe { fstat_common(fd, st, real!("fstat", FstatFn)) }
}

/// # Safety
/// libc's `fstat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstat64(fd: c_int, st: *mut libc::stat64) -> c_int {
    // SAFETY: forwarding.
    unsafe { fstat_common(fd, st, real!("fstat64", FstatFn)) }
}

type FstatatFn = unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat64, c_int) -> c_int;

/// # Safety
/// libc's `fstatat` contract.
unsafe fn fstatat_common(
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
    flags: c_int,
    real: FstatatFn,
) -> c_int {
    let fills = StatFills {
        file: fill_stat,
        dirfd: dir::fstat_dirfd,
        rel: dir::stat_rel,
    };
    // SAFETY: the caller's promise.
    let host = match unsafe { stat_served(dirfd, path, flags, st, fills) } {
        Ok(r) => return r,
        Err(host) => host,
    };
    // SAFETY: forwarding.
    unsafe { real(dirfd, Route::host_path(&host, path), st, flags) }
}

/// How a stat-like call fills its buffer `S` for a served file descriptor,
/// a served directory descriptor (`None`: not one) and a served path.
struct StatFills<S> {
    file: fn(&RemoteFile, *mut S) -> c_int,
    dirfd: fn(c_int, *mut S) -> Option<c_int>,
    rel: fn(&str, *mut S) -> c_int,
}

/// The served part of `fstatat`/`statx` on (`dirfd`, `path`, `flags`):
/// `AT_EMPTY_PATH` on a tracked descriptor, or a path that routes into the
/// served tree, is answered here (`Ok`); anything else goes to the host,
/// as the path [`dir::route`] says (`Err`).
///
/// # Safety
/// `path` is null or NUL-terminated, as `fstatat` requires.
unsafe fn stat_served<S>(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    st: *mut S,
    fills: StatFills<S>,
) -> Result<c_int, Option<CString>> {
    let Some(_b) = Busy::enter() else {
        return Err(None);
    };
    // SAFETY: the caller's promise.
    let empty = !path.is_null() && unsafe { *path } == 0;
    if empty && flags & libc::AT_EMPTY_PATH != 0 {
        if let Some(e) = entry(dirfd) {
            return Ok(match e.file() {
                Ok(f) => (fills.file)(&f, st),
                Err(err) => fail(err),
            });
        }
        return (fills.dirfd)(dirfd, st).ok_or(None);
    }
    // SAFETY: the caller's promise.
    match unsafe { dir::route(dirfd, path) } {
        Route::Served(rel) => Ok((fills.rel)(&rel, st)),
        Route::Host(p) => Err(p),
    }
}

/// # Safety
/// libc's `fstatat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstatat(
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { fstatat_common(dirfd, path, st, flags, real!("fstatat", FstatatFn)) }
}

/// # Safety
/// libc's `fstatat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fstatat64(
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat64,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { fstatat_common(dirfd, path, st, flags, real!("fstatat64", FstatatFn)) }
}

/// # Safety
/// libc's `statx`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: libc::c_uint,
    st: *mut libc::statx,
) -> c_int {
    let fills = StatFills {
        file: fill_statx,
        dirfd: dir::statx_dirfd,
        rel: dir::statx_rel,
    };
    // SAFETY: the caller's promise.
    let host = match unsafe { stat_served(dirfd, path, flags, st, fills) } {
        Ok(r) => return r,
        Err(host) => host,
    };
    let path = Route::host_path(&host, path);
    // SAFETY: forwarding.
    unsafe {
        real!(
            "statx",
            unsafe extern "C" fn(
                c_int,
                *const c_char,
                c_int,
                libc::c_uint,
                *mut libc::statx,
            ) -> c_int
        )(dirfd, path, flags, mask, st)
    }
}

// ---- mmap, munmap --------------------------------------------------------

/// # Safety
/// libc's `mmap`.
unsafe fn mmap_common(
    addr: *mut c_void,
    len: SizeT,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: OffT,
    sym: u8,
) -> *mut c_void {
    let t = if flags & libc::MAP_ANONYMOUS == 0 {
        tracked(fd)
    } else {
        None
    };
    if let Some((_b, e)) = t {
        let r = e
            .file()
            .and_then(|f| map::do_mmap(&f, &e.path, addr, len, prot, flags, off));
        return match r {
            Ok(a) => a as *mut c_void,
            Err(err) => {
                set_errno(err);
                libc::MAP_FAILED
            }
        };
    }
    // A MAP_FIXED of anything else over served pages: they stop being
    // served first.
    let _b = map::before_fixed(addr, len, flags);
    // SAFETY: forwarding.
    unsafe {
        match sym {
            0 => real!("mmap", map::MmapFn)(addr, len, prot, flags, fd, off),
            _ => real!("mmap64", map::MmapFn)(addr, len, prot, flags, fd, off),
        }
    }
}

/// # Safety
/// libc's `mmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: SizeT,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: OffT,
) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { mmap_common(addr, len, prot, flags, fd, off, 0) }
}

/// # Safety
/// libc's `mmap64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: SizeT,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: OffT,
) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { mmap_common(addr, len, prot, flags, fd, off, 1) }
}

/// # Safety
/// libc's `munmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: SizeT) -> c_int {
    // SAFETY: forwarding.
    unsafe { map::munmap(addr, len) }
}

/// libc's `mremap` is variadic: the new address comes only with
/// `MREMAP_FIXED`, and is read only then (on x86-64 and aarch64 a variadic
/// pointer travels where a fifth fixed argument does, as `open`'s mode).
///
/// # Safety
/// libc's `mremap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: SizeT,
    new_len: SizeT,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { map::mremap(old, old_len, new_len, flags, new_addr) }
}

// ---- fopen ---------------------------------------------------------------

#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, SizeT) -> SsizeT>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, SizeT) -> SsizeT>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

unsafe extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut libc::FILE;
}

/// # Safety
/// `cookie` is a descriptor this shim made.
unsafe extern "C" fn cookie_read(cookie: *mut c_void, buf: *mut c_char, n: SizeT) -> SsizeT {
    let fd = cookie as usize as c_int;
    // SAFETY: read(2)'s contract, passed on from the stream's buffer.
    unsafe { read(fd, buf.cast(), n) }
}

/// # Safety
/// `cookie` is a descriptor this shim made; `off` is valid.
unsafe extern "C" fn cookie_seek(cookie: *mut c_void, off: *mut i64, whence: c_int) -> c_int {
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
unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: closes the stream's own descriptor.
    unsafe { close(cookie as usize as c_int) }
}

type FopenFn = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;

/// # Safety
/// libc's `fopen` contract.
unsafe fn fopen_common(path: *const c_char, mode: *const c_char, real: FopenFn) -> *mut libc::FILE {
    let route = match Busy::enter() {
        // SAFETY: the caller's promise.
        Some(_b) => unsafe { dir::route(libc::AT_FDCWD, path) },
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

/// # Safety
/// libc's `fopen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    // SAFETY: forwarding.
    unsafe { fopen_common(path, mode, real!("fopen", FopenFn)) }
}

/// # Safety
/// libc's `fopen64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    // SAFETY: forwarding.
    unsafe { fopen_common(path, mode, real!("fopen64", FopenFn)) }
}

// ---- fork ----------------------------------------------------------------

type Held = (
    ForkGuard<'static, Option<Client>>,
    ForkGuard<'static, State>,
    ForkGuard<'static, Vec<map::Map>>,
);

thread_local! {
    /// The locks the forking thread holds across fork.
    static HELD: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

extern "C" fn before_fork() {
    // Made here, not first in the child: a child would wait forever on a
    // OnceLock another parent thread was initialising at the fork.
    let _ = map::past_eof_fd();
    // Held across fork so the child's copies are consistent; released in
    // both processes below (fork returns in the same thread).
    let held = (CLIENT.lock(), STATE.lock(), map::MAPS.lock());
    let _ = HELD.try_with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn after_fork_parent() {
    // Dropping the guards releases the locks.
    let _ = HELD.try_with(|h| drop(h.borrow_mut().take()));
}

/// In the child: the connection is the parent's (its requests would mix
/// with the parent's). The connection and the open files are forgotten,
/// never dropped (dropping would speak on the parent's connection or join
/// threads the child does not have). The child's copies of descriptors of
/// served files keep working: each opens its path again on the child's own
/// connection (made on first use), at the offset it had at the fork (from
/// then on the parent's and the child's offsets are separate, unlike a
/// shared open file description). Lazy mappings are not inherited
/// (`MADV_DONTFORK`): each is mapped again at its address on the child's
/// own connection before `fork` returns ([`map::remap_in_child`]).
extern "C" fn after_fork_child() {
    vfork::own();
    let mut parent_maps = Vec::new();
    let _ = HELD.try_with(|h| {
        if let Some((mut c, mut st, mut maps)) = h.borrow_mut().take() {
            std::mem::forget(c.take());
            parent_maps = std::mem::take(&mut *maps);
            let old = std::mem::take(&mut st.fds);
            // Descriptors that shared an entry (dups) share the new one.
            let mut fresh: Vec<(*const Entry, Arc<Entry>)> = Vec::new();
            for (fd, e) in old.iter() {
                let key = Arc::as_ptr(e);
                let n = match fresh.iter().find(|(k, _)| *k == key) {
                    Some((_, n)) => n.clone(),
                    None => {
                        let n = Arc::new(Entry {
                            path: e.path.clone(),
                            file: Mutex::new(None),
                            pos: AtomicU64::new(e.pos.load(Ordering::SeqCst)),
                        });
                        fresh.push((key, n.clone()));
                        n
                    }
                };
                st.fds.insert(*fd, n);
            }
            std::mem::forget(old);
        }
    });
    if parent_maps.is_empty() {
        return;
    }
    match Busy::enter() {
        Some(_b) => map::remap_in_child(parent_maps),
        // Forked from inside the shim: nothing can be mapped again here.
        None => std::mem::forget(parent_maps),
    }
}

extern "C" fn init() {
    if audit::in_audit_namespace() {
        return;
    }
    vfork::own();
    exec::adopt();
    // SAFETY: three valid handlers with no preconditions.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        )
    };
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
