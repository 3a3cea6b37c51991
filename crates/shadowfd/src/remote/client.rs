//! The consumer side: map a shadow served by an engine in another process.

use super::wire::{self, ATTACH, ERROR, Frame, HELLO, OFFER, READY, VERSION};
use crate::error::{Error, Result};
use crate::sys::mmap::RawMap;
use crate::sys::{Advice, Uffd};
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

fn protocol(what: impl Into<String>) -> Error {
    Error::Protocol { what: what.into() }
}

fn expect(
    stream: &UnixStream,
    kind: u64,
    what: &str,
) -> Result<(Frame, Option<std::os::fd::OwnedFd>)> {
    let (f, fd) = wire::recv(stream)?;
    if f.kind == ERROR {
        return Err(protocol(format!(
            "the engine refused the consumer (code {}) while {what}",
            f.a
        )));
    }
    if f.kind != kind {
        return Err(protocol(format!(
            "unexpected frame kind {} while {what}",
            f.kind
        )));
    }
    Ok((f, fd))
}

impl RemoteMapping {
    /// Receives a shadow from [`super::serve`] on the other end of `stream`,
    /// maps it read-only (`MAP_PRIVATE`) and, if it is lazy, registers the
    /// mapping with a userfaultfd made here, which the engine serves.
    /// Returns once faults are served.
    pub fn receive(stream: UnixStream) -> Result<RemoteMapping> {
        stream
            .set_read_timeout(Some(super::PEER_TIMEOUT))
            .map_err(|e| Error::sys("set the engine socket timeout", e))?;
        let uffd = Uffd::open().ok().map(|(u, _)| u);
        let hello = Frame {
            kind: HELLO,
            a: VERSION,
            b: 0,
            c: uffd.as_ref().map_or(0, Uffd::features),
        };
        wire::send(&stream, &hello, uffd.as_ref().map(|u| u.as_fd()))?;
        let (offer, fd) = expect(&stream, OFFER, "waiting for the shadow")?;
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
        let map = RawMap::new(memfd.as_fd(), 0, len, prot, libc::MAP_PRIVATE)
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
        let uffd = uffd.ok_or_else(|| {
            protocol("the engine sent a lazy shadow to a consumer without a userfaultfd")
        })?;
        let page = crate::page_size() as u64;
        let reg_len = (len as u64).div_ceil(page) * page;
        map.advise(Advice::DontFork)
            .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
        uffd.register(map.addr(), reg_len)
            .map_err(|e| Error::sys("UFFDIO_REGISTER of the remote mapping", e))?;
        let attach = Frame {
            kind: ATTACH,
            a: map.addr(),
            b: reg_len,
            c: 0,
        };
        wire::send(&stream, &attach, None)?;
        expect(&stream, READY, "attaching")?;
        // SAFETY: nothing refers into the mapping yet; every fault on it is
        // now served.
        unsafe { map.protect(libc::PROT_READ) }
            .map_err(|e| Error::sys("mprotect the remote mapping readable", e))?;
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
            // mapped only once filled.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr(), self.len) },
            None => &[],
        }
    }
}
