//! The objects under `s3://BUCKET/PREFIX/` served: STAT, LIST and OPEN
//! over [`ObjectTree`] (directories from the store's common prefixes,
//! files from its objects, each opened pinned to its ETag).
//!
//! - **Identity.** An opened object's container is (hash of endpoint and
//!   bucket, `ObjectSource::version_id`: a second hash of endpoint,
//!   bucket, key and ETag), its inode a hash of (key, ETag): the server's
//!   shadow table keys on all of them, so an overwritten object (a new
//!   ETag) is a new shadow and never shares the old one's pages.
//! - **LIST cursors.** A page of a directory ends at a key; the next page
//!   asks the store for the keys after it (`start-after`). A key does not
//!   fit in the protocol's 64-bit cursor, so the server keeps it in a table
//!   of [`CURSORS`] slots and hands out `(sequence << 10) | slot`: bounded
//!   (a new cursor takes the slot of the oldest), and checked (the slot
//!   must hold that sequence, for the same directory, made less than
//!   [`CURSOR_LIFE`] ago). Anything else is refused with `E_RANGE`: list
//!   again from 0.
//! - **Names.** An object or prefix whose name in its directory is over
//!   255 bytes (NAME_MAX; keys may be 1024) is left out of listings, as
//!   no program could name it.
//! - **Counters.** The sources of one object version share one set of
//!   counters, found by [`object_json`] for `status`: requests, bytes,
//!   retries, cache hits and misses, fetch latency.

use super::{ListPage, Opened, PathStat, Refusal, ServedTree};
use crate::remote::wire;
use crate::source::object::{
    ObjectConfig, ObjectCounters, ObjectEntry, ObjectError, ObjectStats, ObjectTree,
};
use crate::source::{Source, SourceMeta, Timestamp};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

/// LIST cursors kept at once (a power of two: the slot is the low bits).
pub(crate) const CURSORS: usize = 1 << CURSOR_BITS;
const CURSOR_BITS: u32 = 10;
/// How long a LIST cursor stays valid.
pub(crate) const CURSOR_LIFE: Duration = Duration::from_secs(600);
/// Items one LIST page asks the store for (S3 gives at most 1000).
const STORE_PAGE: usize = 1000;

struct Cursor {
    seq: u64,
    dir: Vec<u8>,
    after: String,
    made: Instant,
}

/// The LIST cursors given out (see the module documentation).
struct Cursors(Mutex<(u64, Vec<Option<Cursor>>)>);

impl Cursors {
    fn new() -> Cursors {
        Cursors(Mutex::new((0, (0..CURSORS).map(|_| None).collect())))
    }

    /// A cursor for the page of `dir` after the key `after`.
    fn make(&self, dir: &[u8], after: String) -> u64 {
        let mut c = self.0.lock();
        c.0 += 1;
        let seq = c.0;
        let slot = (seq as usize) & (CURSORS - 1);
        c.1[slot] = Some(Cursor {
            seq,
            dir: dir.to_vec(),
            after,
            made: Instant::now(),
        });
        (seq << CURSOR_BITS) | slot as u64
    }

    /// The key `cursor` goes on after, if it is one given for `dir` and
    /// still held.
    fn get(&self, dir: &[u8], cursor: u64) -> Result<String, Refusal> {
        let slot = (cursor & (CURSORS as u64 - 1)) as usize;
        let seq = cursor >> CURSOR_BITS;
        let c = self.0.lock();
        match &c.1[slot] {
            Some(k) if k.seq == seq && k.dir == dir && k.made.elapsed() < CURSOR_LIFE => {
                Ok(k.after.clone())
            }
            _ => Err((
                wire::E_RANGE,
                format!(
                    "LIST cursor {cursor} of {:?} is not one a LIST reply for that directory \
                     gave, or it has expired (a cursor lasts {} s, and only the last {CURSORS} \
                     are kept); list it again from cursor 0",
                    super::shown(dir),
                    CURSOR_LIFE.as_secs()
                ),
            )),
        }
    }
}

/// The served bucket prefix.
pub(crate) struct ObjectServedTree {
    tree: ObjectTree,
    cursors: Cursors,
}

impl ObjectServedTree {
    pub fn open(url: &str, cfg: ObjectConfig) -> crate::Result<ObjectServedTree> {
        Ok(ObjectServedTree {
            tree: ObjectTree::open(url, cfg)?,
            cursors: Cursors::new(),
        })
    }
}

/// A path of the tree as the store's text: object keys are UTF-8.
fn utf8(rel: &[u8]) -> Result<&str, Refusal> {
    std::str::from_utf8(rel).map_err(|_| {
        (
            wire::E_NOT_FOUND,
            format!(
                "{:?}: not UTF-8, so no object key names it",
                super::shown(rel)
            ),
        )
    })
}

fn refusal(e: ObjectError) -> Refusal {
    let code = match &e {
        ObjectError::BadUrl { why, .. } if why.contains("..") => wire::E_ESCAPE,
        ObjectError::BadUrl { .. } | ObjectError::NoBucket { .. } | ObjectError::NoKey { .. } => {
            wire::E_NOT_FOUND
        }
        ObjectError::Denied { .. } => wire::E_ACCESS,
        ObjectError::IsPrefix { .. } => wire::E_NOT_REGULAR,
        _ => wire::E_IO,
    };
    (code, e.to_string())
}

fn missing(tree: &ObjectTree, rel: &str) -> Refusal {
    (
        wire::E_NOT_FOUND,
        format!(
            "{:?}: no object or prefix {}{rel} in the store",
            format!("/{rel}"),
            tree.url()
        ),
    )
}

impl ServedTree for ObjectServedTree {
    fn kind(&self) -> &'static str {
        "object"
    }

    fn stat(&self, rel: &[u8]) -> Result<PathStat, Refusal> {
        let r = utf8(rel)?;
        let e = self
            .tree
            .stat(r)
            .map_err(refusal)?
            .ok_or_else(|| missing(&self.tree, r))?;
        Ok(stat_of(&e, self.tree.device()))
    }

    fn list(&self, rel: &[u8], cursor: u64) -> Result<ListPage, Refusal> {
        let r = utf8(rel)?;
        let after = match cursor {
            0 => None,
            c => Some(self.cursors.get(rel, c)?),
        };
        let Some(page) = self
            .tree
            .list_page(r, after.as_deref(), STORE_PAGE.min(wire::LIST_MAX_ENTRIES))
            .map_err(refusal)?
        else {
            // Nothing under it: a file, or nothing at all.
            return Err(match self.tree.stat(r).map_err(refusal)? {
                Some(e) if !e.dir => (
                    wire::E_NOT_DIR,
                    format!("\"/{r}\" is an object, not a directory; LIST takes a directory"),
                ),
                _ => missing(&self.tree, r),
            });
        };
        let mut out = ListPage {
            entries: Vec::new(),
            next: 0,
            end: !page.more,
        };
        let mut bytes = 0;
        let mut last: Option<&str> = None;
        for (key, e) in &page.entries {
            // A name no program can pass (over NAME_MAX, or with a NUL) is
            // left out; the page still goes on after its key.
            if e.name.is_empty() || e.name.len() > 255 || e.name.contains('\0') {
                last = Some(key);
                continue;
            }
            let b = wire::LIST_ENTRY_HEAD + e.name.len();
            if out.entries.len() >= wire::LIST_MAX_ENTRIES || bytes + b > wire::LIST_PAGE_BYTES {
                out.end = false;
                break;
            }
            bytes += b;
            out.entries.push(wire::DirEntry {
                name: e.name.clone().into_bytes(),
                kind: if e.dir {
                    wire::KIND_DIR
                } else {
                    wire::KIND_FILE
                },
                inode: e.inode,
            });
            last = Some(key);
        }
        if !out.end {
            let Some(last) = last.or(after.as_deref()) else {
                return Err((
                    wire::E_IO,
                    format!(
                        "the store said the listing of \"/{r}\" goes on but sent no entry of it"
                    ),
                ));
            };
            if last_repeats(after.as_deref(), last, &page.entries) {
                return Err((
                    wire::E_IO,
                    format!("the store's listing of \"/{r}\" did not move on after {last:?}"),
                ));
            }
            out.next = self.cursors.make(rel, last.to_string());
        }
        Ok(out)
    }

    fn open(&self, rel: &[u8]) -> Result<Opened, Refusal> {
        let r = utf8(rel)?;
        let src = self
            .tree
            .open_file_sharing(r, &shared_counters)
            .map_err(refusal)?;
        let meta = src
            .fill_metadata()
            .map_err(|e| (wire::E_IO, format!("\"/{r}\": {e}")))?;
        Ok(Opened {
            container: (meta.device, src.version_id()),
            source: Arc::new(src),
            meta,
        })
    }
}

/// Whether a page that goes on would go on from where it started: no entry
/// after `after` came back.
fn last_repeats(after: Option<&str>, last: &str, entries: &[(String, ObjectEntry)]) -> bool {
    entries.is_empty() && after == Some(last)
}

fn stat_of(e: &ObjectEntry, device: u64) -> PathStat {
    PathStat {
        kind: if e.dir {
            wire::KIND_DIR
        } else {
            wire::KIND_FILE
        },
        size: e.size,
        device,
        inode: e.inode,
        mtime: Timestamp {
            sec: e.mtime.0,
            nsec: e.mtime.1,
        },
        nlink: if e.dir { 2 } else { 1 },
    }
}

/// Counters of the object versions served in this process, by (device,
/// inode, size): the sources of one version count in one set, which lives
/// as long as one of them does.
type Versions = HashMap<(u64, u64, u64), Weak<ObjectCounters>>;

fn versions() -> &'static Mutex<Versions> {
    static V: OnceLock<Mutex<Versions>> = OnceLock::new();
    V.get_or_init(Default::default)
}

fn shared_counters(meta: &SourceMeta) -> Option<Arc<ObjectCounters>> {
    let mut v = versions().lock();
    let k = (meta.device, meta.inode, meta.size);
    if let Some(c) = v.get(&k).and_then(Weak::upgrade) {
        return Some(c);
    }
    v.retain(|_, w| w.strong_count() > 0);
    let c = Arc::new(ObjectCounters::default());
    v.insert(k, Arc::downgrade(&c));
    Some(c)
}

/// `,"object":{…}` for a shadow of an object version served here (what
/// `status` reports: requests, bytes fetched, retries, failures, cache
/// hits, misses and refusals, fetch latency p50/p99 in µs, the last
/// error); empty for any other shadow.
pub(crate) fn object_json(meta: &SourceMeta) -> String {
    let c = versions()
        .lock()
        .get(&(meta.device, meta.inode, meta.size))
        .and_then(Weak::upgrade);
    match c {
        Some(c) => format!(",\"object\":{}", stats_json(&c.snapshot())),
        None => String::new(),
    }
}

fn stats_json(s: &ObjectStats) -> String {
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.1}"));
    format!(
        "{{\"requests\":{},\"bytes_fetched\":{},\"retries\":{},\"failures\":{},\"cache_hits\":{},\"cache_misses\":{},\"cache_rejected\":{},\"memory_hits\":{},\"fetch_p50_us\":{},\"fetch_p99_us\":{},\"last_error\":{}}}",
        s.requests,
        s.bytes_fetched,
        s.retries,
        s.failures,
        s.cache_hits,
        s.cache_misses,
        s.cache_rejected,
        s.memory_hits,
        opt(s.fetch_p50_us),
        opt(s.fetch_p99_us),
        s.last_error
            .as_deref()
            .map_or("null".to_string(), wire::json_str),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_str_escapes() {
        assert_eq!(wire::json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn cursors_are_checked_and_bounded() {
        let c = Cursors::new();
        let a = c.make(b"d", "p/d/x".into());
        assert_ne!(a, 0);
        assert_eq!(c.get(b"d", a).unwrap(), "p/d/x");
        assert_eq!(
            c.get(b"d", a).unwrap(),
            "p/d/x",
            "a page may be asked again"
        );
        // Another directory, a forged sequence, a slot never used.
        for (dir, cur) in [
            (&b"e"[..], a),
            (b"d", a + (1 << CURSOR_BITS)),
            (b"d", a + 1),
        ] {
            let (code, msg) = c.get(dir, cur).unwrap_err();
            assert_eq!(code, wire::E_RANGE);
            assert!(msg.contains("again from cursor 0"), "{msg}");
        }
        // The table holds CURSORS: the oldest gives way.
        for i in 0..CURSORS {
            c.make(b"d", format!("k{i}"));
        }
        assert!(c.get(b"d", a).is_err());
        assert!(c.get(b"d", u64::MAX).is_err());
    }
}
