//! Owned `mmap` regions and typed `madvise` advice.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// `madvise(2)` advice that cannot change the bytes a live `&[u8]` over a
/// read-only mapping of a shadow sees. Use it with
/// [`crate::Mapping::advise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Advice {
    /// `MADV_NORMAL`.
    Normal,
    /// `MADV_RANDOM`.
    Random,
    /// `MADV_SEQUENTIAL`.
    Sequential,
    /// `MADV_WILLNEED`.
    WillNeed,
    /// `MADV_DONTFORK`: children of `fork(2)` do not inherit the range.
    DontFork,
    /// `MADV_DONTDUMP`: the range is left out of core dumps.
    DontDump,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
    /// `MADV_POPULATE_READ`: fault the range in now (lazy pages are filled
    /// from the source before the call returns).
    PopulateRead,
}

impl Advice {
    fn raw(self) -> libc::c_int {
        match self {
            Advice::Normal => libc::MADV_NORMAL,
            Advice::Random => libc::MADV_RANDOM,
            Advice::Sequential => libc::MADV_SEQUENTIAL,
            Advice::WillNeed => libc::MADV_WILLNEED,
            Advice::DontFork => libc::MADV_DONTFORK,
            Advice::DontDump => libc::MADV_DONTDUMP,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
            Advice::PopulateRead => libc::MADV_POPULATE_READ,
        }
    }
}

/// `madvise(2)` advice that can change or discard what a mapping shows, or
/// undo a protection the library relies on. Only through `unsafe`
/// ([`crate::Mapping::advise_unchecked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UncheckedAdvice {
    /// `MADV_DONTNEED`: drops the range's page-table entries; a private
    /// mapping's written pages are lost.
    DontNeed,
    /// `MADV_DOFORK`: undoes `MADV_DONTFORK`; a forked child would see a lazy
    /// mapping unregistered.
    DoFork,
    /// `MADV_PAGEOUT`.
    PageOut,
    /// `MADV_COLD`.
    Cold,
}

impl UncheckedAdvice {
    fn raw(self) -> libc::c_int {
        match self {
            UncheckedAdvice::DontNeed => libc::MADV_DONTNEED,
            UncheckedAdvice::DoFork => libc::MADV_DOFORK,
            UncheckedAdvice::PageOut => libc::MADV_PAGEOUT,
            UncheckedAdvice::Cold => libc::MADV_COLD,
        }
    }
}

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub(crate) struct RawMap {
    ptr: NonNull<u8>,
    len: usize,
    /// A fixed mapping goes back to a `PROT_NONE` reservation on drop.
    fixed: bool,
}

// SAFETY: RawMap is an address range owned by this handle; the kernel object
// behind it may be used from any thread.
unsafe impl Send for RawMap {}
// SAFETY: as above; shared access through `&self` never writes the range.
unsafe impl Sync for RawMap {}

fn mapped(p: *mut libc::c_void, len: usize, fixed: bool) -> io::Result<RawMap> {
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(RawMap { ptr, len, fixed })
}

impl RawMap {
    /// Maps `len` (> 0) bytes of `fd` from `offset` (page-aligned) at an
    /// address the kernel picks: [`RawMap::map`] without a fixed address.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: i32,
        flags: i32,
    ) -> io::Result<RawMap> {
        assert!(len > 0, "RawMap::new of zero length");
        // SAFETY: no fixed address: a fresh mapping chosen by the kernel
        // cannot alias any Rust object.
        unsafe { Self::map(None, fd, (offset, len), prot, flags) }
    }

    /// Maps `len` bytes of `fd` from `offset`: at exactly `at`, replacing
    /// whatever the caller had reserved there (`MAP_FIXED`), or where the
    /// kernel picks. On drop a fixed range becomes a `PROT_NONE` anonymous
    /// reservation again, so the caller's reservation survives the mapping.
    ///
    /// # Safety
    /// With `at`: `at..at+len` must be page-aligned address space the caller
    /// owns (reserved with `mmap`), that no Rust reference points into and
    /// that no other thread uses until this call returns.
    pub(crate) unsafe fn map(
        at: Option<*mut u8>,
        fd: BorrowedFd<'_>,
        (offset, len): (u64, usize),
        prot: i32,
        flags: i32,
    ) -> io::Result<RawMap> {
        let (addr, fixed) = match at {
            Some(a) => (a.cast(), libc::MAP_FIXED),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: the kernel validates the arguments; a fixed target is owned
        // by the caller (contract above); fd is open for the call.
        let p = unsafe {
            libc::mmap(
                addr,
                len,
                prot,
                flags | fixed,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        mapped(p, len, at.is_some())
    }

    /// A `PROT_NONE` anonymous reservation of `len` (> 0) bytes where the
    /// kernel picks, unmapped on drop.
    pub(crate) fn reserve(len: usize) -> io::Result<RawMap> {
        assert!(len > 0, "RawMap::reserve of zero length");
        // SAFETY: no fixed address: a fresh mapping chosen by the kernel
        // cannot alias any Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        mapped(p, len, false)
    }

    /// A second `MAP_SHARED` mapping of `len` bytes of the same pages from
    /// `offset`, in place of `into` (a range of the same length, which it
    /// replaces, `MREMAP_FIXED`). It keeps the original's `VM_MAYWRITE`, so
    /// it can be registered with userfaultfd after `F_SEAL_FUTURE_WRITE`.
    /// It keeps the original's userfaultfd registration too where
    /// `UFFD_FEATURE_EVENT_REMAP` was negotiated (the kernel then queues a
    /// `REMAP` event of length 0), and comes unregistered where it was not.
    /// On drop it is unmapped, or made a reservation again if `into` was
    /// fixed.
    ///
    /// # Safety
    /// `into` must be the caller's to replace: no reference points into it
    /// and no other thread uses it until this returns.
    pub(crate) unsafe fn duplicate_shared(
        &self,
        offset: usize,
        into: RawMap,
    ) -> io::Result<RawMap> {
        let len = into.len;
        if offset.checked_add(len).is_none_or(|e| e > self.len) || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `self` is a live shared mapping and `offset..offset+len`
        // lies inside it; an old size of 0 creates a new mapping of the same
        // pages and leaves the original untouched. The target is `into`,
        // the caller's to replace (contract above).
        let p = unsafe {
            libc::mremap(
                self.ptr.as_ptr().add(offset).cast(),
                0,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                into.ptr.as_ptr().cast::<libc::c_void>(),
            )
        };
        let fixed = into.fixed;
        if p == libc::MAP_FAILED {
            // `into` is untouched and dropped.
            return Err(io::Error::last_os_error());
        }
        // The range is the duplicate's now.
        std::mem::forget(into);
        mapped(p, len, fixed)
    }

    /// Takes `len` bytes at `at`, a mapping the kernel moved there from
    /// `like`'s, as a handle that lets go of it as `like` would (unmapped,
    /// or made a reservation again for a fixed one, whose owner unmaps it).
    ///
    /// # Safety
    /// `at..at+len` must be a page-aligned mapping that nothing else owns or
    /// unmaps.
    pub(crate) unsafe fn adopt(at: *mut u8, len: usize, like: &RawMap) -> io::Result<RawMap> {
        let ptr = NonNull::new(at).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(RawMap {
            ptr,
            len,
            fixed: like.fixed,
        })
    }

    /// Takes `len` bytes at `at` (page-aligned address space the caller
    /// owns) as a fixed range: made a reservation again on drop.
    ///
    /// # Safety
    /// The same contract as [`RawMap::map`] with `at`.
    pub(crate) unsafe fn fixed(at: *mut u8, len: usize) -> io::Result<RawMap> {
        let ptr = NonNull::new(at).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(RawMap {
            ptr,
            len,
            fixed: true,
        })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes of address space the range covers.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Splits the range into the part before offset `a` and the part from
    /// offset `z` on (`a <= z`, both page-aligned): each owned as `self` was
    /// (same drop behaviour). Pages `a..z` are owned by neither any more.
    pub(crate) fn split(self, a: usize, z: usize) -> (Option<RawMap>, Option<RawMap>) {
        assert!(a <= z && z <= self.len, "RawMap::split out of range");
        let me = std::mem::ManuallyDrop::new(self);
        let left = (a > 0).then_some(RawMap {
            ptr: me.ptr,
            len: a,
            fixed: me.fixed,
        });
        let right = (z < me.len).then(|| RawMap {
            // SAFETY: `z < len`: inside the same mapping, so not null.
            ptr: unsafe { NonNull::new_unchecked(me.ptr.as_ptr().add(z)) },
            len: me.len - z,
            fixed: me.fixed,
        });
        (left, right)
    }

    /// `mprotect(prot)` over the whole range.
    ///
    /// # Safety
    /// No live reference into the range may be invalidated: making it
    /// inaccessible under a `&[u8]`, or writable where other code assumes the
    /// bytes never change, breaks those borrows.
    pub(crate) unsafe fn protect(&self, prot: i32) -> io::Result<()> {
        // SAFETY: the range is exactly our own mapping; the caller vouches
        // for the borrows.
        let r = unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.len, prot) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `madvise(advice)` over the whole range.
    pub(crate) fn advise(&self, advice: Advice) -> io::Result<()> {
        madvise(self.as_ptr(), self.len, advice.raw())
    }

    /// `madvise(advice)` over the whole range, for advice that can change
    /// what the range shows.
    ///
    /// # Safety
    /// No live reference into the range may depend on the contents the
    /// advice discards (see [`UncheckedAdvice`]).
    pub(crate) unsafe fn advise_unchecked(&self, advice: UncheckedAdvice) -> io::Result<()> {
        madvise(self.as_ptr(), self.len, advice.raw())
    }
}

pub(crate) fn madvise(addr: *mut u8, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise validates the range; the callers pass a range they own
    // and hold to their own contract about the advice.
    let r = unsafe { libc::madvise(addr.cast(), len, advice) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `addr..addr+len` a `PROT_NONE` anonymous reservation (`MAP_FIXED`).
///
/// # Safety
/// The range must be owned by the caller and not borrowed.
pub(crate) unsafe fn reserve_fixed(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl RawMap {
    /// Lets go of the range, but unmaps (or, for a fixed mapping, turns
    /// back into a reservation) only `parts` (address, length) of it: the
    /// rest is no longer this handle's (its consumer moved or unmapped it,
    /// and something else may live there now).
    pub(crate) fn drop_parts(self, parts: &[(u64, u64)]) {
        let me = std::mem::ManuallyDrop::new(self);
        let (lo, hi) = (me.addr(), me.addr() + me.len as u64);
        for &(a, l) in parts {
            let (a, b) = (a.max(lo), (a + l).min(hi));
            if a < b {
                // SAFETY: `a..b` lies in the range this handle owned, and the
                // caller says it still holds our mapping.
                unsafe { release(a as *mut u8, (b - a) as usize, me.fixed) };
            }
        }
    }
}

/// Unmaps `len` bytes at `addr`, or makes them a reservation again.
///
/// # Safety
/// The range must be owned by the caller and not borrowed.
unsafe fn release(addr: *mut u8, len: usize, fixed: bool) {
    // SAFETY: forwarded from the caller.
    if fixed && unsafe { reserve_fixed(addr, len) }.is_ok() {
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        libc::munmap(addr.cast(), len);
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: we own this range since it was mapped; nothing borrows it
        // once the owning handle is being dropped. A fixed mapping's
        // reservation is kept.
        unsafe { release(self.ptr.as_ptr(), self.len, self.fixed) };
    }
}
