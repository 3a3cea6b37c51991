//! Reading served descriptors: `read`, `pread`, `readv`, `preadv`,
//! `preadv2`, `lseek`, and the copies out of them (`copy_file_range`,
//! `sendfile`), emulated as a read then a write.

use crate::errno::io_err;
use crate::fdtable::{Entry, entry, tracked};
use crate::readahead::read_ahead;
use crate::{Busy, OffT, SizeT, SsizeT, fail, set_errno};
use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;

/// Reads up to `n` bytes of `e` into `buf`, at `at` or at (and moving)
/// its offset; -1 with errno set on failure.
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
    // Random reads of a large file: through the shim's mapping
    // (`mapread.rs`); what it could not copy, and every other read,
    // through FILL.
    let got = match e.mapped.read(&file, slice, off) {
        Some(k) if k == slice.len() || off + k as u64 >= file.size() => Ok(k),
        Some(k) => read_ahead(&file, &mut slice[k..], off + k as u64).map(|m| k + m),
        None => read_ahead(&file, slice, off),
    };
    match got {
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

/// `lseek` of a served file: moves (and returns) its offset.
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

pub(crate) type PreadFn = unsafe extern "C" fn(c_int, *mut c_void, SizeT, OffT) -> SsizeT;

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

twins! {
    [pread, pread64] fn(fd: c_int, buf: *mut c_void, n: SizeT, off: OffT) -> SsizeT,
    real: PreadFn => {
        // SAFETY: forwarding.
        unsafe { pread_common(fd, buf, n, off, real) }
    }
}

twins! {
    [lseek, lseek64] fn(fd: c_int, off: OffT, whence: c_int) -> OffT,
    real: unsafe extern "C" fn(c_int, OffT, c_int) -> OffT => {
        if let Some((_b, e)) = tracked(fd) {
            return seek_entry(&e, off, whence);
        }
        // SAFETY: forwarding.
        unsafe { real(fd, off, whence) }
    }
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

twins! {
    [preadv, preadv64] fn(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: OffT) -> SsizeT,
    real: PreadvFn => {
        // SAFETY: forwarding.
        unsafe { preadv_common(fd, iov, cnt, off, real) }
    }
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

twins! {
    [preadv2, preadv64v2] fn(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: OffT, flags: c_int) -> SsizeT,
    real: Preadv2Fn => {
        // SAFETY: forwarding.
        unsafe { preadv2_common(fd, iov, cnt, off, flags, real) }
    }
}

/// Copies up to `len` bytes of `e` (at `*off` or its offset) to `out`.
///
/// # Safety
/// `off` is null or points to a readable and writable offset; `out_off`
/// likewise.
unsafe fn copy_out(e: &Entry, off: *mut i64, out: c_int, out_off: *mut i64, len: usize) -> SsizeT {
    // SAFETY: the caller's promise.
    let at = (!off.is_null()).then(|| unsafe { *off });
    if at.is_some_and(|a| a < 0) {
        return fail(libc::EINVAL) as SsizeT;
    }
    // No more than the file has left: `cp` asks `copy_file_range` for a
    // gigabyte at a time, and a zeroed 1 MiB buffer per small file was most
    // of what `cp -r` cost under `run` (2026-12-07).
    let pos = at.map_or_else(|| e.pos.load(Ordering::SeqCst), |a| a as u64);
    let left = e.file().map_or(u64::MAX, |f| f.size().saturating_sub(pos));
    let n = len
        .min(1 << 20)
        .min(usize::try_from(left).unwrap_or(usize::MAX));
    let mut buf = vec![0u8; n];
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

twins! {
    [sendfile, sendfile64] fn(out: c_int, fd: c_int, off: *mut OffT, n: SizeT) -> SsizeT,
    real: SendfileFn => {
        // SAFETY: forwarding.
        unsafe { sendfile_common(out, fd, off, n, real) }
    }
}
