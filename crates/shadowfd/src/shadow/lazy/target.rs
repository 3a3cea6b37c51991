//! How the fault service drives a lazy shadow: its faults, its events
//! (unmap, remap, fork), and the fills it runs as work.

use super::*;

impl LazyShadow {
    /// A kernel-mediated access to the alias or the template: fill (or wait
    /// for) the page here, then map it (template) or let the access retry
    /// on the now present page (alias, registered MISSING only).
    pub(super) fn serve_internal(&self, core: &Core, hit: &Hit<'_>) {
        let len = core.page.min(self.size - hit.offset);
        if self.populate(hit.offset, len).is_err() {
            let _ = core.refuse(hit.uffd, hit.addr);
        } else if hit.uffd.continue_range(hit.addr, core.page).is_err() {
            let _ = hit.uffd.wake(hit.addr, core.page);
        }
    }
}

impl FaultTarget for LazyShadow {
    fn on_fault(&self, core: &Core, hit: Hit<'_>) -> Option<Work> {
        if !self.ready.load(Ordering::Acquire) {
            let _ = hit.uffd.wake(hit.addr, core.page);
            return None;
        }
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        core.counters.faults.fetch_add(1, Ordering::Relaxed);
        if hit.offset >= self.size {
            let _ = core.refuse(hit.uffd, hit.addr);
            return None;
        }
        if hit.internal {
            self.serve_internal(core, &hit);
            return None;
        }
        let chunk = hit.offset / self.chunk;
        let plan = self.while_replaying(self.readahead.lock().on_fault(chunk));
        let remote = !std::ptr::eq(hit.uffd, &core.uffd);
        let mut mine = None;
        let mut filled_to = None;
        loop {
            match self.chunks.get(chunk) {
                ChunkState::Empty => {
                    if let Some(r) = self.chunks.claim_run(chunk, plan.now.end) {
                        if remote {
                            // Ours to fill: nobody else can take it, so
                            // it is still Filling here.
                            let ok = self.wait_on(chunk, &hit, true);
                            debug_assert!(ok, "a claimed chunk is Filling");
                        }
                        mine = Some(r);
                        break;
                    }
                }
                // The filler answers every range where a fault waits, and
                // every other range of this process but the one it filled
                // directly, once it is done.
                ChunkState::Filling => {
                    if self.wait_on(chunk, &hit, remote) {
                        break;
                    }
                }
                ChunkState::Filled => {
                    filled_to = self.answer_filled(core, &hit);
                    break;
                }
            }
        }
        for a in plan.ahead {
            let work = Work {
                chunks: a,
                why: Why::Prefetch,
                direct: None,
            };
            core.prefetch(self.target(), work);
        }
        match (&mine, filled_to) {
            (Some(r), _) => self.need(core, r.start, r.end),
            (None, Some(e)) => self.need(core, chunk, e.max(chunk + 1)),
            (None, None) => self.need(core, chunk, chunk + 1),
        }
        mine.map(|chunks| {
            let direct = self.direct_for(core, &hit, &chunks);
            Work {
                chunks,
                why: Why::Fault,
                direct,
            }
        })
    }

    fn memory_freed(&self, _core: &Core) {
        let refused = std::mem::take(&mut *self.refused.lock());
        // The read lock keeps every listed range mapped: a consumer range is
        // removed from the list (write lock) before it is unmapped.
        let consumers = self.consumers.read();
        for (id, addr, len) in refused {
            if consumers.contains_id(id) {
                // Drops the poison markers only: these pages were never mapped.
                let _ =
                    crate::sys::mmap::madvise(addr as *mut u8, len as usize, libc::MADV_DONTNEED);
            }
        }
    }

    fn on_unmap(&self, _core: &Core, space: Space<'_>, lo: u64, hi: u64) {
        self.cut_consumers(space_key(space), lo, hi);
    }

    fn on_remap(&self, _core: &Core, space: Space<'_>, from: u64, to: u64, len: u64) {
        let key = space_key(space);
        let next = || self.next_id.fetch_add(1, Ordering::Relaxed);
        let moved = (self.consumers.read()).moved(key, from, to, len, space.cloned(), next);
        let mut cs = self.consumers.write();
        cs.drop_overlapping(key, to, to + len);
        for m in moved {
            cs.insert(m);
        }
    }

    fn on_fork(&self, _core: &Core, parent: Space<'_>, child: &Arc<Uffd>) {
        let next = || self.next_id.fetch_add(1, Ordering::Relaxed);
        let (key, child) = (space_key(parent), Some(child.clone()));
        let copies = (self.consumers.read()).moved(key, 0, 0, u64::MAX, child, next);
        let mut cs = self.consumers.write();
        for m in copies {
            cs.insert(m);
        }
    }

    fn on_adopt(
        &self,
        _core: &Core,
        space: Space<'_>,
        start: u64,
        len: u64,
        offset: u64,
        shared: bool,
    ) {
        self.add_consumer(space.cloned(), start, len, offset, shared);
    }

    fn hold_range(&self, on: bool) {
        self.gone.hold_range(on);
    }

    fn orphan(&self, core: &Core, uffd: &Uffd, start: u64, len: u64, offset: u64) {
        let page = core.page;
        // Fills in flight end first (for at most a second): the pages the
        // parent itself just read are among them.
        let (c0, c1) = (
            offset / self.chunk,
            (offset + len).min(self.size).div_ceil(self.chunk),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while (c0..c1).any(|c| self.chunks.get(c) == ChunkState::Filling)
            && std::time::Instant::now() < deadline
        {
            let mut g = self.done_lock.lock();
            let _ = self
                .done_cv
                .wait_for(&mut g, std::time::Duration::from_millis(10));
        }
        let bad = self.bad.lock().clone();
        let mut at = 0;
        while at < len {
            let off = offset + at;
            let good = off < self.size
                && self.chunks.get(off / self.chunk) == ChunkState::Filled
                && !bad.contains_key(&off);
            // A page mapped there already is only woken (`EEXIST`).
            if good {
                let _ = uffd.continue_range(start + at, page);
            } else {
                let _ = uffd.poison(start + at, page);
            }
            at += page;
        }
    }

    fn run(&self, core: &Core, work: Work) {
        // A replay is queued by `open` before the first user holds the
        // shadow; once the last one goes, the shadow drops and the queued
        // step finds nothing (it holds the shadow weakly).
        if work.why == Why::Prefetch && self.users.none() {
            return; // nobody left to read what it would fill
        }
        let _busy = self.gone.fill();
        match work.why {
            Why::Prefetch => {
                let chunks = work.chunks.clone();
                self.fill_empty(core, work.chunks, run_chunks(self.chunk), Why::Prefetch);
                // Readahead maps its chunks into this process's consumer
                // ranges, which then never fault on them: recorded as
                // needed when filled, or a sequential reader's record
                // would hold one chunk in a window. Only what was filled:
                // a full budget gives chunks back.
                if self.workset.is_some() {
                    let mut c = chunks.start;
                    while c < chunks.end {
                        let e = self.chunks.filled_until(c, chunks.end);
                        if e > c {
                            self.need(core, c, e);
                        }
                        c = e + 1;
                    }
                }
            }
            Why::Replay => self.replay_step(core, work.chunks),
            why => self.fill_into(core, work.chunks, why, work.direct),
        }
    }
}
