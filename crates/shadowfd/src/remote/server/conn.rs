//! A connection's own bookkeeping: its handles and the lazy ranges it
//! attached, indexed by address.

use super::*;

/// One handle a client holds.
pub(super) struct Handle {
    pub(super) entry: Arc<Entry>,
    /// Where its lazy ranges start (each a key of [`Conn::ranges`]).
    pub(super) starts: BTreeSet<u64>,
    /// Closed by the client while some of its ranges were still mapped
    /// (moved by `mremap`, say): those stay served, as a file mapping
    /// outlives its descriptor, and the handle goes with the last of them.
    /// Requests on it are refused.
    pub(super) closed: bool,
}

/// A lazy range a client attached: `len` bytes at `start` in the client
/// show the shadow from `offset` through `handle`; `key` names it among the
/// shadow's consumers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Attached {
    pub(super) handle: u64,
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) offset: u64,
    pub(super) key: u64,
}

impl Attached {
    pub(super) fn end(&self) -> u64 {
        self.start + self.len
    }
}

pub(super) struct Conn {
    pub(super) peer: Peer,
    /// The protocol version chosen at HELLO.
    pub(super) version: u64,
    pub(super) activity: Arc<Activity>,
    /// Its ranges as counted in [`Inner::ranges_total`].
    pub(super) published: usize,
    pub(super) stream: UnixStream,
    pub(super) uffd: Option<Arc<Uffd>>,
    /// The fault service's workers read `uffd` and answer the faults in
    /// the ranges mirrored here (every range of [`Conn::ranges`] of a lazy
    /// shadow); the rest they leave to the session (`fault::Foreign`).
    /// `None`: the session reads `uffd` itself (no fault service to hand
    /// it to).
    pub(super) lane: Option<Foreign>,
    pub(super) handles: BTreeMap<u64, Handle>,
    /// Every lazy range of the connection by start address, none
    /// overlapping another: overlap checks and fault lookups are O(log n).
    pub(super) ranges: BTreeMap<u64, Attached>,
    pub(super) next_handle: u64,
    /// The client's forked children that inherited lazy ranges
    /// (`UFFD_EVENT_FORK` on its userfaultfd), served by this thread.
    pub(super) children: Vec<ChildSpace>,
    /// The client's `/proc/PID/maps`, for faults in ranges it grew (opened
    /// at the first).
    pub(super) maps: Option<crate::sys::maps::Maps>,
    /// Mapping events read from the client's userfaultfd in the current
    /// window ([`EVENT_WINDOW`]), and when that window began.
    pub(super) events: (u32, Instant),
    /// When the forked children were last asked whether they live.
    pub(super) children_checked: Instant,
}

/// How many mapping events of one client the server applies per
/// [`EVENT_WINDOW`]: past that, its session thread waits out the window
/// before reading more. Each event blocks the client call that made it
/// (`munmap`, `mremap`, `MADV_DONTNEED` with `EVENT_REMOVE`) until it is
/// read, so a client making them in a loop goes at this rate, and costs
/// the server a bounded share of a CPU, whatever it negotiated. Far above
/// what programs do with served ranges.
pub(super) const EVENTS_PER_WINDOW: u32 = 250;

/// See [`EVENTS_PER_WINDOW`].
pub(super) const EVENT_WINDOW: Duration = Duration::from_millis(50);

impl Conn {
    pub(super) fn new(
        peer: Peer,
        stream: UnixStream,
        uffd: Option<Arc<Uffd>>,
        activity: Arc<Activity>,
        version: u64,
    ) -> Conn {
        Conn {
            peer,
            version,
            activity,
            published: 0,
            stream,
            uffd,
            lane: None,
            handles: BTreeMap::new(),
            ranges: BTreeMap::new(),
            next_handle: 1,
            children: Vec::new(),
            maps: None,
            events: (0, Instant::now()),
            children_checked: Instant::now(),
        }
    }

    /// The range holding address `addr`.
    pub(super) fn range_at(&self, addr: u64) -> Option<&Attached> {
        self.ranges
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end())
    }

    /// The starts of the ranges overlapping `lo..hi`, in address order.
    pub(super) fn overlapping(&self, lo: u64, hi: u64) -> Vec<u64> {
        let before = self
            .ranges
            .range(..lo)
            .next_back()
            .filter(|(_, r)| r.end() > lo)
            .map(|(s, _)| *s);
        before
            .into_iter()
            .chain(self.ranges.range(lo..hi).map(|(s, _)| *s))
            .collect()
    }

    /// Adds a range (mirrored to the fault service's workers).
    pub(super) fn insert_range(&mut self, r: Attached) {
        if let Some(h) = self.handles.get_mut(&r.handle) {
            h.starts.insert(r.start);
            if let (Some(lane), Some(l)) = (&self.lane, h.entry.lazy()) {
                lane.add(r.start, r.len, r.offset, l.target());
            }
        }
        self.ranges.insert(r.start, r);
    }

    /// Removes a range (and its mirror). Call before the shadow forgets the
    /// range (`remove_remote`): while the fault service's workers find it
    /// in the mirror, the shadow must list it, or a waiter recorded there
    /// would have nobody to wake it.
    pub(super) fn remove_range(&mut self, start: u64) -> Option<Attached> {
        let r = self.ranges.remove(&start)?;
        if let Some(lane) = &self.lane {
            lane.remove(r.start, r.len);
        }
        if let Some(h) = self.handles.get_mut(&r.handle) {
            h.starts.remove(&start);
        }
        Some(r)
    }

    /// Takes handle `h` out with its ranges.
    pub(super) fn take_handle(&mut self, h: u64) -> Option<(Handle, Vec<Attached>)> {
        let mut handle = self.handles.remove(&h)?;
        let ranges: Vec<Attached> = std::mem::take(&mut handle.starts)
            .into_iter()
            .filter_map(|s| self.ranges.remove(&s))
            .collect();
        if let Some(lane) = &self.lane {
            for r in &ranges {
                lane.remove(r.start, r.len);
            }
        }
        Some((handle, ranges))
    }
}
