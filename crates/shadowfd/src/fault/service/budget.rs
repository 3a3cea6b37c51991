//! The memory budget: what fills may reserve, and the machine's own room
//! (`MemAvailable`, the memory cgroup's headroom) read as they go.

use super::*;

/// Bytes reserved between two reads of the machine's free memory, at
/// most.
pub const ROOM_EVERY: u64 = 4 << 20;

/// ... and at least: near the margin the reads come more often, so that
/// many processes filling at once in one cgroup (each sees only its own
/// reservations between reads) cannot together run past the margin: the
/// window is a [`ROOM_SHARE`]th of the room left above the margin.
pub const ROOM_EVERY_MIN: u64 = 256 << 10;

/// See [`ROOM_EVERY_MIN`].
pub const ROOM_SHARE: u64 = 32;

/// Free memory (MemAvailable, cgroup headroom) fills may not go below.
pub const ROOM_MARGIN: u64 = 64 << 20;

/// Bytes a process may reserve between two reads of the machine's room,
/// given the room last read (see [`ROOM_EVERY_MIN`]).
pub(super) fn room_window(room: u64) -> u64 {
    (room.saturating_sub(ROOM_MARGIN) / ROOM_SHARE).clamp(ROOM_EVERY_MIN, ROOM_EVERY)
}

/// The tighter of `MemAvailable` and the memory cgroup's headroom
/// (`u64::MAX` if neither is known).
pub(super) fn read_room() -> u64 {
    let a = crate::config::mem_available().unwrap_or(u64::MAX);
    let h = crate::config::headroom().unwrap_or(u64::MAX);
    a.min(h)
}

impl Core {
    /// Reserves `n` bytes of the memory budget; false if it would overflow.
    /// Speculative fills (readahead, and the part of a sequential fault's run
    /// beyond the faulting chunk) may only use the first half of the budget,
    /// so that they can never take the bytes a demand fault needs.
    ///
    /// The machine is consulted too, since a budget fixed at start cannot
    /// hold when many processes start at once: every [`ROOM_EVERY`] bytes
    /// reserved (fewer near the margin, [`ROOM_EVERY_MIN`]), the tighter of
    /// `MemAvailable` and the memory cgroup's
    /// headroom is read again, and a fill that would leave less than
    /// [`ROOM_MARGIN`] of it is refused too.
    pub fn reserve(&self, n: u64, speculative: bool) -> Result<(), Cause> {
        let limit = if speculative {
            self.budget / 2
        } else {
            self.budget
        };
        let room = self.machine_room(n);
        if room < n.saturating_add(ROOM_MARGIN) {
            return Err(Cause::LowMemory {
                room,
                margin: ROOM_MARGIN,
            });
        }
        self.resident
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(n).filter(|&t| t <= limit)
            })
            .map(|_| ())
            .map_err(|resident| Cause::Budget {
                budget: self.budget,
                resident,
                needed: n,
            })
    }

    /// What the machine has left, as last read, less what was reserved since.
    pub(super) fn machine_room(&self, n: u64) -> u64 {
        let since = self.since_room.fetch_add(n, Ordering::Relaxed) + n;
        if since >= room_window(self.room.load(Ordering::Relaxed)) {
            self.since_room.store(0, Ordering::Relaxed);
            self.room.store(read_room(), Ordering::Relaxed);
            return self.room.load(Ordering::Relaxed);
        }
        self.room.load(Ordering::Relaxed).saturating_sub(since)
    }

    /// Gives `n` bytes of the budget back; targets that refused fills for
    /// lack of it are told they may retry.
    pub fn release(&self, n: u64) {
        self.resident.fetch_sub(n, Ordering::AcqRel);
        if n > 0 {
            let refused = std::mem::take(&mut *self.refused.lock());
            for t in refused.iter().filter_map(Weak::upgrade) {
                t.memory_freed(self);
            }
        }
    }

    /// Remembers that `target` refused a demand fill for lack of budget.
    pub fn note_refusal(&self, target: Weak<dyn FaultTarget>) {
        self.refused.lock().push(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_is_read_more_often_near_the_margin() {
        const MIB: u64 = 1 << 20;
        assert_eq!(room_window(u64::MAX), ROOM_EVERY);
        assert_eq!(room_window(ROOM_MARGIN + 32 * ROOM_EVERY), ROOM_EVERY);
        assert_eq!(room_window(ROOM_MARGIN + 64 * MIB), 2 * MIB);
        assert_eq!(room_window(ROOM_MARGIN + MIB), ROOM_EVERY_MIN);
        assert_eq!(room_window(0), ROOM_EVERY_MIN);
        // 32 processes each at a full window stay within the room above
        // the margin, wherever the window is not at its floor.
        for above in [8 * MIB, 64 * MIB, 100 * MIB, 128 * MIB] {
            assert!(ROOM_SHARE * room_window(ROOM_MARGIN + above) <= above);
        }
    }
}
