//! The install pipeline: a run of chunks read from the source (or copied
//! from its mapping) into the memfd through the unregistered alias, with
//! the checks that keep a changed source from being installed.

use super::*;

impl LazyShadow {
    /// Installs what it can of `at..end` (page-aligned `at`) with one
    /// `UFFDIO_COPY` from the source's mapping into `dst` (`wake`: waking
    /// the threads waiting there). Returns where it stopped: `end` rounded
    /// down to a page or the mapping's end, or the first page the copy
    /// failed on (present already, or past the file's end now); the rest is
    /// for `read_at`.
    ///
    /// Under [`MAPPED_FROM`] bytes nothing is copied (returns `at`): a page
    /// of the source's mapping this process has not touched yet makes
    /// `UFFDIO_COPY` fail, fault it in with its locks dropped and start
    /// again, and the copy then needs the source's size read
    /// (`recheck_mapped`), which `pread` and a copy from the buffer do not.
    pub(super) fn copy_mapped(&self, core: &Core, dst: u64, at: u64, end: u64, wake: bool) -> u64 {
        if end.saturating_sub(at) < MAPPED_FROM {
            return at;
        }
        let Some((m, full)) = self.mapped_source(core.page) else {
            return at;
        };
        let stop = end.min(full);
        if stop <= at {
            return at;
        }
        if stop - at > POPULATE_OVER {
            // Maps the run's pages of the file in one call. Without it the
            // copy finds them unmapped every 16 pages (the kernel's
            // fault-around), drops its locks, faults them in and starts
            // again, which made 1 MiB fills slower than pread and copy. A
            // page past the file's end is an error here, not a signal; the
            // copy then stops there.
            let _ = crate::sys::mmap::madvise(
                (m.addr() + at) as *mut u8,
                (stop - at) as usize,
                libc::MADV_POPULATE_READ,
            );
        }
        // SAFETY: `dst..dst + (stop - at)` lies in a range registered with
        // the engine's userfaultfd (the caller's), and the source is only
        // read by the kernel: the mapping stays mapped while `self.source`
        // lives, and `at..stop` lies within it.
        match unsafe { core.uffd.copy_from(dst, m.addr() + at, stop - at, wake) } {
            Ok(()) => stop,
            Err((_, n)) => at + n,
        }
    }

    /// Reads `off..end` of the source piece by piece into this thread's
    /// bounded buffer and installs it in the memfd with `UFFDIO_COPY` into
    /// the alias. A page that is present already was planted by someone else
    /// (the chunk was never filled): it is overwritten through the alias and
    /// counted. A source that offers its bytes in memory is copied from
    /// there in one step instead, the buffer kept for what that copy cannot
    /// place. Returns the bytes read from the source, and the end of what
    /// was copied from its mapping (`off` if nothing was): the caller must
    /// check the source's size against it before anyone sees those pages
    /// ([`LazyShadow::recheck_mapped`]).
    pub(super) fn read_and_install(
        &self,
        core: &Core,
        off: u64,
        end: u64,
        bad: &mut Vec<BadRange>,
    ) -> (u64, u64) {
        let alias = self
            .alias
            .as_ref()
            .expect("a non-empty shadow has an alias");
        let (mut good_bytes, mut mapped_end) = (0, off);
        let mut at = off;
        while at < end {
            let piece_end = end.min(at + buffer::PIECE as u64);
            // Small pieces are read (see `copy_mapped`).
            let copied = self.copy_mapped(core, alias.addr() + at, at, piece_end, false);
            if copied > at {
                good_bytes += copied - at;
                mapped_end = copied;
            }
            if copied < piece_end {
                good_bytes += self.bounce(core, alias, copied, piece_end, bad);
            }
            at = piece_end;
        }
        (good_bytes, mapped_end)
    }

    /// Reads `at..end` (at most one buffer) into this thread's buffer and
    /// installs it through the alias; returns the bytes read.
    pub(super) fn bounce(
        &self,
        core: &Core,
        alias: &RawMap,
        at: u64,
        end: u64,
        bad: &mut Vec<BadRange>,
    ) -> u64 {
        let page = core.page;
        let span = round_up(end - at, page);
        buffer::with(span as usize, |data| {
            let good = fill::read_chunk(&*self.source, data, at, end, page, self.size, bad);
            for &(a, b) in &good {
                let piece = &data[(a - at) as usize..(b - at) as usize];
                self.install(core, alias, piece, a, bad);
            }
            good.iter().map(|(a, b)| b - a).sum::<u64>()
        })
    }

    /// After pages `off..mapped_end` were copied from the source's mapping:
    /// if the source is now shorter (`size`, as just read; `None`: read it),
    /// the pages from its end on may have been copied after the cut, as
    /// zeros the source never held. They are read again with `read_at`,
    /// which finds the end of the data and poisons what is missing, exactly
    /// as a fill that started after the cut. Returns the bytes to take off
    /// the fill's count.
    pub(super) fn recheck_mapped(
        &self,
        core: &Core,
        off: u64,
        mapped_end: u64,
        size: Option<u64>,
        bad: &mut Vec<BadRange>,
    ) -> u64 {
        if mapped_end <= off {
            return 0;
        }
        let size = size
            .or_else(|| self.source_meta().map(|m| m.size))
            .unwrap_or(0);
        if size >= mapped_end {
            return 0;
        }
        let alias = self
            .alias
            .as_ref()
            .expect("a non-empty shadow has an alias");
        let page = core.page;
        let mut at = (size / page * page).max(off);
        let mut lost = 0;
        while at < mapped_end {
            let e = mapped_end.min(at + buffer::PIECE as u64);
            lost += (e - at) - self.bounce(core, alias, at, e, bad);
            at = e;
        }
        lost
    }

    /// Where a fault's fill of `chunks` may go straight into the faulting
    /// range: a `MAP_SHARED` consumer range of this process that shows the
    /// whole run, for a run that fits in one fill buffer. `UFFDIO_COPY` into
    /// it puts the pages into the memfd and maps them there in one call, and
    /// wakes the faulting thread; the alias and `UFFDIO_CONTINUE` are then
    /// needed only for the other consumer ranges.
    pub(super) fn direct_for(
        &self,
        core: &Core,
        hit: &Hit<'_>,
        chunks: &Range<u64>,
    ) -> Option<Direct> {
        if hit.internal || !std::ptr::eq(hit.uffd, &core.uffd) {
            return None;
        }
        let (off, end) = self.run_range(chunks);
        let end = round_up(end, core.page);
        if end - off > buffer::PIECE as u64 {
            return None;
        }
        let consumers = self.consumers.read();
        let m = consumers
            .local()
            .iter()
            .find(|m| m.shared && hit.addr >= m.start && hit.addr < m.end())?;
        (off >= m.offset && end <= m.offset + m.len).then(|| Direct {
            consumer: m.id,
            addr: m.start + off - m.offset,
        })
    }

    /// Reads `off..end` (at most one fill buffer) and installs it straight
    /// into the consumer range `d` with `UFFDIO_COPY`, which wakes the
    /// threads waiting there. The source's metadata is checked between the
    /// read and the copy, so that a strict shadow installs nothing a change
    /// may have torn, and a change is recorded before the faulting thread
    /// runs again. A page the copy cannot place there (present in the memfd
    /// already, or the range going away) goes through the alias with the
    /// rest of the run, for [`LazyShadow::answer_all`] to map. A run the
    /// source could not wholly give goes through the alias. `count` is
    /// called with the bytes read before the copy wakes anyone, so that a
    /// woken thread sees the fill in the statistics. Returns the bytes read,
    /// and `d`'s consumer if it holds every good page now.
    pub(super) fn read_and_install_direct(
        &self,
        core: &Core,
        off: u64,
        end: u64,
        d: Direct,
        bad: &mut Vec<BadRange>,
        count: impl FnOnce(u64),
    ) -> (u64, Option<u64>) {
        let page = core.page;
        let alias = self
            .alias
            .as_ref()
            .expect("a non-empty shadow has an alias");
        let span = round_up(end - off, page);
        let strict = self.stale == StalePolicy::Strict;
        buffer::with(span as usize, |data| {
            let good = fill::read_chunk(&*self.source, data, off, end, page, self.size, bad);
            let changed = if strict {
                self.check_changed()
            } else {
                self.check_changed_lately(core)
            };
            if strict && changed {
                *bad = vec![(off, end, STALE_DURING)];
                return (0, None);
            }
            let good_bytes = good.iter().map(|(a, b)| b - a).sum::<u64>();
            let slice = |a: u64, b: u64| &data[(a - off) as usize..(b - off) as usize];
            // The read lock keeps the range mapped (it is removed from the
            // list before it is unmapped).
            let consumers = self.consumers.read();
            let m = consumers.local().iter().find(|m| m.id == d.consumer);
            let Some(m) = m.filter(|_| bad.is_empty()) else {
                drop(consumers);
                for &(a, b) in &good {
                    self.install(core, alias, slice(a, b), a, bad);
                }
                return (good_bytes, None);
            };
            count(good_bytes);
            let id = m.id;
            let mut left = Vec::new();
            for &(a, b) in &good {
                let piece = slice(a, b);
                // SAFETY: `d.addr + (a - off)..+piece.len()` lies in the
                // consumer range `m` (direct_for checked that it shows the
                // whole run), a shared mapping of the memfd registered with
                // the engine's userfaultfd and kept mapped by the read lock;
                // `piece` is this thread's heap buffer.
                if let Err((_, n)) = unsafe { core.uffd.copy_waking(d.addr + (a - off), piece) } {
                    left.push((a + n, b));
                }
            }
            // Through the alias what the copy could not place, without the
            // lock: installing may wait for the kernel's mapping events,
            // whose handling takes it.
            drop(consumers);
            for &(a, b) in &left {
                self.install(core, alias, slice(a, b), a, bad);
            }
            (good_bytes, left.is_empty().then_some(id))
        })
    }

    /// Installs `data` at shadow offset `off` (page-aligned).
    pub(super) fn install(
        &self,
        core: &Core,
        alias: &RawMap,
        data: &[u8],
        off: u64,
        bad: &mut Vec<BadRange>,
    ) {
        let page = core.page as usize;
        let mut done = 0usize;
        let mut tries = 0u32;
        while done < data.len() {
            let dst = alias.addr() + off + done as u64;
            // SAFETY: the destination lies in the alias, registered with the
            // engine's userfaultfd; `data` is this thread's heap buffer.
            match unsafe { core.uffd.copy(dst, &data[done..]) } {
                Ok(()) => return,
                Err((e, n)) if e.raw_os_error() == Some(libc::EAGAIN) && tries < u32::MAX => {
                    // An event is pending on the engine's userfaultfd: read
                    // it (unless a worker does), give its sender time to go
                    // on, and copy the rest. Never a spin.
                    done += n as usize;
                    if !core.await_events(&mut tries) {
                        tries = u32::MAX;
                    }
                }
                Err((e, n)) => {
                    done += n as usize;
                    let p = off + done as u64;
                    let piece = &data[done..(done + page).min(data.len())];
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        // SAFETY: the page at `p` is present in the memfd
                        // (EEXIST), so writing it through the alias maps it
                        // without a userfault (the alias is registered for
                        // MISSING faults only); the chunk is claimed by this
                        // thread and no consumer range has been given it.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                piece.as_ptr(),
                                alias.as_ptr().add(p as usize),
                                piece.len(),
                            );
                        }
                        for ctr in [&self.counters, &core.counters] {
                            ctr.healed_pages.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        let cause = Cause::Allocate {
                            errno: e.raw_os_error(),
                            message: format!("UFFDIO_COPY into the memfd: {e}"),
                        };
                        bad.push((p, p + page as u64, cause));
                    }
                    done += piece.len();
                }
            }
        }
    }
}
