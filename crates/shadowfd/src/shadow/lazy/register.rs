//! Consumer ranges: registering a range with the engine's userfaultfd,
//! adding and removing this process's and other processes' ranges.

use super::*;

/// A consumer range's registration with the engine's userfaultfd;
/// unregisters on drop what is still its own (see [`Registration::release`]).
pub(crate) struct Registration {
    shadow: User,
    start: u64,
    len: u64,
    /// Key of its region ([`Core::add_region`]).
    owner: u64,
    /// The process that registered it: a forked child's copy of this
    /// handle must not touch the parent's registration (userfaultfd
    /// ioctls act on the address space that made the userfaultfd).
    pid: u32,
    released: bool,
}

impl Registration {
    /// Unregisters and forgets the parts of the range that are still this
    /// registration's, and returns them. A part the consumer moved away or
    /// unmapped itself (the kernel's events said so) is not returned: what
    /// lies at that address now is not ours to unmap. In a forked child,
    /// nothing is done and nothing returned.
    pub fn release(mut self) -> Vec<(u64, u64)> {
        self.release_now()
    }

    fn release_now(&mut self) -> Vec<(u64, u64)> {
        if std::mem::replace(&mut self.released, true) || std::process::id() != self.pid {
            return Vec::new();
        }
        let core = &self.shadow.service.core;
        // The events of the consumer's own munmap or mremap of the range may
        // have been read but not applied yet (the kernel lets the caller go
        // on when they are read): applied first, so that what is returned
        // is what is still the range's.
        core.sync_events();
        let parts = core.release_owned(self.owner, self.start, self.len);
        for &(a, l) in &parts {
            let _ = core.uffd.unregister(a, l);
            self.shadow.cut_consumers(0, a, a + l);
        }
        parts
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release_now();
    }
}

impl LazyShadow {
    /// Registers `start..start+len` of this process, a mapping of the memfd
    /// from `offset`, with the engine's userfaultfd. The caller made it
    /// `PROT_NONE`, or vouches that nobody touches it until this returns.
    pub fn register(self: &Arc<Self>, start: u64, len: u64, offset: u64) -> Result<Registration> {
        self.register_as(start, len, offset, false)
    }

    /// Claims `start..start+len` (a mapping of the memfd from `offset`) as a
    /// consumer range: in the table before the kernel can send a fault from
    /// it, so that no answer meant for a range that was there before lands
    /// in it unseen (an answer to an address no region covers poisons it).
    /// The caller registers it next; dropping the result forgets it.
    pub(super) fn claim(
        self: &Arc<Self>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) -> Registration {
        let core = &self.service.core;
        // An event naming these addresses from before they were ours
        // (another range's munmap or move) must not cut this range out.
        core.sync_events();
        self.add_consumer(None, start, len, offset, shared);
        let owner = core.add_region(start, len, offset, false, shared, self.target());
        Registration {
            shadow: User::new(self.clone()),
            start,
            len,
            owner,
            pid: std::process::id(),
            released: false,
        }
    }

    pub(super) fn register_as(
        self: &Arc<Self>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) -> Result<Registration> {
        let reg = self.claim(start, len, offset, shared);
        self.service
            .core
            .uffd
            .register(start, len)
            .map_err(|e| Error::sys("UFFDIO_REGISTER of a consumer mapping", e))?;
        self.map_ahead(start, len, offset);
        self.prefetch_replay(&self.service.core);
        Ok(reg)
    }

    /// Whether lazy mappings follow a `fork` into the child (the engine
    /// negotiated `UFFD_FEATURE_EVENT_FORK`); if not, they are kept out of
    /// children with `MADV_DONTFORK`, since a child's copy would be
    /// unregistered and read its holes as zeros.
    pub fn follows_fork(&self) -> bool {
        self.service.core.uffd.follows_fork()
    }

    pub(super) fn add_consumer(
        &self,
        remote: Option<Arc<Uffd>>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.consumers.write().insert(Consumer {
            id,
            start,
            len,
            offset,
            remote,
            shared,
        });
        id
    }

    pub(super) fn remove_consumer(&self, id: u64) {
        self.consumers.write().remove(id);
    }

    /// Removes `lo..hi` of the address space of the userfaultfd `key` from
    /// the consumer ranges; what sticks out on either side stays.
    pub(super) fn cut_consumers(&self, key: usize, lo: u64, hi: u64) {
        let next = || self.next_id.fetch_add(1, Ordering::Relaxed);
        self.consumers.write().cut(key, lo, hi, next);
    }

    /// Adds a consumer range registered with another process's userfaultfd,
    /// showing the shadow from `offset`; returns a key for
    /// [`LazyShadow::remove_remote`]. Its faults are answered with
    /// `UFFDIO_CONTINUE` after the fill (never a direct copy: the server
    /// cannot see whether the client's mapping is shared).
    /// While a working set is replayed, what is filled already is mapped
    /// into the range at once ([`LazyShadow::map_ahead_via`]).
    pub fn add_remote(&self, uffd: Arc<Uffd>, start: u64, len: u64, offset: u64) -> u64 {
        let id = self.add_consumer(Some(uffd.clone()), start, len, offset, false);
        self.map_ahead_via(&uffd, start, len, offset);
        id
    }

    pub fn remove_remote(&self, key: u64) {
        self.remove_consumer(key);
    }

    /// Ends the service of a client's range `start..start + len` (showing
    /// the shadow from `offset`) through its userfaultfd `uffd`: every page
    /// of a chunk not Filled gets a poison marker (a later touch raises
    /// `SIGBUS`, never blocks), then the whole range is woken once. A
    /// Filled chunk's page is mapped there already, or faults again and is
    /// refused as the range now stands. `uffd.poison` over the whole range
    /// would crawl over the mapped pages one at a time (`EEXIST`, then a
    /// wake: two system calls a page, about half a second for a 1 GiB range
    /// read whole, paid by every program's last `munmap` under `run`); this
    /// costs one call per unfilled run.
    pub fn poison_unfilled_via(&self, uffd: &Uffd, start: u64, len: u64, offset: u64) {
        let page = self.service.core.page;
        let end_off = offset + len;
        let nchunks = self.size.div_ceil(self.chunk);
        let mut at = offset;
        while at < end_off {
            let c = at / self.chunk;
            if c < nchunks && self.chunks.get(c) == ChunkState::Filled {
                let e = self.chunks.filled_until(c, nchunks);
                at = (e * self.chunk).min(end_off);
                continue;
            }
            // An unfilled run: up to the next Filled chunk (or the end).
            let z = self.chunks.unfilled_until(c + 1, nchunks);
            let b = if z >= nchunks {
                end_off
            } else {
                (z * self.chunk).min(end_off)
            };
            let (lo, hi) = (at / page * page, round_up(b, page));
            let _ = uffd.poison(start + lo - offset, hi - lo);
            at = b;
        }
        let _ = uffd.wake(start, len);
    }

    /// How many consumer ranges in other processes are attached.
    pub fn remote_consumers(&self) -> usize {
        self.consumers.read().remote_len()
    }
}
