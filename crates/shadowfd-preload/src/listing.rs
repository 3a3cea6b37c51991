//! Directory listing: `opendir`/`fdopendir` of a served directory return a
//! pointer to a [`Stream`] of this shim, kept in a table so that
//! `readdir`, `closedir`, ... tell it from glibc's own `DIR`: host
//! directories go to the real functions untouched. The listing is read
//! whole from the server (LIST, page after page) when the stream is
//! opened. `scandir` and `scandirat` go through it.

use crate::conn::client;
use crate::dirfd::{dirfd_entry, open_dir};
use crate::errno::errno_of;
use crate::forklock::ForkMutex as Mutex;
use crate::route::{Route, route, with_route};
use crate::statcache::stat_info;
use crate::{Busy, fail, set_errno};
use std::collections::BTreeSet;
use std::ffi::{CString, c_char, c_int, c_long, c_void};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

/// One entry of a stream: name, inode, `d_type`.
struct Ent {
    name: Vec<u8>,
    ino: u64,
    dtype: u8,
}

/// What `opendir` of a served directory returns (as a `DIR *`).
struct Stream {
    fd: c_int,
    entries: Vec<Ent>,
    pos: usize,
    /// Where `readdir` writes the entry it returns.
    ent: Box<libc::dirent64>,
}

/// Addresses of live [`Stream`]s.
pub(crate) static STREAMS: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

static ANY_STREAM: AtomicBool = AtomicBool::new(false);

fn is_stream(p: *mut libc::DIR) -> bool {
    ANY_STREAM.load(Ordering::Acquire) && STREAMS.lock().contains(&(p as usize))
}

/// A stream over the served directory of `fd` (which it then owns).
fn new_stream(fd: c_int, rel: &str) -> Result<*mut libc::DIR, c_int> {
    let c = client()?;
    let list = c.list(rel).map_err(|e| errno_of(&e))?;
    crate::small::listed(
        rel,
        list.iter()
            .filter(|e| e.kind == shadowfd::remote::wire::KIND_FILE)
            .map(|e| e.name.clone()),
    );
    let here = stat_info(rel)?;
    let up = if rel.is_empty() {
        here.inode
    } else {
        let parent = rel.rsplit_once('/').map_or("", |(p, _)| p);
        stat_info(parent).map(|i| i.inode).unwrap_or(here.inode)
    };
    let mut entries = vec![
        Ent {
            name: b".".to_vec(),
            ino: here.inode,
            dtype: libc::DT_DIR,
        },
        Ent {
            name: b"..".to_vec(),
            ino: up,
            dtype: libc::DT_DIR,
        },
    ];
    entries.extend(list.into_iter().map(|e| Ent {
        name: e.name,
        ino: e.inode.max(1),
        dtype: if e.kind == shadowfd::remote::wire::KIND_DIR {
            libc::DT_DIR
        } else {
            libc::DT_REG
        },
    }));
    let s = Box::new(Stream {
        fd,
        entries,
        pos: 0,
        // SAFETY: an all-zero dirent64 is valid.
        ent: Box::new(unsafe { std::mem::zeroed() }),
    });
    let p = Box::into_raw(s);
    let mut t = STREAMS.lock();
    ANY_STREAM.store(true, Ordering::Release);
    t.insert(p as usize);
    Ok(p.cast())
}

/// Runs `f` on the stream behind `p` (checked to be ours).
fn with_stream<R>(p: *mut libc::DIR, f: impl FnOnce(&mut Stream) -> R) -> R {
    // SAFETY: `p` is in STREAMS: a live Box<Stream> this shim made. glibc's
    // contract: one thread uses a DIR at a time.
    let s = unsafe { &mut *p.cast::<Stream>() };
    f(s)
}

/// Fills `out` with the next entry; false at the end.
fn next_into(s: &mut Stream, out: &mut libc::dirent64) -> bool {
    let Some(e) = s.entries.get(s.pos) else {
        return false;
    };
    s.pos += 1;
    out.d_ino = e.ino;
    out.d_off = s.pos as i64;
    out.d_type = e.dtype;
    let n = e.name.len().min(out.d_name.len() - 1);
    for (d, &b) in out.d_name.iter_mut().zip(&e.name[..n]) {
        *d = b as c_char;
    }
    out.d_name[n] = 0;
    out.d_reclen =
        (std::mem::offset_of!(libc::dirent64, d_name) + n + 1).next_multiple_of(8) as u16;
    true
}

type OpendirFn = unsafe extern "C" fn(*const c_char) -> *mut libc::DIR;

/// # Safety
/// libc's `opendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut libc::DIR {
    let mut host = None;
    if let Some(_b) = Busy::enter() {
        // SAFETY: the caller's promise.
        match unsafe { route(libc::AT_FDCWD, path) } {
            Route::Served(rel) => {
                let r = open_dir(&rel, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .and_then(|fd| {
                        new_stream(fd, &rel).inspect_err(|_| {
                            // Forgotten here too: this thread is inside
                            // the shim, where `close` keeps no books.
                            crate::fdtable::close_own(fd);
                        })
                    });
                return r.unwrap_or_else(|e| {
                    set_errno(e);
                    std::ptr::null_mut()
                });
            }
            Route::Host(p) => host = p,
        }
    }
    // SAFETY: forwarding.
    let d = unsafe { real!("opendir", OpendirFn)(Route::host_path(&host, path)) };
    if !d.is_null() {
        // glibc opened it with an internal call: its descriptor is new.
        // SAFETY: a live host stream.
        crate::fdtable::fresh(unsafe {
            real!("dirfd", unsafe extern "C" fn(*mut libc::DIR) -> c_int)(d)
        });
    }
    d
}

/// # Safety
/// libc's `fdopendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut libc::DIR {
    if let Some(_b) = Busy::enter() {
        if let Some(d) = dirfd_entry(fd) {
            return new_stream(fd, &d.path).unwrap_or_else(|e| {
                set_errno(e);
                std::ptr::null_mut()
            });
        }
        if crate::fdtable::entry(fd).is_some() {
            set_errno(libc::ENOTDIR);
            return std::ptr::null_mut();
        }
    }
    // SAFETY: forwarding.
    unsafe { real!("fdopendir", unsafe extern "C" fn(c_int) -> *mut libc::DIR)(fd) }
}

type ReaddirFn = unsafe extern "C" fn(*mut libc::DIR) -> *mut libc::dirent64;

/// # Safety
/// libc's `readdir` contract.
unsafe fn readdir_common(d: *mut libc::DIR, real: ReaddirFn) -> *mut libc::dirent64 {
    if is_stream(d) {
        return with_stream(d, |s| {
            let mut ent = std::mem::replace(
                &mut s.ent,
                // SAFETY: an all-zero dirent64 is valid.
                Box::new(unsafe { std::mem::zeroed() }),
            );
            let more = next_into(s, &mut ent);
            s.ent = ent;
            if more {
                &mut *s.ent as *mut libc::dirent64
            } else {
                std::ptr::null_mut()
            }
        });
    }
    // SAFETY: forwarding.
    unsafe { real(d) }
}

twins! {
    [readdir, readdir64] fn(d: *mut libc::DIR) -> *mut libc::dirent64,
    real: ReaddirFn => {
        // SAFETY: forwarding.
        unsafe { readdir_common(d, real) }
    }
}

type ReaddirRFn =
    unsafe extern "C" fn(*mut libc::DIR, *mut libc::dirent64, *mut *mut libc::dirent64) -> c_int;

/// # Safety
/// libc's `readdir_r` contract.
unsafe fn readdir_r_common(
    d: *mut libc::DIR,
    ent: *mut libc::dirent64,
    res: *mut *mut libc::dirent64,
    real: ReaddirRFn,
) -> c_int {
    if is_stream(d) {
        if ent.is_null() || res.is_null() {
            return libc::EFAULT;
        }
        // SAFETY: the caller's buffers (readdir_r's contract).
        let (e, r) = unsafe { (&mut *ent, &mut *res) };
        *r = if with_stream(d, |s| next_into(s, e)) {
            ent
        } else {
            std::ptr::null_mut()
        };
        return 0;
    }
    // SAFETY: forwarding.
    unsafe { real(d, ent, res) }
}

twins! {
    [readdir_r, readdir64_r] fn(d: *mut libc::DIR, ent: *mut libc::dirent64, res: *mut *mut libc::dirent64) -> c_int,
    real: ReaddirRFn => {
        // SAFETY: forwarding.
        unsafe { readdir_r_common(d, ent, res, real) }
    }
}

/// # Safety
/// libc's `closedir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closedir(d: *mut libc::DIR) -> c_int {
    if is_stream(d) {
        STREAMS.lock().remove(&(d as usize));
        // SAFETY: `d` was a live Box<Stream> of ours, now out of the table.
        let s = unsafe { Box::from_raw(d.cast::<Stream>()) };
        // The stream's own placeholder descriptor.
        return crate::fdtable::close_own(s.fd);
    }
    // SAFETY: forwarding.
    unsafe { real!("closedir", unsafe extern "C" fn(*mut libc::DIR) -> c_int)(d) }
}

/// # Safety
/// libc's `dirfd`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dirfd(d: *mut libc::DIR) -> c_int {
    if is_stream(d) {
        return with_stream(d, |s| s.fd);
    }
    // SAFETY: forwarding.
    unsafe { real!("dirfd", unsafe extern "C" fn(*mut libc::DIR) -> c_int)(d) }
}

/// # Safety
/// libc's `rewinddir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rewinddir(d: *mut libc::DIR) {
    if is_stream(d) {
        return with_stream(d, |s| s.pos = 0);
    }
    // SAFETY: forwarding.
    unsafe { real!("rewinddir", unsafe extern "C" fn(*mut libc::DIR))(d) }
}

/// # Safety
/// libc's `telldir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn telldir(d: *mut libc::DIR) -> c_long {
    if is_stream(d) {
        return with_stream(d, |s| s.pos as c_long);
    }
    // SAFETY: forwarding.
    unsafe { real!("telldir", unsafe extern "C" fn(*mut libc::DIR) -> c_long)(d) }
}

/// # Safety
/// libc's `seekdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn seekdir(d: *mut libc::DIR, pos: c_long) {
    if is_stream(d) {
        return with_stream(d, |s| s.pos = (pos.max(0) as usize).min(s.entries.len()));
    }
    // SAFETY: forwarding.
    unsafe { real!("seekdir", unsafe extern "C" fn(*mut libc::DIR, c_long))(d, pos) }
}

type Filter = Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>;

pub(crate) type Compar =
    Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>;

type ScandirFn =
    unsafe extern "C" fn(*const c_char, *mut *mut *mut libc::dirent64, Filter, Compar) -> c_int;

/// `scandir` of a served directory, through [`opendir`] and [`readdir`]:
/// glibc's own opens the directory with internal calls no preload sees.
///
/// # Safety
/// libc's `scandir` contract.
unsafe fn scandir_common(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: Filter,
    compar: Compar,
    real: ScandirFn,
) -> c_int {
    let served = match Busy::enter() {
        // SAFETY: the caller's promise.
        Some(_b) => matches!(unsafe { route(libc::AT_FDCWD, path) }, Route::Served(_)),
        None => false,
    };
    if !served {
        // SAFETY: forwarding (a relative path leaving the prefix is the
        // host's as given: glibc resolves it).
        return unsafe { real(path, list, filter, compar) };
    }
    if list.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: the caller's path.
    let d = unsafe { opendir(path) };
    if d.is_null() {
        return -1;
    }
    let mut got: Vec<*mut libc::dirent64> = Vec::new();
    let mut oom = false;
    loop {
        // SAFETY: our own stream.
        let e = unsafe { readdir(d) };
        if e.is_null() {
            break;
        }
        if let Some(f) = filter {
            // SAFETY: `e` is the stream's entry; the filter is the caller's.
            if unsafe { f(e) } == 0 {
                continue;
            }
        }
        let n = std::mem::size_of::<libc::dirent64>();
        // SAFETY: malloc has no preconditions; the caller frees each entry.
        let copy = unsafe { libc::malloc(n) }.cast::<libc::dirent64>();
        if copy.is_null() {
            oom = true;
            break;
        }
        // SAFETY: both hold a whole dirent64.
        unsafe { std::ptr::copy_nonoverlapping(e, copy, 1) };
        got.push(copy);
    }
    // SAFETY: our own stream.
    unsafe { closedir(d) };
    let bytes = got.len().max(1) * std::mem::size_of::<*mut libc::dirent64>();
    let arr = if oom {
        std::ptr::null_mut()
    } else {
        // SAFETY: malloc has no preconditions; the caller frees the array.
        unsafe { libc::malloc(bytes) }.cast::<*mut libc::dirent64>()
    };
    if arr.is_null() {
        for p in got {
            // SAFETY: each came from malloc above.
            unsafe { libc::free(p.cast()) };
        }
        return fail(libc::ENOMEM);
    }
    // SAFETY: `arr` holds got.len() pointers.
    unsafe { std::ptr::copy_nonoverlapping(got.as_ptr(), arr, got.len()) };
    if let Some(c) = compar {
        type QsortCmp = unsafe extern "C" fn(*const c_void, *const c_void) -> c_int;
        // SAFETY: qsort calls the comparator with pointers to two elements
        // (pointers to entries), which is what scandir's comparators take.
        unsafe {
            libc::qsort(
                arr.cast(),
                got.len(),
                std::mem::size_of::<*mut libc::dirent64>(),
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(
                        *mut *const libc::dirent64,
                        *mut *const libc::dirent64,
                    ) -> c_int,
                    QsortCmp,
                >(c)),
            )
        };
    }
    // SAFETY: the caller's out-pointer.
    unsafe { *list = arr };
    got.len() as c_int
}

twins! {
    [scandir, scandir64] fn(path: *const c_char, list: *mut *mut *mut libc::dirent64, filter: Filter, compar: Compar) -> c_int,
    real: ScandirFn => {
        // SAFETY: forwarding.
        unsafe { scandir_common(path, list, filter, compar, real) }
    }
}

type ScandiratFn = unsafe extern "C" fn(
    c_int,
    *const c_char,
    *mut *mut *mut libc::dirent64,
    crate::listing::Filter,
    crate::listing::Compar,
) -> c_int;

/// # Safety
/// libc's `scandirat`, with `real` its next definition.
unsafe fn scandirat_common(
    dirfd: c_int,
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: crate::listing::Filter,
    compar: crate::listing::Compar,
    real: ScandiratFn,
) -> c_int {
    // SAFETY: the caller's promise.
    match unsafe { with_route(dirfd, path, |rel| CString::new(crate::route::full(rel))) } {
        // SAFETY: the shim's scandir of the served directory's full path.
        Ok(Ok(full)) => unsafe { crate::listing::scandir(full.as_ptr(), list, filter, compar) },
        Ok(Err(_)) => fail(libc::EINVAL),
        // SAFETY: forwarding.
        Err(p) => unsafe { real(dirfd, Route::host_path(&p, path), list, filter, compar) },
    }
}

twins! {
    [scandirat, scandirat64] fn(dirfd: c_int, path: *const c_char, list: *mut *mut *mut libc::dirent64, filter: crate::listing::Filter, compar: crate::listing::Compar) -> c_int,
    real: ScandiratFn => {
        // SAFETY: forwarding.
        unsafe {
            scandirat_common(
                dirfd,
                path,
                list,
                filter,
                compar,
                real,
            )
        }
    }
}
