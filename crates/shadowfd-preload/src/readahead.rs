//! Read-ahead of the read path: a sequential reader of a served file gets
//! a growing window per request (128 KiB doubling to 1 MiB), kept per
//! thread ([`Ahead`]), instead of one request per small read.

use shadowfd::remote::RemoteFile;

/// Read-ahead of the read path: bytes one thread fetched past what a
/// sequential reader asked for, kept for its next reads of the same file.
///
/// A served file's bytes never change under a handle (a changed source is
/// refused by the server, never served), so bytes fetched once stay right.
/// Each thread keeps a few of these, with no lock: a forked child (one
/// thread, a copy of the forking thread's) finds its parent's and forgets
/// them without using them (the file belongs to the parent's connection).
struct Ahead {
    pid: u32,
    /// Held so that its handle is not reused on the connection while these
    /// bytes are kept; `None` only while being forgotten.
    file: Option<RemoteFile>,
    /// `data` holds the file's bytes from `start`.
    start: u64,
    data: Vec<u8>,
    /// Where the last read through this slot ended.
    next: u64,
    /// The next fetch size for a sequential reader.
    window: usize,
    /// For least-recently-used replacement.
    used: u64,
}

/// Slots per thread; the first and the largest sequential fetch.
const AHEAD_SLOTS: usize = 4;

const AHEAD_FIRST: usize = 128 << 10;

const AHEAD_MAX: usize = shadowfd::remote::wire::MAX_FILL as usize;

/// Reads `buf.len()` bytes at `off` (short only at the end of the file):
/// from this thread's read-ahead when it holds them, else through FILL. A
/// read that starts where the last one of the same file ended is a
/// sequential reader: it fetches a window ahead (128 KiB, doubling to
/// 1 MiB), so that small reads (`dd bs=4k`, 8 KiB stdio buffers) cost one
/// request per window instead of one each. Other reads, and reads of 1 MiB
/// or more, fetch exactly what was asked.
pub(crate) fn read_ahead(file: &RemoteFile, buf: &mut [u8], off: u64) -> shadowfd::Result<usize> {
    // A file read whole (handle 0) reads from memory.
    if buf.len() >= AHEAD_MAX || file.inline_bytes().is_some() {
        return file.read_at(buf, off);
    }
    let r = AHEAD.try_with(|a| {
        let Ok(mut a) = a.try_borrow_mut() else {
            return None;
        };
        Some(read_ahead_in(&mut a, file, buf, off))
    });
    match r {
        Ok(Some(r)) => r,
        // Thread teardown or re-entry: no read-ahead.
        _ => file.read_at(buf, off),
    }
}

/// [`read_ahead`] with this thread's slots `a` (a tick and the slots).
fn read_ahead_in(
    a: &mut (u64, Vec<Ahead>),
    file: &RemoteFile,
    buf: &mut [u8],
    off: u64,
) -> shadowfd::Result<usize> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    a.0 += 1;
    let tick = a.0;
    let slots = &mut a.1;
    // A forked child's copies of its parent's slots go (forgotten by Drop).
    slots.retain(|s| s.pid == pid);
    let size = file.size();
    let handle = file.handle();
    let i = slots
        .iter()
        .position(|s| s.file.as_ref().is_some_and(|f| f.handle() == handle));
    if let Some(i) = i {
        let s = &mut slots[i];
        s.used = tick;
        let end = s.start + s.data.len() as u64;
        if off >= s.start && off < end {
            // Held: copy what is there (up to the end of the window).
            let from = (off - s.start) as usize;
            let n = buf.len().min(s.data.len() - from);
            buf[..n].copy_from_slice(&s.data[from..from + n]);
            s.next = off + n as u64;
            if n < buf.len() && end < size {
                // The rest comes with the next window (a sequential read).
                return match read_ahead_in(a, file, &mut buf[n..], end) {
                    Ok(m) => Ok(n + m),
                    Err(_) if n > 0 => Ok(n),
                    Err(e) => Err(e),
                };
            }
            return Ok(n);
        }
    }
    let sequential = i.is_some_and(|i| slots[i].next == off);
    if !sequential {
        if let Some(i) = i {
            // Random access: keep the slot (a later sequential run reuses
            // it) but start its window again.
            slots[i].window = AHEAD_FIRST;
            slots[i].next = off + buf.len() as u64;
        } else {
            // Remember where this read ends: a next read there is
            // sequential. No bytes are kept yet.
            if slots.len() >= AHEAD_SLOTS {
                let lru = (0..slots.len()).min_by_key(|&k| slots[k].used).unwrap_or(0);
                slots.swap_remove(lru);
            }
            slots.push(Ahead {
                pid,
                file: Some(file.clone()),
                start: 0,
                data: Vec::new(),
                next: off + buf.len() as u64,
                window: AHEAD_FIRST,
                used: tick,
            });
        }
        let got = file.read_at(buf, off)?;
        return Ok(got);
    }
    let i = i.expect("sequential implies a slot");
    let s = &mut slots[i];
    let want = s.window.max(buf.len()).min(AHEAD_MAX);
    let want = (want as u64).min(size.saturating_sub(off)) as usize;
    s.data.resize(want, 0);
    let got = match file.read_at(&mut s.data, off) {
        Ok(g) => g,
        Err(e) => {
            s.data.clear();
            return Err(e);
        }
    };
    s.data.truncate(got);
    s.start = off;
    s.window = (s.window * 2).min(AHEAD_MAX);
    let n = buf.len().min(got);
    buf[..n].copy_from_slice(&s.data[..n]);
    s.next = off + n as u64;
    Ok(n)
}

impl Drop for Ahead {
    fn drop(&mut self) {
        // SAFETY: getpid has no preconditions.
        if self.pid != unsafe { libc::getpid() } as u32 {
            // The parent's file: dropping it would speak on the parent's
            // connection.
            std::mem::forget(self.file.take());
        }
    }
}

thread_local! {
    static AHEAD: std::cell::RefCell<(u64, Vec<Ahead>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
}
