//! The shadow object: a sealed memfd holding a copy of a source, filled
//! eagerly at open or lazily on first touch, and the ways to consume it.

mod mapping;
pub(crate) mod memfd;
mod stale;

pub(crate) use mapping::RawMap;
pub use mapping::{Mapping, Share};
pub use stale::{Field, Staleness};

use crate::config::Mode;
use crate::error::{Error, Result};
use crate::fault::LazyShadow;
use crate::source::{Source, SourceMeta};
use crate::stats::Stats;
use memfd::Memfd;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
    Lazy(Arc<LazyShadow>),
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

    fn memfd(&self) -> &Memfd {
        match &self.kind {
            Kind::Eager(e) => &e.memfd,
            Kind::Lazy(l) => &l.memfd,
        }
    }

    /// Maps the whole shadow read-only. Empty shadows give an empty mapping.
    pub fn map(&self, share: Share) -> Result<Mapping> {
        let size = self.size();
        if size == 0 {
            return Ok(Mapping {
                registration: None,
                map: None,
                len: 0,
            });
        }
        let flags = match share {
            Share::Shared => libc::MAP_SHARED,
            Share::Private => libc::MAP_PRIVATE,
        };
        // Lazy mappings start PROT_NONE and become readable once registered.
        let prot = match self.kind {
            Kind::Eager(_) => libc::PROT_READ,
            Kind::Lazy(_) => libc::PROT_NONE,
        };
        let map = match (&self.kind, share) {
            (Kind::Lazy(l), Share::Shared) => l.shared_mapping()?,
            _ => RawMap::new(self.memfd().as_fd(), size as usize, prot, flags)
                .map_err(|e| Error::sys(format!("mmap shadow of {}", self.name()), e))?,
        };
        let registration = match &self.kind {
            Kind::Eager(_) => None,
            Kind::Lazy(l) => Some(l.register(&map)?),
        };
        Ok(Mapping {
            registration,
            map: Some(map),
            len: size as usize,
        })
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
            Kind::Lazy(l) => l.populate(offset, len),
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
                s
            }
        }
    }

    /// Hands this shadow to a consumer process on the other end of `stream`,
    /// which calls [`crate::RemoteMapping::receive`]. An eager or
    /// materialized shadow is sent as a read-only descriptor and needs
    /// nothing more. For a lazy one, the consumer registers its mapping with a
    /// userfaultfd of its own and sends it back; a thread then serves its
    /// faults, filling the same page cache as local mappings, until the
    /// consumer closes the connection (or dies), and then forgets it.
    pub fn serve(&self, stream: std::os::unix::net::UnixStream) -> Result<Served> {
        use crate::remote::wire::{self, Frame, OFFER};
        let lazy = !self.is_materialized();
        let ro = self.memfd().reopen_readonly()?;
        let offer = Frame {
            kind: OFFER,
            a: self.size(),
            b: u64::from(lazy),
            c: 0,
        };
        wire::send(&stream, &offer, Some(ro.as_fd()))?;
        drop(ro);
        let thread = match (&self.kind, lazy && self.size() > 0) {
            (Kind::Lazy(l), true) => Some(crate::fault::remote::attach(l.clone(), stream)?),
            _ => None,
        };
        Ok(Served { thread })
    }

    /// How many consumers in other processes this shadow is serving.
    pub fn remote_consumers(&self) -> usize {
        match &self.kind {
            Kind::Eager(_) => 0,
            Kind::Lazy(l) => l.remote_consumers(),
        }
    }

    /// Offsets of pages that could not be filled, with the reason (lazy only).
    pub fn poisoned_pages(&self) -> Vec<(u64, String)> {
        match &self.kind {
            Kind::Eager(_) => Vec::new(),
            Kind::Lazy(l) => l.bad_pages().into_iter().collect(),
        }
    }
}

/// A consumer being served by [`Shadow::serve`].
#[derive(Debug)]
pub struct Served {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    /// Waits until the consumer has disconnected and its range is forgotten.
    /// Returns at once for eager or materialized shadows.
    pub fn wait(self) {
        if let Some(t) = self.thread {
            let _ = t.join();
        }
    }

    /// Whether the consumer is still attached.
    pub fn is_active(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
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
