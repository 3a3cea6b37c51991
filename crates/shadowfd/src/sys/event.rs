//! eventfd and epoll handles for the fault service's sleeping workers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with valid flags; returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd just returned this descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter (makes it readable).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// Resets a non-blocking eventfd's counter.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
}

/// An epoll set.
pub(crate) struct Epoll {
    ep: OwnedFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 with a valid flag; returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 just returned this descriptor; we own it.
        let ep = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { ep })
    }

    /// `EPOLL_CTL_ADD` of `target` for `events`, reported with `tag`.
    pub(crate) fn add(&self, target: BorrowedFd<'_>, events: u32, tag: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: tag };
        // SAFETY: `ev` is a live epoll_event; both descriptors are open.
        let r = unsafe {
            libc::epoll_ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                target.as_raw_fd(),
                &mut ev,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for events (`timeout_ms` < 0: for ever); returns the tags.
    pub(crate) fn wait(&self, out: &mut [u64], timeout_ms: i32) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let max = out.len().min(evs.len()) as i32;
        // SAFETY: `evs` is a live array of at least `max` epoll_event structs.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), max, timeout_ms) };
        let n = n.max(0) as usize;
        for (o, e) in out.iter_mut().zip(&evs[..n]) {
            *o = e.u64;
        }
        n
    }
}
