//! The consumer side: map a shadow served by an engine in another process.

use super::wire::{self, ATTACH, Frame, OFFER, READY};
use crate::error::{Error, Result};
use crate::shadow::RawMap;
use crate::uffd::Uffd;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

/// A read-only mapping of a shadow held by another process
/// (`Deref<Target = [u8]>`).
///
/// For a lazy shadow the mapping is registered with a userfaultfd made here
/// and served by the engine's process; keep the connection open while the
/// mapping lives (this handle owns it). Touching a page the source could not
/// provide raises `SIGBUS`. If the serving process goes away, unfilled pages
/// block: they never read as zeros.
pub struct RemoteMapping {
    // Drop order: unmap, then close the userfaultfd, then the connection.
    map: Option<RawMap>,
    len: usize,
    _uffd: Option<Uffd>,
    _stream: UnixStream,
}

fn protocol(what: &str) -> Error {
    Error::sys(
        "shadowfd remote protocol",
        std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    )
}

impl RemoteMapping {
    /// Receives a shadow from [`crate::Shadow::serve`] on the other end of
    /// `stream`, maps it read-only (`MAP_PRIVATE`) and, if it is lazy,
    /// registers the mapping and hands the server its userfaultfd. Returns
    /// once faults are served.
    pub fn receive(stream: UnixStream) -> Result<RemoteMapping> {
        let (offer, fd) = wire::recv(&stream)?;
        if offer.kind != OFFER {
            return Err(protocol("expected an offer"));
        }
        let memfd = fd.ok_or_else(|| protocol("the offer carried no descriptor"))?;
        let len = usize::try_from(offer.a).map_err(|_| protocol("size does not fit"))?;
        let lazy = offer.b == 1;
        if len == 0 {
            return Ok(RemoteMapping {
                map: None,
                len: 0,
                _uffd: None,
                _stream: stream,
            });
        }
        let prot = if lazy {
            libc::PROT_NONE
        } else {
            libc::PROT_READ
        };
        let map = RawMap::new(memfd.as_fd(), len, prot, libc::MAP_PRIVATE)
            .map_err(|e| Error::sys("mmap the received shadow", e))?;
        drop(memfd);
        if !lazy {
            return Ok(RemoteMapping {
                map: Some(map),
                len,
                _uffd: None,
                _stream: stream,
            });
        }
        let (uffd, _) = Uffd::open().map_err(|p| {
            Error::LazyUnavailable(p.reason.unwrap_or_else(|| "userfaultfd is unusable".into()))
        })?;
        let page = crate::page_size() as u64;
        let reg_len = (len as u64).div_ceil(page) * page;
        map.advise(libc::MADV_DONTFORK)
            .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
        crate::fault::register_readable(&uffd, &map, "the remote mapping")?;
        let attach = Frame {
            kind: ATTACH,
            a: map.addr(),
            b: reg_len,
            c: uffd.features(),
        };
        wire::send(&stream, &attach, Some(uffd.as_fd()))?;
        let (ready, _) = wire::recv(&stream)?;
        if ready.kind != READY {
            return Err(protocol("the server refused the mapping"));
        }
        Ok(RemoteMapping {
            map: Some(map),
            len,
            _uffd: Some(uffd),
            _stream: stream,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the shadow is served lazily (faults go to the engine).
    pub fn is_lazy(&self) -> bool {
        self._uffd.is_some()
    }
}

impl std::ops::Deref for RemoteMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.map {
            // SAFETY: `len` bytes are mapped PROT_READ for the life of
            // `self`; the memfd is sealed against writes and lazy pages are
            // filled once before any read of them returns.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr(), self.len) },
            None => &[],
        }
    }
}
