//! Kernel-mediated reads of served mappings without a full userfaultfd
//! (docs/run.md, "Writing a served mapping to a descriptor").
//!
//! A process that may only make a user-mode-only userfaultfd (an
//! unprivileged one where `vm.unprivileged_userfaultfd=0`) has its lazy
//! mappings served only for faults taken in user space: when the kernel
//! itself touches an unfilled page (`write(2)` from a mapping to a pipe),
//! the fault is not delivered and the call fails with `EFAULT`. So every
//! intercepted call that hands memory to the kernel to read first makes
//! the pages of that memory which lie in served mappings present, by
//! reading one byte of each page from user space; the call then finds them
//! filled. A raw system call does not come through here and gets `EFAULT`
//! (never zeros). With a full userfaultfd this costs one touch per page,
//! which the kernel would have faulted anyway.
//!
//! The pages are touched outside the mapping table's lock: a fault is
//! answered by the server, and holding the lock across it would stall
//! every `mmap`/`munmap` of the process behind one fill.

use crate::map::served_spans;
use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;

type SizeT = libc::size_t;
type SsizeT = libc::ssize_t;

/// Makes the served pages of `buf..buf+len` present (see the module).
pub(crate) fn prefault(buf: *const c_void, len: usize) {
    if buf.is_null() || len == 0 || !crate::map::ANY_MAP.load(Ordering::Acquire) {
        return;
    }
    // Not from inside the shim: a signal handler's `write` on a thread
    // that holds the mapping table's lock must not wait for it (and the
    // shim's own writes are of its own buffers).
    let Some(_b) = crate::Busy::enter() else {
        return;
    };
    let pg = crate::page();
    for (s, e) in served_spans(buf as usize, len) {
        let mut p = s & !(pg - 1);
        while p < e {
            // SAFETY: `p` is inside a live served mapping (readable); a
            // volatile read makes the page present, as the kernel's own
            // access would have needed.
            unsafe { std::ptr::read_volatile(p as *const u8) };
            p += pg;
        }
    }
}

/// [`prefault`] for each buffer of an iovec array.
///
/// # Safety
/// `iov` is null or points to `cnt` iovecs.
unsafe fn prefault_iov(iov: *const libc::iovec, cnt: c_int) {
    if iov.is_null() || !(0..=libc::UIO_MAXIOV).contains(&cnt) {
        return;
    }
    for i in 0..cnt as usize {
        // SAFETY: the caller's promise.
        let v = unsafe { *iov.add(i) };
        prefault(v.iov_base, v.iov_len);
    }
}

/// # Safety
/// libc's `write`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: SizeT) -> SsizeT {
    prefault(buf, n);
    // SAFETY: forwarding.
    unsafe {
        real!(
            "write",
            unsafe extern "C" fn(c_int, *const c_void, SizeT) -> SsizeT
        )(fd, buf, n)
    }
}

type PwriteFn = unsafe extern "C" fn(c_int, *const c_void, SizeT, libc::off_t) -> SsizeT;

twins! {
    [pwrite, pwrite64] fn(fd: c_int, buf: *const c_void, n: SizeT, off: libc::off_t) -> SsizeT,
    real: PwriteFn => {
        prefault(buf, n);
        // SAFETY: forwarding.
        unsafe { real(fd, buf, n, off) }
    }
}

/// # Safety
/// libc's `writev`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> SsizeT {
    // SAFETY: writev's contract.
    unsafe { prefault_iov(iov, cnt) };
    // SAFETY: forwarding.
    unsafe {
        real!(
            "writev",
            unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> SsizeT
        )(fd, iov, cnt)
    }
}

type PwritevFn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int, libc::off_t) -> SsizeT;

twins! {
    [pwritev, pwritev64] fn(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: libc::off_t) -> SsizeT,
    real: PwritevFn => {
        // SAFETY: pwritev's contract.
        unsafe { prefault_iov(iov, cnt) };
        // SAFETY: forwarding.
        unsafe { real(fd, iov, cnt, off) }
    }
}

/// # Safety
/// libc's `send`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: SizeT, flags: c_int) -> SsizeT {
    prefault(buf, n);
    // SAFETY: forwarding.
    unsafe {
        real!(
            "send",
            unsafe extern "C" fn(c_int, *const c_void, SizeT, c_int) -> SsizeT
        )(fd, buf, n, flags)
    }
}

/// # Safety
/// libc's `sendto`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: SizeT,
    flags: c_int,
    to: *const libc::sockaddr,
    tolen: libc::socklen_t,
) -> SsizeT {
    prefault(buf, n);
    // SAFETY: forwarding.
    unsafe {
        real!(
            "sendto",
            unsafe extern "C" fn(
                c_int,
                *const c_void,
                SizeT,
                c_int,
                *const libc::sockaddr,
                libc::socklen_t,
            ) -> SsizeT
        )(fd, buf, n, flags, to, tolen)
    }
}

/// # Safety
/// libc's `sendmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> SsizeT {
    if !msg.is_null() {
        // SAFETY: sendmsg's contract: a valid msghdr.
        let m = unsafe { &*msg };
        // SAFETY: its iovec array.
        unsafe { prefault_iov(m.msg_iov, m.msg_iovlen as c_int) };
    }
    // SAFETY: forwarding.
    unsafe {
        real!(
            "sendmsg",
            unsafe extern "C" fn(c_int, *const libc::msghdr, c_int) -> SsizeT
        )(fd, msg, flags)
    }
}

/// # Safety
/// libc's `vmsplice`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vmsplice(
    fd: c_int,
    iov: *const libc::iovec,
    cnt: SizeT,
    flags: libc::c_uint,
) -> SsizeT {
    // SAFETY: vmsplice's contract.
    unsafe { prefault_iov(iov, cnt.min(libc::UIO_MAXIOV as usize) as c_int) };
    // SAFETY: forwarding.
    unsafe {
        real!(
            "vmsplice",
            unsafe extern "C" fn(c_int, *const libc::iovec, SizeT, libc::c_uint) -> SsizeT
        )(fd, iov, cnt, flags)
    }
}

/// # Safety
/// libc's `fwrite` (glibc writes its buffer, or a large one straight from
/// the caller's memory, with internal calls).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fwrite(
    buf: *const c_void,
    size: SizeT,
    n: SizeT,
    f: *mut libc::FILE,
) -> SizeT {
    prefault(buf, size.saturating_mul(n));
    // SAFETY: forwarding.
    unsafe {
        real!(
            "fwrite",
            unsafe extern "C" fn(*const c_void, SizeT, SizeT, *mut libc::FILE) -> SizeT
        )(buf, size, n, f)
    }
}
