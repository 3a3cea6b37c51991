//! Reading one run of chunks from the source into the memfd, through the
//! shadow's unregistered writable alias: one copy, from the source straight
//! into the page cache. Nothing here touches registered memory.

use crate::error::Cause;
use crate::source::{ReadFail, Source, read_full};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A byte range `[start, end)` of the shadow that could not be filled.
pub(crate) type BadRange = (u64, u64, Cause);

/// A read that failed, or `None` for a panic.
type Failed = Option<ReadFail>;

fn guarded_read(src: &dyn Source, buf: &mut [u8], offset: u64) -> Result<(), Failed> {
    match catch_unwind(AssertUnwindSafe(|| read_full(src, buf, offset))) {
        Ok(r) => r.map_err(Some),
        Err(_) => Err(None),
    }
}

fn done_of(fail: &Failed) -> usize {
    match fail {
        Some(ReadFail::Error { done, .. } | ReadFail::Eof { done }) => *done,
        None => 0,
    }
}

fn describe(fail: &Failed, at: u64, size: u64) -> Cause {
    match fail {
        Some(ReadFail::Error { error, .. }) => Cause::SourceRead {
            offset: at,
            errno: error.raw_os_error(),
            message: error.to_string(),
        },
        Some(ReadFail::Eof { .. }) => Cause::SourceShort { offset: at, size },
        None => Cause::SourcePanicked,
    }
}

/// Reads `off..end` of the source into `data` (page-rounded; the tail past
/// `end` is zeroed, as in any mapping of a file's last page). After a failure,
/// reads page by page so that exactly the failing pages are reported in
/// `bad`. Returns the page-aligned runs that were read successfully.
pub(crate) fn read_chunk(
    src: &dyn Source,
    data: &mut [u8],
    off: u64,
    end: u64,
    page: u64,
    size: u64,
    bad: &mut Vec<BadRange>,
) -> Vec<(u64, u64)> {
    let span_end = off + data.len() as u64;
    let n = (end - off) as usize;
    data[n..].fill(0);
    let done = match guarded_read(src, &mut data[..n], off) {
        Ok(()) => return vec![(off, span_end)],
        Err(fail) => done_of(&fail) as u64,
    };
    let mut good: Vec<(u64, u64)> = Vec::new();
    let mut p = off + done / page * page;
    if p > off {
        good.push((off, p));
    }
    while p < end {
        let plen = page.min(end - p);
        let i = (p - off) as usize;
        match guarded_read(src, &mut data[i..i + plen as usize], p) {
            Ok(()) => match good.last_mut() {
                Some(last) if last.1 == p => last.1 = p + page,
                _ => good.push((p, p + page)),
            },
            Err(fail) => {
                let at = p + done_of(&fail) as u64;
                bad.push((p, p + page, describe(&fail, at, size)));
            }
        }
        p += page;
    }
    if let Some(last) = good.last_mut() {
        last.1 = last.1.min(span_end);
    }
    good
}

/// Expands bad ranges to their pages (page offsets within the shadow), in
/// ascending order (a recheck after a copy from the source's mapping may add
/// a page below those found first), each once.
pub(crate) fn bad_pages(bad: &[BadRange], page: u64) -> Vec<(u64, Cause)> {
    let mut out = Vec::new();
    for (a, b, reason) in bad {
        let mut p = a / page * page;
        while p < *b {
            out.push((p, reason.clone()));
            p += page;
        }
    }
    out.sort_by_key(|(p, _)| *p);
    out.dedup_by_key(|(p, _)| *p);
    out
}
