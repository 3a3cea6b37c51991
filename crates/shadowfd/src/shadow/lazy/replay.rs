//! The working set as the shadow drives it: recording first needs, saving
//! the record, replaying it ahead of demand and mapping replayed chunks into
//! the consumer ranges ahead of the touch. The record itself is
//! [`super::workset`].

use super::*;

impl LazyShadow {
    /// Notes that a consumer needed chunks `first..end` (a fault's answer
    /// mapped them, `populate` asked for them, or readahead filled them),
    /// for the working set.
    pub(super) fn need(&self, core: &Core, first: u64, end: u64) {
        let Some(ws) = &self.workset else {
            return;
        };
        let n = ws.need(first, end);
        let both = [&self.counters, &core.counters];
        workset::count(both, |c| &c.workset_recorded, n.recorded);
        workset::count(both, |c| &c.workset_hits, n.hits);
        workset::count(both, |c| &c.workset_used, n.hits);
        if n.diverged {
            workset::count(both, |c| &c.workset_diverged, 1);
        }
        if let Some(r) = n.store {
            // The window closed: stored off the fault path.
            let dir = ws.dir();
            let _ = std::thread::Builder::new()
                .name("shadowfd-workset".into())
                .spawn(move || {
                    let _ = workset::store_in(&dir, &r);
                });
        }
    }

    /// Ends the working-set recording now and stores the record (see
    /// [`crate::Shadow::save_workset`]).
    pub fn save_workset(&self) -> std::io::Result<Option<std::path::PathBuf>> {
        match &self.workset {
            Some(ws) => match ws.finish() {
                Some(r) => ws.store(&r).map(Some),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Recorded chunks the replay has still to look at (0 once it ended
    /// or stopped).
    pub fn workset_pending(&self) -> u64 {
        match &self.workset {
            Some(ws) if ws.replaying() && !self.users.none() => {
                (ws.plan().len() - ws.done.load(Ordering::Acquire).min(ws.plan().len())) as u64
            }
            _ => 0,
        }
    }

    /// Notes bytes `offset..offset+len` asked for by `populate` or
    /// `read_at`, for the working set.
    pub fn need_bytes(&self, offset: u64, len: u64) {
        if self.workset.is_none() || len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let (first, last) = (offset / self.chunk, (end - 1) / self.chunk);
        self.need(&self.service.core, first, last + 1);
    }

    /// One step of the working-set replay: takes the next recorded chunks
    /// (at most [`workset::STEP_CHUNKS`]) from the shared cursor and fills
    /// them in recorded order, consecutive ones in runs, as speculative
    /// fills (the budget's first half only), then queues the next step
    /// behind whatever faults wait. Each fill
    /// maps its chunks into every consumer range of this process
    /// ([`LazyShadow::answer_all`]), ahead of the touch. Stops for good at
    /// the first fill the budget refuses, or once the run diverged.
    pub(super) fn replay_step(&self, core: &Core) {
        let Some(ws) = &self.workset else {
            return;
        };
        let plan = ws.plan();
        let mut pos = ws
            .cursor
            .fetch_add(workset::STEP_CHUNKS, Ordering::AcqRel)
            .min(plan.len());
        let start = pos;
        let step_end = (pos + workset::STEP_CHUNKS).min(plan.len());
        let run = run_chunks(self.chunk);
        while pos < step_end {
            if !ws.replaying() {
                return;
            }
            let c = plan[pos];
            let mut e = c + 1;
            pos += 1;
            while pos < step_end && plan[pos] == e && e - c < run {
                e += 1;
                pos += 1;
            }
            let mut x = c;
            while x < e {
                let Some(r) = self.chunks.claim_run(x, e) else {
                    x += 1;
                    continue;
                };
                x = r.end;
                self.fill(core, r.clone(), Why::Replay);
                if self.chunks.get(r.start) != ChunkState::Filled {
                    // Given back: the budget has no room for more.
                    ws.stop();
                    return;
                }
                self.note_replayed(core, ws, r);
            }
        }
        ws.done.fetch_add(step_end - start, Ordering::AcqRel);
        if step_end < plan.len() && ws.replaying() {
            core.prefetch(self.target(), replay_work());
        }
    }

    /// Counts the chunks of `run` the replay filled, and those of them
    /// its fill mapped into a consumer range of this process.
    pub(super) fn note_replayed(&self, core: &Core, ws: &workset::Workset, run: Range<u64>) {
        let (off, end) = self.run_range(&run);
        let shown = self
            .consumers
            .read()
            .local()
            .iter()
            .any(|m| m.overlap(off, end).is_some());
        let both = [&self.counters, &core.counters];
        for c in run {
            if ws.replayed(c) {
                workset::count(both, |x| &x.workset_replayed, 1);
            }
            if shown && ws.used(c) {
                workset::count(both, |x| &x.workset_mapped_ahead, 1);
                workset::count(both, |x| &x.workset_used, 1);
            }
        }
    }

    /// Maps the filled chunks of the new consumer range `start..start+len`
    /// (this process's, showing the shadow from `offset`) into it now,
    /// while a working set is replayed: what the replay filled before the
    /// range was made then costs no fault either. Only Filled chunks, and
    /// not their bad pages (those fault, and are poisoned then).
    pub(super) fn map_ahead(&self, start: u64, len: u64, offset: u64) {
        let Some(ws) = self.workset.as_ref().filter(|w| w.has_plan()) else {
            return;
        };
        let core = &self.service.core;
        let page = core.page;
        let end_off = (offset + len).min(round_up(self.size, page));
        if end_off <= offset {
            return;
        }
        let bad = self.bad.lock().clone();
        let both = [&self.counters, &core.counters];
        let (first, last) = (offset / self.chunk, (end_off - 1) / self.chunk);
        let mut c = first;
        while c <= last {
            if self.chunks.get(c) != ChunkState::Filled {
                c += 1;
                continue;
            }
            let e = self.chunks.filled_until(c, last + 1);
            for x in c..e {
                if ws.used(x) {
                    workset::count(both, |k| &k.workset_mapped_ahead, 1);
                    workset::count(both, |k| &k.workset_used, 1);
                }
            }
            let a = (c * self.chunk).max(offset);
            let b = round_up((e * self.chunk).min(self.size), page).min(end_off);
            let mut at = a;
            for (&p, _) in bad.range(a..b) {
                if p > at {
                    let _ = core.uffd.continue_range(start + at - offset, p - at);
                }
                at = p + page;
            }
            if at < b {
                let _ = core.uffd.continue_range(start + at - offset, b - at);
            }
            c = e;
        }
    }
}
