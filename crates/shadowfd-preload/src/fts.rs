//! glibc's `fts_*` over a served tree. glibc's own opens, stats and reads
//! directories with internal calls no preload sees, so for roots under the
//! prefix the shim walks the tree itself, through its own `stat64`,
//! `opendir` and `readdir64`, and hands out `FTSENT`s laid out as glibc's
//! (`<fts.h>`, x86-64: `FTSENT` and `FTSENT64` are the same). Roots that are
//! all on the host go to glibc; a mix is refused (`EXDEV`).
//!
//! What it does: pre-order `FTS_D`, post-order `FTS_DP`, `FTS_F`, `FTS_NS`
//! (with `fts_errno`), `FTS_DNR`, `FTS_DEFAULT`, `FTS_DOT` with
//! `FTS_SEEDOT`; siblings sorted with the program's `compar` (else in
//! listing order); `fts_set` with `FTS_SKIP` (the directory then comes
//! back at once in post-order, as glibc's); `fts_children` of the
//! directory just returned. It never changes directory: `fts_accpath` is
//! `fts_path` (what `FTS_NOCHDIR` gives). A served tree has no symbolic
//! links (they are followed inside it), so `FTS_LOGICAL`, `FTS_PHYSICAL`
//! and `FTS_COMFOLLOW` walk the same. Every entry lives until `fts_close`.

use crate::forklock::ForkMutex as Mutex;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString, c_char, c_int, c_long, c_void};

const FTS_SEEDOT: c_int = 0x0020;
const FTS_D: u16 = 1;
const FTS_DEFAULT: u16 = 3;
const FTS_DNR: u16 = 4;
const FTS_DOT: u16 = 5;
const FTS_DP: u16 = 6;
const FTS_F: u16 = 8;
const FTS_NS: u16 = 10;
const FTS_SKIP: c_int = 4;
const FTS_NOINSTR: u16 = 3;

/// glibc's `FTSENT` (x86-64).
#[repr(C)]
pub struct FtsEnt {
    fts_cycle: *mut FtsEnt,
    fts_parent: *mut FtsEnt,
    fts_link: *mut FtsEnt,
    fts_number: c_long,
    fts_pointer: *mut c_void,
    fts_accpath: *mut c_char,
    fts_path: *mut c_char,
    fts_errno: c_int,
    fts_symfd: c_int,
    fts_pathlen: u16,
    fts_namelen: u16,
    fts_ino: u64,
    fts_dev: u64,
    fts_nlink: u64,
    fts_level: i16,
    fts_info: u16,
    fts_flags: u16,
    fts_instr: u16,
    fts_statp: *mut libc::stat64,
    fts_name: [c_char; 1],
}

type Compar = unsafe extern "C" fn(*const *const FtsEnt, *const *const FtsEnt) -> c_int;

/// One directory being walked: its entry and its children.
struct Frame {
    dir: *mut FtsEnt,
    kids: Vec<*mut FtsEnt>,
    at: usize,
}

/// A walk of served roots (what `fts_open` returned, opaque to programs).
struct Walk {
    options: c_int,
    compar: Option<Compar>,
    roots: Vec<*mut FtsEnt>,
    next_root: usize,
    stack: Vec<Frame>,
    /// The entry `fts_read` returned last, and whether it was a directory
    /// in pre-order (whose children come next unless skipped).
    cur: *mut FtsEnt,
    /// Children built by `fts_children` for `cur`.
    kids_of_cur: Option<Vec<*mut FtsEnt>>,
    /// Every allocation, freed by `fts_close`.
    owned: Vec<*mut c_void>,
    root_parent: *mut FtsEnt,
}

/// The walks this shim made (by address), so `fts_read` and the rest know
/// theirs from glibc's.
static WALKS: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

fn ours(p: *mut c_void) -> bool {
    !p.is_null() && WALKS.lock().contains(&(p as usize))
}

impl Walk {
    fn alloc(&mut self, n: usize) -> *mut c_void {
        // SAFETY: calloc of a positive size; checked below.
        let p = unsafe { libc::calloc(1, n.max(1)) };
        if p.is_null() {
            std::process::abort();
        }
        self.owned.push(p);
        p
    }

    fn cstr(&mut self, b: &[u8]) -> *mut c_char {
        let p = self.alloc(b.len() + 1).cast::<u8>();
        // SAFETY: `p` has room for `b` and the NUL (zeroed by calloc).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len()) };
        p.cast()
    }

    /// A new entry for `path` (its last component `name`), stat'ed.
    fn entry(&mut self, path: &[u8], name: &[u8], level: i16, parent: *mut FtsEnt) -> *mut FtsEnt {
        let e = self
            .alloc(std::mem::size_of::<FtsEnt>() + name.len() + 1)
            .cast::<FtsEnt>();
        let st = self
            .alloc(std::mem::size_of::<libc::stat64>())
            .cast::<libc::stat64>();
        let p = self.cstr(path);
        // SAFETY: `e` is a zeroed allocation of an FtsEnt and room for the
        // name after `fts_name`; `st` a zeroed stat64; `p` a C string.
        unsafe {
            let en = &mut *e;
            en.fts_parent = parent;
            en.fts_path = p;
            en.fts_accpath = p;
            en.fts_pathlen = path.len().min(u16::MAX as usize) as u16;
            en.fts_namelen = name.len().min(u16::MAX as usize) as u16;
            en.fts_level = level;
            en.fts_instr = FTS_NOINSTR;
            en.fts_statp = st;
            let dst = std::ptr::addr_of_mut!(en.fts_name).cast::<u8>();
            std::ptr::copy_nonoverlapping(name.as_ptr(), dst, name.len());
            *dst.add(name.len()) = 0;
            if name == b"." || name == b".." {
                en.fts_info = FTS_DOT;
            }
            if crate::stat::stat64(p, st) != 0 {
                en.fts_info = FTS_NS;
                en.fts_errno = *libc::__errno_location();
            } else if en.fts_info != FTS_DOT {
                en.fts_info = match (*st).st_mode & libc::S_IFMT {
                    libc::S_IFDIR => FTS_D,
                    libc::S_IFREG => FTS_F,
                    _ => FTS_DEFAULT,
                };
            }
            en.fts_ino = (*st).st_ino;
            en.fts_dev = (*st).st_dev;
            en.fts_nlink = (*st).st_nlink;
        }
        e
    }

    fn sort(&self, v: &mut [*mut FtsEnt]) {
        if let Some(c) = self.compar {
            v.sort_by(|a, b| {
                let (a, b) = (*a as *const FtsEnt, *b as *const FtsEnt);
                // SAFETY: the program's comparison of two live entries.
                unsafe { c(&a, &b) }.cmp(&0)
            });
        }
    }

    /// The children of directory entry `d`, sorted; `Err(errno)` if it
    /// cannot be listed.
    fn children(&mut self, d: *mut FtsEnt) -> Result<Vec<*mut FtsEnt>, c_int> {
        // SAFETY: `d` is a live entry of this walk.
        let (path, level) = unsafe {
            (
                CStr::from_ptr((*d).fts_path).to_bytes().to_vec(),
                (*d).fts_level,
            )
        };
        let c = CString::new(path.clone()).map_err(|_| libc::EINVAL)?;
        // SAFETY: a C string (the shim's opendir).
        let s = unsafe { crate::listing::opendir(c.as_ptr()) };
        if s.is_null() {
            // SAFETY: reads errno.
            return Err(unsafe { *libc::__errno_location() });
        }
        let mut names = Vec::new();
        loop {
            // SAFETY: the stream opened above (the shim's readdir64).
            let e = unsafe { crate::listing::readdir64(s) };
            if e.is_null() {
                break;
            }
            // SAFETY: a live dirent64 with a NUL-terminated name.
            let n = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }
                .to_bytes()
                .to_vec();
            names.push(n);
        }
        // SAFETY: the stream opened above.
        unsafe { crate::listing::closedir(s) };
        let seedot = self.options & FTS_SEEDOT != 0;
        let mut kids = Vec::new();
        for n in names {
            if !seedot && (n == b"." || n == b"..") {
                continue;
            }
            let mut p = path.clone();
            if !p.ends_with(b"/") {
                p.push(b'/');
            }
            p.extend_from_slice(&n);
            kids.push(self.entry(&p, &n, level + 1, d));
        }
        self.sort(&mut kids);
        for w in kids.windows(2) {
            // SAFETY: live entries of this walk.
            unsafe { (*w[0]).fts_link = w[1] };
        }
        Ok(kids)
    }

    fn read(&mut self) -> *mut FtsEnt {
        let cur = self.cur;
        // SAFETY: `cur` is null or a live entry of this walk.
        if !cur.is_null() && unsafe { (*cur).fts_info } == FTS_D {
            // SAFETY: as above.
            let skip = unsafe { (*cur).fts_instr } as c_int == FTS_SKIP;
            if skip {
                // As glibc: no children, then the directory in post-order.
                self.stack.push(Frame {
                    dir: cur,
                    kids: Vec::new(),
                    at: 0,
                });
            } else {
                let kids = match self.kids_of_cur.take() {
                    Some(k) => Ok(k),
                    None => self.children(cur),
                };
                match kids {
                    Err(e) => {
                        // SAFETY: as above.
                        unsafe {
                            (*cur).fts_info = FTS_DNR;
                            (*cur).fts_errno = e;
                        }
                        return self.give(cur);
                    }
                    Ok(kids) => {
                        self.stack.push(Frame {
                            dir: cur,
                            kids,
                            at: 0,
                        });
                    }
                }
            }
        }
        self.kids_of_cur = None;
        if let Some(f) = self.stack.last_mut() {
            if f.at < f.kids.len() {
                let e = f.kids[f.at];
                f.at += 1;
                return self.give(e);
            }
            let d = f.dir;
            self.stack.pop();
            // SAFETY: a live entry of this walk.
            unsafe { (*d).fts_info = FTS_DP };
            return self.give(d);
        }
        if self.next_root < self.roots.len() {
            let r = self.roots[self.next_root];
            self.next_root += 1;
            return self.give(r);
        }
        self.cur = std::ptr::null_mut();
        crate::set_errno(0);
        std::ptr::null_mut()
    }

    fn give(&mut self, e: *mut FtsEnt) -> *mut FtsEnt {
        self.cur = e;
        e
    }
}

impl Drop for Walk {
    fn drop(&mut self) {
        for p in self.owned.drain(..) {
            // SAFETY: each came from calloc and is freed once.
            unsafe { libc::free(p) };
        }
    }
}

/// The program's roots, or `None` if they are not all served.
///
/// # Safety
/// `argv` is a NULL-terminated array of C strings.
unsafe fn served_roots(argv: *const *const c_char) -> Result<Option<Vec<Vec<u8>>>, c_int> {
    if argv.is_null() {
        return Ok(None);
    }
    let (mut served, mut host) = (Vec::new(), 0);
    let mut i = 0;
    loop {
        // SAFETY: the caller's promise.
        let p = unsafe { *argv.add(i) };
        if p.is_null() {
            break;
        }
        // SAFETY: as above.
        if unsafe { crate::ftw::served_path(p) } {
            // SAFETY: as above.
            served.push(unsafe { CStr::from_ptr(p) }.to_bytes().to_vec());
        } else {
            host += 1;
        }
        i += 1;
    }
    match (served.is_empty(), host) {
        (true, _) => Ok(None),
        (false, 0) => Ok(Some(served)),
        _ => Err(libc::EXDEV),
    }
}

type OpenFn = unsafe extern "C" fn(*const *const c_char, c_int, Option<Compar>) -> *mut c_void;

/// # Safety
/// libc's `fts_open`, with `real` its next definition.
unsafe fn open_common(
    argv: *const *const c_char,
    options: c_int,
    compar: Option<Compar>,
    real: OpenFn,
) -> *mut c_void {
    // SAFETY: the caller's promise.
    let roots = match unsafe { served_roots(argv) } {
        Ok(Some(r)) => r,
        Ok(None) => {
            // SAFETY: forwarding.
            return unsafe { real(argv, options, compar) };
        }
        Err(e) => {
            eprintln!(
                "shadowfd-preload: fts_open of paths both under the shadowfd run prefix and \
                 on the host is not supported; walk them in separate fts_open calls"
            );
            crate::set_errno(e);
            return std::ptr::null_mut();
        }
    };
    let mut w = Box::new(Walk {
        options,
        compar,
        roots: Vec::new(),
        next_root: 0,
        stack: Vec::new(),
        cur: std::ptr::null_mut(),
        kids_of_cur: None,
        owned: Vec::new(),
        root_parent: std::ptr::null_mut(),
    });
    let rp = w.entry(b"", b"", -1, std::ptr::null_mut());
    w.root_parent = rp;
    let mut rs = Vec::new();
    for r in roots {
        // A root's name is its last component, as glibc's.
        let mut t = r.as_slice();
        while t.len() > 1 && t.ends_with(b"/") {
            t = &t[..t.len() - 1];
        }
        let name = match t.iter().rposition(|&b| b == b'/') {
            Some(i) if t.len() > 1 => t[i + 1..].to_vec(),
            _ => t.to_vec(),
        };
        rs.push(w.entry(&r, &name, 0, rp));
    }
    w.sort(&mut rs);
    w.roots = rs;
    let p = Box::into_raw(w).cast::<c_void>();
    WALKS.lock().insert(p as usize);
    p
}

/// Runs `f` on our walk `p`.
fn with<R>(p: *mut c_void, f: impl FnOnce(&mut Walk) -> R) -> R {
    // SAFETY: `p` is in WALKS: a live Box<Walk> made above; one thread
    // uses an FTS at a time (fts's contract).
    f(unsafe { &mut *p.cast::<Walk>() })
}

twins! {
    [fts_open, fts64_open] fn(argv: *const *const c_char, options: c_int, compar: Option<Compar>) -> *mut c_void,
    real: OpenFn => {
        // SAFETY: forwarding.
        unsafe { open_common(argv, options, compar, real) }
    }
}

twins! {
    [fts_read, fts64_read] fn(p: *mut c_void) -> *mut FtsEnt,
    real: unsafe extern "C" fn(*mut c_void) -> *mut FtsEnt => {
        if ours(p) {
            return with(p, |w| w.read());
        }
        // SAFETY: forwarding.
        unsafe { real(p) }
    }
}

twins! {
    [fts_children, fts64_children] fn(p: *mut c_void, options: c_int) -> *mut FtsEnt,
    real: unsafe extern "C" fn(*mut c_void, c_int) -> *mut FtsEnt => {
        if ours(p) {
            return with(p, |w| {
                let cur = w.cur;
                // SAFETY: null or a live entry of this walk.
                if cur.is_null() || unsafe { (*cur).fts_info } != FTS_D {
                    crate::set_errno(0);
                    return std::ptr::null_mut();
                }
                match w.children(cur) {
                    Ok(k) => {
                        let first = k.first().copied().unwrap_or(std::ptr::null_mut());
                        w.kids_of_cur = Some(k);
                        crate::set_errno(0);
                        first
                    }
                    Err(e) => {
                        crate::set_errno(e);
                        std::ptr::null_mut()
                    }
                }
            });
        }
        // SAFETY: forwarding.
        unsafe {
            real(p, options)
        }
    }
}

twins! {
    [fts_set, fts64_set] fn(p: *mut c_void, e: *mut FtsEnt, instr: c_int) -> c_int,
    real: unsafe extern "C" fn(*mut c_void, *mut FtsEnt, c_int) -> c_int => {
        if ours(p) {
            if e.is_null() {
                crate::set_errno(libc::EINVAL);
                return -1;
            }
            // SAFETY: an entry this walk handed out.
            unsafe { (*e).fts_instr = instr as u16 };
            return 0;
        }
        // SAFETY: forwarding.
        unsafe {
            real(p, e, instr)
        }
    }
}

twins! {
    [fts_close, fts64_close] fn(p: *mut c_void) -> c_int,
    real: unsafe extern "C" fn(*mut c_void) -> c_int => {
        if ours(p) {
            WALKS.lock().remove(&(p as usize));
            // SAFETY: made by Box::into_raw in open_common, removed from
            // WALKS just now: dropped once.
            drop(unsafe { Box::from_raw(p.cast::<Walk>()) });
            return 0;
        }
        // SAFETY: forwarding.
        unsafe { real(p) }
    }
}
