//! The working set as the shadow drives it: recording first needs, saving
//! the record, replaying it ahead of demand and mapping replayed chunks into
//! the consumer ranges ahead of the touch. The record itself is
//! [`super::workset`].

use super::*;

/// A replay fill no consumer range can take straight: it names no range
/// (ids start at 1), so [`LazyShadow::read_and_install_direct`] reads the
/// run with `read_at` into the fill buffer and installs it through the
/// alias, instead of copying from the source's mapping, which faults each
/// isolated source page in with the kernel's fault-around, and reading the
/// source's metadata after each fill. A replay alone of 2,621 isolated
/// chunks of a 1 GiB file (tests/replay_rate.rs, 2 busy vCPUs,
/// 2026-12-07): 13.7-14.5 us per chunk through the mapping, 7.6-16.9 us
/// this way, 7.8-10.5 us straight into a consumer range.
const THROUGH_ALIAS: Direct = Direct {
    consumer: 0,
    addr: 0,
};

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
        self.prefetch_replay(&self.service.core);
        self.need(&self.service.core, first, last + 1);
    }

    /// One step of the working-set replay: takes the next recorded chunks
    /// (at most [`workset::STEP_CHUNKS`]) from the shared cursor, or the
    /// positions `resume` of the plan a step left when a fault came, and
    /// fills them in recorded order, consecutive ones in runs, as
    /// speculative fills (the budget's first half only), then queues the
    /// next step behind whatever faults wait. Every [`workset::LOOK_EVERY`]
    /// runs it looks for a fault waiting on the engine's userfaultfd and,
    /// if one is, queues the rest of its positions behind it and returns:
    /// a demand fault goes first even when every worker replays. A step
    /// that was fast starts another chain of steps (up to
    /// [`workset::Workset::max_chains`]). Each fill goes straight into the
    /// consumer range that shows its run ([`LazyShadow::replay_direct`]),
    /// else through the alias, and is mapped into every other consumer
    /// range, this process's and others', ahead of the touch. Stops for
    /// good at the first fill the budget refuses, or once the run diverged.
    pub(super) fn replay_step(&self, core: &Core, resume: Range<u64>) {
        self.replay_steps(core, resume, true);
    }

    /// [`LazyShadow::replay_step`]; `chain`: queue the next step (a
    /// worker's chain), else only fill this one (the opening thread's
    /// prefetch, [`LazyShadow::prefetch_replay`]).
    fn replay_steps(&self, core: &Core, resume: Range<u64>, chain: bool) {
        let Some(ws) = &self.workset else {
            return;
        };
        let plan = ws.plan();
        let (start, step_end) = if resume.is_empty() {
            let p = ws
                .cursor
                .fetch_add(workset::STEP_CHUNKS, Ordering::AcqRel)
                .min(plan.len());
            (p, (p + workset::STEP_CHUNKS).min(plan.len()))
        } else {
            (
                (resume.start as usize).min(plan.len()),
                (resume.end as usize).min(plan.len()),
            )
        };
        let t0 = std::time::Instant::now();
        let mut pos = start;
        let run = run_chunks(self.chunk);
        let mut runs = 0usize;
        while pos < step_end {
            if !ws.replaying() {
                return;
            }
            runs += 1;
            if runs % workset::LOOK_EVERY == 0 && core.uffd.has_pending() {
                ws.done.fetch_add(pos - start, Ordering::AcqRel);
                let rest = Work {
                    chunks: pos as u64..step_end as u64,
                    why: Why::Replay,
                    direct: None,
                };
                core.prefetch(self.target(), rest);
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
                let direct = self.replay_direct(&r).unwrap_or(THROUGH_ALIAS);
                self.fill_into(core, r.clone(), Why::Replay, Some(direct));
                if self.chunks.get(r.start) != ChunkState::Filled {
                    // Given back: the budget has no room for more.
                    ws.stop();
                    return;
                }
                self.show_remote(core, &r);
                self.note_replayed(core, ws, r);
            }
        }
        ws.done.fetch_add(step_end - start, Ordering::AcqRel);
        if start < step_end {
            self.notify();
        }
        let more = ws.cursor.load(Ordering::Acquire) < plan.len();
        if chain && more && ws.replaying() {
            core.prefetch(self.target(), replay_work());
            // Judged on whole steps only, never a resumed part.
            let fast = resume.is_empty()
                && step_end - start == workset::STEP_CHUNKS
                && t0.elapsed() < workset::FAST_STEP;
            let chains = &ws.chains;
            if fast
                && chains
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < ws.max_chains).then_some(n + 1)
                    })
                    .is_ok()
            {
                core.prefetch(self.target(), replay_work());
            }
        }
    }

    /// Before the first access returns (the first mapping of this
    /// process, or the first `populate`/`read_at`): fills the first recorded
    /// chunks of the replay, up to `workset_prefetch` bytes, the calling
    /// thread taking steps itself while the workers' chains take others,
    /// then waits for the steps in flight. A mapping registered first takes
    /// the fills straight (one `UFFDIO_COPY` fills and maps a chunk; filled
    /// at open, it would cost a `UFFDIO_CONTINUE` more). Only the first
    /// access waits; it stops early where the replay stops (budget,
    /// divergence, a change of the source).
    pub(super) fn prefetch_replay(&self, core: &Core) {
        let Some(ws) = &self.workset else {
            return;
        };
        let k = ws.prefetch_positions();
        if k == 0 || ws.prefetched.swap(true, Ordering::AcqRel) {
            return;
        }
        while ws.replaying() && ws.cursor.load(Ordering::Acquire) < k {
            self.replay_steps(core, 0..0, false);
        }
        let mut g = self.done_lock.lock();
        while ws.replaying() && ws.done.load(Ordering::Acquire) < k {
            let _ = self
                .done_cv
                .wait_for(&mut g, std::time::Duration::from_micros(200));
        }
    }

    /// A fault's readahead `plan`, while a working set is replayed: nothing
    /// ahead. The record holds what the recorded run's readahead filled,
    /// in order, so the replay fills it already; a readahead window of its
    /// own (up to 8 MiB) would take the workers from the replay and the
    /// faults, and its fills, counted as first needs, would look like a
    /// run gone elsewhere and stop the replay (seen: `sqlite3` over 1 GiB,
    /// 2026-12-07).
    pub(super) fn while_replaying(&self, mut plan: readahead::Plan) -> readahead::Plan {
        if self.workset.as_ref().is_some_and(|w| w.replaying()) {
            plan.ahead.clear();
        }
        plan
    }

    /// Where a replay fill of `run` may go straight into a consumer range:
    /// a `MAP_SHARED` range of this process that shows the whole run, for a
    /// run that fits in one fill buffer. One `UFFDIO_COPY` from the fill
    /// buffer then puts the pages into the memfd and maps them there,
    /// where the fill through the alias takes a copy from the source's
    /// mapping (which faults the source's page in, with the kernel's
    /// fault-around, on every isolated chunk), a metadata read and a
    /// `UFFDIO_CONTINUE` into the range.
    fn replay_direct(&self, run: &Range<u64>) -> Option<Direct> {
        let (off, end) = self.run_range(run);
        let end = round_up(end, self.service.core.page);
        if end - off > buffer::PIECE as u64 {
            return None;
        }
        let consumers = self.consumers.read();
        let m = consumers
            .local()
            .iter()
            .find(|m| m.shared && off >= m.offset && end <= m.offset + m.len)?;
        Some(Direct {
            consumer: m.id,
            addr: m.start + off - m.offset,
        })
    }

    /// Counts the chunks of `run` the replay filled, and those of them
    /// its fill mapped into a consumer range of this process.
    pub(super) fn note_replayed(&self, core: &Core, ws: &workset::Workset, run: Range<u64>) {
        let (off, end) = self.run_range(&run);
        let shown = {
            let c = self.consumers.read();
            c.local().iter().any(|m| m.overlap(off, end).is_some())
                || c.remote_showing(off, end).next().is_some()
        };
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

    /// Maps the filled chunks `run` of a replay into every other process's
    /// range that shows them, with `UFFDIO_CONTINUE` on that range's
    /// userfaultfd, ahead of the touch (a fill answers those ranges only
    /// where a fault waits). Not its bad pages: those fault, and are
    /// poisoned then. A page mapped there already is left as it is
    /// (`EEXIST`).
    fn show_remote(&self, core: &Core, run: &Range<u64>) {
        let (off, end) = self.run_range(run);
        let end = round_up(end, core.page);
        let bad: Vec<u64> = self.bad.lock().range(off..end).map(|(&p, _)| p).collect();
        let consumers = self.consumers.read();
        for m in consumers.remote_showing(off, end) {
            let Some((addr, len)) = m.overlap(off, end) else {
                continue;
            };
            let uffd = m.uffd(&core.uffd);
            let (lo, hi) = (
                m.offset + (addr - m.start),
                m.offset + (addr - m.start) + len,
            );
            let mut at = lo;
            for &p in bad.iter().filter(|&&p| p >= lo && p < hi) {
                if p > at {
                    let _ = uffd.continue_range(m.start + at - m.offset, p - at);
                }
                at = p + core.page;
            }
            if at < hi {
                let _ = uffd.continue_range(m.start + at - m.offset, hi - at);
            }
        }
    }

    /// Maps the filled chunks of the new consumer range `start..start+len`
    /// (this process's, showing the shadow from `offset`) into it now,
    /// while a working set is replayed: what the replay filled before the
    /// range was made then costs no fault either. Only Filled chunks, and
    /// not their bad pages (those fault, and are poisoned then).
    pub(super) fn map_ahead(&self, start: u64, len: u64, offset: u64) {
        self.map_ahead_via(&self.service.core.uffd, start, len, offset);
    }

    /// [`LazyShadow::map_ahead`] for a range registered with `uffd` (this
    /// process's, or the one another process's range came with).
    pub(super) fn map_ahead_via(&self, uffd: &Uffd, start: u64, len: u64, offset: u64) {
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
                    let _ = uffd.continue_range(start + at - offset, p - at);
                }
                at = p + page;
            }
            if at < b {
                let _ = uffd.continue_range(start + at - offset, b - at);
            }
            c = e;
        }
    }
}
