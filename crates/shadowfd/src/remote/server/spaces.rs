//! A client's address spaces as the server follows them: the mapping
//! events read from its userfaultfd (`munmap`, `mremap`, `fork`; paced
//! per client), checked against its `/proc/PID/maps` when several of its
//! threads' events interleave; ranges it grew in place; and the forked
//! children whose inherited ranges the session serves (docs/remote.md).

use super::*;

/// Forked children a client may leave the server to serve at once; past
/// it, a new child's inherited ranges are poisoned (SIGBUS where unfilled)
/// and its userfaultfd closed.
pub const MAX_CHILDREN: usize = 64;

/// How often forked children are checked for being alive, in ms.
pub(super) const CHILD_CHECK_MS: i32 = 1000;

/// A range a forked child of a client inherited: it holds its shadow's
/// entry (not a handle: the parent may close that).
pub(super) struct ChildRange {
    pub(super) entry: Arc<Entry>,
    pub(super) offset: u64,
    pub(super) key: u64,
}

/// The address space of a client's forked child (or of a child's child):
/// its copies of the lazy ranges, registered with the userfaultfd that the
/// `FORK` event handed over.
pub(super) struct ChildSpace {
    pub(super) uffd: Arc<Uffd>,
    pub(super) ranges: Spans<ChildRange>,
}

impl Clone for ChildRange {
    fn clone(&self) -> Self {
        self.entry.users.fetch_add(1, Ordering::Relaxed);
        ChildRange {
            entry: self.entry.clone(),
            offset: self.offset,
            key: 0,
        }
    }
}

impl Drop for ChildRange {
    fn drop(&mut self) {
        if let Some(l) = self.entry.lazy() {
            l.remove_remote(self.key);
        }
        self.entry.users.fetch_sub(1, Ordering::Relaxed);
        *self.entry.last_used.lock() = Instant::now();
    }
}

impl ChildSpace {
    /// Registers the new pieces (key 0) of its table with their shadows.
    pub(super) fn attach_new(&mut self) {
        let fresh: Vec<(u64, u64, u64)> = self
            .ranges
            .iter()
            .filter(|(_, s)| s.value.key == 0)
            .map(|(a, s)| (a, s.len, s.offset))
            .collect();
        for (a, len, offset) in fresh {
            self.ranges.insert_with(a, |r| {
                if let Some(l) = r.entry.lazy() {
                    r.key = l.add_remote(self.uffd.clone(), a, len, offset);
                }
            });
        }
    }

    /// Applies mapping events of its userfaultfd; returns forked children.
    pub(super) fn apply(&mut self, events: Vec<Event>) -> Vec<OwnedFd> {
        let mut forks = Vec::new();
        for ev in events {
            match ev {
                Event::Unmap { start, end } => {
                    drop(self.ranges.cut(start, end));
                    self.attach_new();
                }
                Event::Remap { from, to, len } => {
                    drop(self.ranges.copy(from, to, len, Clone::clone));
                    self.attach_new();
                }
                Event::Remove => {}
                Event::Fork(fd) => forks.push(fd),
            }
        }
        forks
    }

    /// Serves one fault.
    pub(super) fn fault(&self, address: u64) {
        let page = crate::page_size() as u64;
        let addr = address & !(page - 1);
        let found = self.ranges.find(addr).and_then(|(s, r)| {
            let l = r.value.entry.lazy()?;
            Some((l, r.offset + (addr - s), s + r.len - addr))
        });
        let Some((shadow, offset, limit)) = found else {
            if self.uffd.poison(addr, page).is_err() {
                let _ = self.uffd.wake(addr, page);
            }
            return;
        };
        let core = &shadow.service.core;
        let hit = Hit {
            uffd: &self.uffd,
            addr,
            offset,
            limit,
            internal: false,
        };
        if let Some(work) = shadow.on_fault(core, hit) {
            shadow.run(core, work);
        }
    }
}

impl Inner {
    /// A piece `lo..hi` of `r` as a new attached range of `conn` (a new
    /// consumer of its shadow through `uffd`).
    pub(super) fn attach_piece(conn: &Conn, r: &Attached, lo: u64, hi: u64, at: u64) -> Attached {
        let offset = r.offset + (lo - r.start);
        let key = match (
            &conn.uffd,
            conn.handles.get(&r.handle).and_then(|h| h.entry.lazy()),
        ) {
            (Some(u), Some(l)) => l.add_remote(u.clone(), at, hi - lo, offset),
            _ => 0,
        };
        Attached {
            handle: r.handle,
            start: at,
            len: hi - lo,
            offset,
            key,
        }
    }

    /// Forgets `lo..hi` of the client's ranges (the kernel unmapped it):
    /// what sticks out stays attached.
    pub(super) fn cut_client(conn: &mut Conn, lo: u64, hi: u64) {
        Self::cut_client_except(conn, lo, hi, &[]);
    }

    /// [`Inner::cut_client`], but the ranges starting at `keep` stay whole.
    pub(super) fn cut_client_except(conn: &mut Conn, lo: u64, hi: u64, keep: &[u64]) {
        let hit: Vec<Attached> = conn
            .overlapping(lo, hi)
            .into_iter()
            .filter(|s| !keep.contains(s))
            .filter_map(|s| conn.ranges.get(&s).copied())
            .collect();
        for r in hit {
            let mut pieces = Vec::with_capacity(2);
            for (a, b) in [(r.start, lo.max(r.start)), (hi.min(r.end()), r.end())] {
                if a < b {
                    pieces.push(Self::attach_piece(conn, &r, a, b, a));
                }
            }
            // The mirror first: a worker that found the range there (under
            // its read lock, which the removal waits for) recorded its
            // waiter while the shadow still listed the range, so the fill
            // wakes it (`Conn::lane`).
            conn.remove_range(r.start);
            if let Some(l) = conn.handles.get(&r.handle).and_then(|h| h.entry.lazy()) {
                l.remove_remote(r.key);
            }
            for p in pieces {
                conn.insert_range(p);
            }
        }
    }

    /// Applies mapping events read from the client's own userfaultfd.
    pub(super) fn client_events(&self, conn: &mut Conn, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Unmap { start, end } => {
                    // Events of several client threads interleave: the
                    // addresses may hold a range moved or attached there
                    // since (its REMAP or ATTACH came first). What the
                    // client's maps still show of a range stays.
                    self.open_maps(conn);
                    let keep: Vec<u64> = conn
                        .overlapping(start, end)
                        .into_iter()
                        .filter(|s| {
                            let r = conn.ranges[s];
                            let (a, b) = (r.start.max(start), r.end().min(end));
                            Self::still_shown(conn, &r, a, b)
                        })
                        .collect();
                    Self::cut_client_except(conn, start, end, &keep);
                }
                Event::Remap { from, to, len } => {
                    let end = from.saturating_add(len);
                    let moved: Vec<Attached> = conn
                        .overlapping(from, end)
                        .into_iter()
                        .filter_map(|s| conn.ranges.get(&s).copied())
                        .map(|r| {
                            let (a, b) = (r.start.max(from), r.end().min(end));
                            Self::attach_piece(conn, &r, a, b, to + (a - from))
                        })
                        .collect();
                    Self::cut_client(conn, to, to.saturating_add(len));
                    for p in moved {
                        conn.insert_range(p);
                    }
                    if len > 0 {
                        self.follow_client(conn, to, to.saturating_add(len));
                    }
                }
                Event::Remove => {}
                Event::Fork(fd) => {
                    let mut ranges = Spans::default();
                    for r in conn.ranges.values() {
                        if let Some(h) = conn.handles.get(&r.handle) {
                            h.entry.users.fetch_add(1, Ordering::Relaxed);
                            let c = ChildRange {
                                entry: h.entry.clone(),
                                offset: 0,
                                key: 0,
                            };
                            ranges.insert(r.start, r.len, r.offset, c);
                        }
                    }
                    let features = conn.uffd.as_ref().map_or(0, |u| u.features());
                    self.add_child(conn, fd, features, ranges);
                }
            }
        }
        self.reap_closed(conn);
        self.note_mappings(conn);
    }

    /// Counts `n` events of the client read just now; past
    /// [`EVENTS_PER_WINDOW`] in the current window, waits the window out
    /// (at most [`EVENT_WINDOW`]).
    pub(super) fn pace_events(conn: &mut Conn, n: u32) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let (count, since) = &mut conn.events;
        if now.duration_since(*since) >= EVENT_WINDOW {
            (*count, *since) = (0, now);
        }
        *count += n;
        if *count > EVENTS_PER_WINDOW {
            std::thread::sleep(EVENT_WINDOW.saturating_sub(now.duration_since(*since)));
            (*count, *since) = (0, Instant::now());
        }
    }

    /// Lets go of the handles the client closed whose last range the
    /// kernel has since unmapped.
    pub(super) fn reap_closed(&self, conn: &mut Conn) {
        let done: Vec<u64> = conn
            .handles
            .iter()
            .filter(|(_, h)| h.closed && h.starts.is_empty())
            .map(|(&k, _)| k)
            .collect();
        for k in done {
            if let Some((h, ranges)) = conn.take_handle(k) {
                self.release(h, &ranges, conn.uffd.as_deref());
                if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
                    c.handles = c.handles.saturating_sub(1);
                }
            }
        }
    }

    /// Takes on a forked child's userfaultfd with its inherited ranges, or,
    /// past [`MAX_CHILDREN`], poisons those ranges and lets it go.
    pub(super) fn add_child(
        &self,
        conn: &mut Conn,
        fd: OwnedFd,
        features: u64,
        ranges: Spans<ChildRange>,
    ) {
        let mut child = ChildSpace {
            uffd: Arc::new(Uffd::from_fd(fd, features)),
            ranges,
        };
        if conn.children.len() >= MAX_CHILDREN {
            for (s, r) in child.ranges.iter() {
                let _ = child.uffd.poison(s, r.len);
            }
            self.log(&format!(
                "{}: a forked child past the limit of {MAX_CHILDREN} served children; its \
                 inherited lazy ranges are poisoned (SIGBUS where not yet filled)",
                conn.peer
            ));
            return;
        }
        child.attach_new();
        conn.children.push(child);
    }

    /// Serves forked children with messages waiting, drops those that are
    /// gone, and wakes threads whose answers waited for an event. Returns
    /// the poll timeout for the session loop (ms; -1: none).
    pub(super) fn serve_spaces(&self, conn: &mut Conn) -> i32 {
        // Called before every poll of the session loop: nothing to do, and
        // nothing allocated, for a client with no children and no answer
        // deferred (nearly always).
        if conn.children.is_empty() && !conn.uffd.as_ref().is_some_and(|u| u.has_deferred()) {
            return -1;
        }
        let mut raw = vec![uffd_msg::default(); 32];
        let mut i = 0;
        while i < conn.children.len() {
            let (mut faults, mut events) = (Vec::new(), Vec::new());
            let c = &conn.children[i];
            if c.uffd.has_pending() && c.uffd.read_msgs(&mut raw, &mut faults, &mut events).is_ok()
            {
                let forks = conn.children[i].apply(events);
                for fd in forks {
                    // Each copy holds its entry, unattached (key 0).
                    let ranges = conn.children[i].ranges.clone();
                    let features = conn.children[i].uffd.features();
                    self.add_child(conn, fd, features, ranges);
                }
                for f in &faults {
                    conn.children[i].fault(f.address);
                }
            }
            i += 1;
        }
        // Whether each child still lives (an ioctl each) is asked once per
        // CHILD_CHECK_MS, not before every poll of a busy session.
        let now = Instant::now();
        if now.duration_since(conn.children_checked) >= Duration::from_millis(CHILD_CHECK_MS as u64)
        {
            conn.children_checked = now;
            conn.children
                .retain(|c| c.uffd.alive() && !c.ranges.is_empty());
        } else {
            conn.children.retain(|c| !c.ranges.is_empty());
        }
        let mut deferred = false;
        for u in conn
            .uffd
            .iter()
            .chain(conn.children.iter().map(|c| &c.uffd))
        {
            if u.has_deferred() {
                // Woken now, the threads fault again once the event's sender
                // went on; a pending event makes their answer wait 1 ms more.
                u.flush_deferred();
                deferred = true;
            }
        }
        if deferred {
            1
        } else if conn.children.is_empty() {
            -1
        } else {
            CHILD_CHECK_MS.min(50)
        }
    }

    /// Serves the client's userfaultfd (faults and events) until its socket
    /// has something to read, or `by`.
    pub(super) fn serve_until_readable(&self, conn: &mut Conn, by: Instant) {
        if conn.uffd.is_none() {
            return;
        }
        let mut raw = vec![uffd_msg::default(); 32];
        let mut faults = Vec::new();
        loop {
            let left = by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut fds =
                [conn.stream.as_fd().as_raw_fd(), Self::uffd_side(conn)].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: `fds` is a live array of two pollfd structs.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents & libc::POLLIN != 0 {
                if self.serve_client_uffd(conn, &mut raw, &mut faults).is_err() {
                    return;
                }
            } else if fds[1].revents != 0 {
                return;
            }
        }
    }

    /// After the client went away: serves its forked children until the
    /// last one exits.
    pub(super) fn serve_orphans(&self, conn: &mut Conn) {
        while !conn.children.is_empty() {
            let timeout = self.serve_spaces(conn);
            let mut fds: Vec<libc::pollfd> = conn
                .children
                .iter()
                .map(|c| libc::pollfd {
                    fd: c.uffd.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.max(1)) };
        }
    }

    /// Opens the client's `/proc/PID/maps` if it negotiated mapping events
    /// and it is not open yet.
    pub(super) fn open_maps(&self, conn: &mut Conn) {
        if conn.maps.is_none() && conn.uffd.as_ref().is_some_and(|u| u.has_events()) {
            conn.maps = crate::sys::maps::Maps::open_pid(conn.peer.pid as u32).ok();
        }
    }

    /// Whether the client's maps show `a..b` of range `r` as its shadow's
    /// memfd at the offsets `r` gives (no maps: no).
    pub(super) fn still_shown(conn: &Conn, r: &Attached, a: u64, b: u64) -> bool {
        let Some(maps) = conn.maps.as_ref() else {
            return false;
        };
        let Some(ino) = conn
            .handles
            .get(&r.handle)
            .and_then(|h| h.entry.lazy())
            .and_then(|l| l.memfd.inode().ok())
        else {
            return false;
        };
        maps.showing(a, b, ino, r.offset + (a - r.start)) == [(a, b - a)]
    }

    /// After a REMAP into `lo..hi`: the client's ranges there are made to
    /// agree with its maps. A range copied from a source whose addresses
    /// were reused before the event came (another thread's munmap and mmap
    /// between them) is dropped, and what maps a shadow's memfd is
    /// attached from what the kernel shows (a REMAP is only sent for
    /// registered ranges).
    pub(super) fn follow_client(&self, conn: &mut Conn, lo: u64, hi: u64) {
        self.open_maps(conn);
        if conn.maps.is_none() {
            return;
        }
        let wrong: Vec<u64> = conn
            .overlapping(lo, hi)
            .into_iter()
            .filter(|s| {
                let r = conn.ranges[s];
                !Self::still_shown(conn, &r, r.start.max(lo), r.end().min(hi))
            })
            .collect();
        for s in wrong {
            if let Some(r) = conn.remove_range(s) {
                if let Some(l) = conn.handles.get(&r.handle).and_then(|h| h.entry.lazy()) {
                    l.remove_remote(r.key);
                }
            }
        }
        let mut at = lo;
        while at < hi {
            if let Some(r) = conn.range_at(at) {
                at = r.end();
                continue;
            }
            let next = conn
                .ranges
                .range(at..)
                .next()
                .map_or(hi, |(&s, _)| s.min(hi));
            if !self.adopt_grown(conn, at) {
                at = next;
            }
        }
    }

    /// A fault at `addr` outside the client's ranges may be in a range it
    /// grew with `mremap` (in place the kernel sends no event): if its
    /// `/proc/PID/maps` shows a shadow's memfd there, that part is attached
    /// at the offset the kernel shows. Returns whether it was.
    pub(super) fn adopt_grown(&self, conn: &mut Conn, addr: u64) -> bool {
        // Opened at the first such fault only: a descriptor per connection
        // would count against the server's limit for nothing.
        self.open_maps(conn);
        let Some(vma) = conn.maps.as_ref().and_then(|m| m.query(addr)) else {
            return false;
        };
        let Some((&handle, _)) = conn.handles.iter().find(|(_, h)| {
            h.entry
                .lazy()
                .is_some_and(|l| l.memfd.inode().ok() == Some(vma.inode))
        }) else {
            return false;
        };
        let lo = conn
            .ranges
            .range(..addr)
            .next_back()
            .map_or(vma.start, |(_, r)| r.end().max(vma.start));
        let hi = conn
            .ranges
            .range(addr..)
            .next()
            .map_or(vma.end, |(&s, _)| s.min(vma.end));
        if !(lo <= addr && addr < hi) {
            return false;
        }
        let seed = Attached {
            handle,
            start: lo,
            len: hi - lo,
            offset: vma.offset + (lo - vma.start),
            key: 0,
        };
        let r = Self::attach_piece(conn, &seed, lo, hi, lo);
        conn.insert_range(r);
        true
    }
}
