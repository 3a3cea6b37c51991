//! Whether the source changed since the shadow was opened, and the record
//! of the last error (docs/staleness.md).

use super::*;

impl LazyShadow {
    pub(super) fn record_error(&self, core_counters: &Counters, msg: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        core_counters.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(msg);
    }

    /// Compares the source with its recorded metadata; true if it changed.
    pub(super) fn check_changed(&self) -> bool {
        self.check_source().0
    }

    /// [`LazyShadow::check_changed`] for a fill whose result does not
    /// depend on it (`detect`, and bytes read with `read_at`, whose short
    /// reads say where the source ends): the metadata is read at most once
    /// per [`DETECT_EVERY`] per shadow, so a stream of faults pays one
    /// `fstat` per millisecond, not one per fault. A change is seen by the
    /// first fill a millisecond after it, or by the next
    /// [`LazyShadow::source_changed`], whichever comes first; one undone
    /// within the millisecond may go unseen.
    pub(super) fn check_changed_lately(&self, core: &Core) -> bool {
        if self.changed.load(Ordering::Relaxed) {
            return true;
        }
        // The worker's reading of this turn (taken after the fill's wake,
        // or where the turn began): a check may come up to one turn late.
        let now = core.now_recent();
        let last = self.checked_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < DETECT_EVERY {
            return false;
        }
        self.checked_at.store(now, Ordering::Relaxed);
        self.check_changed()
    }

    /// [`LazyShadow::check_changed`], with the source's size as just read
    /// (`None` if it was not read: a change was seen before, or the read
    /// failed).
    pub(super) fn check_source(&self) -> (bool, Option<u64>) {
        if self.changed.load(Ordering::Relaxed) {
            return (true, None);
        }
        let (changed, size) = match self.source_meta() {
            Some(now) => (now != self.meta, Some(now.size)),
            None => (true, None),
        };
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
        (changed, size)
    }

    /// The source's fill metadata; `None` on an error or a panic (a
    /// panicking backend must not take a fault-service thread down).
    pub(super) fn source_meta(&self) -> Option<SourceMeta> {
        catch_unwind(AssertUnwindSafe(|| self.source.fill_metadata()))
            .ok()?
            .ok()
    }

    /// The source's mapping ([`Source::mapped`]) and the end of the whole
    /// pages of the shadow it holds: a partial last page is read with
    /// `read_at`, so that its tail stays zero whatever the file holds there
    /// now.
    pub(super) fn mapped_source(&self, page: u64) -> Option<(crate::source::Mapped, u64)> {
        let m = self.source.mapped()?;
        Some((m, self.size.min(m.len()) / page * page))
    }
}
