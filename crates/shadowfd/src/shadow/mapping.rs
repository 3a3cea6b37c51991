//! Read-only mappings of a shadow, as RAII handles.

use crate::fault::Registration;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// How a [`Mapping`] shares pages with the shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Share {
    /// `MAP_SHARED`: pages are the shadow's page cache.
    #[default]
    Shared,
    /// `MAP_PRIVATE`: what `ld.so` uses for read-only segments; pages are the
    /// page cache until written (and a read-only mapping is never written).
    Private,
}

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub(crate) struct RawMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: RawMap is an address range owned by this handle; the kernel object
// behind it may be used from any thread.
unsafe impl Send for RawMap {}
// SAFETY: as above; shared access is read-only through `&self`.
unsafe impl Sync for RawMap {}

impl RawMap {
    /// Maps `len` (> 0) bytes of `fd` at offset 0.
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize, prot: i32, flags: i32) -> io::Result<RawMap> {
        assert!(len > 0, "RawMap::new of zero length");
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) cannot alias
        // any Rust object; fd is open for the call's duration.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMap {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL without MAP_FIXED"),
            len,
        })
    }

    /// A second `MAP_SHARED` mapping of the same pages (`mremap` with an old
    /// size of 0). It keeps the original's `VM_MAYWRITE`, so it can be
    /// registered with userfaultfd after `F_SEAL_FUTURE_WRITE`, and it comes
    /// unregistered (the engine does not request `UFFD_FEATURE_EVENT_REMAP`).
    pub(crate) fn duplicate_shared(&self) -> io::Result<RawMap> {
        // SAFETY: `self` is a live shared mapping of `len` bytes; old size 0
        // with MREMAP_MAYMOVE creates a new range chosen by the kernel and
        // leaves the original untouched.
        let p =
            unsafe { libc::mremap(self.ptr.as_ptr().cast(), 0, self.len, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMap {
            ptr: NonNull::new(p.cast()).expect("mremap returned NULL"),
            len: self.len,
        })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// `mprotect(prot)` over the whole range.
    pub(crate) fn protect(&self, prot: i32) -> io::Result<()> {
        // SAFETY: the range is exactly our own mapping; changing its
        // protection does not invalidate any reference (none is handed out
        // before the mapping is PROT_READ).
        let r = unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.len, prot) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `madvise(advice)` over the whole range.
    pub(crate) fn advise(&self, advice: i32) -> io::Result<()> {
        // SAFETY: the range is exactly our own mapping; the advices we use
        // (MADV_DONTFORK) do not change its contents.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: we own this range since `new`; nothing borrows it once the
        // owning handle is being dropped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A read-only mapping of a shadow: `Deref<Target = [u8]>`.
///
/// For a lazy shadow the mapping is registered with the engine's
/// userfaultfd while it lives, so first touches are filled from the source
/// (and a page that could not be read raises `SIGBUS`, as an I/O error under
/// any file mapping does). It is excluded from `fork(2)` children
/// (`MADV_DONTFORK`): a child would see the pages unregistered, as zeros.
///
/// The bytes never change while mapped: the memfd is sealed against writes,
/// and a lazy page is filled once before any access to it completes.
pub struct Mapping {
    // Field order is drop order: unregister before unmapping.
    pub(crate) registration: Option<Registration>,
    pub(crate) map: Option<RawMap>,
    /// The shadow's size; the mapping itself may be rounded up to a page.
    pub(crate) len: usize,
}

impl Mapping {
    /// Start address (dangling for an empty shadow).
    pub fn as_ptr(&self) -> *const u8 {
        self.map
            .as_ref()
            .map_or(NonNull::dangling().as_ptr(), |m| m.as_ptr())
    }

    /// Length in bytes (the source size).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is mapped PROT_READ for the life of `self` and no
        // code in this crate writes through any mapping of the memfd; the
        // memfd is sealed against writes (an eager one fully; a lazy one
        // against write(2) and new writable mappings, while the engine's own
        // mappings keep VM_MAYWRITE, so only unsafe code calling mprotect on
        // them could write); and a lazy page is filled exactly once before
        // any read of it returns. So the bytes are immutable while borrowed.
        // An empty mapping yields an empty slice.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.as_ptr())
            .field("len", &self.len())
            .field("lazy", &self.registration.is_some())
            .finish()
    }
}
