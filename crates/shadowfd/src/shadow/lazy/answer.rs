//! Answering faults: waiting on a chunk another thread is filling, and
//! mapping filled chunks into every consumer range that waits on them.

use super::*;

impl LazyShadow {
    /// Takes the faults waiting on the chunks of bytes `a..b`. Called
    /// after those chunks left Filling, so that a fault that saw Filling
    /// under the lock ([`LazyShadow::wait_on`]) is always taken.
    pub(super) fn take_waiters(&self, a: u64, b: u64) -> Vec<Waiter> {
        let (first, last) = (a / self.chunk, b.saturating_sub(1) / self.chunk);
        let mut w = self.waiters.lock();
        if w.is_empty() || b <= a {
            return Vec::new();
        }
        let keys: Vec<u64> = w.range(first..=last).map(|(&c, _)| c).collect();
        keys.into_iter()
            .filter_map(|c| w.remove(&c))
            .flatten()
            .collect()
    }

    /// Records a fault as waiting on `chunk` if it is still being filled;
    /// false if it is not (the caller looks at the chunk again). `remote`:
    /// the fault is not on the engine's own userfaultfd.
    pub(super) fn wait_on(&self, chunk: u64, hit: &Hit<'_>, remote: bool) -> bool {
        let (key, uffd) = if remote {
            let key = uffd_key(hit.uffd);
            let consumers = self.consumers.read();
            let uffd = consumers
                .containing(key, hit.addr)
                .and_then(|m| m.remote.clone());
            (key, uffd)
        } else {
            (0, None)
        };
        let mut w = self.waiters.lock();
        if self.chunks.get(chunk) != ChunkState::Filling {
            return false;
        }
        w.entry(chunk).or_default().push(Waiter {
            key,
            addr: hit.addr,
            offset: hit.offset,
            uffd,
        });
        true
    }

    pub(super) fn notify(&self) {
        let _g = self.done_lock.lock();
        self.done_cv.notify_all();
    }

    /// Maps filled bytes `a..b` into every consumer range of this process
    /// that shows them, and every remote one where a fault waits on them
    /// (waking its waiting threads), and poisons the bad pages there. The
    /// consumer range `mapped` has every good page of `a..b` already (a
    /// direct fill): only its bad pages are poisoned.
    pub(super) fn answer_all(
        &self,
        core: &Core,
        a: u64,
        b: u64,
        bad: &[(u64, Cause)],
        mapped: Option<u64>,
    ) {
        let page = core.page;
        let waiting = self.take_waiters(a, b);
        let consumers = self.consumers.read();
        let (ranges, unlisted) = consumers.answering(a, b, &waiting);
        for m in ranges {
            let Some((addr, len)) = m.overlap(a, b) else {
                continue;
            };
            let uffd = m.uffd(&core.uffd);
            if mapped == Some(m.id) {
                for (p, _) in bad {
                    if (m.offset..m.offset + m.len).contains(p) {
                        let _ = uffd.poison(m.start + p - m.offset, page);
                    }
                }
                // A fault there came after the direct copy woke the range
                // (its page was discarded since, `MADV_DONTNEED`): it is
                // answered with the other waiters below.
                continue;
            }
            // Runs of good pages between the bad ones.
            let mut at = addr;
            let end = addr + len;
            let to_addr = |off: u64| m.start + off - m.offset;
            for (p, _) in bad {
                let pa = to_addr(*p);
                if *p < m.offset || pa < at || pa >= end {
                    continue;
                }
                if pa > at {
                    let _ = uffd.continue_range(at, pa - at);
                }
                let _ = uffd.poison(pa, page);
                at = pa + page;
            }
            if at < end {
                let _ = uffd.continue_range(at, end - at);
            }
        }
        // Every fault of this process that waits is answered here: one may
        // wait where no consumer range says (the list lags the kernel when
        // events of several threads interleave), or in the range a direct
        // fill skipped above. `UFFDIO_CONTINUE` maps the page the mapping
        // there shows, and only if it is in the memfd; a page mapped above
        // already is only woken (`EEXIST`), any other failure wakes it to
        // fault again.
        for w in waiting.iter().filter(|w| w.key == 0) {
            if bad.iter().any(|(p, _)| *p == w.offset) {
                let _ = core.uffd.poison(w.addr, page);
            } else {
                let _ = core.uffd.continue_range(w.addr, page);
            }
        }
        // Another process's fault in a range no longer listed (detached or
        // moved since it was recorded): its page is mapped if it is in the
        // memfd, else woken to fault again (and be refused or served as the
        // range now stands). Never poisoned: what that address shows now
        // may be another range.
        for w in unlisted {
            if let Some(u) = &w.uffd
                && (bad.iter().any(|(p, _)| *p == w.offset)
                    || u.continue_range(w.addr, page).is_err())
            {
                let _ = u.wake(w.addr, page);
            }
        }
        drop(consumers);
        self.notify();
    }

    /// Answers a fault on a filled chunk: poisons a bad page, or maps the
    /// run of filled chunks from the faulting page (up to [`RUN_BYTES`], the
    /// end of the range and the next bad page). Returns the end of the
    /// chunks it mapped, if it mapped any.
    pub(super) fn answer_filled(&self, core: &Core, hit: &Hit<'_>) -> Option<u64> {
        let page = core.page;
        let bad = self.bad.lock();
        if bad.contains_key(&hit.offset) {
            drop(bad);
            let _ = hit.uffd.poison(hit.addr, page);
            return None;
        }
        let c = hit.offset / self.chunk;
        let filled = self.chunks.filled_until(c, c + run_chunks(self.chunk));
        let mut end = round_up((filled * self.chunk).min(self.size), page);
        end = end.min(hit.offset + hit.limit);
        if let Some((p, _)) = bad.range(hit.offset..end).next() {
            end = *p;
        }
        drop(bad);
        let mut len = end.max(hit.offset + page) - hit.offset;
        // The run ends where the table says the range ends, and the table
        // lags the kernel: if the consumer has since unmapped a part of the
        // range (its event not applied yet), the run spans a hole and the
        // kernel refuses all of it (`ENOENT`: one call, one mapping). Then
        // the faulting page alone; only if that fails too is the page not
        // in the memfd, and nothing can be vouched for.
        if hit.uffd.continue_range(hit.addr, len).is_err() {
            if len == page || hit.uffd.continue_range(hit.addr, page).is_err() {
                let _ = core.refuse(hit.uffd, hit.addr);
                return None;
            }
            len = page;
        }
        Some((hit.offset + len).div_ceil(self.chunk))
    }
}
