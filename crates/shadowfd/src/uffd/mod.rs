//! A typed userfaultfd handle above the raw ABI in [`sys`], plus the
//! capability probe. This is the only module that talks to userfaultfd.

mod probe;
pub(crate) mod sys;

pub use probe::{Access, Attempt, Probe, probe};

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Features the engine asks for when the kernel has them.
pub(crate) const WANTED_FEATURES: u64 =
    sys::UFFD_FEATURE_MISSING_SHMEM | sys::UFFD_FEATURE_EXACT_ADDRESS | sys::UFFD_FEATURE_POISON;
/// Features without which lazy shadows cannot work.
/// POISON is required so that a source read error reaches the consumer as
/// SIGBUS; without it the only alternatives are zeros or a hung thread.
pub(crate) const REQUIRED_FEATURES: u64 =
    sys::UFFD_FEATURE_MISSING_SHMEM | sys::UFFD_FEATURE_POISON;

/// A page-fault event read from the userfaultfd.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub address: u64,
}

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// `None` for a userfaultfd received from another process.
    access: Option<Access>,
}

impl Uffd {
    /// Opens a userfaultfd fit for lazy shadows, the way [`probe`] found to
    /// work, non-blocking and close-on-exec, negotiating the wanted features
    /// the kernel offers. Returns the probe too; on failure, the probe says
    /// why.
    pub fn open() -> Result<(Uffd, Probe), Probe> {
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
            Ok(fd) => Ok((
                Uffd {
                    fd,
                    features,
                    access: Some(access),
                },
                p,
            )),
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
        Uffd {
            fd,
            features,
            access: None,
        }
    }

    /// Negotiated features (`UFFD_FEATURE_*` bits).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether `UFFDIO_POISON` was offered.
    pub fn has_poison(&self) -> bool {
        self.features & sys::UFFD_FEATURE_POISON != 0
    }

    /// How this descriptor was obtained (`None`: received from another
    /// process).
    pub fn access(&self) -> Option<Access> {
        self.access
    }

    pub(crate) fn register(&self, start: u64, len: u64) -> io::Result<u64> {
        sys::register_missing(self.fd.as_fd(), start, len)
    }

    pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        sys::unregister(self.fd.as_fd(), start, len)
    }

    pub(crate) fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        sys::wake(self.fd.as_fd(), start, len)
    }

    /// Installs `src` at `dst`, resuming after partial copies and retrying
    /// EAGAIN (the address space changed under the copy). Does not wake
    /// waiters. On failure, returns the error and the bytes installed before
    /// it. EEXIST is a failure: chunks are claimed exclusively, so a present
    /// page means something filled the memfd outside the protocol, and its
    /// bytes cannot be vouched for.
    ///
    /// # Safety
    /// `dst..dst+src.len()` must lie in a range registered with this uffd by
    /// this crate, and `src` must not be registered memory (the copy would
    /// fault into ourselves).
    pub(crate) unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<(), (io::Error, u64)> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            // SAFETY: forwarded from the caller; `src[done..]` is in bounds.
            let r = unsafe {
                sys::copy(
                    self.fd.as_fd(),
                    dst + done,
                    src.as_ptr().add(done as usize),
                    len - done,
                    sys::UFFDIO_COPY_MODE_DONTWAKE,
                )
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
                .map(|m| Fault { address: m.arg1 }),
        );
        Ok(())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Renders `UFFD_FEATURE_*` bits as names.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    sys::FEATURE_NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}
