//! Mapping events read from the engine's userfaultfd (and forked children's):
//! applied to the region table in the kernel's order, checked against the
//! kernel's own view, and the answers they deferred (`EAGAIN`) flushed.

use super::*;

impl Core {
    /// Reads and applies every event the kernel has queued, or is about to
    /// queue, on the engine's userfaultfd: call before adding a range of a
    /// mapping just made. The kernel frees an unmapped (or moved) range's
    /// addresses before it queues the event that names them, so a new
    /// mapping can land there first; applied later, that event would cut
    /// the new range out of the table. Waits (at most about 100 ms) while
    /// events are under way (`Uffd::changing`); faults read meanwhile are
    /// left to the workers.
    pub fn sync_events(&self) {
        let mut raw = [uffd_msg::default(); 8];
        for round in 0..200u32 {
            let (mut faults, mut events) = (Vec::new(), Vec::new());
            let g = self.read.lock();
            self.take_ring(&mut faults, &mut events);
            if self.forking.load(Ordering::SeqCst) == 0 {
                while let Ok(n) = self.uffd.read_raw(&mut raw) {
                    if n == 0 {
                        break;
                    }
                    decode(&raw[..n], &mut faults, &mut events);
                    self.apply_events(None, &self.regions, &mut events);
                }
            }
            drop(g);
            self.leave_faults(faults);
            // Read by the fork watcher and not in the ring yet: the event
            // that freed these addresses may be among them.
            let watched = self.ring_filling.load(Ordering::SeqCst) || !self.ring.is_empty();
            if !watched && !self.uffd.changing() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(50 << round.min(4)));
        }
    }

    /// Applies mapping events read from the userfaultfd of `regions`
    /// (`uffd`: the engine's, or a child's) in order: the table follows
    /// the consumer's `munmap` and `mremap`, and a `fork` adds the child's
    /// address space. Targets hear of the changes to their ranges.
    pub(super) fn apply_events(
        &self,
        space: Space<'_>,
        regions: &RwLock<Spans<Region>>,
        events: &mut Vec<Event>,
    ) {
        for ev in events.drain(..) {
            match ev {
                Event::Unmap { start, end } => {
                    let mut r = regions.write();
                    let gone = r.cut(start, end);
                    // Events of several threads interleave: another thread
                    // may have mapped these addresses again, and moved a
                    // range of ours there (its REMAP applied already),
                    // between this munmap and its event. What the kernel
                    // shows there now stays.
                    let (kept, gone): (Vec<_>, Vec<_>) = match space {
                        None => gone.into_iter().partition(|(s, sp)| self.shown(*s, sp)),
                        Some(_) => (Vec::new(), gone),
                    };
                    for (s, sp) in kept {
                        r.insert(s, sp.len, sp.offset, sp.value);
                    }
                    drop(r);
                    for t in distinct_targets(&gone) {
                        t.on_unmap(self, space, start, end);
                    }
                    // Dropped here, outside the lock: an adopted range may
                    // hold the last reference to its shadow.
                    drop(gone);
                }
                Event::Remap { from, to, len } => {
                    let moved = regions.read().moved(from, to, len, Region::adopted);
                    let mut r = regions.write();
                    let mut gone = r.copy(from, to, len, Region::adopted);
                    let adopted = match space {
                        None if len > 0 => self.follow_kernel(&mut r, to, len, &mut gone),
                        _ => Vec::new(),
                    };
                    drop(r);
                    for t in distinct_targets(&gone) {
                        t.on_unmap(self, space, to, to + len);
                    }
                    for t in distinct_targets(&moved) {
                        t.on_remap(self, space, from, to, len);
                    }
                    for (t, at, l, offset, shared) in &adopted {
                        t.on_adopt(self, space, *at, *l, *offset, *shared);
                    }
                    drop((gone, moved, adopted));
                }
                Event::Remove => {
                    // The range stays registered: the next touch faults.
                }
                Event::Fork(fd) => self.add_child(space, regions, fd),
            }
        }
    }

    /// Whether this process's mapping at `start` shows what `span` says:
    /// the same shadow's memfd at the same offset, all the way.
    pub(super) fn shown(&self, start: u64, span: &Span<Region>) -> bool {
        let Some(vma) = self.maps.as_ref().and_then(|m| m.query(start)) else {
            return false;
        };
        if vma.offset + (start - vma.start) != span.offset || vma.end < start + span.len {
            return false;
        }
        let inodes = self.inodes.read();
        inodes
            .get(&vma.inode)
            .is_some_and(|w| span.value.target.is_at(w.as_ptr()))
    }

    /// After a REMAP into `to..to+len` of this process: the table there is
    /// made to agree with what the kernel shows. The table's copy of the
    /// source is wrong where the source's addresses were reused before the
    /// event came (another thread's munmap and mmap between them); such
    /// parts go to `gone`, and each part that maps a shadow's memfd is
    /// adopted from the kernel's view (a REMAP is only sent for registered
    /// ranges). Returns the adopted parts (target, start, len, offset,
    /// shared) for their targets to hear of.
    pub(super) fn follow_kernel(
        &self,
        r: &mut Spans<Region>,
        to: u64,
        len: u64,
        gone: &mut Vec<(u64, Span<Region>)>,
    ) -> Vec<Adopted> {
        let Some(maps) = self.maps.as_ref() else {
            return Vec::new();
        };
        let end = to + len;
        let wrong: Vec<(u64, u64)> = r
            .iter()
            .filter(|(s, sp)| *s < end && s + sp.len > to && !self.shown(*s, sp))
            .map(|(s, sp)| (s, s + sp.len))
            .collect();
        for (a, b) in wrong {
            gone.extend(r.cut(a.max(to), b.min(end)));
        }
        let mut adopted = Vec::new();
        let mut at = to;
        while at < end {
            if let Some((s, sp)) = r.find(at) {
                at = s + sp.len;
                continue;
            }
            let next = r.next_after(at).unwrap_or(end).min(end);
            let Some(vma) = maps.query(at) else {
                at = next;
                continue;
            };
            let hi = vma.end.min(next);
            let target = self.inodes.read().get(&vma.inode).and_then(Weak::upgrade);
            if let Some(t) = target {
                let offset = vma.offset + (at - vma.start);
                let region = Region {
                    internal: false,
                    owner: 0,
                    shared: vma.shared,
                    target: Held::Range(RangeHold::new(t.clone())),
                };
                gone.extend(r.insert(at, hi - at, offset, region));
                adopted.push((t, at, hi - at, offset, vma.shared));
                self.counters.adopted_ranges.fetch_add(1, Ordering::Relaxed);
            }
            at = hi;
        }
        adopted
    }

    /// Reads the engine's userfaultfd: events applied under [`Core::read`],
    /// in order; the faults are returned. Up to the read nothing allocates
    /// (`events` comes with room for a batch): a `fork` of this process may
    /// hold the allocator's locks until the read (`fault::forkwatch`).
    /// Reads nothing while a fork is under way or the watcher holds
    /// messages (they come first).
    pub(super) fn read_own(
        &self,
        raw: &mut [uffd_msg],
        faults: &mut Vec<Fault>,
        events: &mut Vec<Event>,
    ) -> std::io::Result<()> {
        let _g = self.read.lock();
        if !self.ring.is_empty() {
            // What the fork watcher read comes first.
            self.take_ring(faults, events);
            return Ok(());
        }
        if self.forking.load(Ordering::SeqCst) > 0 {
            return Ok(());
        }
        self.uffd.read_msgs(raw, faults, events)?;
        if !events.is_empty() {
            self.apply_events(None, &self.regions, events);
        }
        Ok(())
    }

    /// A fork of this process is coming (the `pthread_atfork` prepare
    /// handler, before glibc locks the allocator).
    pub(in crate::fault) fn fork_begins(&self) {
        self.forking.fetch_add(1, Ordering::SeqCst);
        eventfd_signal(self.fork_kick.as_fd());
    }

    /// The fork returned in the parent.
    pub(in crate::fault) fn fork_ends(&self) {
        let _ = self
            .forking
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Decodes and applies the messages the fork watcher read (call under
    /// [`Core::read`]); their faults go to `faults`.
    pub(super) fn take_ring(&self, faults: &mut Vec<Fault>, events: &mut Vec<Event>) {
        if self.ring.is_empty() {
            return;
        }
        let mut raw = Vec::new();
        self.ring.take(&mut raw);
        decode(&raw, faults, events);
        self.apply_events(None, &self.regions, events);
    }

    /// Leaves faults read off a worker's path to the workers.
    pub(super) fn leave_faults(&self, faults: Vec<Fault>) {
        if !faults.is_empty() {
            self.pending.lock().extend(faults);
            eventfd_signal(self.work.as_fd());
        }
    }

    /// For a filler whose `UFFDIO_COPY` met a pending event (`EAGAIN`):
    /// reads the engine's userfaultfd (unless a worker is at it), applies
    /// the events and leaves the faults for the workers, then waits a
    /// little for the event's sender to go on. False once `tries` waits
    /// (about 2 s in all) did not help.
    pub fn await_events(&self, tries: &mut u32) -> bool {
        if let Some(g) = self.read.try_lock() {
            let mut raw = vec![uffd_msg::default(); BATCH];
            let (mut faults, mut events) = (Vec::new(), Vec::new());
            self.take_ring(&mut faults, &mut events);
            if self.forking.load(Ordering::SeqCst) == 0
                && self
                    .uffd
                    .read_msgs(&mut raw, &mut faults, &mut events)
                    .is_ok()
            {
                self.apply_events(None, &self.regions, &mut events);
            }
            drop(g);
            self.leave_faults(faults);
        }
        *tries += 1;
        let wait = 20u64 << (*tries).min(7);
        std::thread::sleep(std::time::Duration::from_micros(wait));
        *tries < 1000
    }

    /// Notes that an answer was deferred; see [`Core::flush_deferred`].
    pub(super) fn note_deferred(&self, now: u64) {
        let _ = self
            .deferred_at
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Wakes the threads whose answers waited for a pending event
    /// ([`Uffd::flush_deferred`]), once the event had 200 µs to settle.
    /// Returns whether some still wait (the caller sleeps at most 1 ms).
    pub(super) fn flush_deferred(&self) -> bool {
        // No allocation here: workers pass through on their way to the
        // userfaultfd (see `read_own`); and no lock on the common path.
        if !self.uffd.has_deferred()
            && self.deferred_at.load(Ordering::Relaxed) == 0
            && self.child_count.load(Ordering::Relaxed) == 0
            && !self.foreign_deferred()
        {
            return false;
        }
        let children = self.children.lock();
        let any = self.uffd.has_deferred()
            || children.iter().any(|c| c.uffd.has_deferred())
            || self.foreign_deferred();
        if !any {
            self.deferred_at.store(0, Ordering::Relaxed);
            return false;
        }
        let now = self.now_recent();
        self.note_deferred(now);
        let at = self.deferred_at.load(Ordering::Relaxed);
        if now.saturating_sub(at) < 200 * US {
            return true;
        }
        self.deferred_at.store(0, Ordering::Relaxed);
        self.uffd.flush_deferred();
        for c in children.iter() {
            c.uffd.flush_deferred();
        }
        drop(children);
        self.flush_foreign();
        false
    }
}
