//! Read-only mappings of a shadow: [`MapOptions`] makes them, [`Mapping`]
//! owns one, [`Registration`] covers a mapping the caller made itself.

use super::{Kind, Shadow};
use crate::error::{Error, Result};
use crate::shadow::lazy;
use crate::sys::mmap::RawMap;
use crate::sys::{Advice, UncheckedAdvice};
use std::os::fd::AsFd;
use std::ptr::NonNull;

/// How a mapping shares pages with the shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Share {
    /// `MAP_SHARED`: pages are the shadow's page cache.
    #[default]
    Shared,
    /// `MAP_PRIVATE`: what `ld.so` uses for read-only segments; pages are the
    /// page cache until written (and a read-only mapping is never written).
    Private,
}

impl Share {
    /// `"shared"` or `"private"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Share::Shared => "shared",
            Share::Private => "private",
        }
    }
}

/// Options for mapping (part of) a shadow, in the manner of memmap2's
/// `MmapOptions`: `shadow.map_options().offset(o).len(n).share(s).map()`.
///
/// - `offset` must be a multiple of the page size; `len` defaults to the
///   rest of the shadow and may end mid-page only at the shadow's end.
/// - Every lazy mapping is registered with the engine before any of its
///   bytes can be read, and unregistered when dropped.
#[must_use]
pub struct MapOptions<'a, T: Mappable + ?Sized = Shadow> {
    target: &'a T,
    offset: u64,
    len: Option<u64>,
    share: Share,
}

impl<T: Mappable + ?Sized> Clone for MapOptions<'_, T> {
    fn clone(&self) -> Self {
        MapOptions { ..*self }
    }
}

impl<T: Mappable + ?Sized> std::fmt::Debug for MapOptions<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapOptions")
            .field("size", &self.target.size())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("share", &self.share)
            .finish()
    }
}

/// What a [`MapOptions`] maps: a [`Shadow`] of this process, or a file
/// opened through a server (`remote::RemoteFile`). Sealed: the crate
/// implements it for those two only.
pub trait Mappable: sealed::Sealed {
    /// The mapping made.
    type Mapping;
    /// Size in bytes of what is mapped.
    fn size(&self) -> u64;
    /// The empty mapping (`len` 0 at `offset`).
    #[doc(hidden)]
    fn map_nothing(&self, offset: u64) -> Self::Mapping;
    /// Maps `span` (its `len` > 0, checked against [`Mappable::size`]).
    ///
    /// # Safety
    /// As [`MapOptions::map_fixed`] when `span.at` is given.
    #[doc(hidden)]
    unsafe fn map_span(&self, span: Span) -> Result<Self::Mapping>;
}

/// What [`MapOptions`] asks a [`Mappable`] to map, checked.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
    pub share: Share,
    /// The caller's reservation (`map_fixed`), or `None`.
    pub at: Option<*mut u8>,
}

pub(crate) mod sealed {
    /// Keeps [`super::Mappable`] to the crate's own types.
    pub trait Sealed {}
}

impl<'a, T: Mappable + ?Sized> MapOptions<'a, T> {
    pub(crate) fn new(target: &'a T) -> Self {
        MapOptions {
            target,
            offset: 0,
            len: None,
            share: Share::Shared,
        }
    }

    /// Offset of the mapping's first byte (page-aligned).
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// Length in bytes (default: from `offset` to the end).
    pub fn len(mut self, len: u64) -> Self {
        self.len = Some(len);
        self
    }

    /// `MAP_SHARED` (the default) or `MAP_PRIVATE`.
    pub fn share(mut self, share: Share) -> Self {
        self.share = share;
        self
    }

    /// Maps at an address the kernel picks.
    pub fn map(self) -> Result<T::Mapping> {
        // SAFETY: no fixed address: the kernel picks a fresh range.
        unsafe { self.map_at(None) }
    }

    /// Maps at exactly `addr` (`MAP_FIXED` semantics), replacing the
    /// caller's reservation there. When the mapping is dropped (and on an
    /// error) the range is an inaccessible `PROT_NONE` anonymous reservation
    /// again; releasing the reservation stays the caller's job.
    ///
    /// # Safety
    /// `addr` must be page-aligned, and `addr..addr+len` (page-rounded) must
    /// be address space the caller reserved (e.g. with `mmap(PROT_NONE)`),
    /// that no Rust reference points into and that no other thread touches
    /// until this returns.
    pub unsafe fn map_fixed(self, addr: NonNull<u8>) -> Result<T::Mapping> {
        check_page_aligned("fixed mapping address", addr.as_ptr() as u64)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.map_at(Some(addr.as_ptr())) }
    }

    /// # Safety
    /// As [`MapOptions::map_fixed`] when `at` is given.
    unsafe fn map_at(self, at: Option<*mut u8>) -> Result<T::Mapping> {
        let size = self.target.size();
        let len = self.len.unwrap_or(size.saturating_sub(self.offset));
        check_span(size, self.offset, len)?;
        if len == 0 {
            return Ok(self.target.map_nothing(self.offset));
        }
        let span = Span {
            offset: self.offset,
            len,
            share: self.share,
            at,
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.target.map_span(span) }
    }
}

impl sealed::Sealed for Shadow {}

impl Mappable for Shadow {
    type Mapping = Mapping;

    fn size(&self) -> u64 {
        Shadow::size(self)
    }

    fn map_nothing(&self, _offset: u64) -> Mapping {
        Mapping {
            registration: None,
            map: None,
            len: 0,
        }
    }

    unsafe fn map_span(&self, span: Span) -> Result<Mapping> {
        let Span {
            offset,
            len,
            share,
            at,
        } = span;
        let page = crate::page_size() as u64;
        let maplen = len.div_ceil(page) * page;
        let shadow = self;
        let flags = match share {
            Share::Shared => libc::MAP_SHARED,
            Share::Private => libc::MAP_PRIVATE,
        };
        let fd = shadow.memfd().as_fd();
        let e = |e| Error::sys(format!("mmap the shadow of {}", shadow.name()), e);
        let l = lazy_of(shadow);
        // Lazy mappings start PROT_NONE and become readable once registered.
        let prot = if l.is_some() {
            libc::PROT_NONE
        } else {
            libc::PROT_READ
        };
        // A shared lazy mapping is a duplicate of the template, registered
        // as it is made (`map_shared`); the others are registered below.
        let mut claimed = None;
        let map = match (l, share, at) {
            (Some(l), Share::Shared, at) => {
                let into = match at {
                    // SAFETY: the caller owns the fixed range (map_fixed's contract).
                    Some(a) => unsafe { RawMap::fixed(a, maplen as usize) }.map_err(e)?,
                    None => RawMap::reserve(maplen as usize).map_err(e)?,
                };
                // SAFETY: `into` is the caller's fixed range or our fresh
                // reservation; nothing refers into either.
                let (map, reg) = unsafe { l.map_shared(offset, into)? };
                claimed = Some(reg);
                map
            }
            (_, _, Some(a)) => {
                // SAFETY: the caller owns the fixed range (map_fixed's contract).
                unsafe { RawMap::map(Some(a), fd, (offset, maplen as usize), prot, flags) }
                    .map_err(e)?
            }
            (_, _, None) => RawMap::new(fd, offset, maplen as usize, prot, flags).map_err(e)?,
        };
        let registration = match l {
            None => None,
            Some(l) => {
                // A forked child inherits the mapping, registered with its
                // own userfaultfd and served like this one; without fork
                // events it would be unregistered there, so it stays out.
                if !l.follows_fork() {
                    map.advise(Advice::DontFork)
                        .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
                }
                let reg = match claimed {
                    Some(reg) => reg,
                    None => l.register(map.addr(), maplen, offset)?,
                };
                // SAFETY: nothing refers into the new mapping yet; it becomes
                // readable only now that every fault on it is served.
                unsafe { map.protect(libc::PROT_READ) }
                    .map_err(|e| Error::sys("mprotect a registered mapping readable", e))?;
                Some(Registration { inner: Some(reg) })
            }
        };
        Ok(Mapping {
            registration,
            map: Some(map),
            len: len as usize,
        })
    }
}

fn lazy_of(shadow: &Shadow) -> Option<&std::sync::Arc<lazy::LazyShadow>> {
    match &shadow.kind {
        Kind::Lazy(l) => Some(l),
        Kind::Eager(_) => None,
    }
}

/// Checks that `value` (`what` names it in the error) is a multiple of
/// the page size.
pub(crate) fn check_page_aligned(what: &'static str, value: u64) -> Result<()> {
    let page = crate::page_size() as u64;
    if value % page != 0 {
        return Err(Error::Align { what, value, page });
    }
    Ok(())
}

/// Checks `offset..offset+len` against a shadow (or remote file) of `size`
/// bytes: a page-aligned offset and a span that ends within the file.
pub(crate) fn check_span(size: u64, offset: u64, len: u64) -> Result<()> {
    check_page_aligned("mapping offset", offset)?;
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(Error::Range { offset, len, size });
    }
    Ok(())
}

/// The registration of a lazy consumer range with the engine: while it
/// lives, faults on the range are served. Dropping it unregisters the range
/// (and nothing else: who unmaps is said where it was made).
///
/// For an eager shadow there is nothing to register and this is empty.
pub struct Registration {
    inner: Option<lazy::Registration>,
}

impl Registration {
    pub(crate) fn none() -> Registration {
        Registration { inner: None }
    }

    pub(crate) fn lazy(r: lazy::Registration) -> Registration {
        Registration { inner: Some(r) }
    }

    /// Unregisters now; returns the parts (address, length) of a lazy
    /// range that were still the registration's: a part its user moved
    /// away or unmapped is not, and what lies there now is not the
    /// caller's to unmap. `None` for an eager shadow: all of it.
    pub fn release(mut self) -> Option<Vec<(u64, u64)>> {
        self.inner.take().map(lazy::Registration::release)
    }

    /// Whether a range is registered (false for eager shadows).
    pub fn is_registered(&self) -> bool {
        self.inner.is_some()
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("registered", &self.is_registered())
            .finish()
    }
}

/// A read-only mapping of a shadow: `Deref<Target = [u8]>`.
///
/// For a lazy shadow the mapping is registered with the engine's
/// userfaultfd while it lives, so first touches are filled from the source
/// (and a page that could not be read raises `SIGBUS`, as an I/O error under
/// any file mapping does). A `fork(2)` child inherits it like a file
/// mapping, served through its own userfaultfd (`UFFD_FEATURE_EVENT_FORK`,
/// which needs `CAP_SYS_PTRACE`; without it the mapping is `MADV_DONTFORK`,
/// absent from children). The kernel's mapping events keep it served where
/// code that owns the memory moves or cuts it (`mremap`, `munmap`): the
/// C ABI and `shadowfd run` hand such memory to programs that do.
///
/// The bytes never change while mapped: the memfd is sealed against writes,
/// and a lazy page is filled once before any access to it completes.
pub struct Mapping {
    // Field order is drop order: unregister before unmapping.
    pub(crate) registration: Option<Registration>,
    pub(crate) map: Option<RawMap>,
    /// Requested length; the mapping itself is rounded up to a page.
    pub(crate) len: usize,
}

impl Mapping {
    /// Start address (dangling for an empty mapping).
    pub fn as_ptr(&self) -> *const u8 {
        self.map
            .as_ref()
            .map_or(NonNull::dangling().as_ptr(), |m| m.as_ptr())
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether faults on this mapping are served by the engine (lazy).
    pub fn is_lazy(&self) -> bool {
        self.registration
            .as_ref()
            .is_some_and(Registration::is_registered)
    }

    /// `madvise(2)` with advice that cannot change what the mapping shows.
    pub fn advise(&self, advice: Advice) -> Result<()> {
        match &self.map {
            Some(m) => m.advise(advice).map_err(|e| Error::sys("madvise", e)),
            None => Ok(()),
        }
    }

    /// `madvise(2)` with advice that can.
    ///
    /// # Safety
    /// No `&[u8]` borrowed from this mapping may be live across the call,
    /// and the caller accepts what the advice does (see
    /// [`UncheckedAdvice`]); `DoFork` in particular lets a forked child see
    /// a lazy mapping unregistered.
    pub unsafe fn advise_unchecked(&self, advice: UncheckedAdvice) -> Result<()> {
        match &self.map {
            // SAFETY: forwarded from the caller.
            Some(m) => unsafe { m.advise_unchecked(advice) }.map_err(|e| Error::sys("madvise", e)),
            None => Ok(()),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregister first, then unmap only what is still this mapping's:
        // a part its user moved away or unmapped may hold something else now.
        let parts = self.registration.take().and_then(Registration::release);
        if let Some(map) = self.map.take() {
            match parts {
                Some(p) if !(p.len() == 1 && p[0] == (map.addr(), map.len() as u64)) => {
                    map.drop_parts(&p)
                }
                _ => drop(map),
            }
        }
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is mapped PROT_READ for the life of `self` and no
        // code in this crate writes through it; the memfd is sealed against
        // writes (an eager one fully; a lazy one against write(2) and new
        // writable mappings, and the engine writes a lazy page only before
        // any consumer range can map it). So the bytes are immutable while
        // borrowed. An empty mapping yields an empty slice.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.as_ptr())
            .field("len", &self.len())
            .field("lazy", &self.is_lazy())
            .finish()
    }
}
