//! Filling without a fault: `populate` of a byte range and `materialize`
//! of the whole shadow, with the refusals they report.

use super::*;

impl LazyShadow {
    /// Fills every chunk overlapping `offset..offset+len`, in this thread
    /// where possible, and waits for chunks other threads are filling.
    /// Errors if any page in the range could not be filled.
    pub fn populate(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.populate_here(offset, len);
        // A caller's thread keeps no fill buffer (workers free theirs when
        // they park).
        buffer::release();
        r
    }

    pub(super) fn populate_here(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::Range {
                offset,
                len,
                size: self.size,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let core = &self.service.core;
        let (first, last) = (offset / self.chunk, (offset + len - 1) / self.chunk);
        let run = run_chunks(self.chunk).min(last - first + 1);
        // Fill what is empty in runs, then wait for what others are filling.
        let mut c = first;
        while c <= last {
            match self.chunks.claim_run(c, (last + 1).min(c + run)) {
                Some(r) => {
                    let next = r.end;
                    self.fill(core, r, Why::Populate);
                    self.check_refused(c, offset)?;
                    c = next;
                }
                None => c += 1,
            }
        }
        for c in first..=last {
            loop {
                if let Some(r) = self.chunks.claim_run(c, c + 1) {
                    self.fill(core, r, Why::Populate);
                    self.check_refused(c, offset)?;
                }
                match self.chunks.get(c) {
                    ChunkState::Filled => break,
                    ChunkState::Empty => continue,
                    ChunkState::Filling => {
                        let mut g = self.done_lock.lock();
                        if self.chunks.get(c) == ChunkState::Filling {
                            self.done_cv.wait(&mut g);
                        }
                    }
                }
            }
        }
        self.check_bad(offset, offset + len)
    }

    /// Fills the whole shadow using this thread and the idle workers.
    pub fn materialize(&self) -> Result<()> {
        let n = self.chunks.len();
        // The workers take the second half while this thread does the first.
        let core = &self.service.core;
        let run = run_chunks(self.chunk);
        let mut c = n / 2;
        while c < n {
            let e = n.min(c + run);
            let work = Work {
                chunks: c..e,
                why: Why::Prefetch,
                direct: None,
            };
            core.prefetch(self.target(), work);
            c = e;
        }
        self.populate(0, self.size)
    }

    /// After this thread's fill of chunk `c`: an error if the budget
    /// refused it (the chunk is Empty again; nothing was recorded as bad).
    pub(super) fn check_refused(&self, c: u64, offset: u64) -> Result<()> {
        if self.chunks.get(c) != ChunkState::Empty {
            return Ok(());
        }
        let core = &self.service.core;
        let cause = self.refused_cause.lock().clone().unwrap_or(Cause::Budget {
            budget: core.budget,
            resident: core.resident.load(Ordering::Relaxed),
            needed: self.chunk,
        });
        Err(Error::Unfillable {
            what: self.name.clone(),
            offset: (c * self.chunk).max(offset) / core.page * core.page,
            end: ((c + 1) * self.chunk).min(self.size),
            cause,
        })
    }

    pub(super) fn check_bad(&self, from: u64, to: u64) -> Result<()> {
        let bad = self.bad.lock();
        let page = self.service.core.page;
        if let Some((p, cause)) = bad.range(from / page * page..to).next() {
            return Err(Error::Unfillable {
                what: self.name.clone(),
                offset: *p,
                end: (*p + page).min(self.size),
                cause: cause.clone(),
            });
        }
        Ok(())
    }
}
