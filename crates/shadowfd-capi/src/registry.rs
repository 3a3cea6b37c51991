//! The mappings and registrations the C caller holds, keyed by address, so
//! that `shadowfd_unmap` drops the right one.

use crate::errors::Failure;
use sfd::remote::RemoteMapping;
use sfd::{Mapping, Registration};
use std::collections::BTreeMap;
use std::sync::Mutex;

enum Entry {
    /// From `shadowfd_map`: dropping it unregisters and unmaps.
    Map(Mapping),
    /// From `shadowfd_register`: the caller's mapping.
    Reg(Registration),
    /// From `shadowfd_map` of a client shadow: dropping it asks the server
    /// to stop serving the range (UNMAP), then unmaps.
    Remote(RemoteMapping),
}

struct Tracked {
    /// Page-rounded length.
    len: usize,
    entry: Entry,
}

static TRACKED: Mutex<BTreeMap<usize, Tracked>> = Mutex::new(BTreeMap::new());

fn table() -> std::sync::MutexGuard<'static, BTreeMap<usize, Tracked>> {
    // No code panics while holding the lock (entries are dropped after it
    // is released); take the table even if it were poisoned.
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn round_up(len: u64) -> Result<usize, Failure> {
    let page = sfd::page_size() as u64;
    len.checked_next_multiple_of(page)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| Failure::einval(format!("length {len} is too large")))
}

/// Fails with EEXIST if `addr..addr+len` overlaps a tracked range.
pub(crate) fn check_free(func: &str, addr: usize, len: usize) -> Result<(), Failure> {
    let t = table();
    let end = addr.saturating_add(len);
    // The last range starting before `end` is the only one that can overlap.
    if let Some((&a, tr)) = t.range(..end).next_back() {
        if a + tr.len > addr {
            return Err(Failure::new(
                libc::EEXIST,
                format!(
                    "{func}: {addr:#x}+{len} overlaps the range {a:#x}+{} that shadowfd already \
                     maps or registers; shadowfd_unmap it first",
                    tr.len
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn insert_mapping(m: Mapping) {
    let len = m.len().next_multiple_of(sfd::page_size());
    let addr = m.as_ptr() as usize;
    let stale = {
        let mut t = table();
        // Entries over addresses the kernel just handed out again can only
        // be ranges the caller moved (`mremap`) or unmapped behind the
        // library's back.
        let over: Vec<usize> = t
            .range(..addr + len)
            .filter(|(a, tr)| *a + tr.len > addr)
            .map(|(a, _)| *a)
            .collect();
        let stale: Vec<Tracked> = over.iter().filter_map(|a| t.remove(a)).collect();
        t.insert(
            addr,
            Tracked {
                len,
                entry: Entry::Map(m),
            },
        );
        stale
    };
    // Outside the lock. A local mapping or registration gives up only what
    // the kernel's events say is still its own (nothing here), so dropping
    // it leaves the new mapping alone. A remote one cannot tell: leaked.
    for tr in stale {
        match tr.entry {
            Entry::Remote(r) => std::mem::forget(r),
            other => drop(other),
        }
    }
}

pub(crate) fn insert_remote(m: RemoteMapping) {
    let len = m.len().next_multiple_of(sfd::page_size());
    let stale = table().insert(
        m.as_ptr() as usize,
        Tracked {
            len,
            entry: Entry::Remote(m),
        },
    );
    // As in insert_mapping: only a range unmapped behind the library's back.
    std::mem::forget(stale);
}

pub(crate) fn insert_registration(addr: usize, len: usize, r: Registration) {
    let stale = table().insert(
        addr,
        Tracked {
            len,
            entry: Entry::Reg(r),
        },
    );
    // check_free ran before: nothing was there.
    std::mem::forget(stale);
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undo {
    /// `shadowfd_unmap`: unregister, and unmap what `shadowfd_register` got.
    Unmap,
    /// `shadowfd_unregister`: registrations only; the caller unmaps.
    Unregister,
}

pub(crate) fn remove(func: &str, addr: usize, len: usize, undo: Undo) -> Result<(), Failure> {
    let rounded = round_up(len as u64)?;
    let tracked = {
        let mut t = table();
        let Some(tr) = t.get(&addr) else {
            let what = match undo {
                Undo::Unmap => "made by shadowfd_map or registered with shadowfd_register",
                Undo::Unregister => "registered with shadowfd_register",
            };
            return Err(Failure::einval(format!(
                "{func}: no range {what} starts at {addr:#x}"
            )));
        };
        if rounded != tr.len {
            return Err(Failure::einval(format!(
                "{func}: the range at {addr:#x} is {} bytes (page-rounded), not {len}; pass the \
                 length it was mapped or registered with",
                tr.len
            )));
        }
        if undo == Undo::Unregister && matches!(tr.entry, Entry::Map(_) | Entry::Remote(_)) {
            return Err(Failure::einval(format!(
                "{func}: the range at {addr:#x} was made by shadowfd_map; release it with \
                 shadowfd_unmap"
            )));
        }
        t.remove(&addr)
            .expect("present: looked up under the same lock")
    };
    // Dropped outside the lock: unregistering may wait for faults in flight.
    match tracked.entry {
        Entry::Map(m) => drop(m),
        Entry::Remote(m) => drop(m),
        Entry::Reg(r) => {
            drop(r);
            if undo == Undo::Unmap {
                // SAFETY: the caller's own mapping, registered by it with
                // this length and given up by this call; no longer
                // registered.
                if unsafe { libc::munmap(addr as *mut libc::c_void, tracked.len) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(Failure::new(
                        e.raw_os_error().unwrap_or(libc::EINVAL),
                        format!("{func}: munmap({addr:#x}, {}): {e}", tracked.len),
                    ));
                }
            }
        }
    }
    Ok(())
}
