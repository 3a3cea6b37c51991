//! Mappings of remote files: the options builder and the mapping itself,
//! lazy (registered with this process's userfaultfd, served by the server)
//! or a sealed descriptor.

use super::*;

/// Options for mapping (part of) a [`RemoteFile`]: the one builder,
/// [`crate::MapOptions`], over a remote file (`file.map_options()`).
/// `offset` must be a multiple of the page size, and `offset + len` at most
/// the file's size (`len` defaults to the rest of the file). The mapping
/// covers `len` rounded up to a page. Every remote mapping is the same
/// read-only private view of the server's sealed memfd, so `share` changes
/// nothing.
pub type RemoteMapOptions<'a> = crate::MapOptions<'a, RemoteFile>;

impl crate::shadow::sealed::Sealed for RemoteFile {}

impl crate::shadow::Mappable for RemoteFile {
    type Mapping = RemoteMapping;

    fn size(&self) -> u64 {
        self.inner.size
    }

    fn map_nothing(&self, offset: u64) -> RemoteMapping {
        RemoteMapping::nothing(self, offset)
    }

    unsafe fn map_span(&self, span: crate::shadow::Span) -> Result<RemoteMapping> {
        if self.inner.inline.is_some() {
            let real = self.with_handle()?;
            // SAFETY: forwarded from the caller.
            return unsafe { real.map_span(span) };
        }
        let (offset, len, at) = (span.offset, span.len, span.at);
        let page = crate::page_size() as u64;
        let maplen = usize::try_from(len.div_ceil(page) * page)
            .map_err(|_| protocol("the mapping length does not fit"))?;
        // A mapping that fails after it was made is dropped only once the
        // io lock is let go: its drop may send UNMAP through that lock.
        let mut doomed = None;
        let r = {
            let _one = self.inner.client.inner.conn.io.lock();
            // SAFETY: forwarded from the caller.
            unsafe { self.map_locked(at, offset, len, maplen, &mut doomed) }
        };
        drop(doomed);
        r
    }
}

impl RemoteFile {
    /// MAP, mmap, and for a lazy mapping register and ATTACH, with the
    /// connection's io lock held. A mapping made and then failed is left in
    /// `doomed` for the caller to drop after the lock.
    ///
    /// # Safety
    /// As [`crate::MapOptions::map_fixed`] when `at` is given.
    unsafe fn map_locked(
        &self,
        at: Option<*mut u8>,
        offset: u64,
        len: u64,
        maplen: usize,
        doomed: &mut Option<RemoteMapping>,
    ) -> Result<RemoteMapping> {
        let this = self;
        let client = &this.inner.client;
        let ci = &client.inner;
        let mode = if ci.uffd.is_some() {
            wire::MAP_LAZY
        } else {
            wire::MAP_SEALED
        };
        let name = format!("MAP of {:?}", this.inner.path);
        wire::send(
            &ci.conn.stream,
            &Frame::new(wire::MAP, this.inner.handle, mode, 0, 0),
            None,
        )?;
        let (r, fd) = reply(&ci.conn.stream, wire::MAP, &name)?;
        if r.b == 0 {
            return Ok(RemoteMapping::nothing(this, offset));
        }
        let lazy = r.c == wire::MAP_LAZY;
        // Before ATTACH, a lazy MAP that fails here is abandoned (version
        // 5), so that the session goes on.
        let abandon = |e: Error| -> Error {
            if lazy {
                let f = Frame::new(wire::ATTACH, this.inner.handle, 0, 0, 0);
                let ok = wire::send(&ci.conn.stream, &f, None)
                    .and_then(|()| reply(&ci.conn.stream, wire::ATTACH, "ATTACH (abandon)"));
                if ok.is_err() || ci.version < 5 {
                    // A version 4 server cannot take it back: the session
                    // is over either way; say so now.
                    let _ = ci.conn.stream.shutdown(std::net::Shutdown::Both);
                }
            }
            e
        };
        let memfd = match fd {
            Some(fd) => fd,
            None => {
                return Err(abandon(protocol(format!(
                    "the {name} reply carried no descriptor"
                ))));
            }
        };
        check_sealed(&memfd, offset + len, &name).map_err(abandon)?;
        let e = |e| Error::sys("mmap the received shadow", e);
        let prot = if lazy {
            libc::PROT_NONE
        } else {
            libc::PROT_READ
        };
        let map = match at {
            // SAFETY: the caller owns the fixed range (map_fixed's contract).
            Some(a) => unsafe {
                RawMap::map(
                    Some(a),
                    memfd.as_fd(),
                    (offset, maplen),
                    prot,
                    libc::MAP_PRIVATE,
                )
            },
            None => RawMap::new(memfd.as_fd(), offset, maplen, prot, libc::MAP_PRIVATE),
        }
        .map_err(|x| abandon(e(x)))?;
        let ino = {
            use std::os::unix::fs::MetadataExt;
            std::fs::File::from(memfd).metadata().map_or(0, |m| m.ino())
        };
        // Not attached yet: dropped without UNMAP.
        let mut mapping = RemoteMapping {
            map: Some(map),
            ino,
            len: len as usize,
            offset,
            lazy: false,
            file: this.clone(),
        };
        if !lazy {
            return Ok(mapping);
        }
        let map = mapping.map.as_ref().expect("mapped");
        let (addr, reg_len) = (map.addr(), maplen as u64);
        let registered = (|| {
            let uffd = ci.uffd.as_ref().ok_or_else(|| {
                protocol("the server sent a lazy mapping to a client without a userfaultfd")
            })?;
            // Kept out of fork children: a child's copy would be served by
            // the server alone (EVENT_FORK), and read zeros if the server
            // died first. A child maps again on a connection of its own
            // (`shadowfd run`'s shim does); a range made MADV_DOFORK again
            // by its user is still served in the child while the server
            // lives (docs/remote.md).
            map.advise(Advice::DontFork)
                .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
            #[cfg(feature = "failpoints")]
            if failpoint("SHADOWFD_FAILPOINT_REMOTE_REGISTER") {
                return Err(Error::sys(
                    "UFFDIO_REGISTER of the remote mapping (failpoint)",
                    std::io::Error::from_raw_os_error(libc::ENOMEM),
                ));
            }
            uffd.register(addr, reg_len)
                .map_err(|e| Error::sys("UFFDIO_REGISTER of the remote mapping", e))
        })();
        if let Err(e) = registered {
            *doomed = Some(mapping);
            return Err(abandon(e));
        }
        ci.ranges.lock().push((addr, reg_len));
        if let Some(k) = &ci.kick {
            crate::sys::event::eventfd_signal(k.as_fd());
        }
        let attached = wire::send(
            &ci.conn.stream,
            &Frame::new(wire::ATTACH, this.inner.handle, addr, reg_len, offset),
            None,
        )
        .and_then(|()| reply(&ci.conn.stream, wire::ATTACH, "ATTACH"));
        if let Err(e) = attached {
            ci.ranges.lock().retain(|r| r.0 != addr);
            *doomed = Some(mapping);
            return Err(e);
        }
        mapping.lazy = true;
        let map = mapping.map.as_ref().expect("mapped");
        #[cfg(feature = "failpoints")]
        let protected = if failpoint("SHADOWFD_FAILPOINT_REMOTE_PROTECT") {
            Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            // SAFETY: nothing refers into the mapping yet; every fault on it
            // is now served (or poisoned if the server goes away).
            unsafe { map.protect(libc::PROT_READ) }
        };
        #[cfg(not(feature = "failpoints"))]
        // SAFETY: nothing refers into the mapping yet; every fault on it is
        // now served (or poisoned if the server goes away).
        let protected = unsafe { map.protect(libc::PROT_READ) };
        if let Err(e) = protected {
            // Attached: its drop (after the io lock) sends UNMAP.
            *doomed = Some(mapping);
            return Err(Error::sys("mprotect the remote mapping readable", e));
        }
        Ok(mapping)
    }
}

/// A read-only mapping of a file served by another process
/// (`Deref<Target = [u8]>`).
///
/// A lazy one is registered with the client's userfaultfd and filled by the
/// server on first touch. Touching a page the source could not provide
/// raises `SIGBUS`; so does touching an unfilled page once the server has
/// gone away (never zeros, never a hang).
pub struct RemoteMapping {
    pub(super) map: Option<RawMap>,
    /// Inode of the memfd it maps: on drop, only what the kernel still
    /// shows of it at the offsets it had is unmapped.
    pub(super) ino: u64,
    /// Bytes shown (the mapping covers them rounded up to a page).
    pub(super) len: usize,
    /// Offset in the file of the first byte.
    pub(super) offset: u64,
    pub(super) lazy: bool,
    pub(super) file: RemoteFile,
}

impl Drop for RemoteMapping {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        let client = &self.file.inner.client;
        let addr = map.addr();
        if self.lazy && !client.server_gone() {
            // The server stops serving the range (poisoning what is
            // unfilled) before it is unmapped: the address may be reused.
            let f = Frame::new(wire::UNMAP, self.file.inner.handle, addr, 0, 0);
            let _ = client.call(&f, "UNMAP", false);
        }
        if self.lazy {
            client.inner.ranges.lock().retain(|r| r.0 != addr);
        }
        // Unmapped without any lock held: with UNMAP events the munmap waits
        // until the server (or, once it is gone, the watcher, which takes
        // that lock) has read the event. Only what is still this mapping's:
        // a part its user moved or unmapped may hold something else now.
        let parts = crate::sys::maps::Maps::open_self()
            .filter(crate::sys::maps::Maps::works)
            .map(|m| {
                let end = addr + map.len() as u64;
                m.showing(addr, end, self.ino, self.offset)
            });
        match parts {
            Some(p) if !(p.len() == 1 && p[0] == (addr, map.len() as u64)) => map.drop_parts(&p),
            _ => drop(map),
        }
    }
}

impl RemoteMapping {
    /// A mapping of no bytes of `file` (an empty file or range).
    pub(super) fn nothing(file: &RemoteFile, offset: u64) -> RemoteMapping {
        RemoteMapping {
            map: None,
            ino: 0,
            len: 0,
            offset,
            lazy: false,
            file: file.clone(),
        }
    }

    /// Receives the one shadow [`super::serve`] serves on the other end of
    /// `stream`, and maps it: lazily through a userfaultfd made here, or as
    /// a sealed descriptor for an eager or materialized shadow.
    pub fn receive(stream: UnixStream) -> Result<RemoteMapping> {
        let client = Client::from_stream(stream, ClientOptions::default())?;
        client.open("")?.map()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping is served lazily (faults go to the server).
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// Offset in the file of the mapping's first byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Address of the first byte (null for an empty mapping).
    pub fn as_ptr(&self) -> *const u8 {
        self.map
            .as_ref()
            .map_or(std::ptr::null(), |m| m.as_ptr().cast_const())
    }

    /// Bytes of address space the mapping covers: its length rounded up to
    /// a page.
    pub fn mapped_len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Takes the pages `at..at+len` out of the mapping (offsets in it, page
    /// multiples; `len` is rounded up to a page and cut at the mapping's
    /// end): the server stops serving them (protocol version 4, UNMAP with
    /// a length) and they become an inaccessible `PROT_NONE` anonymous
    /// reservation that the **caller** owns from then on (to unmap, or to
    /// map over). Returns what is left on either side, each a mapping of
    /// its own (`None` where nothing is left).
    ///
    /// # Safety
    /// No Rust reference points into `at..at+len`, and no other thread
    /// reads it while this runs.
    pub unsafe fn punch(
        mut self,
        at: usize,
        len: usize,
    ) -> Result<(Option<RemoteMapping>, Option<RemoteMapping>)> {
        let (total, z) = self.pages_of(at, len)?;
        let map = self.map.take().expect("a non-empty mapping");
        let base = map.addr();
        let client = self.file.inner.client.clone();
        if self.lazy && !client.server_gone() {
            let f = Frame::new(
                wire::UNMAP,
                self.file.inner.handle,
                base + at as u64,
                (z - at) as u64,
                0,
            );
            if let Err(e) = client.call(&f, "UNMAP of a part", false) {
                self.map = Some(map);
                return Err(e);
            }
        }
        // SAFETY: inside our own mapping; the caller vouches that nothing
        // borrows it.
        unsafe { crate::sys::mmap::reserve_fixed((base as usize + at) as *mut u8, z - at) }
            .map_err(|e| Error::sys("reserve the punched pages", e))?;
        let (left, right) = map.split(at, z);
        if self.lazy {
            let mut rg = client.inner.ranges.lock();
            rg.retain(|r| r.0 != base);
            for m in left.iter().chain(right.iter()) {
                rg.push((m.addr(), m.len() as u64));
            }
        }
        let piece = |m: RawMap, from: usize| {
            let len = if from + m.len() >= total {
                self.len - from
            } else {
                m.len()
            };
            RemoteMapping {
                map: Some(m),
                ino: self.ino,
                len,
                offset: self.offset + from as u64,
                lazy: self.lazy,
                file: self.file.clone(),
            }
        };
        let l = left.map(|m| piece(m, 0));
        let r = right.map(|m| piece(m, z));
        // `self` holds no mapping any more: its drop does nothing.
        Ok((l, r))
    }

    /// Follows its user's `mremap` of the pages `at..at+len` (from the
    /// mapping's start; all of its pages from `at` when `at + len` reaches
    /// its end) to `to`, where they are `new_len` bytes now. The kernel has
    /// moved them already, and the server follows the move through the
    /// client's userfaultfd (`EVENT_REMAP`): nothing is unmapped or
    /// UNMAPped here. Returns what stays at the old place, left and right
    /// of the moved part, and the moved part itself, each a mapping of its
    /// own (released like any other).
    ///
    /// # Safety
    /// The kernel must have moved exactly those pages to `to..to+new_len`
    /// (a successful `mremap` returned `to`), and nothing else may own that
    /// range.
    #[allow(clippy::type_complexity)]
    pub unsafe fn moved(
        mut self,
        at: usize,
        len: usize,
        to: usize,
        new_len: usize,
    ) -> Result<(Option<RemoteMapping>, Option<RemoteMapping>, RemoteMapping)> {
        let page = crate::page_size();
        let (total, z) = self.pages_of(at, len)?;
        if to % page != 0 || new_len == 0 {
            return Err(Error::Range {
                offset: at as u64,
                len: new_len as u64,
                size: total as u64,
            });
        }
        let map = self.map.take().expect("a non-empty mapping");
        let base = map.addr();
        let new_len = new_len.div_ceil(page) * page;
        // SAFETY: the caller vouches that the kernel moved the pages there
        // and that nothing else owns them.
        let there = unsafe { RawMap::adopt(to as *mut u8, new_len, &map) }
            .map_err(|e| Error::sys("take the moved pages", e))?;
        let (left, right) = map.split(at, z);
        if self.lazy {
            let client = &self.file.inner.client;
            let mut rg = client.inner.ranges.lock();
            rg.retain(|r| r.0 != base);
            for m in left
                .iter()
                .chain(right.iter())
                .chain(std::iter::once(&there))
            {
                rg.push((m.addr(), m.len() as u64));
            }
        }
        let piece = |m: RawMap, from: usize, shown: usize| RemoteMapping {
            map: Some(m),
            ino: self.ino,
            len: shown,
            offset: self.offset + from as u64,
            lazy: self.lazy,
            file: self.file.clone(),
        };
        let shown = |from: usize, upto: usize| upto.min(self.len).saturating_sub(from);
        let l = left.map(|m| piece(m, 0, shown(0, at)));
        let r = right.map(|m| piece(m, z, shown(z, total)));
        // Bytes of the file the moved part shows: as many as it showed,
        // or, grown, up to the end of the file.
        let file_end = self.file.inner.size.saturating_sub(self.offset) as usize;
        let moved_shown = new_len.min(file_end.saturating_sub(at));
        let moved = piece(there, at, moved_shown);
        // `self` holds no mapping any more: its drop does nothing.
        Ok((l, r, moved))
    }

    /// Checks the pages `at..at+len` (from the mapping's start; `at`
    /// page-aligned, `len` > 0) against the mapping and returns its length
    /// and where those pages end (page-rounded, at most its length).
    pub(super) fn pages_of(&self, at: usize, len: usize) -> Result<(usize, usize)> {
        let page = crate::page_size();
        let total = self.mapped_len();
        if at % page != 0 || len == 0 || at >= total {
            return Err(Error::Range {
                offset: at as u64,
                len: len as u64,
                size: total as u64,
            });
        }
        let z = at
            .saturating_add(len)
            .div_ceil(page)
            .saturating_mul(page)
            .min(total);
        Ok((total, z))
    }

    /// The file mapped.
    pub fn file(&self) -> &RemoteFile {
        &self.file
    }
}

impl std::ops::Deref for RemoteMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.map {
            // SAFETY: `len` bytes are mapped PROT_READ for the life of
            // `self`; the memfd is sealed against writes and lazy pages are
            // mapped only once filled (or poisoned: SIGBUS, never a read).
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr(), self.len) },
            None => &[],
        }
    }
}
