//! Small files in one request (protocol version 6, SMALL): a served file
//! of at most [`wire::SMALL_MAX_FILE`] bytes is opened by reading it whole,
//! with its STAT answer, instead of OPEN, FILL and CLOSE (and a shadow in
//! the server). Its descriptor then reads from this process's memory, and
//! a mapping of it opens it the ordinary way first.
//!
//! When the served tree cannot change ([`crate::env::Env::immutable`], `run
//! --image`), a STAT or open of an entry of a directory this process
//! listed lately (the last [`MAX_DIRS`]) asks SMALL for that entry and the
//! regular files listed after it, up to [`wire::SMALL_MAX_PATHS`]: a program that walks a directory
//! (`tar`, `cp -r`, `diff -r`) then makes one request per 64 files. Their
//! STAT answers go to the kept STAT answers, their bytes here, at most
//! [`MAX_BYTES`] bytes and [`MAX_FILES`] files (the oldest go first). When
//! none of the files a read-ahead brought the bytes of was opened before
//! the next one (`ls -l`), that one asks for STAT answers only; one made
//! for an open always asks for bytes.

use crate::conn::client;
use crate::env::env;
use crate::errno::errno_of;
use crate::forklock::ForkMutex as Mutex;
use shadowfd::remote::{PathKind, RemoteFile, SmallAnswer, wire};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_int;

/// The bytes of prefetched small files this process keeps, at most.
pub(crate) const MAX_BYTES: usize = 8 << 20;
/// The prefetched small files this process keeps, at most.
const MAX_FILES: usize = 8192;
/// Listed directories whose files a read-ahead may follow, at most: a
/// walk that goes down into a subdirectory (`lost+found` first, in an
/// image's root) and comes back still finds the parent's listing.
pub(crate) const MAX_DIRS: usize = 16;
/// Names of listed directories kept, at most (the oldest listing goes).
const MAX_NAMES: usize = 1 << 18;

#[derive(Default)]
pub(crate) struct Cache {
    /// The process these belong to: a forked child forgets its parent's
    /// (their connection is the parent's) without dropping them.
    pid: u32,
    /// The regular files of the directories listed lately, each listing
    /// in its order, oldest first, and where each file is in its listing.
    listings: VecDeque<(String, std::sync::Arc<Vec<String>>)>,
    index: HashMap<String, (std::sync::Arc<Vec<String>>, usize)>,
    names: usize,
    /// Files read whole, by path, and the order they came in.
    files: HashMap<String, RemoteFile>,
    order: VecDeque<String>,
    bytes: usize,
    /// Files whose bytes the last read-ahead brought, and how many of them
    /// were opened since: when none was, the next read-ahead asks for
    /// STAT answers only (`ls -l` stats every file and opens none).
    last: std::collections::HashSet<String>,
    opened: usize,
    /// The directory of the last open of a file no listing named, and how
    /// many such opens came in a row from it ([`list_on_misses`]).
    miss_dir: Option<String>,
    misses: u32,
    /// Directories listed because of such opens (each listed once).
    auto_listed: std::collections::HashSet<String>,
}

pub(crate) static SMALL: Mutex<Option<Cache>> = Mutex::new(None);

fn pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// The cache of this process (a child's copy of its parent's is forgotten).
fn mine(g: &mut Option<Cache>) -> &mut Cache {
    let me = pid();
    if g.as_ref().is_some_and(|c| c.pid != me) {
        std::mem::forget(g.take());
    }
    g.get_or_insert_with(|| Cache {
        pid: me,
        ..Cache::default()
    })
}

/// Whether answers may be kept: the tree cannot change, and this is not
/// a `vfork` child (which shares the parent's memory, and only execs).
fn keep() -> bool {
    env().is_some_and(|e| e.immutable) && !crate::vfork::in_child()
}

/// Remembers the regular files of the directory `dir` as listed (only when
/// the tree cannot change).
pub(crate) fn listed(dir: &str, files: impl Iterator<Item = Vec<u8>>) {
    if !keep() {
        return;
    }
    let names: Vec<String> = files
        .filter_map(|n| String::from_utf8(n).ok())
        .map(|n| {
            if dir.is_empty() {
                n
            } else {
                format!("{dir}/{n}")
            }
        })
        .collect();
    let names = std::sync::Arc::new(names);
    let mut g = SMALL.lock();
    let c = mine(&mut g);
    if let Some(at) = c.listings.iter().position(|(d, _)| d == dir) {
        let (_, old) = c.listings.remove(at).expect("found");
        forget(c, &old);
    }
    for (i, n) in names.iter().enumerate() {
        c.index.insert(n.clone(), (names.clone(), i));
    }
    c.names += names.len();
    c.listings.push_back((dir.to_string(), names));
    while c.listings.len() > MAX_DIRS || c.names > MAX_NAMES {
        let Some((_, old)) = c.listings.pop_front() else {
            break;
        };
        forget(c, &old);
    }
}

/// Opens in a row of files of one directory that no listing named, after
/// which the shim lists the directory itself: a process that opens the
/// files it was given (`xargs sha256sum`, `cat dir/*` after the shell
/// expanded the glob) then reads ahead too.
const LIST_AFTER_MISSES: u32 = 2;
/// Directories listed that way per process, at most.
const MAX_AUTO_LISTED: usize = 1024;

/// Counts an open of `rel` that no listing named; at the
/// [`LIST_AFTER_MISSES`]th in a row from one directory, lists it (once).
fn list_on_misses(rel: &str) {
    let parent = rel.rsplit_once('/').map_or("", |(p, _)| p).to_string();
    {
        let mut g = SMALL.lock();
        let c = mine(&mut g);
        if c.index.contains_key(rel) || c.auto_listed.contains(&parent) {
            return;
        }
        if c.miss_dir.as_deref() == Some(parent.as_str()) {
            c.misses += 1;
        } else {
            c.miss_dir = Some(parent.clone());
            c.misses = 1;
        }
        if c.misses < LIST_AFTER_MISSES || c.auto_listed.len() >= MAX_AUTO_LISTED {
            return;
        }
        c.auto_listed.insert(parent.clone());
    }
    let Ok(cl) = client() else {
        return;
    };
    if let Ok(list) = cl.list(&parent) {
        listed(
            &parent,
            list.iter()
                .filter(|e| e.kind == wire::KIND_FILE)
                .map(|e| e.name.clone()),
        );
    }
}

/// Drops the index entries that point into the listing `old`.
fn forget(c: &mut Cache, old: &std::sync::Arc<Vec<String>>) {
    c.names -= old.len();
    for n in old.iter() {
        if c.index
            .get(n)
            .is_some_and(|(l, _)| std::sync::Arc::ptr_eq(l, old))
        {
            c.index.remove(n);
        }
    }
}

/// Asks SMALL for `rel` and the listed files after it, and keeps the
/// answers. An open (`bytes`) always asks for bytes. False if `rel` was
/// not listed or the request failed.
pub(crate) fn prefetch(rel: &str, bytes: bool) -> bool {
    if !keep() {
        return false;
    }
    let (paths, cap) = {
        let mut g = SMALL.lock();
        let c = mine(&mut g);
        let Some((list, i)) = c.index.get(rel).cloned() else {
            return false;
        };
        let paths: Vec<String> = list[i..]
            .iter()
            .filter(|n| *n == rel || !c.files.contains_key(*n))
            .take(wire::SMALL_MAX_PATHS)
            .cloned()
            .collect();
        let unused = !bytes && !c.last.is_empty() && c.opened == 0;
        (paths, if unused { 0 } else { wire::SMALL_MAX_FILE })
    };
    let Ok(cl) = client() else {
        return false;
    };
    if !cl.has_small() {
        return false;
    }
    let refs: Vec<&str> = paths.iter().map(|s| s.as_str()).collect();
    let Ok(answers) = cl.small(&refs, cap) else {
        return false;
    };
    let mut files = Vec::new();
    for (a, p) in answers.into_iter().zip(&paths) {
        let SmallAnswer { info, file } = a;
        crate::statcache::keep_stat(p, info.map_err(|e| errno_of(&e)));
        if let Some(f) = file {
            files.push((p.clone(), f));
        }
    }
    let mut g = SMALL.lock();
    let c = mine(&mut g);
    if cap > 0 {
        c.last = files.iter().map(|(p, _)| p.clone()).collect();
        c.opened = 0;
    }
    for (p, f) in files {
        add(c, p, f);
    }
    true
}

fn add(c: &mut Cache, p: String, f: RemoteFile) {
    let n = f.size() as usize;
    if n > MAX_BYTES {
        return;
    }
    if let Some(old) = c.files.insert(p.clone(), f) {
        c.bytes -= old.size() as usize;
        c.order.retain(|q| *q != p);
    }
    c.bytes += n;
    c.order.push_back(p);
    while c.bytes > MAX_BYTES || c.files.len() > MAX_FILES {
        let Some(q) = c.order.pop_front() else {
            break;
        };
        if let Some(old) = c.files.remove(&q) {
            c.bytes -= old.size() as usize;
        }
    }
}

/// The kept bytes of `rel`, for an open (counted for the next read-ahead).
fn cached(rel: &str) -> Option<RemoteFile> {
    let mut g = SMALL.lock();
    let c = mine(&mut g);
    let f = c.files.get(rel).cloned()?;
    if c.last.contains(rel) {
        c.opened += 1;
    }
    Some(f)
}

/// Opens `rel` by reading it whole, if it is a small regular file:
/// `Some(Ok)` with the file, `Some(Err)` with the errno the server's
/// answer means, `None` to open it the ordinary way (a large file, a
/// directory, a server without SMALL).
pub(crate) fn open(rel: &str) -> Option<Result<RemoteFile, c_int>> {
    if crate::vfork::in_child() {
        return None;
    }
    if keep() {
        if let Some(f) = cached(rel) {
            return Some(Ok(f));
        }
        if let Some(r) = crate::statcache::kept_stat(rel) {
            match r {
                Err(e) => return Some(Err(e)),
                Ok(i) if i.kind != PathKind::File || i.size > wire::SMALL_MAX_FILE => {
                    return None;
                }
                Ok(_) => {}
            }
        }
        list_on_misses(rel);
        if prefetch(rel, true) {
            if let Some(f) = cached(rel) {
                return Some(Ok(f));
            }
            return match crate::statcache::kept_stat(rel) {
                Some(Err(e)) => Some(Err(e)),
                _ => None,
            };
        }
    }
    let cl = client().ok()?;
    if !cl.has_small() {
        return None;
    }
    let a = cl.small(&[rel], wire::SMALL_MAX_FILE).ok()?.pop()?;
    let SmallAnswer { info, file } = a;
    let info = info.map_err(|e| errno_of(&e));
    if keep() {
        crate::statcache::keep_stat(rel, info.clone());
    }
    match (info, file) {
        (Err(e), _) => Some(Err(e)),
        (Ok(_), Some(f)) => {
            if keep() {
                let mut g = SMALL.lock();
                add(mine(&mut g), rel.to_string(), f.clone());
            }
            Some(Ok(f))
        }
        (Ok(_), None) => None,
    }
}
