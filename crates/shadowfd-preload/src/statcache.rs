//! STAT answers by path, kept per process when the served tree cannot
//! change (`run --image`: [`crate::env::Env::immutable`]), so that a
//! program that stats the same path again (`tar`, `diff -r`, `git status`,
//! a Python import search) costs no round trip.
//!
//! Kept: a found path, and a path that is missing or not under a directory
//! (negative answers); never other errors. At most [`MAX_ENTRIES`] answers
//! and [`MAX_BYTES`] bytes (paths and answers, with their table overhead);
//! past either, the oldest go first. A forked child keeps its copy (the
//! tree is the same); a `vfork` child, which runs in its parent's memory,
//! keeps nothing.

use crate::conn::client;
use crate::env::env;
use crate::errno::errno_of;
use crate::forklock::ForkMutex as Mutex;
use shadowfd::remote::PathInfo;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_int;

/// The most answers kept.
const MAX_ENTRIES: usize = 1 << 18;
/// The most bytes the kept answers take.
pub(crate) const MAX_BYTES: usize = 32 << 20;

type Answer = Result<PathInfo, c_int>;

/// The kept answers, and the order they came in (oldest first).
#[derive(Default)]
pub(crate) struct Stats {
    map: HashMap<String, Answer>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Stats {
    /// What one answer for `path` takes: the path twice (table and order),
    /// the answer, and the tables' own overhead per entry.
    fn cost(path: &str) -> usize {
        2 * (path.len() + std::mem::size_of::<String>()) + std::mem::size_of::<Answer>() + 16
    }

    fn insert(&mut self, path: &str, r: Answer) {
        if self.map.contains_key(path) {
            // The tree cannot change: the answer is the one kept.
            return;
        }
        self.bytes += Self::cost(path);
        self.map.insert(path.to_string(), r);
        self.order.push_back(path.to_string());
        while self.map.len() > MAX_ENTRIES || self.bytes > MAX_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.bytes -= Self::cost(&old);
            self.map.remove(&old);
        }
    }
}

pub(crate) static STATS: Mutex<Option<Stats>> = Mutex::new(None);

/// STAT of a served path (kept, for an image). The request runs with no
/// lock held. A path the process listed last asks for it and the listed
/// files after it at once ([`crate::small::prefetch`]).
pub(crate) fn stat_info(rel: &str) -> Answer {
    let keep = env().is_some_and(|e| e.immutable);
    if keep {
        if let Some(r) = kept_stat(rel) {
            return r;
        }
        if crate::small::prefetch(rel, false)
            && let Some(r) = kept_stat(rel)
        {
            return r;
        }
    }
    let r = client()?.stat(rel).map_err(|e| errno_of(&e));
    if keep && !crate::vfork::in_child() {
        keep_stat(rel, r.clone());
    }
    r
}

/// The kept STAT answer for `rel`, if any.
pub(crate) fn kept_stat(rel: &str) -> Option<Answer> {
    STATS.lock().as_ref().and_then(|m| m.map.get(rel)).cloned()
}

/// Keeps a STAT answer (a found path, a missing one, one under a file;
/// not other errors). The caller is not a `vfork` child.
pub(crate) fn keep_stat(rel: &str, r: Answer) {
    if matches!(r, Ok(_) | Err(libc::ENOENT) | Err(libc::ENOTDIR)) {
        STATS
            .lock()
            .get_or_insert_with(Stats::default)
            .insert(rel, r);
    }
}
