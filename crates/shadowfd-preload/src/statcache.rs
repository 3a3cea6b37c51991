//! STAT answers by path, kept when the served tree cannot change.

use crate::conn::client;
use crate::env::env;
use crate::errno::errno_of;
use crate::forklock::ForkMutex as Mutex;
use shadowfd::remote::PathInfo;
use std::ffi::c_int;

/// STAT answers by path, kept when the served tree cannot change
/// ([`crate::env::Env::immutable`]): a found path, and a path that is missing
/// or not under a directory. At most [`MAX_STATS`] of them; then all are
/// dropped at once.
pub(crate) type Stats = std::collections::HashMap<String, Result<PathInfo, c_int>>;

pub(crate) static STATS: Mutex<Option<Stats>> = Mutex::new(None);

pub(crate) const MAX_STATS: usize = 1 << 16;

/// STAT of a served path (kept, for an image: see [`STATS`]). The request
/// runs with no lock held. A path the process listed last asks for it and
/// the listed files after it at once ([`crate::small::prefetch`]).
pub(crate) fn stat_info(rel: &str) -> Result<PathInfo, c_int> {
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
    if keep {
        keep_stat(rel, r.clone());
    }
    r
}

/// The kept STAT answer for `rel`, if any.
pub(crate) fn kept_stat(rel: &str) -> Option<Result<PathInfo, c_int>> {
    STATS.lock().as_ref().and_then(|m| m.get(rel)).cloned()
}

/// Keeps a STAT answer (a found path, a missing one, one under a file;
/// not other errors).
pub(crate) fn keep_stat(rel: &str, r: Result<PathInfo, c_int>) {
    if matches!(r, Ok(_) | Err(libc::ENOENT) | Err(libc::ENOTDIR)) {
        let mut g = STATS.lock();
        let m = g.get_or_insert_with(Stats::new);
        if m.len() >= MAX_STATS {
            *m = Stats::new();
        }
        m.insert(rel.to_string(), r);
    }
}
