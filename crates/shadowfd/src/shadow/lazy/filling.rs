//! A fill from start to end: claim the chunks, read and install them,
//! account the resident bytes against the budget, then answer the waiting
//! faults; or refuse for now when the budget is spent.

use super::*;

impl LazyShadow {
    /// Byte range of chunks `run`, clipped to the shadow's size.
    pub(super) fn run_range(&self, run: &Range<u64>) -> (u64, u64) {
        (
            run.start * self.chunk,
            (run.end * self.chunk).min(self.size),
        )
    }

    /// Fills whatever chunks of `range` are still empty, in runs of at most
    /// `run_chunks`.
    pub(super) fn fill_empty(&self, core: &Core, range: Range<u64>, run_chunks: u64, why: Why) {
        let mut c = range.start;
        while c < range.end {
            match self.chunks.claim_run(c, range.end.min(c + run_chunks)) {
                Some(run) => {
                    c = run.end;
                    self.fill(core, run, why);
                }
                None => c += 1,
            }
        }
    }

    /// Fills the chunks `run`, which the caller has claimed (Filling), then
    /// publishes them and answers the consumer ranges
    /// ([`LazyShadow::answer_all`]): filled pages are mapped
    /// (`UFFDIO_CONTINUE`), bad ones poisoned. For prefetch, a full
    /// budget gives the chunks back (Empty) instead of poisoning them.
    pub(super) fn fill(&self, core: &Core, run: Range<u64>, why: Why) {
        self.fill_into(core, run, why, None)
    }

    /// [`LazyShadow::fill`], straight into the faulting consumer range
    /// `direct` where it can ([`LazyShadow::direct_for`]).
    pub(super) fn fill_into(&self, core: &Core, run: Range<u64>, why: Why, direct: Option<Direct>) {
        let r = catch_unwind(AssertUnwindSafe(|| {
            self.fill_claimed(core, run.clone(), why, direct)
        }));
        if r.is_err() {
            // A bug, not a source error (those are caught where the source
            // is called): the run's chunks are still claimed by this thread.
            // Resolve them as bad so that nobody waits on them for ever.
            for ctr in [&self.counters, &core.counters] {
                ctr.worker_panics.fetch_add(1, Ordering::Relaxed);
            }
            let still: Vec<u64> = run
                .clone()
                .filter(|&c| self.chunks.get(c) == ChunkState::Filling)
                .collect();
            if let (Some(&a), Some(&b)) = (still.first(), still.last()) {
                let (off, end) = self.run_range(&(a..b + 1));
                let bad = fill::bad_pages(&[(off, end, Cause::FillPanicked)], core.page);
                self.record_error(
                    &core.counters,
                    format!("{}: {}", self.name, Cause::FillPanicked),
                );
                {
                    let mut m = self.bad.lock();
                    for (p, c) in &bad {
                        m.insert(*p, c.clone());
                    }
                }
                for c in still {
                    self.chunks.publish(c..c + 1);
                }
                self.answer_all(core, off, round_up(end, core.page), &bad, None);
            }
        }
    }

    pub(super) fn fill_claimed(
        &self,
        core: &Core,
        run: Range<u64>,
        why: Why,
        direct: Option<Direct>,
    ) {
        // Read once per process, not on every fill: `cargo test` and
        // `cargo bench` build the CLI with this feature, so the binaries
        // they leave (and benchmark) took the environment lock and scanned
        // the environment on every fault (2026-12-07: no difference
        // measurable above the noise at 1 GiB random:0.01, but none to pay).
        #[cfg(feature = "failpoints")]
        static FILL_PANIC: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        #[cfg(feature = "failpoints")]
        if let Some(at) = *FILL_PANIC.get_or_init(|| {
            std::env::var("SHADOWFD_FAILPOINT_FILL_PANIC")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
        }) {
            let (off, end) = self.run_range(&run);
            assert!(
                !(off..end).contains(&at),
                "failpoint: a fill over offset {at}"
            );
        }
        // A replay step is as speculative as readahead.
        let prefetch = matches!(why, Why::Prefetch | Why::Replay);
        let readahead = why == Why::Prefetch;
        // A fault needs its first chunk; the rest of its run is a guess.
        let speculative = prefetch || (why == Why::Fault && run.end - run.start > 1);
        // Where the worker's turn began (`sys::clock`): the latency counts
        // the fault's look-up too, a few hundred ns.
        let t0 = crate::sys::clock::recent();
        let (off, end) = self.run_range(&run);
        let page = core.page;
        let span = round_up(end - off, page);
        let strict = self.stale == StalePolicy::Strict;
        let mut bad: Vec<BadRange> = Vec::new();
        let mut good_bytes = 0u64;
        let mut reserved = 0u64;
        // The consumer range every good page was installed in directly, and
        // whether the fill was counted already (before that woke anyone).
        let (mut mapped, mut accounted) = (None, false);
        if strict && self.check_changed() {
            bad.push((off, end, STALE_BEFORE));
        } else if let Err(cause) = core.reserve(span, speculative) {
            if !prefetch && run.end - run.start > 1 {
                // Give back all but the faulting chunk and try with that alone.
                let rest = run.start + 1..run.end;
                self.give_back(core, rest);
                let direct = direct.filter(|_| self.chunk <= buffer::PIECE as u64);
                return self.fill_into(core, run.start..run.start + 1, why, direct);
            }
            if prefetch {
                return self.give_back(core, run);
            }
            return self.refuse_for_now(core, run, cause);
        } else {
            reserved = span;
            match direct.filter(|_| span <= buffer::PIECE as u64) {
                Some(d) => {
                    let count = |good| {
                        self.account(core, &run, readahead, good, span, t0);
                        accounted = true;
                    };
                    (good_bytes, mapped) =
                        self.read_and_install_direct(core, off, end, d, &mut bad, count);
                }
                None => {
                    let mapped_end;
                    (good_bytes, mapped_end) = self.read_and_install(core, off, end, &mut bad);
                    // The metadata is read for every fill only where the
                    // result depends on it: a strict shadow, or pages copied
                    // from the source's mapping (a cut may have made them
                    // zeros). Bytes read with `read_at` are as safe as a
                    // direct fill's, and like it look at most once per
                    // millisecond (an `fstat` per remote fault before).
                    let (changed, size) = if strict || mapped_end > off {
                        self.check_source()
                    } else {
                        (self.check_changed_lately(core), None)
                    };
                    if strict && changed {
                        bad = vec![(off, end, STALE_DURING)];
                        good_bytes = 0;
                    } else {
                        good_bytes -= self.recheck_mapped(core, off, mapped_end, size, &mut bad);
                    }
                }
            }
        }
        let bad_pages = fill::bad_pages(&bad, page);
        if !bad_pages.is_empty() {
            let first = &bad_pages[0].1;
            self.record_error(&core.counters, format!("{}: {first}", self.name));
            let n = bad_pages.len() as u64;
            self.counters.poisoned_pages.fetch_add(n, Ordering::Relaxed);
            core.counters.poisoned_pages.fetch_add(n, Ordering::Relaxed);
            let mut b = self.bad.lock();
            for (p, r) in &bad_pages {
                b.insert(*p, r.clone());
            }
        }
        if !accounted {
            self.account(core, &run, readahead, good_bytes, reserved, t0);
        }
        // Publish before answering: a fault message read after this sees
        // Filled and is answered by whoever reads it.
        self.chunks.publish(run);
        self.answer_all(core, off, off + span, &bad_pages, mapped);
    }

    /// Counts a fill of `run` (`good` bytes read, `reserved` resident;
    /// `prefetch`: readahead).
    pub(super) fn account(
        &self,
        core: &Core,
        run: &Range<u64>,
        prefetch: bool,
        good: u64,
        reserved: u64,
        t0: std::time::Instant,
    ) {
        self.resident.fetch_add(reserved, Ordering::Relaxed);
        // Not a refresh: a consumer's own thread fills too (populate), and
        // only the service's threads keep a reading (`sys::clock`).
        let ns = t0.elapsed().as_nanos() as u64;
        let nchunks = run.end - run.start;
        for ctr in [&self.counters, &core.counters] {
            ctr.chunks_filled.fetch_add(nchunks, Ordering::Relaxed);
            ctr.bytes_filled.fetch_add(good, Ordering::Relaxed);
            if prefetch {
                ctr.readahead_chunks.fetch_add(nchunks, Ordering::Relaxed);
            }
            ctr.fill_latency.record(ns);
        }
    }

    /// A demand fill the memory budget has no room for: the faulting threads
    /// get SIGBUS now, but nothing is recorded as bad. The chunk goes back to
    /// Empty, so a later fault or `populate` fills it normally once memory is
    /// free; the poison markers left in this process's consumer ranges are
    /// dropped when the engine's memory is given back
    /// ([`FaultTarget::memory_freed`]). A consumer range in another process
    /// keeps its marker until some fill of the chunk maps it there: its
    /// fault stays recorded as waiting on the run's chunks (a marked page
    /// raises `SIGBUS` without a fault, so nothing else would record it).
    pub(super) fn refuse_for_now(&self, core: &Core, run: Range<u64>, cause: Cause) {
        let (off, end) = self.run_range(&run);
        let end = round_up(end, core.page);
        self.record_error(&core.counters, format!("{}: {cause}", self.name));
        for ctr in [&self.counters, &core.counters] {
            ctr.budget_refusals.fetch_add(1, Ordering::Relaxed);
        }
        *self.refused_cause.lock() = Some(cause);
        self.chunks.release(run.clone());
        let waiting = self.take_waiters(off, end);
        {
            let mut refused = self.refused.lock();
            let consumers = self.consumers.read();
            for m in consumers.answering(off, end, &waiting).0 {
                if let Some((addr, len)) = m.overlap(off, end) {
                    let _ = m.uffd(&core.uffd).poison(addr, len);
                    if m.remote.is_none() {
                        refused.push((m.id, addr, len));
                    }
                }
            }
        }
        // A fault of this process that waits where no listed range says
        // (the list lags the kernel, see `answer_all`) is refused too,
        // rather than left waiting; its marker is not among those
        // `memory_freed` drops (that page raises SIGBUS until unmapped).
        // One in a listed range finds its marker there (`EEXIST`, woken).
        for w in waiting.iter().filter(|w| w.key == 0) {
            let _ = core.uffd.poison(w.addr, core.page);
        }
        // Remote faults stay recorded (their markers stay, see above); this
        // process's ranges are all answered when the chunks fill.
        let waiting: Vec<Waiter> = waiting.into_iter().filter(|w| w.key != 0).collect();
        if !waiting.is_empty() {
            let mut w = self.waiters.lock();
            for c in run {
                w.entry(c).or_default().extend_from_slice(&waiting);
            }
        }
        core.note_refusal(self.target());
        self.notify();
    }

    /// Returns claimed chunks to Empty and wakes whoever waits on them: they
    /// fault again and claim the chunks themselves.
    pub(super) fn give_back(&self, core: &Core, run: Range<u64>) {
        let (off, end) = self.run_range(&run);
        self.chunks.release(run);
        let end = round_up(end, core.page);
        let waiting = self.take_waiters(off, end);
        let consumers = self.consumers.read();
        let (ranges, unlisted) = consumers.answering(off, end, &waiting);
        for m in ranges {
            if let Some((addr, len)) = m.overlap(off, end) {
                let _ = m.uffd(&core.uffd).wake(addr, len);
            }
        }
        // Waiting faults in no listed range (see `answer_all`): this
        // process's, and other processes' through the userfaultfd they
        // came on.
        for w in waiting.iter().filter(|w| w.key == 0) {
            let _ = core.uffd.wake(w.addr, core.page);
        }
        for w in unlisted {
            if let Some(u) = &w.uffd {
                let _ = u.wake(w.addr, core.page);
            }
        }
        drop(consumers);
        self.notify();
    }
}
