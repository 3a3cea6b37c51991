//! The shadow object: a sealed memfd holding a copy of a source, filled
//! eagerly at open or lazily on first touch, and the ways to consume it.

pub(crate) mod lazy;
mod mapping;
mod stale;

pub(crate) use mapping::sealed;
pub use mapping::{MapOptions, Mappable, Mapping, Registration, Share, Span};
pub(crate) use mapping::{check_page_aligned, check_span};
pub use stale::{Field, Staleness};

use crate::config::Mode;
use crate::error::{Error, Result};
use crate::source::{Source, SourceMeta};
use crate::stats::Stats;
use crate::sys::memfd::Memfd;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct EagerShadow {
    pub name: String,
    pub source: Arc<dyn Source>,
    pub meta: SourceMeta,
    pub memfd: Memfd,
}

pub(crate) enum Kind {
    Eager(EagerShadow),
    Lazy(lazy::User),
}

/// A shadow of one source. Create it with [`crate::Engine::open`].
///
/// - An **eager** shadow is a point-in-time copy, sealed with
///   `F_SEAL_WRITE|F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`; its descriptor can
///   be handed to anyone.
/// - A **lazy** shadow is filled from the source as it is touched through
///   [`Shadow::map`], [`Shadow::populate`] or [`Shadow::read_at`]. Its
///   descriptor is withheld until [`Shadow::materialize`] has filled it:
///   any unregistered access to an unfilled page would read zeros and leave a
///   zero page in the page cache for every later reader.
///
/// Mappings outlive the shadow and keep filling from its source. The source
/// is dropped once the shadow and all its mappings are: the last of those
/// drops waits for a fill still in flight (at most 2 s), so the source has
/// been dropped when it returns.
pub struct Shadow {
    pub(crate) kind: Kind,
    pub(crate) open_time: Duration,
}

impl Shadow {
    /// `Mode::Eager` or `Mode::Lazy`.
    pub fn mode(&self) -> Mode {
        match self.kind {
            Kind::Eager(_) => Mode::Eager,
            Kind::Lazy(_) => Mode::Lazy,
        }
    }

    /// Size in bytes (the source's size at open).
    pub fn size(&self) -> u64 {
        self.meta().size
    }

    /// The source's name (its path, for a host file).
    pub fn name(&self) -> &str {
        match &self.kind {
            Kind::Eager(e) => &e.name,
            Kind::Lazy(l) => &l.name,
        }
    }

    /// The source metadata recorded when the shadow was made.
    pub fn meta(&self) -> &SourceMeta {
        match &self.kind {
            Kind::Eager(e) => &e.meta,
            Kind::Lazy(l) => &l.meta,
        }
    }

    /// How long [`crate::Engine::open`] took.
    pub fn open_time(&self) -> Duration {
        self.open_time
    }

    pub(crate) fn memfd(&self) -> &Memfd {
        match &self.kind {
            Kind::Eager(e) => &e.memfd,
            Kind::Lazy(l) => &l.memfd,
        }
    }

    /// Maps the whole shadow read-only. Empty shadows give an empty mapping.
    /// Shorthand for `self.map_options().share(share).map()`.
    pub fn map(&self, share: Share) -> Result<Mapping> {
        self.map_options().share(share).map()
    }

    /// Options for a mapping at an offset, of a length, shared or private,
    /// at a fixed address: see [`MapOptions`].
    pub fn map_options(&self) -> MapOptions<'_> {
        MapOptions::new(self)
    }

    /// The descriptor to `mmap` the shadow with yourself, for
    /// [`Shadow::register`]. For a lazy shadow it is not a copy of the
    /// source: `read(2)` of it, or a mapping of it that is not registered,
    /// sees zeros where nothing was filled yet (only that reader is affected:
    /// registered mappings never see such pages). Hand it to nobody;
    /// [`Shadow::reopen_readonly`] is the descriptor for other processes.
    pub fn mapping_fd(&self) -> BorrowedFd<'_> {
        self.memfd().as_fd()
    }

    /// Registers a mapping the caller made of [`Shadow::mapping_fd`]:
    /// `len` bytes at `addr`, showing the shadow from `offset` (both
    /// page-aligned; `len` may end mid-page only at the shadow's end). From
    /// now on, faults on it are served. For an eager shadow there is nothing
    /// to do and the registration is empty.
    ///
    /// Any page-table entry the range had is dropped first (`MADV_DONTNEED`),
    /// so a page touched before registration is faulted and checked again.
    /// A `MAP_SHARED` range of a lazy shadow cannot be registered by the
    /// kernel once the memfd is sealed, so it is replaced in place by an
    /// equivalent shared mapping that can (same address, offset, length and
    /// `PROT_READ`).
    ///
    /// Dropping the [`Registration`] unregisters the range; the caller
    /// unmaps it, after dropping the registration (an address range
    /// unmapped first may be reused by another mapping, which the drop
    /// would then unregister).
    ///
    /// # Safety
    /// `addr..addr+len` (page-rounded) must be a read-only mapping the
    /// caller made of this shadow's descriptor at `offset`, that no Rust
    /// reference points into and that no other thread touches until this
    /// returns. Private pages written through it are discarded.
    pub unsafe fn register(
        &self,
        addr: NonNull<u8>,
        len: u64,
        offset: u64,
    ) -> Result<Registration> {
        check_span(self.size(), offset, len)?;
        check_page_aligned("registered address", addr.as_ptr() as u64)?;
        let page = crate::page_size() as u64;
        let Kind::Lazy(l) = &self.kind else {
            return Ok(Registration::none());
        };
        if len == 0 {
            return Ok(Registration::none());
        }
        let maplen = len.div_ceil(page) * page;
        let start = addr.as_ptr() as u64;
        match l.register(start, maplen, offset) {
            Ok(reg) => {
                // SAFETY: the caller vouches nobody borrows or touches the
                // range; dropping its page-table entries makes every page
                // fault (and be checked) again.
                crate::sys::mmap::madvise(addr.as_ptr(), maplen as usize, libc::MADV_DONTNEED)
                    .map_err(|e| Error::sys("madvise(MADV_DONTNEED) of a registered range", e))?;
                Ok(Registration::lazy(reg))
            }
            Err(Error::Sys { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
                // A shared mapping made after sealing: replace it.
                // SAFETY: the caller owns the range and nothing borrows it
                // (this function's contract).
                let (dup, reg) = unsafe {
                    let into = crate::sys::mmap::RawMap::fixed(addr.as_ptr(), maplen as usize)
                        .map_err(|e| Error::sys("take the registered range", e))?;
                    l.map_shared(offset, into)?
                };
                // SAFETY: as above; it becomes readable once registered.
                unsafe { dup.protect(libc::PROT_READ) }
                    .map_err(|e| Error::sys("mprotect a registered mapping readable", e))?;
                // The caller owns and unmaps the range.
                std::mem::forget(dup);
                Ok(Registration::lazy(reg))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes `offset..offset+len` present, for `read()`-style consumers and
    /// explicit prefetch. Fails if a page in the range cannot be filled.
    pub fn populate(&self, offset: u64, len: u64) -> Result<()> {
        match &self.kind {
            Kind::Eager(_) => {
                if offset.checked_add(len).is_none_or(|e| e > self.size()) {
                    return Err(Error::Range {
                        offset,
                        len,
                        size: self.size(),
                    });
                }
                Ok(())
            }
            Kind::Lazy(l) => {
                l.need_bytes(offset, len);
                l.populate(offset, len)
            }
        }
    }

    /// Fills the whole shadow. Afterwards [`Shadow::fd`] and
    /// [`Shadow::reopen_readonly`] work and the shadow no longer needs the
    /// fault service. No-op for eager shadows.
    pub fn materialize(&self) -> Result<()> {
        match &self.kind {
            Kind::Eager(_) => Ok(()),
            Kind::Lazy(l) => l.materialize(),
        }
    }

    /// True for eager shadows and fully filled lazy ones.
    pub fn is_materialized(&self) -> bool {
        match &self.kind {
            Kind::Eager(_) => true,
            Kind::Lazy(l) => l.fully_filled(),
        }
    }

    /// Reads into `buf` at `offset`, filling lazily first. Returns the count
    /// read, short only at the end of the shadow.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - offset) as usize;
        self.populate(offset, n as u64)?;
        let mut done = 0;
        while done < n {
            match self
                .memfd()
                .read_at(&mut buf[done..n], offset + done as u64)
            {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::sys("read from the shadow memfd", e)),
            }
        }
        Ok(done)
    }

    fn check_handout(&self) -> Result<()> {
        if self.is_materialized() {
            Ok(())
        } else {
            Err(Error::NotMaterialized {
                what: self.name().to_string(),
            })
        }
    }

    /// The memfd itself, for passing to another process (`SCM_RIGHTS`) or
    /// mapping by other code. Only for eager or materialized shadows.
    pub fn fd(&self) -> Result<BorrowedFd<'_>> {
        self.check_handout()?;
        Ok(self.memfd().as_fd())
    }

    /// A new `O_RDONLY` descriptor of the shadow, the form to hand to
    /// consumers. Only for eager or materialized shadows.
    pub fn reopen_readonly(&self) -> Result<OwnedFd> {
        self.check_handout()?;
        self.memfd().reopen_readonly()
    }

    /// Bytes of memory the shadow's memfd holds now (`st_blocks * 512`).
    pub fn resident_bytes(&self) -> Result<u64> {
        self.memfd().resident_bytes()
    }

    /// The memfd's `F_SEAL_*` set.
    pub fn seals(&self) -> Result<i32> {
        self.memfd().seals()
    }

    /// Compares the source as it is now with the metadata recorded at open.
    /// Costs one `fstat` and one `stat` for a host file. For a lazy shadow a
    /// change seen while filling is reported even if the metadata has since
    /// changed back.
    pub fn staleness(&self) -> Result<Staleness> {
        let (source, meta): (&dyn Source, _) = match &self.kind {
            Kind::Eager(e) => (&*e.source, &e.meta),
            Kind::Lazy(l) => (&*l.source, &l.meta),
        };
        let s = stale::check(source, meta).map_err(|e| Error::Open {
            path: self.name().into(),
            source: e,
        })?;
        if let (Staleness::Unchanged, Kind::Lazy(l)) = (&s, &self.kind) {
            if l.source_changed() {
                return Ok(Staleness::Changed(Vec::new()));
            }
        }
        Ok(s)
    }

    /// Counters for this shadow. For eager shadows the copy counts as one
    /// fill of the whole file.
    pub fn stats(&self) -> Stats {
        match &self.kind {
            Kind::Eager(e) => Stats {
                bytes_filled: e.meta.size,
                chunks_filled: u64::from(e.meta.size > 0),
                resident_bytes: e.meta.size,
                ..Stats::default()
            },
            Kind::Lazy(l) => {
                let mut s = l.counters.snapshot(l.resident_bytes());
                s.last_error = l.last_error.lock().clone();
                s.source_changed = l.source_changed();
                s.workset_pending = l.workset_pending();
                s
            }
        }
    }

    /// Ends this shadow's working-set recording now and stores the record
    /// (docs/worksets.md), as its drop or the end of the recording window
    /// would. Returns the record's path, or `None` if nothing was to be
    /// stored (not recording, nothing new, or stored already). A failure
    /// to store is also reported on stderr.
    pub fn save_workset(&self) -> std::io::Result<Option<std::path::PathBuf>> {
        match &self.kind {
            Kind::Eager(_) => Ok(None),
            Kind::Lazy(l) => l.save_workset(),
        }
    }

    /// How many consumers in other processes this shadow is serving.
    pub fn remote_consumers(&self) -> usize {
        match &self.kind {
            Kind::Eager(_) => 0,
            Kind::Lazy(l) => l.remote_consumers(),
        }
    }

    /// Why the page holding `offset` cannot be read now, if it cannot: the
    /// cause recorded for a poisoned page, or the budget refusal that left it
    /// unfilled (retryable; also while it is being filled again). `None` for
    /// a filled page, and for one never refused.
    /// For a consumer that got `SIGBUS` there and wants to say why.
    pub fn unfillable_cause(&self, offset: u64) -> Option<crate::Cause> {
        match &self.kind {
            Kind::Eager(_) => None,
            Kind::Lazy(l) => l.unfillable_cause(offset),
        }
    }

    /// Offsets of pages that could not be filled, with the reason (lazy only).
    pub fn poisoned_pages(&self) -> Vec<(u64, crate::Cause)> {
        match &self.kind {
            Kind::Eager(_) => Vec::new(),
            Kind::Lazy(l) => l.bad_pages().into_iter().collect(),
        }
    }
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("name", &self.name())
            .field("mode", &self.mode())
            .field("size", &self.size())
            .finish()
    }
}
