//! Other processes' address spaces (a `serve` client's), whose
//! userfaultfds the service was handed: their faults are read by the same
//! workers as the engine's own, with the same placement (each userfaultfd
//! sits in every worker's epoll set, armed and disarmed with the engine's
//! own), so a client's fault is answered on its CPU as an in-process one
//! is, and never waits behind its owner's requests.
//!
//! The owner (the server's session of that client) keeps the truth about
//! the space's ranges and mirrors it here ([`Foreign::add`],
//! [`Foreign::remove`]). A worker answers a fault that the mirror explains
//! at once: the mirror stays read-locked, and the space's read lock held,
//! until the answer is given, so no answer lands in a range registered
//! there since. Everything else read from the userfaultfd (mapping events,
//! and faults the mirror does not explain: a range grown in place, an
//! address the owner has not heard of yet) goes to the owner's
//! [`Inbox`] in the kernel's order, and the owner is signalled; it applies
//! the events, updates the mirror and serves those faults itself.
//!
//! Bounds: a worker reads at most [`FOREIGN_BATCH`] messages of one space
//! per turn, and epoll hands ready spaces round robin, so one client's
//! flood of faults delays another's by a batch at most; a space whose
//! inbox holds [`INBOX_MAX`] messages is not read until its owner takes
//! them, so a client making mapping events in a loop goes at its owner's
//! pace (and its own faults wait meanwhile, nobody else's).

use super::*;
use std::os::fd::BorrowedFd;

/// Messages read from one foreign userfaultfd per turn of a worker.
pub(super) const FOREIGN_BATCH: usize = 8;

/// Messages an owner may leave untaken before its space is no longer read.
pub const INBOX_MAX: usize = 256;

/// What the workers leave to a space's owner, in the kernel's order within
/// each kind (events are applied before the faults are served).
#[derive(Default)]
pub(crate) struct Inbox {
    pub events: Vec<Event>,
    pub faults: Vec<Fault>,
    /// Reading the userfaultfd failed (`Some(error)`): the space is no
    /// longer read.
    pub broken: Option<std::io::Error>,
}

impl Inbox {
    fn len(&self) -> usize {
        self.events.len() + self.faults.len()
    }
}

/// A foreign address space as the workers see it.
pub(super) struct ForeignSpace {
    pub(super) uffd: Arc<Uffd>,
    /// The owner's ranges, mirrored.
    regions: RwLock<Spans<Region>>,
    /// Held while reading the userfaultfd and until what was read is
    /// answered or in the inbox (see [`Foreign::take`]).
    read: Mutex<()>,
    inbox: Mutex<Inbox>,
    /// Signalled when the inbox gains something.
    notify: OwnedFd,
    pub(super) tag: u64,
    /// Not read (its epoll entries set to no events) until the owner takes
    /// its inbox.
    paused: AtomicBool,
    /// Events read and not yet applied by the owner ([`Foreign::applied`]):
    /// while there are any, the mirror may be stale (a range moved or cut,
    /// its addresses reused), so faults go to the owner too, who serves
    /// them after the events.
    unapplied: AtomicUsize,
}

/// The owner's handle on a foreign space: keeps the service alive, and
/// stops the workers watching the space when dropped.
pub(crate) struct Foreign {
    service: Arc<Service>,
    space: Arc<ForeignSpace>,
}

impl Foreign {
    /// Hands `uffd` (another process's) to the service's workers.
    pub fn watch(service: &Arc<Service>, uffd: Arc<Uffd>) -> Result<Foreign> {
        let core = &service.core;
        let space = Arc::new(ForeignSpace {
            uffd,
            regions: RwLock::new(Spans::default()),
            read: Mutex::new(()),
            inbox: Mutex::new(Inbox::default()),
            notify: eventfd().map_err(|e| Error::sys("eventfd for a client's faults", e))?,
            tag: core.next_foreign.fetch_add(1, Ordering::Relaxed),
            paused: AtomicBool::new(false),
            unapplied: AtomicUsize::new(0),
        });
        core.foreign.write().insert(space.tag, space.clone());
        core.foreign_count.fetch_add(1, Ordering::SeqCst);
        let e = |e| Error::sys("adding a client's userfaultfd to the fault service", e);
        let r = (|| {
            core.foreign_ep
                .add(space.uffd.as_fd(), libc::EPOLLIN as u32, space.tag)
                .map_err(e)?;
            for i in 0..core.slots.len() {
                core.set_foreign_entry(i, &space, true).map_err(e)?;
            }
            Ok(())
        })();
        let f = Foreign {
            service: service.clone(),
            space,
        };
        r.map(|()| f)
    }

    /// `start..start+len` of the space shows `target` from `offset`. Call
    /// before the owner says the range is usable.
    pub fn add(&self, start: u64, len: u64, offset: u64, target: Weak<dyn FaultTarget>) {
        let r = Region {
            internal: false,
            owner: 0,
            shared: false,
            target: Held::Weak(target),
        };
        let gone = self.space.regions.write().insert(start, len, offset, r);
        drop(gone);
    }

    /// Forgets `start..start+len` of the space.
    pub fn remove(&self, start: u64, len: u64) {
        let gone = self
            .space
            .regions
            .write()
            .cut(start, start.saturating_add(len));
        drop(gone);
    }

    /// Readable when the inbox has something ([`Foreign::take`]).
    pub fn notify(&self) -> BorrowedFd<'_> {
        self.space.notify.as_fd()
    }

    /// The owner applied `n` events it took (and updated the mirror).
    pub fn applied(&self, n: usize) {
        let _ = self
            .space
            .unapplied
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Moves what the workers left into `into` (appended). Call
    /// [`Foreign::applied`] once the events taken are applied. Waits for a
    /// worker reading the userfaultfd to finish: every message the kernel
    /// handed out before this call is then answered or in `into`, so the
    /// owner, applying `into`, knows every event that the client's calls
    /// so far waited for.
    pub fn take(&self, into: &mut Inbox) {
        let core = &self.service.core;
        let g = self.space.read.lock();
        eventfd_drain(self.space.notify.as_fd());
        let mut ib = self.space.inbox.lock();
        into.events.append(&mut ib.events);
        into.faults.append(&mut ib.faults);
        if into.broken.is_none() {
            into.broken = ib.broken.take();
        }
        let resume = ib.broken.is_none() && into.broken.is_none();
        drop(ib);
        drop(g);
        if resume && self.space.paused.swap(false, Ordering::SeqCst) {
            core.set_foreign_all(&self.space, true);
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let core = &self.service.core;
        let _ = core.foreign_ep.delete(self.space.uffd.as_fd());
        for s in core.slots.iter() {
            let _g = s.arm.lock();
            let _ = s.ep.delete(self.space.uffd.as_fd());
        }
        core.foreign.write().remove(&self.space.tag);
        core.foreign_count.fetch_sub(1, Ordering::SeqCst);
        // What is left in the inbox (forked children's descriptors among
        // them) goes with the space.
    }
}

impl Core {
    /// Sets worker `i`'s epoll entry for `space`: reported if `on` and the
    /// worker is armed and the space not paused. Where the userfaultfds are
    /// shared `EPOLLEXCLUSIVE` (no placement), an entry cannot be modified:
    /// it is added or deleted.
    pub(super) fn set_foreign_entry(
        &self,
        i: usize,
        space: &ForeignSpace,
        on: bool,
    ) -> std::io::Result<()> {
        let s = &self.slots[i];
        let _g = s.arm.lock();
        self.set_foreign_entry_locked(i, space, on)
    }

    /// [`Core::set_foreign_entry`] with the worker's arming lock held.
    pub(super) fn set_foreign_entry_locked(
        &self,
        i: usize,
        space: &ForeignSpace,
        on: bool,
    ) -> std::io::Result<()> {
        let s = &self.slots[i];
        let fd = space.uffd.as_fd();
        let want = on && !space.paused.load(Ordering::SeqCst);
        if !self.local {
            if !want {
                let _ = s.ep.delete(fd);
                return Ok(());
            }
            let excl = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
            return match s.ep.add(fd, excl, space.tag) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
                _ => Ok(()),
            };
        }
        let events = if want && s.armed.load(Ordering::SeqCst) {
            libc::EPOLLIN as u32
        } else {
            0
        };
        match s.ep.modify(fd, events, space.tag) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => s.ep.add(fd, events, space.tag),
            r => r,
        }
    }

    /// Sets every worker's entry for `space` (see
    /// [`Core::set_foreign_entry`]), and the starvation check's.
    fn set_foreign_all(&self, space: &ForeignSpace, on: bool) {
        let want = on && !space.paused.load(Ordering::SeqCst);
        let ev = if want { libc::EPOLLIN as u32 } else { 0 };
        let _ = self.foreign_ep.modify(space.uffd.as_fd(), ev, space.tag);
        for i in 0..self.slots.len() {
            let _ = self.set_foreign_entry(i, space, on);
        }
    }

    /// Worker `i` armed or disarmed: its entries for every foreign space
    /// follow (call with its arming lock held).
    pub(super) fn arm_foreign(&self, i: usize, on: bool) {
        if self.foreign_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let spaces: Vec<Arc<ForeignSpace>> = self.foreign.read().values().cloned().collect();
        for sp in spaces {
            let _ = self.set_foreign_entry_locked(i, &sp, on);
        }
    }

    /// Stops reading `space` until its owner takes its inbox.
    fn pause(&self, space: &ForeignSpace) {
        if !space.paused.swap(true, Ordering::SeqCst) {
            self.set_foreign_all(space, false);
        }
    }

    /// Whether a foreign space has messages waiting (one `epoll_wait`).
    pub(super) fn foreign_pending(&self) -> bool {
        if self.foreign_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut t = [0u64; 1];
        self.foreign_ep.wait(&mut t, 0) > 0
    }

    /// Serves foreign spaces with messages waiting, as worker `me` (an
    /// armed one between faults, which thus finds a client's next fault
    /// without sleeping, as it does the engine's own) or as a spare
    /// (`None`). False if none had any.
    pub(super) fn serve_foreign_ready(&self, me: Option<usize>) -> bool {
        let count = self.foreign_count.load(Ordering::Relaxed);
        if count == 0 {
            return false;
        }
        if count == 1 {
            // One client: its userfaultfd is read at once, as the engine's
            // own is. `read` says "nothing" (EAGAIN) as cheaply as an
            // `epoll_wait` would, and a fault waiting costs one system
            // call instead of two. With more, the epoll set takes the
            // ready ones in turn.
            let only = self.foreign.read().keys().next().copied();
            return only.is_some_and(|t| self.serve_foreign(t, me, false));
        }
        let mut tags = [0u64; 8];
        let n = self.foreign_ep.wait(&mut tags, 0);
        let mut any = false;
        for &t in &tags[..n] {
            any |= self.serve_foreign(t, me, false);
        }
        any
    }

    /// Reads one batch of the foreign space `tag` as worker `me` (`woken`:
    /// it slept before), answers the faults the mirror explains, leaves
    /// the rest to the owner, and runs the first claimed fill itself
    /// (queueing the others). False if nothing was read.
    pub(super) fn serve_foreign(&self, tag: u64, me: Option<usize>, woken: bool) -> bool {
        let Some(space) = self.foreign.read().get(&tag).cloned() else {
            return false;
        };
        // Another worker reads it: its turn.
        let Some(g) = space.read.try_lock() else {
            return false;
        };
        if space.paused.load(Ordering::SeqCst) {
            return false;
        }
        let mut raw = [uffd_msg::default(); FOREIGN_BATCH];
        let mut faults = Vec::with_capacity(FOREIGN_BATCH);
        let mut events = Vec::new();
        match space.uffd.read_msgs(&mut raw, &mut faults, &mut events) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                return false;
            }
            Err(e) => {
                space.inbox.lock().broken = Some(e);
                self.pause(&space);
                eventfd_signal(space.notify.as_fd());
                return false;
            }
        }
        let mut claimed = Vec::new();
        let mut left = Vec::new();
        // Events not applied yet (these, or earlier ones): the mirror may
        // show a range moved or cut since, whose addresses a new range
        // may hold now; an answer from it would land there. The owner
        // serves these faults after the events.
        let stale = !events.is_empty() || space.unapplied.load(Ordering::SeqCst) > 0;
        if stale {
            left.extend_from_slice(&faults);
        } else {
            let regions = space.regions.read();
            for f in &faults {
                let addr = f.address & !(self.page - 1);
                match self.lookup(&space.uffd, &regions, addr) {
                    Some((target, hit)) => {
                        if let Some(w) = target.on_fault(self, hit) {
                            claimed.push((target, w));
                        }
                    }
                    None => left.push(*f),
                }
            }
        }
        if !events.is_empty() || !left.is_empty() {
            space.unapplied.fetch_add(events.len(), Ordering::SeqCst);
            let mut ib = space.inbox.lock();
            ib.events.append(&mut events);
            ib.faults.append(&mut left);
            let full = ib.len() >= INBOX_MAX;
            drop(ib);
            if full {
                self.pause(&space);
            }
            eventfd_signal(space.notify.as_fd());
        }
        drop(g);
        self.reads.fetch_add(faults.len() as u64, Ordering::SeqCst);
        self.run_claimed(claimed);
        if self.local
            && let Some(me) = me
            && !faults.is_empty()
        {
            self.attribute(me, &faults, woken);
            self.kick_parked(me);
        }
        true
    }

    /// Wakes the threads of foreign spaces whose answers waited for an
    /// event (see [`Core::flush_deferred`]).
    pub(super) fn flush_foreign(&self) {
        if self.foreign_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        for sp in self.foreign.read().values() {
            sp.uffd.flush_deferred();
        }
    }

    /// Whether a foreign space has answers deferred.
    pub(super) fn foreign_deferred(&self) -> bool {
        self.foreign_count.load(Ordering::Relaxed) > 0
            && crate::sys::uffd::any_deferred()
            && self
                .foreign
                .read()
                .values()
                .any(|sp| sp.uffd.has_deferred())
    }
}
