//! A typed userfaultfd handle above the raw ABI in [`super::uffd_abi`].
//! With the probe, this is the only module that issues userfaultfd calls;
//! the probe owns the feature constants, and this module imports them.

use super::probe::{self, Probe, REQUIRED_FEATURES, probe};
use super::uffd_abi as sys;
use parking_lot::Mutex;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Features the engine asks for when the kernel has them. THREAD_ID lets
/// the fault service see which thread faulted, and so on which CPU it
/// waits (see `fault::service`).
pub(crate) const WANTED_FEATURES: u64 = sys::UFFD_FEATURE_MISSING_SHMEM
    | sys::UFFD_FEATURE_MINOR_SHMEM
    | sys::UFFD_FEATURE_EXACT_ADDRESS
    | sys::UFFD_FEATURE_POISON
    | sys::UFFD_FEATURE_THREAD_ID
    | EVENT_FEATURES;
/// The mapping events the engine, its clients and `shadowfd run` negotiate
/// so that a consumer range stays registered, and the engine's table of
/// ranges exact, whatever the consumer does with its mapping: `mremap`
/// (REMAP: the moved range stays registered), `fork` (FORK: the child's
/// copy is registered with a new userfaultfd that the reader receives) and
/// `munmap` (UNMAP). Without REMAP and FORK the kernel drops the
/// registration of a moved or inherited range, whose holes then read as
/// zeros. `EVENT_REMOVE` is not asked for: `MADV_DONTNEED` leaves a range
/// registered (a later touch faults again and is served), so the event
/// would tell nothing and make every such call wait for the service.
pub(crate) const EVENT_FEATURES: u64 =
    sys::UFFD_FEATURE_EVENT_FORK | sys::UFFD_FEATURE_EVENT_REMAP | sys::UFFD_FEATURE_EVENT_UNMAP;
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

/// Creates a userfaultfd by `access` and negotiates `wanted`. The kernel
/// gives `EVENT_FORK` only to a process with `CAP_SYS_PTRACE` (`EPERM`
/// otherwise): then it is negotiated without it, and lazy mappings are kept
/// out of forked children (`MADV_DONTFORK`) instead of followed into them.
pub(crate) fn open_with(access: probe::Access, wanted: u64) -> io::Result<(OwnedFd, u64)> {
    let fd = probe::create(access)?;
    match sys::api(fd.as_fd(), wanted) {
        Ok(_) => Ok((fd, wanted)),
        Err(e)
            if e.raw_os_error() == Some(libc::EPERM)
                && wanted & sys::UFFD_FEATURE_EVENT_FORK != 0 =>
        {
            let fd = probe::create(access)?;
            let features = wanted & !sys::UFFD_FEATURE_EVENT_FORK;
            sys::api(fd.as_fd(), features)?;
            Ok((fd, features))
        }
        Err(e) => Err(e),
    }
}

/// A mapping event read from a userfaultfd (`UFFD_EVENT_*` but page
/// faults), in the order the kernel queued it.
#[derive(Debug)]
pub(crate) enum Event {
    /// The address space forked: the child's copies of the registered
    /// ranges are registered with this new userfaultfd (same features).
    Fork(OwnedFd),
    /// `from..from+len` moved to `to` (`mremap`). The old range follows as
    /// an [`Event::Unmap`] unless `MREMAP_DONTUNMAP` kept it. A range grown
    /// as it moved reports its old length; the grown part is registered too.
    Remap { from: u64, to: u64, len: u64 },
    /// `MADV_DONTNEED`/`MADV_REMOVE` of a range (only if negotiated: a
    /// client may have): the range stays registered.
    Remove,
    /// `start..end` was unmapped.
    Unmap { start: u64, end: u64 },
}

/// Userfaultfds of this process with answers deferred
/// ([`Uffd::has_deferred`]): whether any must be looked at, in one load.
static DEFERRED: AtomicUsize = AtomicUsize::new(0);

/// Whether some userfaultfd has answers deferred for a pending event.
pub(crate) fn any_deferred() -> bool {
    DEFERRED.load(Ordering::Acquire) > 0
}

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// Ranges whose waiting threads could not be answered because an event
    /// was pending (`EAGAIN`): they are woken by [`Uffd::flush_deferred`]
    /// once the events are read, fault again and are answered afresh.
    deferred: Mutex<Vec<(u64, u64)>>,
    has_deferred: AtomicBool,
}

impl Drop for Uffd {
    fn drop(&mut self) {
        if *self.has_deferred.get_mut() {
            DEFERRED.fetch_sub(1, Ordering::AcqRel);
        }
    }
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
        let wanted = p.features & WANTED_FEATURES;
        let opened = open_with(access, wanted);
        match opened {
            Ok((fd, features)) => Ok((Uffd::from_fd(fd, features), p)),
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
            deferred: Mutex::new(Vec::new()),
            has_deferred: AtomicBool::new(false),
        }
    }

    /// Whether the mapping events ([`EVENT_FEATURES`]) were negotiated.
    pub(crate) fn has_events(&self) -> bool {
        self.features & EVENT_FEATURES == EVENT_FEATURES
    }

    /// Whether a forked child's copy of a registered range stays registered
    /// (`EVENT_FORK`): if not, lazy mappings must be `MADV_DONTFORK`, or the
    /// child would read their holes as zeros.
    pub(crate) fn follows_fork(&self) -> bool {
        self.features & sys::UFFD_FEATURE_EVENT_FORK != 0
    }

    /// Whether the address space this userfaultfd serves still exists: a
    /// `UFFDIO_WRITEPROTECT` that changes nothing (no range of the crate's
    /// is registered for write-protection) fails with `ESRCH` once the
    /// process exited or exec'd. The only way to learn that a forked
    /// child's userfaultfd serves nobody any more.
    pub(crate) fn alive(&self) -> bool {
        let page = crate::page_size() as u64;
        // Any valid range will do: the call finds no write-protected range.
        let r = sys::writeprotect(self.fd.as_fd(), 1 << 20, page, 0);
        !matches!(r, Err(e) if e.raw_os_error() == Some(libc::ESRCH))
    }

    /// Whether an event of this address space is under way (`EAGAIN` from
    /// the same no-op `UFFDIO_WRITEPROTECT` as [`Uffd::alive`]): until the
    /// reader has read it, the kernel may have let go of addresses that the
    /// event will name.
    pub(crate) fn changing(&self) -> bool {
        let page = crate::page_size() as u64;
        let r = sys::writeprotect(self.fd.as_fd(), 1 << 20, page, 0);
        matches!(r, Err(e) if e.raw_os_error() == Some(libc::EAGAIN))
    }

    /// Notes that the threads waiting in `start..start+len` could not be
    /// answered for a pending event: [`Uffd::flush_deferred`] wakes them.
    fn defer(&self, start: u64, len: u64) {
        self.deferred.lock().push((start, len));
        if !self.has_deferred.swap(true, Ordering::AcqRel) {
            DEFERRED.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether answers wait for [`Uffd::flush_deferred`].
    pub(crate) fn has_deferred(&self) -> bool {
        self.has_deferred.load(Ordering::Acquire)
    }

    /// Wakes the threads whose answers were deferred for a pending event:
    /// each faults again and is answered afresh (from the table as the
    /// events left it). Call after reading the events; a wake is never
    /// refused for a pending event.
    pub(crate) fn flush_deferred(&self) {
        if !self.has_deferred.swap(false, Ordering::AcqRel) {
            return;
        }
        DEFERRED.fetch_sub(1, Ordering::AcqRel);
        let ranges = std::mem::take(&mut *self.deferred.lock());
        for (start, len) in ranges {
            let _ = self.wake(start, len);
        }
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
    /// A page already mapped (`EEXIST`) is skipped and woken. With an event
    /// pending (`EAGAIN`) the rest is deferred ([`Uffd::flush_deferred`]).
    /// Returns the first other error.
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
                        // An event is pending: never spin (the reader of
                        // the event may be this very thread's caller).
                        Some(libc::EAGAIN) => {
                            self.defer(at, end - at);
                            return Ok(());
                        }
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
    /// resuming after partial copies. On failure, returns the error and the
    /// bytes installed before it; `EEXIST` means the page at `dst + done`
    /// was present already, `EAGAIN` that an event is pending on this
    /// userfaultfd (read the events, then copy the rest).
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
                    return Err((e, done));
                }
            }
        }
        Ok(())
    }

    /// Poisons `len` bytes at `start` and wakes waiters there. A page whose
    /// marker is present already (poisoned by an earlier answer) is woken
    /// instead: a thread may have started waiting on it after that answer's
    /// wake. With an event pending (`EAGAIN`) the wake is deferred
    /// ([`Uffd::flush_deferred`]). Any other failure also ends in a wake, so
    /// no thread is left waiting; it faults again and is answered again.
    pub(crate) fn poison(&self, start: u64, len: u64) -> io::Result<()> {
        let page = crate::page_size() as u64;
        let mut at = start;
        while at < start + len {
            let r = sys::poison(self.fd.as_fd(), at, start + len - at, 0);
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    self.defer(at, start + len - at);
                    return Ok(());
                }
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

    /// Waits up to `ms` for a message; allocates nothing.
    pub(crate) fn wait_readable(&self, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one live pollfd.
        unsafe { libc::poll(&mut p, 1, ms) > 0 }
    }

    /// Whether a message is waiting to be read (a `poll` with no timeout).
    pub(crate) fn has_pending(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Reads up to `raw.len()` messages without blocking: page faults into
    /// `faults`, mapping events into `events` (in the kernel's order; the
    /// kernel hands out waiting faults before events). A forked child's
    /// userfaultfd arrives here as a new descriptor, owned at once.
    pub(crate) fn read_msgs(
        &self,
        raw: &mut [sys::uffd_msg],
        faults: &mut Vec<Fault>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let n = self.read_raw(raw)?;
        decode(&raw[..n], faults, events);
        Ok(())
    }

    /// Reads up to `raw.len()` messages without blocking, undecoded;
    /// returns how many. Allocates nothing: what the fault service uses
    /// while a `fork` of its own process holds the allocator's locks. A
    /// `FORK` message's descriptor is already installed: pass every
    /// message read to [`decode`].
    pub(crate) fn read_raw(&self, raw: &mut [sys::uffd_msg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(raw);
        // SAFETY: `raw` is a writable buffer of `bytes` bytes of plain-old-data structs.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize / std::mem::size_of::<sys::uffd_msg>())
    }
}

/// Decodes messages read by [`Uffd::read_raw`]: page faults into `faults`,
/// mapping events into `events`, in order. Each `FORK` message's descriptor
/// is owned from here on.
pub(crate) fn decode(raw: &[sys::uffd_msg], faults: &mut Vec<Fault>, events: &mut Vec<Event>) {
    for m in raw {
        match m.event {
            sys::UFFD_EVENT_PAGEFAULT => faults.push(Fault {
                address: m.arg1,
                // `feat.ptid`: the first four bytes of the third word.
                tid: {
                    let b = m.arg2.to_ne_bytes();
                    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                },
            }),
            sys::UFFD_EVENT_FORK => {
                // `fork.ufd`: the first four bytes of the first word.
                let fd = {
                    let b = m.arg0.to_ne_bytes();
                    i32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                };
                if fd >= 0 {
                    // SAFETY: the kernel installed this descriptor in our
                    // table as it handed us the message; nobody else owns it.
                    events.push(Event::Fork(unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            sys::UFFD_EVENT_REMAP => events.push(Event::Remap {
                from: m.arg0,
                to: m.arg1,
                len: m.arg2,
            }),
            sys::UFFD_EVENT_REMOVE => events.push(Event::Remove),
            sys::UFFD_EVENT_UNMAP => events.push(Event::Unmap {
                start: m.arg0,
                end: m.arg1,
            }),
            _ => {}
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
