//! A typed userfaultfd handle above the raw ABI in [`super::uffd_abi`].
//! With the probe, this is the only module that issues userfaultfd calls;
//! the probe owns the feature constants, and this module imports them.

use super::probe::{self, Probe, REQUIRED_FEATURES, probe};
use super::uffd_abi as sys;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Features the engine asks for when the kernel has them. THREAD_ID lets
/// the fault service see which thread faulted, and so on which CPU it
/// waits (see `fault::service`).
pub(crate) const WANTED_FEATURES: u64 = sys::UFFD_FEATURE_MISSING_SHMEM
    | sys::UFFD_FEATURE_MINOR_SHMEM
    | sys::UFFD_FEATURE_EXACT_ADDRESS
    | sys::UFFD_FEATURE_POISON
    | sys::UFFD_FEATURE_THREAD_ID;
/// Registration mode of every consumer range: a fault for a page absent from
/// the memfd (MISSING) and for a page present there but not yet mapped in
/// this range (MINOR).
pub(crate) const CONSUMER_MODE: u64 =
    sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_MINOR;

/// A page-fault event read from the userfaultfd.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub address: u64,
    /// The faulting thread's id, or 0 where `UFFD_FEATURE_THREAD_ID` was
    /// not negotiated.
    pub tid: u32,
}

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// Opens a userfaultfd fit for lazy shadows, the way [`probe`] found to
    /// work, non-blocking and close-on-exec, negotiating the wanted features
    /// the kernel offers. Returns the probe too; on failure, the probe says
    /// why.
    pub(crate) fn open() -> Result<(Uffd, Probe), Probe> {
        let mut p = probe();
        let access = match p.access {
            Some(a) if p.lazy_usable => a,
            _ => return Err(p),
        };
        let features = p.features & WANTED_FEATURES;
        let opened = probe::create(access).and_then(|fd| {
            sys::api(fd.as_fd(), features)?;
            Ok(fd)
        });
        match opened {
            Ok(fd) => Ok((Uffd { fd, features }, p)),
            Err(e) => {
                p.lazy_usable = false;
                p.reason = Some(format!("opening the engine's userfaultfd failed: {e}"));
                Err(p)
            }
        }
    }

    /// Wraps a userfaultfd received from another process, which negotiated
    /// `features` (as it says) and registered its own ranges.
    pub(crate) fn from_fd(fd: OwnedFd, features: u64) -> Uffd {
        Uffd { fd, features }
    }

    /// Whether fault messages carry the faulting thread's id.
    pub(crate) fn has_thread_id(&self) -> bool {
        self.features & sys::UFFD_FEATURE_THREAD_ID != 0
    }

    /// Negotiated features (`UFFD_FEATURE_*` bits).
    pub(crate) fn features(&self) -> u64 {
        self.features
    }

    /// Whether every feature lazy shadows need was negotiated.
    pub(crate) fn has_lazy_features(&self) -> bool {
        self.features & REQUIRED_FEATURES == REQUIRED_FEATURES
    }

    /// Registers `start..start+len` for MISSING and MINOR faults
    /// ([`CONSUMER_MODE`]). Fails with `EPERM` on a shared mapping made after
    /// `F_SEAL_FUTURE_WRITE` (it lacks `VM_MAYWRITE`).
    pub(crate) fn register(&self, start: u64, len: u64) -> io::Result<u64> {
        let ioctls = sys::register(self.fd.as_fd(), start, len, CONSUMER_MODE)?;
        if ioctls & sys::UFFDIO_CONTINUE_BIT == 0 {
            let _ = sys::unregister(self.fd.as_fd(), start, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "UFFDIO_CONTINUE is not available on this range",
            ));
        }
        Ok(ioctls)
    }

    /// Registers `start..start+len` for MISSING faults only: the engine's
    /// fill alias, whose present pages map without a fault.
    pub(crate) fn register_missing(&self, start: u64, len: u64) -> io::Result<u64> {
        sys::register(
            self.fd.as_fd(),
            start,
            len,
            sys::UFFDIO_REGISTER_MODE_MISSING,
        )
    }

    /// Maps the memfd's pages of `start..start+len` (all present in its page
    /// cache) into the registered range and wakes the threads waiting there.
    /// A page already mapped (`EEXIST`) is skipped and woken. Returns the
    /// first other error.
    pub(crate) fn continue_range(&self, start: u64, len: u64) -> io::Result<()> {
        let page = crate::page_size() as u64;
        let end = start + len;
        let mut at = start;
        while at < end {
            let r = super::sched::waking(|| sys::continue_range(self.fd.as_fd(), at, end - at, 0));
            match r {
                Ok(_) => return Ok(()),
                Err((e, n)) => {
                    at += n;
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => {}
                        Some(libc::EEXIST) => {
                            let _ = self.wake(at, page);
                            at += page;
                        }
                        _ => {
                            let _ = self.wake(at, end - at);
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        sys::unregister(self.fd.as_fd(), start, len)
    }

    pub(crate) fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        super::sched::waking(|| sys::wake(self.fd.as_fd(), start, len))
    }

    /// Installs `src` at `dst` with `UFFDIO_COPY` (without waking anyone),
    /// resuming after partial copies and retrying `EAGAIN`. On failure,
    /// returns the error and the bytes installed before it; `EEXIST` means
    /// the page at `dst + done` was present already.
    ///
    /// # Safety
    /// `dst..dst+src.len()` must lie in a range registered with this uffd by
    /// this crate, and `src` must not be registered memory (the copy would
    /// fault into ourselves).
    pub(crate) unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<(), (io::Error, u64)> {
        // SAFETY: forwarded from the caller.
        unsafe {
            self.copy_mode(
                dst,
                src.as_ptr(),
                src.len() as u64,
                sys::UFFDIO_COPY_MODE_DONTWAKE,
            )
        }
    }

    /// Like [`Uffd::copy`], but each installed part wakes the threads
    /// waiting on it: a fill straight into the range a thread faulted in.
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub(crate) unsafe fn copy_waking(&self, dst: u64, src: &[u8]) -> Result<(), (io::Error, u64)> {
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_mode(dst, src.as_ptr(), src.len() as u64, 0) }
    }

    /// Like [`Uffd::copy`] (`wake`: [`Uffd::copy_waking`]) from the `len`
    /// bytes at address `src`, which the kernel reads and this process never
    /// does: a page there that cannot be read (a file mapping past the
    /// file's end) fails the copy with `EFAULT` instead of raising a signal.
    ///
    /// # Safety
    /// As for [`Uffd::copy`]; `src..src+len` must be a mapping that stays
    /// mapped during the call, whose bytes may be shown to consumers.
    pub(crate) unsafe fn copy_from(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        wake: bool,
    ) -> Result<(), (io::Error, u64)> {
        let mode = if wake {
            0
        } else {
            sys::UFFDIO_COPY_MODE_DONTWAKE
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_mode(dst, src as *const u8, len, mode) }
    }

    /// # Safety
    /// As for [`Uffd::copy`], with `src..src+len` in place of `src`.
    unsafe fn copy_mode(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        mode: u64,
    ) -> Result<(), (io::Error, u64)> {
        let mut done = 0u64;
        while done < len {
            let copy = || {
                // SAFETY: forwarded from the caller; `src + done` is within `src..src+len`.
                unsafe {
                    sys::copy(
                        self.fd.as_fd(),
                        dst + done,
                        src.wrapping_add(done as usize),
                        len - done,
                        mode,
                    )
                }
            };
            let r = if mode & sys::UFFDIO_COPY_MODE_DONTWAKE == 0 {
                super::sched::waking(copy)
            } else {
                copy()
            };
            match r {
                Ok(n) => done += n,
                Err((e, n)) => {
                    done += n;
                    if e.raw_os_error() != Some(libc::EAGAIN) {
                        return Err((e, done));
                    }
                }
            }
        }
        Ok(())
    }

    /// Poisons `len` bytes at `start` and wakes waiters there. A page whose
    /// marker is present already (poisoned by an earlier answer) is woken
    /// instead: a thread may have started waiting on it after that answer's
    /// wake. Any other failure also ends in a wake, so no thread is left
    /// waiting; it faults again and is answered again.
    pub(crate) fn poison(&self, start: u64, len: u64) -> io::Result<()> {
        let page = crate::page_size() as u64;
        let mut at = start;
        while at < start + len {
            match sys::poison(self.fd.as_fd(), at, start + len - at, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let _ = self.wake(at, page);
                    at += page;
                }
                Err(e) => {
                    let _ = self.wake(at, start + len - at);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Whether a message is waiting to be read (a `poll` with no timeout).
    pub(crate) fn has_pending(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Reads up to `out.len()` page faults without blocking. Events other than
    /// page faults are not requested and are skipped if they ever appear.
    pub(crate) fn read_faults(
        &self,
        raw: &mut [sys::uffd_msg],
        out: &mut Vec<Fault>,
    ) -> io::Result<()> {
        let bytes = std::mem::size_of_val(raw);
        // SAFETY: `raw` is a writable buffer of `bytes` bytes of plain-old-data structs.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let count = n as usize / std::mem::size_of::<sys::uffd_msg>();
        out.extend(
            raw[..count]
                .iter()
                .filter(|m| m.event == sys::UFFD_EVENT_PAGEFAULT)
                .map(|m| Fault {
                    address: m.arg1,
                    // `feat.ptid`: the first four bytes of the third word.
                    tid: {
                        let b = m.arg2.to_ne_bytes();
                        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                    },
                }),
        );
        Ok(())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
