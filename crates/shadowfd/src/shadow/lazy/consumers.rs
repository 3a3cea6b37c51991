//! The consumer ranges of one lazy shadow, and the faults waiting on its
//! chunks.
//!
//! A fill answers every range of this process that shows its bytes, but of
//! other processes' ranges (server clients, forked children) only those
//! where a fault waits. So the table keeps the two apart: this process's
//! ranges in a list (few: the engine's own mappings), other processes'
//! ranges in an index by userfaultfd and address, which a fill looks up
//! from its waiters. A client that attaches many ranges of one file then
//! costs a fill nothing until it faults in them: the cost of a fill is in
//! the ranges that hold its pages, not in every range ever attached.

use crate::fault::Space;
use crate::sys::Uffd;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A registered consumer range: in this process (through the engine's
/// userfaultfd) or in another one (through the userfaultfd it sent us).
pub(super) struct Consumer {
    pub id: u64,
    pub start: u64,
    pub len: u64,
    /// Offset in the shadow of the range's first byte.
    pub offset: u64,
    /// `None`: the engine's own userfaultfd.
    pub remote: Option<Arc<Uffd>>,
    /// A `MAP_SHARED` mapping of the memfd: a fill may install its pages
    /// straight into it (they land in the memfd, and only there).
    pub shared: bool,
}

impl Consumer {
    /// The identity of its userfaultfd ([`uffd_key`]); 0 for the engine's
    /// own (see [`space_key`]).
    pub fn key(&self) -> usize {
        self.remote.as_deref().map_or(0, uffd_key)
    }

    /// Its userfaultfd: `own` (the engine's) or the one it came with.
    pub fn uffd<'a>(&'a self, own: &'a Uffd) -> &'a Uffd {
        self.remote.as_deref().unwrap_or(own)
    }

    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The part of shadow bytes `a..b` this range shows, as (address, len).
    pub fn overlap(&self, a: u64, b: u64) -> Option<(u64, u64)> {
        let (lo, hi) = (a.max(self.offset), b.min(self.offset + self.len));
        (lo < hi).then(|| (self.start + (lo - self.offset), hi - lo))
    }

    /// The same range's bytes `a..b` (addresses within it), as a range of
    /// its own with the id `id`.
    fn part(&self, id: u64, a: u64, b: u64) -> Consumer {
        Consumer {
            id,
            start: a,
            len: b - a,
            offset: self.offset + (a - self.start),
            remote: self.remote.clone(),
            shared: self.shared,
        }
    }
}

/// A fault waiting on a chunk being filled.
#[derive(Clone)]
pub(super) struct Waiter {
    /// The identity of the range's userfaultfd ([`space_key`]: 0 for the
    /// engine's own).
    pub key: usize,
    pub addr: u64,
    /// The shadow offset the faulting page showed.
    pub offset: u64,
    /// Another process's userfaultfd, as the range it faulted in had it
    /// when the fault was recorded: the page is answered through it even if
    /// that range is no longer listed when the fill ends.
    pub uffd: Option<Arc<Uffd>>,
}

/// The identity of a userfaultfd, as [`Waiter`] and the index keep it.
pub(super) fn uffd_key(u: &Uffd) -> usize {
    std::ptr::from_ref(u) as usize
}

/// [`Consumer::key`] of the ranges of `space`: 0 for the engine's own.
pub(super) fn space_key(space: Space<'_>) -> usize {
    space.map_or(0, |u| uffd_key(u))
}

/// The consumer ranges of a shadow (see the module's documentation).
#[derive(Default)]
pub(super) struct Consumers {
    local: Vec<Consumer>,
    /// Other processes' ranges by (userfaultfd key, start, id).
    remote: BTreeMap<(usize, u64, u64), Consumer>,
    /// Where each remote range's id is in `remote`.
    ids: HashMap<u64, (usize, u64)>,
}

impl Consumers {
    pub fn insert(&mut self, c: Consumer) {
        match c.remote {
            None => self.local.push(c),
            Some(_) => {
                let k = (c.key(), c.start);
                self.ids.insert(c.id, k);
                self.remote.insert((k.0, k.1, c.id), c);
            }
        }
    }

    pub fn remove(&mut self, id: u64) {
        match self.ids.remove(&id) {
            Some((key, start)) => {
                self.remote.remove(&(key, start, id));
            }
            None => self.local.retain(|m| m.id != id),
        }
    }

    /// This process's ranges.
    pub fn local(&self) -> &[Consumer] {
        &self.local
    }

    /// Other processes' ranges that show shadow bytes `a..b`.
    pub fn remote_showing(&self, a: u64, b: u64) -> impl Iterator<Item = &Consumer> {
        self.remote
            .values()
            .filter(move |m| m.overlap(a, b).is_some())
    }

    pub fn remote_len(&self) -> usize {
        self.remote.len()
    }

    /// Whether a range with this id is listed.
    pub fn contains_id(&self, id: u64) -> bool {
        self.ids.contains_key(&id) || self.local.iter().any(|m| m.id == id)
    }

    /// The ranges of userfaultfd `key` that overlap addresses `lo..hi`.
    /// Remote ranges of one userfaultfd do not overlap one another (an
    /// address shows one mapping), so those that start below `lo` are
    /// looked at back to the first that ends at or below it.
    fn overlapping(&self, key: usize, lo: u64, hi: u64) -> Vec<&Consumer> {
        if key == 0 {
            return self
                .local
                .iter()
                .filter(|m| m.start < hi && m.end() > lo)
                .collect();
        }
        if hi <= lo {
            return Vec::new();
        }
        let mut out: Vec<&Consumer> = self
            .remote
            .range((key, lo, 0)..(key, hi, 0))
            .map(|(_, c)| c)
            .collect();
        for (_, c) in self.remote.range((key, 0, 0)..(key, lo, 0)).rev() {
            if c.end() <= lo {
                break;
            }
            out.push(c);
        }
        out
    }

    /// The range of userfaultfd `key` that holds address `addr`.
    pub fn containing(&self, key: usize, addr: u64) -> Option<&Consumer> {
        self.overlapping(key, addr, addr + 1).into_iter().next()
    }

    /// The ranges a fill of shadow bytes `a..b` answers: every one of this
    /// process's that shows them, and every other process's where one of
    /// `waiting` is (each once). Also returns the remote waiters found in
    /// no listed range.
    pub fn answering<'a>(
        &'a self,
        a: u64,
        b: u64,
        waiting: &'a [Waiter],
    ) -> (Vec<&'a Consumer>, Vec<&'a Waiter>) {
        let mut out: Vec<&Consumer> = self
            .local
            .iter()
            .filter(|m| m.overlap(a, b).is_some())
            .collect();
        let mut unlisted = Vec::new();
        let first_remote = out.len();
        for w in waiting.iter().filter(|w| w.key != 0) {
            match self.containing(w.key, w.addr) {
                Some(m) => {
                    if !out[first_remote..].iter().any(|o| o.id == m.id) {
                        out.push(m);
                    }
                }
                None => unlisted.push(w),
            }
        }
        (out, unlisted)
    }

    /// Removes addresses `lo..hi` of userfaultfd `key` from its ranges;
    /// what sticks out on either side stays (the part above `hi` under a
    /// new id from `next_id`).
    pub fn cut(&mut self, key: usize, lo: u64, hi: u64, mut next_id: impl FnMut() -> u64) {
        let hit: Vec<u64> = self.overlapping(key, lo, hi).iter().map(|m| m.id).collect();
        let mut parts = Vec::new();
        for id in hit {
            let Some(m) = self.take(key, id) else {
                continue;
            };
            if m.start < lo {
                parts.push(m.part(m.id, m.start, lo));
            }
            if hi < m.end() {
                parts.push(m.part(next_id(), hi, m.end()));
            }
        }
        for p in parts {
            self.insert(p);
        }
    }

    fn take(&mut self, key: usize, id: u64) -> Option<Consumer> {
        if key == 0 {
            let i = self.local.iter().position(|m| m.id == id)?;
            return Some(self.local.swap_remove(i));
        }
        let (k, start) = self.ids.remove(&id)?;
        self.remote.remove(&(k, start, id))
    }

    /// The ranges of userfaultfd `key` within addresses `from..from+len`, as
    /// they stand moved to `to` (with `uffd` as their userfaultfd), each
    /// under a new id from `next_id`.
    pub fn moved(
        &self,
        key: usize,
        from: u64,
        to: u64,
        len: u64,
        uffd: Option<Arc<Uffd>>,
        mut next_id: impl FnMut() -> u64,
    ) -> Vec<Consumer> {
        let end = from.saturating_add(len);
        self.overlapping(key, from, end)
            .into_iter()
            .map(|m| {
                let (a, b) = (m.start.max(from), m.end().min(end));
                let mut c = m.part(next_id(), a, b);
                c.start = to + (a - from);
                c.remote = uffd.clone();
                c
            })
            .collect()
    }

    /// Drops every range of userfaultfd `key` that overlaps `lo..hi`.
    pub fn drop_overlapping(&mut self, key: usize, lo: u64, hi: u64) {
        let hit: Vec<u64> = self.overlapping(key, lo, hi).iter().map(|m| m.id).collect();
        for id in hit {
            self.take(key, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct userfaultfd identity: the table never calls into it, so
    /// any descriptor will do.
    fn uffd() -> Arc<Uffd> {
        let f = std::fs::File::open("/dev/null").unwrap();
        Arc::new(Uffd::from_fd(f.into(), 0))
    }

    fn range(id: u64, start: u64, len: u64, offset: u64, u: Option<&Arc<Uffd>>) -> Consumer {
        Consumer {
            id,
            start,
            len,
            offset,
            remote: u.cloned(),
            shared: false,
        }
    }

    fn waiter(u: &Arc<Uffd>, addr: u64) -> Waiter {
        Waiter {
            key: uffd_key(u),
            addr,
            offset: 0,
            uffd: Some(u.clone()),
        }
    }

    fn ids(v: &[&Consumer]) -> Vec<u64> {
        let mut v: Vec<u64> = v.iter().map(|m| m.id).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_fill_answers_every_local_range_and_only_remote_ones_with_waiters() {
        let (u, v) = (uffd(), uffd());
        let mut t = Consumers::default();
        t.insert(range(1, 0x1000, 0x4000, 0, None));
        t.insert(range(2, 0x9000, 0x1000, 0x8000, None)); // shows other bytes
        for i in 0..1000 {
            t.insert(range(10 + i, 0x10_0000 + i * 0x10000, 0x4000, 0, Some(&u)));
        }
        t.insert(range(5000, 0x10_0000, 0x4000, 0, Some(&v)));
        assert_eq!(t.remote_len(), 1001);
        let (m, unlisted) = t.answering(0, 0x4000, &[]);
        assert_eq!(ids(&m), vec![1]);
        assert!(unlisted.is_empty());
        // Two waiters in one range count it once; one of v's is in no range.
        let w = [
            waiter(&u, 0x10_0000 + 7 * 0x10000 + 0x10),
            waiter(&u, 0x10_0000 + 7 * 0x10000 + 0x2000),
            waiter(&v, 0x10_0000 + 0x3fff),
            waiter(&v, 0x10_4000),
        ];
        let (m, unlisted) = t.answering(0, 0x4000, &w);
        assert_eq!(ids(&m), vec![1, 17, 5000]);
        assert_eq!(unlisted.len(), 1);
        assert_eq!(unlisted[0].addr, 0x10_4000);
    }

    #[test]
    fn cuts_keep_what_sticks_out_and_touch_only_their_userfaultfd() {
        let (u, v) = (uffd(), uffd());
        let mut t = Consumers::default();
        t.insert(range(1, 0x10000, 0x8000, 0x2000, Some(&u)));
        t.insert(range(2, 0x10000, 0x8000, 0, Some(&v)));
        t.insert(range(3, 0x10000, 0x8000, 0, None));
        let mut next = 100;
        t.cut(uffd_key(&u), 0x12000, 0x13000, || {
            next += 1;
            next
        });
        let a = t.containing(uffd_key(&u), 0x11fff).unwrap();
        assert_eq!(
            (a.id, a.start, a.len, a.offset),
            (1, 0x10000, 0x2000, 0x2000)
        );
        assert!(t.containing(uffd_key(&u), 0x12000).is_none());
        let b = t.containing(uffd_key(&u), 0x13000).unwrap();
        assert_eq!(
            (b.id, b.start, b.len, b.offset),
            (101, 0x13000, 0x5000, 0x5000)
        );
        assert_eq!(t.containing(uffd_key(&v), 0x12000).unwrap().id, 2);
        assert_eq!(t.containing(0, 0x12000).unwrap().id, 3);
        // Removing by id finds split parts.
        t.remove(101);
        assert!(t.containing(uffd_key(&u), 0x14000).is_none());
        assert!(!t.contains_id(101) && t.contains_id(1));
        // A cut of everything of v.
        t.cut(uffd_key(&v), 0, u64::MAX, || unreachable!());
        assert!(t.containing(uffd_key(&v), 0x12000).is_none());
        assert_eq!(t.remote_len(), 1);
    }

    #[test]
    fn moves_and_forks_copy_ranges_to_their_new_place() {
        let (u, child) = (uffd(), uffd());
        let mut t = Consumers::default();
        t.insert(range(1, 0x10000, 0x4000, 0x1000, Some(&u)));
        t.insert(range(2, 0x20000, 0x4000, 0x9000, Some(&u)));
        let mut next = 10;
        let mut id = || {
            next += 1;
            next
        };
        // A move of the second half of range 1 to 0x50000.
        let moved = t.moved(
            uffd_key(&u),
            0x12000,
            0x50000,
            0x2000,
            Some(u.clone()),
            &mut id,
        );
        assert_eq!(moved.len(), 1);
        let m = &moved[0];
        assert_eq!((m.start, m.len, m.offset), (0x50000, 0x2000, 0x3000));
        // A fork copies all of them, at the same addresses.
        let copies = t.moved(uffd_key(&u), 0, 0, u64::MAX, Some(child.clone()), &mut id);
        assert_eq!(copies.len(), 2);
        for c in copies {
            t.insert(c);
        }
        assert_eq!(
            t.containing(uffd_key(&child), 0x20000).unwrap().offset,
            0x9000
        );
        t.drop_overlapping(uffd_key(&child), 0x13fff, 0x20001);
        assert!(t.containing(uffd_key(&child), 0x10000).is_none());
        assert!(t.containing(uffd_key(&u), 0x10000).is_some());
    }
}
