//! A table of registered address ranges that follows the kernel's mapping
//! events: `munmap` cuts ranges ([`Spans::cut`]), `mremap` copies them to
//! their new place ([`Spans::copy`]; the old place is cut by the `UNMAP`
//! event that follows, unless `MREMAP_DONTUNMAP` kept it), `fork` copies the
//! whole table for the child.
//!
//! Each span shows a target from an offset; a piece cut out of a span keeps
//! the offset of its first byte, so that whatever the consumer did with its
//! mapping, an address still names the byte the kernel shows there.

use std::collections::BTreeMap;

/// One registered range: `len` bytes showing its target from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span<V> {
    pub len: u64,
    pub offset: u64,
    pub value: V,
}

/// Non-overlapping spans by start address.
#[derive(Debug, Clone)]
pub(crate) struct Spans<V> {
    map: BTreeMap<u64, Span<V>>,
}

impl<V> Default for Spans<V> {
    fn default() -> Self {
        Spans {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Clone> Spans<V> {
    /// Adds `start..start+len`, replacing what overlapped it (returned).
    pub fn insert(&mut self, start: u64, len: u64, offset: u64, value: V) -> Vec<(u64, Span<V>)> {
        let gone = self.cut(start, start + len);
        self.map.insert(start, Span { len, offset, value });
        gone
    }

    /// Removes the span that starts at `start`.
    pub fn remove(&mut self, start: u64) -> Option<Span<V>> {
        self.map.remove(&start)
    }

    /// The span holding `addr`, with its start.
    pub fn find(&self, addr: u64) -> Option<(u64, &Span<V>)> {
        let (&start, s) = self.map.range(..=addr).next_back()?;
        (addr < start + s.len).then_some((start, s))
    }

    /// Changes the value of the span that starts at `start`.
    pub fn insert_with(&mut self, start: u64, f: impl FnOnce(&mut V)) {
        if let Some(s) = self.map.get_mut(&start) {
            f(&mut s.value);
        }
    }

    /// The first span starting after `addr`.
    pub fn next_after(&self, addr: u64) -> Option<u64> {
        self.map.range(addr + 1..).next().map(|(&s, _)| s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Span<V>)> {
        self.map.iter().map(|(&s, v)| (s, v))
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Removes `lo..hi` from every span. Spans that stick out on either side
    /// keep their outer parts (with the offsets of those parts); the parts
    /// inside are returned, each with its own start, length and offset.
    pub fn cut(&mut self, lo: u64, hi: u64) -> Vec<(u64, Span<V>)> {
        let mut out = Vec::new();
        if hi <= lo {
            return out;
        }
        let first = match self.find(lo) {
            Some((s, _)) => s,
            None => lo,
        };
        let starts: Vec<u64> = self.map.range(first..hi).map(|(&s, _)| s).collect();
        for s in starts {
            let span = self.map.remove(&s).expect("listed");
            let end = s + span.len;
            if end <= lo {
                self.map.insert(s, span);
                continue;
            }
            let (a, b) = (s.max(lo), end.min(hi));
            if s < a {
                let left = Span {
                    len: a - s,
                    offset: span.offset,
                    value: span.value.clone(),
                };
                self.map.insert(s, left);
            }
            if b < end {
                let right = Span {
                    len: end - b,
                    offset: span.offset + (b - s),
                    value: span.value.clone(),
                };
                self.map.insert(b, right);
            }
            out.push((
                a,
                Span {
                    len: b - a,
                    offset: span.offset + (a - s),
                    value: span.value,
                },
            ));
        }
        out
    }

    /// The parts of the spans in `from..from+len`, as they would stand at
    /// `to` (a range moved by `mremap`), with `f` giving each its value.
    /// Nothing is changed; see [`Spans::copy`].
    pub fn moved(
        &self,
        from: u64,
        to: u64,
        len: u64,
        mut f: impl FnMut(&V) -> V,
    ) -> Vec<(u64, Span<V>)> {
        let end = from.saturating_add(len);
        let first = self.find(from).map_or(from, |(s, _)| s);
        self.map
            .range(first..end)
            .filter_map(|(&s, span)| {
                let (a, b) = (s.max(from), (s + span.len).min(end));
                (a < b).then(|| {
                    let piece = Span {
                        len: b - a,
                        offset: span.offset + (a - s),
                        value: f(&span.value),
                    };
                    (to + (a - from), piece)
                })
            })
            .collect()
    }

    /// Copies the parts of the spans in `from..from+len` to `to`, replacing
    /// whatever the destination held (returned).
    pub fn copy(
        &mut self,
        from: u64,
        to: u64,
        len: u64,
        f: impl FnMut(&V) -> V,
    ) -> Vec<(u64, Span<V>)> {
        let pieces = self.moved(from, to, len, f);
        let mut gone = self.cut(to, to.saturating_add(len));
        for (s, p) in pieces {
            gone.extend(self.insert(s, p.len, p.offset, p.value));
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(spans: &[(u64, u64, u64, char)]) -> Spans<char> {
        let mut t = Spans::default();
        for &(s, l, o, v) in spans {
            t.insert(s, l, o, v);
        }
        t
    }

    fn rows(t: &Spans<char>) -> Vec<(u64, u64, u64, char)> {
        t.iter()
            .map(|(s, p)| (s, p.len, p.offset, p.value))
            .collect()
    }

    #[test]
    fn a_cut_in_the_middle_keeps_both_ends_with_their_offsets() {
        let mut t = table(&[(100, 50, 1000, 'a')]);
        let gone = t.cut(110, 120);
        assert_eq!(rows(&t), vec![(100, 10, 1000, 'a'), (120, 30, 1020, 'a')]);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].0, gone[0].1.len, gone[0].1.offset),
            (110, 10, 1010)
        );
        // Then both ends.
        t.cut(100, 110);
        t.cut(120, 150);
        assert!(t.is_empty());
    }

    #[test]
    fn a_cut_over_several_spans_and_gaps_takes_only_what_it_covers() {
        let mut t = table(&[(0, 10, 0, 'a'), (20, 10, 50, 'b'), (40, 10, 7, 'c')]);
        let gone = t.cut(5, 45);
        assert_eq!(rows(&t), vec![(0, 5, 0, 'a'), (45, 5, 12, 'c')]);
        let g: Vec<_> = gone
            .iter()
            .map(|(s, p)| (*s, p.len, p.offset, p.value))
            .collect();
        assert_eq!(g, vec![(5, 5, 5, 'a'), (20, 10, 50, 'b'), (40, 5, 7, 'c')]);
        assert!(t.cut(10, 40).is_empty());
    }

    #[test]
    fn a_move_then_the_unmap_of_the_old_place_leaves_the_new_place_only() {
        let mut t = table(&[(100, 40, 4000, 'a')]);
        // mremap of the middle 10..30 to 500 (REMAP), then UNMAP of the old.
        t.copy(110, 500, 20, |v| v.to_ascii_uppercase());
        t.cut(110, 130);
        assert_eq!(
            rows(&t),
            vec![
                (100, 10, 4000, 'a'),
                (130, 10, 4030, 'a'),
                (500, 20, 4010, 'A')
            ]
        );
        assert_eq!(t.find(519).map(|(s, p)| (s, p.offset)), Some((500, 4010)));
        assert!(t.find(520).is_none());
    }

    #[test]
    fn a_move_onto_another_span_replaces_it() {
        let mut t = table(&[(0, 10, 0, 'a'), (100, 10, 900, 'b')]);
        let gone = t.copy(0, 95, 10, |v| *v);
        assert_eq!(
            rows(&t),
            vec![(0, 10, 0, 'a'), (95, 10, 0, 'a'), (105, 5, 905, 'b')]
        );
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0, gone[0].1.len), (100, 5));
    }

    #[test]
    fn find_is_exact_at_the_edges() {
        let t = table(&[(10, 10, 0, 'a')]);
        assert!(t.find(9).is_none());
        assert_eq!(t.find(10).map(|(s, _)| s), Some(10));
        assert_eq!(t.find(19).map(|(s, _)| s), Some(10));
        assert!(t.find(20).is_none());
        assert_eq!(t.next_after(0), Some(10));
        assert_eq!(t.next_after(10), None);
    }
}
