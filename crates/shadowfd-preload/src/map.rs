//! `mmap`/`munmap` of served files, and the lazy mappings a forked child
//! inherits (docs/run.md).
//!
//! Each `mmap` maps just the range asked for: the part inside the file's
//! pages is a server mapping at that file offset (lazy through this
//! process's userfaultfd, or a sealed descriptor), placed over a
//! reservation made with the caller's placement flags (a hint, `MAP_FIXED`,
//! `MAP_FIXED_NOREPLACE`), so the kernel decides where it goes and what is
//! refused. Pages past the file's last page are a mapping of an empty
//! sealed memfd: touching them raises `SIGBUS`, as past the end of a file.
//!
//! The server serves each range this process attached by address, so no
//! two attached ranges may overlap: before anything takes the place of
//! pages of a served mapping (`munmap`, any `MAP_FIXED` `mmap`), those
//! pages are cut out of it (UNMAP of that part, protocol version 4) and
//! what is left on either side stays served.
//!
//! Lazy mappings are `MADV_DONTFORK`: a forked child does not inherit them
//! (it would see the memfd unregistered, and read zeros in its holes). The
//! `pthread_atfork` child handler maps each one again at the same address
//! on the child's own connection and userfaultfd before `fork` returns.

use crate::conn::client;
use crate::errno::io_err;
use crate::fdtable::tracked;
use crate::forklock::ForkMutex;
use crate::{Busy, fail, page, set_errno};
use shadowfd::remote::{RemoteFile, RemoteMapping};
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

type SizeT = libc::size_t;
type OffT = libc::off_t;
type MmapFn = unsafe extern "C" fn(*mut c_void, SizeT, c_int, c_int, c_int, OffT) -> *mut c_void;

/// A served mapping handed to the program (or what is left of one).
pub(crate) struct Map {
    /// The path inside the served tree (a forked child opens it again).
    path: String,
    m: RemoteMapping,
}

impl Map {
    fn start(&self) -> usize {
        self.m.as_ptr() as usize
    }
    fn end(&self) -> usize {
        self.start() + self.m.mapped_len()
    }
}

/// Held across fork and released in the child: a fork-safe lock.
pub(crate) static MAPS: ForkMutex<Vec<Map>> = ForkMutex::new(Vec::new());
/// Whether `MAPS` may be non-empty: the fast path for every other mapping.
pub(crate) static ANY_MAP: AtomicBool = AtomicBool::new(false);

fn real_mmap() -> MmapFn {
    real!("mmap", MmapFn)
}

fn real_munmap() -> unsafe extern "C" fn(*mut c_void, SizeT) -> c_int {
    real!("munmap", unsafe extern "C" fn(*mut c_void, SizeT) -> c_int)
}

type MremapFn = unsafe extern "C" fn(*mut c_void, SizeT, SizeT, c_int, *mut c_void) -> *mut c_void;

fn real_mremap() -> MremapFn {
    real!("mremap", MremapFn)
}

fn errno() -> c_int {
    // SAFETY: reads this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// An empty memfd, sealed against growing: every page of a mapping of it
/// raises `SIGBUS`. What pages past a file's end show, and what a forked
/// child sees where it could not map a lazy mapping again.
pub(crate) fn past_eof_fd() -> Option<c_int> {
    static FD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    FD.get_or_init(|| {
        // The system call itself, not libc's `memfd_create`: that symbol is
        // the shim's own interposer, which takes the descriptor tables'
        // locks, and this runs in the fork handler that holds them.
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_memfd_create,
                c"shadowfd-past-eof".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        } as c_int;
        if fd < 0 {
            return None;
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let seals =
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own descriptor.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return None;
        }
        Some(fd)
    })
    .as_ref()
    .map(|f| f.as_raw_fd())
}

/// Maps `len` bytes of the empty sealed memfd readable at `at`, replacing
/// what is there: touching them raises `SIGBUS`.
///
/// # Safety
/// The range is owned by the caller (the shim's reservation).
unsafe fn sigbus_pages(at: usize, len: usize) -> Result<(), c_int> {
    let fd = past_eof_fd().ok_or(libc::ENOMEM)?;
    // SAFETY: forwarded from the caller; a read-only private mapping.
    let p = unsafe {
        real_mmap()(
            at as *mut c_void,
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(errno());
    }
    Ok(())
}

/// Takes `[start, end)` out of every served mapping: the parts are no
/// longer served and hold an inaccessible reservation (the caller unmaps
/// them or maps over them); what is left on either side stays served.
/// Returns the mappings wholly inside, to be dropped (UNMAP, then a
/// reservation) once no lock is held.
///
/// The table's lock is held only to take the touched mappings out and to
/// put the pieces back: cutting one speaks to the server (UNMAP of the
/// part), and no request runs under the lock, which every `mmap`,
/// `munmap`, fork and prefault of the process takes.
fn carve(start: usize, end: usize) -> Vec<Map> {
    if !ANY_MAP.load(Ordering::Acquire) {
        return Vec::new();
    }
    let mut gone = Vec::new();
    let mut cut = Vec::new();
    {
        let mut maps = MAPS.lock();
        let mut i = 0;
        while i < maps.len() {
            let (s, e) = (maps[i].start(), maps[i].end());
            if e <= start || end <= s {
                i += 1;
                continue;
            }
            let m = maps.swap_remove(i);
            if start <= s && e <= end {
                gone.push(m);
            } else {
                cut.push(m);
            }
        }
    }
    let mut pieces = Vec::new();
    for m in cut {
        let s = m.start();
        let a = start.max(s) - s;
        let z = end.min(m.end()) - s;
        // SAFETY: the program gives these pages up (munmap, or a MAP_FIXED
        // in their place); the shim holds no reference into them.
        match unsafe { m.m.punch(a, z - a) } {
            Ok((l, r)) => {
                for piece in [l, r].into_iter().flatten() {
                    pieces.push(Map {
                        path: m.path.clone(),
                        m: piece,
                    });
                }
            }
            Err(e) => {
                // The whole mapping was released: its other pages now fault
                // with SIGSEGV, never zeros.
                io_err(&e);
            }
        }
    }
    if !pieces.is_empty() {
        MAPS.lock().extend(pieces);
    }
    gone
}

/// `mmap` of a served descriptor. Returns the address or an errno.
fn do_mmap(
    file: &RemoteFile,
    path: &str,
    addr: *mut c_void,
    len: SizeT,
    prot: c_int,
    flags: c_int,
    off: OffT,
) -> Result<usize, c_int> {
    let pg = page();
    if len == 0 || off < 0 || !(off as usize).is_multiple_of(pg) {
        return Err(libc::EINVAL);
    }
    let kind = flags & (libc::MAP_SHARED | libc::MAP_PRIVATE | libc::MAP_SHARED_VALIDATE);
    if kind != libc::MAP_SHARED && kind != libc::MAP_PRIVATE && kind != libc::MAP_SHARED_VALIDATE {
        return Err(libc::EINVAL);
    }
    if prot & !(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) != 0 {
        return Err(libc::EINVAL);
    }
    // The descriptor is read-only, as natively: a shared writable mapping
    // is refused, a private one gets copy-on-write pages of this process.
    if kind != libc::MAP_PRIVATE && prot & libc::PROT_WRITE != 0 {
        return Err(libc::EACCES);
    }
    let place = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE);
    if place != 0 && !(addr as usize).is_multiple_of(pg) {
        return Err(libc::EINVAL);
    }
    let maplen = len.checked_next_multiple_of(pg).ok_or(libc::ENOMEM)?;
    let off = off as u64;
    if off
        .checked_add(maplen as u64)
        .is_none_or(|e| e > i64::MAX as u64)
    {
        return Err(libc::EOVERFLOW);
    }
    // The part inside the file's pages is served; the rest raises SIGBUS.
    let size = file.size();
    let served = size.saturating_sub(off).min(len as u64);
    let served_pages = (served as usize).next_multiple_of(pg);
    if place == libc::MAP_FIXED {
        // What is at the address goes, as the kernel would replace it.
        let gone = carve(addr as usize, (addr as usize).saturating_add(maplen));
        drop(gone);
    }
    // SAFETY: an anonymous inaccessible reservation; with MAP_FIXED it
    // replaces what the caller asked to replace.
    let base = unsafe {
        real_mmap()(
            addr,
            maplen,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | place,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(errno());
    }
    let base = base as usize;
    let undo = |e: c_int| {
        // SAFETY: our own reservation (and what was mapped over it).
        unsafe { real_munmap()(base as *mut c_void, maplen) };
        e
    };
    let mapping = if served > 0 {
        let at = NonNull::new(base as *mut u8).expect("mmap does not return null");
        // SAFETY: `base..base+maplen` is our reservation; nothing refers
        // into it.
        let m = unsafe { file.map_options().offset(off).len(served).map_fixed(at) };
        Some(m.map_err(|e| undo(io_err(&e)))?)
    } else {
        None
    };
    if served_pages < maplen {
        // SAFETY: the rest of our reservation.
        if let Err(e) = unsafe { sigbus_pages(base + served_pages, maplen - served_pages) } {
            drop(mapping);
            return Err(undo(e));
        }
    }
    if served > 0 && prot != libc::PROT_READ {
        // The protection asked for (the served part is mapped readable).
        // SAFETY: the served part of our reservation, mapped just above;
        // nothing refers into it yet.
        if unsafe { libc::mprotect(base as *mut c_void, served_pages, prot) } != 0 {
            let e = errno();
            drop(mapping);
            return Err(undo(e));
        }
    }
    if let Some(m) = mapping {
        let mut maps = MAPS.lock();
        ANY_MAP.store(true, Ordering::Release);
        maps.push(Map {
            path: path.to_string(),
            m,
        });
    }
    Ok(base)
}

/// Before a `MAP_FIXED` `mmap` of anything else: the served pages it
/// replaces are cut out of their mappings first. Returns this thread marked
/// busy, to hold while the call is forwarded, or `None` when there was
/// nothing to do (no `MAP_FIXED`, nothing served, or inside the shim).
fn before_fixed(addr: *mut c_void, len: SizeT, flags: c_int) -> Option<Busy> {
    if flags & libc::MAP_FIXED == 0
        || flags & libc::MAP_FIXED_NOREPLACE != 0
        || !ANY_MAP.load(Ordering::Acquire)
    {
        return None;
    }
    let b = Busy::enter()?;
    let start = addr as usize;
    if start.is_multiple_of(page()) && len > 0 {
        drop(carve(start, start.saturating_add(len)));
    }
    Some(b)
}

/// libc's `munmap`.
///
/// # Safety
/// libc's `munmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: SizeT) -> c_int {
    let b = if ANY_MAP.load(Ordering::Acquire) {
        Busy::enter()
    } else {
        None
    };
    if b.is_none() {
        // SAFETY: forwarding.
        return unsafe { real_munmap()(addr, len) };
    }
    let start = addr as usize;
    if !start.is_multiple_of(page()) || len == 0 {
        return fail(libc::EINVAL);
    }
    // Served pages stop being served (UNMAP) before they are unmapped: the
    // address may be reused at once.
    drop(carve(start, start.saturating_add(len)));
    // SAFETY: forwarding the caller's range (what the shim had there is a
    // reservation now).
    let r = unsafe { real_munmap()(addr, len) };
    let saved = errno();
    drop(b);
    set_errno(saved);
    r
}

/// libc's `mremap`, followed: a served mapping the program moves or
/// resizes goes on being served at its new place (the server follows the
/// move through the userfaultfd's `REMAP` event), and the shim's record of
/// it follows too, so that a later `munmap` or `MAP_FIXED` there cuts it
/// as any other served mapping, and nothing at the old place is ever taken
/// for it. A `MREMAP_FIXED` target's served pages are cut out first, as
/// for a `MAP_FIXED` `mmap`.
///
/// libc's `mremap` is variadic: the new address comes only with
/// `MREMAP_FIXED`, and is read only then (on x86-64 and aarch64 a variadic
/// pointer travels where a fifth fixed argument does, as `open`'s mode).
///
/// # Safety
/// libc's `mremap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: SizeT,
    new_len: SizeT,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let b = if ANY_MAP.load(Ordering::Acquire) {
        Busy::enter()
    } else {
        None
    };
    if b.is_none() {
        // SAFETY: forwarding.
        return unsafe { real_mremap()(old, old_len, new_len, flags, new_addr) };
    }
    let start = old as usize;
    let end = start.saturating_add(old_len.max(1));
    if fixed && (new_addr as usize).is_multiple_of(page()) && new_len > 0 {
        let to = new_addr as usize;
        drop(carve(to, to.saturating_add(new_len)));
    }
    // The table stays locked from before the call until the records have
    // followed: the pages the move frees may be handed to another thread's
    // `mmap` at once, and its record (made under this lock) must not be
    // taken for one of the moved ones.
    let mut maps = MAPS.lock();
    let touched =
        start.is_multiple_of(page()) && maps.iter().any(|m| m.start() < end && start < m.end());
    // SAFETY: forwarding the caller's call.
    let r = unsafe { real_mremap()(old, old_len, new_len, flags, new_addr) };
    if r == libc::MAP_FAILED || !touched || flags & libc::MREMAP_DONTUNMAP != 0 {
        let saved = errno();
        drop(maps);
        drop(b);
        set_errno(saved);
        return r;
    }
    follow(&mut maps, start, old_len, r as usize, new_len);
    drop(maps);
    drop(b);
    r
}

/// The pages `start..start+old_len` of served mappings were moved (or
/// resized in place) by the kernel to `to`, `new_len` bytes there: their
/// records in `maps` follow. An old length of 0 (a second mapping of a
/// shared one) moves nothing: the new mapping is not served by the shim.
/// Speaks to nobody (the server follows the move by itself).
fn follow(maps: &mut Vec<Map>, start: usize, old_len: usize, to: usize, new_len: usize) {
    if old_len == 0 {
        return;
    }
    let end = start.saturating_add(old_len);
    let mut taken = Vec::new();
    let mut i = 0;
    while i < maps.len() {
        if maps[i].start() < end && start < maps[i].end() {
            taken.push(maps.swap_remove(i));
        } else {
            i += 1;
        }
    }
    for m in taken {
        let s = m.start();
        // The kernel moves one mapping per call: the range lies in it.
        let at = start.saturating_sub(s);
        let len = end.min(m.end()) - start.max(s);
        // SAFETY: a successful mremap moved exactly these pages to `to`
        // (`new_len` bytes), which the program owns through this record.
        match unsafe { m.m.moved(at, len, to, new_len) } {
            Ok((l, r, moved)) => {
                for piece in [l, r].into_iter().flatten().chain(std::iter::once(moved)) {
                    maps.push(Map {
                        path: m.path.clone(),
                        m: piece,
                    });
                }
            }
            Err(e) => {
                io_err(&e);
            }
        }
    }
}

/// In a forked child (one thread, before `fork` returns): maps every lazy
/// mapping of the parent again at its address, on the child's own
/// connection and userfaultfd. A sealed mapping was inherited as it is and
/// is left alone (no longer tracked: nothing serves it). Where a lazy one
/// cannot be mapped again (the server is gone), its pages raise `SIGBUS`:
/// never zeros. The parent's mappings are forgotten, never dropped
/// (dropping would speak on the parent's connection).
pub(crate) fn remap_in_child(parent: Vec<Map>) {
    let mut files: Vec<(String, RemoteFile)> = Vec::new();
    let mut mine = Vec::new();
    let mut said = false;
    for Map { path, m } in parent {
        let lazy = m.is_lazy();
        let (at, maplen, off, len) = (m.as_ptr() as usize, m.mapped_len(), m.offset(), m.len());
        let shadow = m.file().shadow_id();
        std::mem::forget(m);
        if !lazy || maplen == 0 {
            continue;
        }
        // Not inherited (MADV_DONTFORK): the range is empty here.
        // SAFETY: an inaccessible reservation of exactly that range, which
        // fails rather than replace anything.
        let p = unsafe {
            real_mmap()(
                at as *mut c_void,
                maplen,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        if p as usize != at {
            // A kernel that ignores MAP_FIXED_NOREPLACE put it elsewhere.
            // SAFETY: the reservation just made, unused.
            unsafe { real_munmap()(p, maplen) };
            continue;
        }
        let again = (|| -> Result<RemoteMapping, String> {
            let file = match files.iter().find(|(p, _)| *p == path) {
                Some((_, f)) => f.clone(),
                None => {
                    let c = client().map_err(|e| format!("no connection (errno {e})"))?;
                    let f = c.open(&path).map_err(|e| e.to_string())?;
                    files.push((path.clone(), f.clone()));
                    f
                }
            };
            if file.shadow_id() != shadow {
                // The source changed since the parent mapped it: the server
                // has a new shadow for the path. The child must not see
                // other bytes than the parent at the same addresses.
                return Err(format!(
                    "the file changed on the server since the parent mapped it (shadow {} \
                     then, {} now)",
                    shadow,
                    file.shadow_id()
                ));
            }
            let a = NonNull::new(at as *mut u8).expect("not null");
            // SAFETY: `at..at+maplen` is the reservation just made.
            unsafe { file.map_options().offset(off).len(len as u64).map_fixed(a) }
                .map_err(|e| e.to_string())
        })();
        match again {
            Ok(n) => mine.push(Map { path, m: n }),
            Err(e) => {
                if !said {
                    said = true;
                    // Not eprintln: another parent thread may have held
                    // Rust's stderr lock at the fork.
                    crate::forklock::say(&format!(
                        "shadowfd-preload: a forked child could not map {path:?} again ({e}); \
                         its inherited pages raise SIGBUS"
                    ));
                }
                // SAFETY: our reservation.
                let _ = unsafe { sigbus_pages(at, maplen) };
            }
        }
    }
    if !mine.is_empty() {
        let mut maps = MAPS.lock();
        ANY_MAP.store(true, Ordering::Release);
        maps.extend(mine);
    }
}

/// The parts of `addr..addr+len` that lie in served mappings, page-aligned
/// outward and clipped to each mapping (for [`crate::prefault`]).
pub(crate) fn served_spans(addr: usize, len: usize) -> Vec<(usize, usize)> {
    if !ANY_MAP.load(Ordering::Acquire) || len == 0 {
        return Vec::new();
    }
    let end = addr.saturating_add(len);
    let maps = MAPS.lock();
    maps.iter()
        .filter(|m| m.start() < end && addr < m.end())
        .map(|m| (addr.max(m.start()), end.min(m.end())))
        .collect()
}

twins! {
    /// `mmap` of a served descriptor maps the server's mapping of the range
    /// asked for; any other goes to the next definition, after served pages
    /// a `MAP_FIXED` replaces stop being served.
    [mmap, mmap64] fn(
        addr: *mut c_void,
        len: SizeT,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: OffT,
    ) -> *mut c_void,
    real: MmapFn => {
        let t = if flags & libc::MAP_ANONYMOUS == 0 {
            tracked(fd)
        } else {
            None
        };
        if let Some((_b, e)) = t {
            let r = e
                .file()
                .and_then(|f| do_mmap(&f, &e.path, addr, len, prot, flags, off));
            return match r {
                Ok(a) => a as *mut c_void,
                Err(err) => {
                    set_errno(err);
                    libc::MAP_FAILED
                }
            };
        }
        // A MAP_FIXED of anything else over served pages: they stop being
        // served first.
        let _b = before_fixed(addr, len, flags);
        // SAFETY: forwarding.
        unsafe { real(addr, len, prot, flags, fd, off) }
    }
}
