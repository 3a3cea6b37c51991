//! Forked children's address spaces: taken on from `FORK` events, served
//! through the same workers, checked for being alive, and settled when
//! this process exits.

use super::*;

impl Core {
    /// A `fork` of an address space we serve: the child's copies of the
    /// consumer ranges are registered with `fd`. They are served from now
    /// on like the parent's, through the workers, until the child is gone.
    pub(super) fn add_child(
        &self,
        parent: Space<'_>,
        regions: &RwLock<Spans<Region>>,
        fd: OwnedFd,
    ) {
        let features = parent.map_or(&self.uffd, |u| &**u).features();
        let child = Arc::new(Uffd::from_fd(fd, features));
        let mut table = Spans::default();
        let mut targets = Vec::new();
        for (s, r) in regions.read().iter() {
            // The alias and the template are MADV_DONTFORK: not in the child.
            if r.value.internal {
                continue;
            }
            let a = r.value.adopted();
            if let Held::Range(RangeHold(t)) = &a.target {
                if !targets.iter().any(|x: &Arc<dyn FaultTarget>| same(x, t)) {
                    targets.push(t.clone());
                }
            }
            table.insert(s, r.len, r.offset, a);
        }
        let tag = self.next_child.fetch_add(1, Ordering::Relaxed);
        let child = Arc::new(Child {
            uffd: child,
            regions: RwLock::new(table),
            read: Mutex::new(()),
            tag,
        });
        for t in &targets {
            t.on_fork(self, parent, &child.uffd);
        }
        if self
            .child_ep
            .add(child.uffd.as_fd(), libc::EPOLLIN as u32, tag)
            .is_err()
        {
            // Not served: nothing may fault there unanswered.
            self.abandon(&child);
            return;
        }
        let mut children = self.children.lock();
        children.push(child);
        self.child_count.store(children.len(), Ordering::Relaxed);
        drop(children);
        self.counters.forks_followed.fetch_add(1, Ordering::Relaxed);
        self.kick_all();
    }

    /// Gives up a child: its targets forget its ranges; whatever still
    /// waits there is poisoned.
    pub(super) fn abandon(&self, child: &Child) {
        let gone = child.regions.write().cut(0, u64::MAX);
        for (s, r) in &gone {
            let _ = child.uffd.poison(*s, r.len);
        }
        for t in distinct_targets(&gone) {
            t.on_unmap(self, Some(&child.uffd), 0, u64::MAX);
        }
    }

    /// Serves the children whose userfaultfds have messages.
    pub(super) fn serve_children(&self) {
        let mut tags = [0u64; 16];
        let n = self.child_ep.wait(&mut tags, 0);
        if n == 0 {
            return;
        }
        let ready: Vec<Arc<Child>> = {
            let c = self.children.lock();
            c.iter()
                .filter(|c| tags[..n].contains(&c.tag))
                .cloned()
                .collect()
        };
        let mut raw = vec![uffd_msg::default(); BATCH];
        let (mut faults, mut events) = (Vec::new(), Vec::new());
        for child in ready {
            {
                let Some(_g) = child.read.try_lock() else {
                    continue;
                };
                if child
                    .uffd
                    .read_msgs(&mut raw, &mut faults, &mut events)
                    .is_err()
                {
                    continue;
                }
                self.apply_events(Some(&child.uffd), &child.regions, &mut events);
            }
            for f in faults.drain(..) {
                let addr = f.address & !(self.page - 1);
                let regions = child.regions.read();
                let Some((target, hit)) = self.lookup(&child.uffd, &regions, addr) else {
                    let _ = self.refuse(&child.uffd, addr);
                    continue;
                };
                let work = target.on_fault(self, hit);
                drop(regions);
                if let Some(w) = work {
                    self.run_guarded(&*target, w);
                }
            }
        }
    }

    /// Drops the children that exited or exec'd (at most once a second).
    pub(super) fn sweep_children(&self, now: u64) {
        let then = self.swept_at.load(Ordering::Relaxed);
        if now.saturating_sub(then) < 1000 * MS
            || self
                .swept_at
                .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let dead: Vec<Arc<Child>> = {
            let mut c = self.children.lock();
            let (dead, live): (Vec<_>, Vec<_>) = c.drain(..).partition(|c| !c.uffd.alive());
            *c = live;
            self.child_count.store(c.len(), Ordering::Relaxed);
            dead
        };
        for child in dead {
            let _ = self.child_ep.delete(child.uffd.as_fd());
            let gone = child.regions.write().cut(0, u64::MAX);
            for t in distinct_targets(&gone) {
                t.on_unmap(self, Some(&child.uffd), 0, u64::MAX);
            }
            drop(gone);
        }
    }

    /// Whether children are being served (workers then look at them
    /// every second while parked).
    pub(super) fn has_children(&self) -> bool {
        self.child_count.load(Ordering::Relaxed) > 0
    }

    /// This process is exiting: each forked child that still maps lazy
    /// ranges gets them settled ([`FaultTarget::orphan`]): what its targets
    /// vouch for mapped, the rest poisoned, so that the child reads `SIGBUS`
    /// and never zeros once its userfaultfd closes with this process. Locks
    /// are only tried: a worker may hold one as the process exits.
    pub(in crate::fault) fn orphan_children(&self) {
        // A fork just before the exit: its event may be read (the fork
        // returned) but not applied yet.
        self.sync_events();
        let Some(children) = self.children.try_lock() else {
            return;
        };
        for c in children.iter() {
            if !c.uffd.alive() {
                continue;
            }
            let Some(regions) = c.regions.try_read() else {
                continue;
            };
            for (s, r) in regions.iter() {
                if let Some(t) = r.value.target() {
                    t.orphan(self, &c.uffd, s, r.len, r.offset);
                } else {
                    let _ = c.uffd.poison(s, r.len);
                }
            }
        }
    }

    /// Kicks every worker (a new child to watch).
    pub(super) fn kick_all(&self) {
        for i in 0..self.slots.len() {
            self.kick(i);
        }
    }
}
