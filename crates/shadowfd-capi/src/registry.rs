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
    insert_over(m.as_ptr() as usize, len, Entry::Map(m));
}

pub(crate) fn insert_remote(m: RemoteMapping) {
    let len = m.len().next_multiple_of(sfd::page_size());
    insert_over(m.as_ptr() as usize, len, Entry::Remote(m));
}

/// Tracks `entry` at `addr..addr+len`, addresses the kernel just handed
/// out: entries over them can only be ranges their caller moved (`mremap`)
/// or unmapped behind the library's back. They are dropped, outside the
/// lock: a mapping or registration gives up only what the kernel still
/// shows as its own (nothing here), so the new mapping is left alone.
fn insert_over(addr: usize, len: usize, entry: Entry) {
    let stale: Vec<Tracked> = {
        let mut t = table();
        let over: Vec<usize> = t
            .range(..addr + len)
            .filter(|(a, tr)| *a + tr.len > addr)
            .map(|(a, _)| *a)
            .collect();
        let stale = over.iter().filter_map(|a| t.remove(a)).collect();
        t.insert(addr, Tracked { len, entry });
        stale
    };
    drop(stale);
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
            // What is still the registration's: a part its caller moved or
            // unmapped may hold something else now.
            let parts = r
                .release()
                .unwrap_or_else(|| vec![(addr as u64, tracked.len as u64)]);
            if undo == Undo::Unmap {
                for (a, l) in parts {
                    // SAFETY: the caller's own mapping, registered by it and
                    // given up by this call; this part is still it (the
                    // kernel's events say so) and no longer registered.
                    if unsafe { libc::munmap(a as *mut libc::c_void, l as usize) } != 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(Failure::new(
                            e.raw_os_error().unwrap_or(libc::EINVAL),
                            format!("{func}: munmap({a:#x}, {l}): {e}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}
