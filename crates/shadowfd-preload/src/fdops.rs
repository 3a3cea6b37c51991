//! Calls on descriptors that are not reads: `close`, `dup*`,
//! `close_range`, `fcntl` (locks, `F_GETFL`, `F_DUPFD`), and the calls
//! that make new descriptors (`socket`, `pipe`, `memfd_create`, ...),
//! whose numbers can never be served ones.

use crate::fdtable::{close_forgetting, dup_done, fresh, tracked};
use crate::{Busy, fail, set_errno};
use std::ffi::{c_char, c_int};

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
pub(crate) fn lock(cmd: c_int, fl: *mut libc::flock) -> c_int {
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

twins! {
    /// `fcntl` (the third argument read as a long, as glibc does): on a
    /// served descriptor, `F_GETFL` and the record locks are answered here;
    /// an `F_DUPFD` of one is tracked.
    [fcntl, fcntl64] fn(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int,
    real: unsafe extern "C" fn(c_int, c_int, ...) -> c_int => {
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
    let r = unsafe { real(fd, cmd, arg) };
    if b.is_some() && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        dup_done(fd, r);
    }
    r
}
}
