//! Objects in an S3-compatible object store (`s3://BUCKET/KEY`), read with
//! ranged GETs pinned to the version seen at open, through an optional
//! disk chunk cache.
//!
//! - `url.rs`: the address and the settings ([`ObjectConfig`]).
//! - `client.rs`: `object_store`'s S3 client with a deadline per request
//!   and bounded retries.
//! - `cache.rs`: the disk chunk cache ([`ChunkCache`]); its tests in
//!   `cache_tests.rs`.
//! - `blocks.rs`: blocks in memory, fetched concurrently and ahead.
//! - `stats.rs`, `error.rs`: what it did, and what went wrong.
//! - `tree.rs`: the objects under a prefix as a read-only tree
//!   ([`ObjectTree`], for `serve --root s3://BUCKET/PREFIX/`).
//!
//! `object_store` is async; each source runs a small private runtime (two
//! threads) and the [`Source`] methods block on it with bounded waits.
//! See docs/object-store.md.

mod blocks;
mod cache;
mod client;
mod stats;
mod tree;
mod url;

pub use crate::object_error::ObjectError;
pub use blocks::{CACHE_WRITE_BOUND, finish_cache_writes};
pub use cache::{CacheBudget, ChunkCache};
pub use stats::{ObjectCounters, ObjectStats};
pub use tree::{ObjectEntry, ObjectPage, ObjectTree};
pub use url::{CacheConfig, DEFAULT_CACHE_SIZE, ObjectConfig, ObjectUrl};

use super::{FileKind, Source, SourceMeta, Timestamp};
use blocks::Blocks;
use client::{Client, Head};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A runtime for fetches: two threads.
fn runtime(url: &str) -> Result<Arc<tokio::runtime::Runtime>, ObjectError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shadowfd-object")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| ObjectError::Client {
            url: url.to_string(),
            detail: format!("starting its runtime: {e}"),
        })
}

/// A cache directory that cannot be used, with the fix.
fn cache_error(c: &CacheConfig, e: io::Error) -> ObjectError {
    ObjectError::Config {
        what: "the cache directory",
        value: c.dir.display().to_string(),
        why: format!("{e}; choose a writable directory (XDG_CACHE_HOME) or turn the cache off"),
    }
}

/// The seed of [`ObjectSource::version_id`]'s hash.
const VERSION_SEED: u64 = 0x7368_6164_6f77_6664;

/// How long the open's HEAD answers [`Source::metadata`] before it asks
/// again.
const HEAD_FRESH: Duration = Duration::from_secs(1);

/// An object in an S3-compatible store, as a [`Source`].
///
/// Open does one HEAD and pins the object's ETag: every ranged GET carries
/// `If-Match` with it, so the bytes served all come from that one version.
/// Once the store says the object changed (`412`, another ETag, or gone),
/// reads fail and [`Source::fill_metadata`] reports another identity, so a
/// lazy shadow sees the change through its staleness policy.
pub struct ObjectSource {
    blocks: Blocks,
    name: String,
    meta: SourceMeta,
    changed: AtomicBool,
    /// A second hash of (endpoint, bucket, key, ETag), independent of the
    /// identity's device and inode.
    version_id: u64,
    /// The last HEAD, and when.
    last_head: Mutex<(Instant, Head)>,
}

impl std::fmt::Debug for ObjectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSource")
            .field("name", &self.name)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

fn hash64(parts: &[&str]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(parts.join("\0").as_bytes())
}

impl ObjectSource {
    /// Opens `url` (`s3://BUCKET/KEY`) with the settings from
    /// [`ObjectConfig::from_env`] and no disk cache.
    pub fn open(url: &str) -> Result<ObjectSource, ObjectError> {
        ObjectSource::open_with(url, ObjectConfig::from_env()?)
    }

    /// Opens `url` with `cfg`: one HEAD, naming the URL and the fix if the
    /// credentials, the bucket or the key are wrong.
    pub fn open_with(url: &str, cfg: ObjectConfig) -> Result<ObjectSource, ObjectError> {
        cfg.validate()?;
        let u = ObjectUrl::parse(url)?;
        let client = Client::new(&u, &cfg)?;
        let rt = runtime(url)?;
        ObjectSource::open_on(client, cfg, rt)
    }

    /// Opens what `client` names, fetching on `rt` (shared with the other
    /// sources of an [`ObjectTree`], or its own).
    fn open_on(
        client: Client,
        cfg: ObjectConfig,
        rt: Arc<tokio::runtime::Runtime>,
    ) -> Result<ObjectSource, ObjectError> {
        ObjectSource::open_sharing(client, cfg, rt, None, &|_| None)
    }

    /// As [`ObjectSource::open_on`]; `budget`: the disk cache's budget
    /// shared with the other sources of a tree (else one of its own, which
    /// costs a pass over the directory); `share` may give, for the metadata
    /// the HEAD found, counters to count in instead of the client's own
    /// (those of the sources of one version, shared).
    fn open_sharing(
        mut client: Client,
        cfg: ObjectConfig,
        rt: Arc<tokio::runtime::Runtime>,
        budget: Option<&Arc<CacheBudget>>,
        share: &dyn Fn(&SourceMeta) -> Option<Arc<ObjectCounters>>,
    ) -> Result<ObjectSource, ObjectError> {
        let u = client.url.clone();
        let head = rt.block_on(client.head())?;
        let cache = match &cfg.cache {
            Some(c) => {
                let id = [
                    client.endpoint.as_str(),
                    u.bucket.as_str(),
                    u.key.as_str(),
                    head.etag.as_str(),
                ];
                let opened = match budget {
                    Some(b) => ChunkCache::open_in(b, id),
                    None => ChunkCache::open(&c.dir, c.max_bytes, id),
                };
                Some(opened.map_err(|e| cache_error(c, e))?)
            }
            None => None,
        };
        let t = Timestamp {
            sec: head.last_modified.0,
            nsec: head.last_modified.1,
        };
        let meta = SourceMeta {
            size: head.size,
            mtime: t,
            ctime: t,
            device: hash64(&[&client.endpoint, &u.bucket]),
            inode: hash64(&[&u.key, &head.etag]),
            kind: FileKind::Regular,
        };
        if let Some(c) = share(&meta) {
            client.counters = c;
        }
        let version_id = xxhash_rust::xxh3::xxh3_64_with_seed(
            [client.endpoint.as_str(), &u.bucket, &u.key, &head.etag]
                .join("\0")
                .as_bytes(),
            VERSION_SEED,
        );
        let blocks = Blocks::new(client, cache, head.etag.clone(), head.size, rt);
        Ok(ObjectSource {
            blocks,
            name: u.to_string(),
            meta,
            changed: AtomicBool::new(false),
            version_id,
            last_head: Mutex::new((Instant::now(), head)),
        })
    }

    /// The ETag every read is pinned to.
    pub fn etag(&self) -> &str {
        &self.blocks.shared().etag
    }

    /// A 64-bit hash of (endpoint, bucket, key, ETag) independent of
    /// [`SourceMeta::device`] (endpoint, bucket) and [`SourceMeta::inode`]
    /// (key, ETag): with them, 128 bits that tell versions apart (the
    /// server's shadow table keys on all three).
    pub fn version_id(&self) -> u64 {
        self.version_id
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        &self.blocks.shared().client.endpoint
    }

    /// The live counters (share them to report after the source is gone).
    pub fn counters(&self) -> Arc<ObjectCounters> {
        self.blocks.shared().client.counters.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ObjectStats {
        self.blocks.shared().client.counters.snapshot()
    }

    /// The metadata with another identity: what a changed object reports.
    fn changed_meta(&self) -> SourceMeta {
        SourceMeta {
            inode: !self.meta.inode,
            ..self.meta.clone()
        }
    }
}

impl Source for ObjectSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.meta.size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min((size - offset) as usize);
        match self.blocks.read(&mut buf[..n], offset) {
            Ok(()) => Ok(n),
            Err(e) => {
                if matches!(e, ObjectError::Changed { .. }) {
                    self.changed.store(true, Ordering::Relaxed);
                }
                Err(e.into_io())
            }
        }
    }

    /// A HEAD, unless the last one is under a second old. An object that
    /// is gone answers `NotFound`; one with another ETag, another identity.
    fn metadata(&self) -> io::Result<SourceMeta> {
        if self.changed.load(Ordering::Relaxed) {
            return Ok(self.changed_meta());
        }
        let mut last = self.last_head.lock();
        if last.0.elapsed() > HEAD_FRESH {
            let head = self.blocks.head().map_err(ObjectError::into_io)?;
            *last = (Instant::now(), head);
        }
        let head = &last.1;
        if head.etag != self.etag() || head.size != self.meta.size {
            self.changed.store(true, Ordering::Relaxed);
            return Ok(self.changed_meta());
        }
        Ok(self.meta.clone())
    }

    /// No request: the metadata at open, or another identity once a read
    /// found the object changed.
    fn fill_metadata(&self) -> io::Result<SourceMeta> {
        if self.changed.load(Ordering::Relaxed) {
            Ok(self.changed_meta())
        } else {
            Ok(self.meta.clone())
        }
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    /// Endpoint, bucket and key; the version is the ETag and size.
    fn identity(&self) -> Option<crate::source::SourceIdentity> {
        Some(crate::source::SourceIdentity {
            which: format!("object {} {}", self.endpoint(), self.name),
            version: format!("etag={} size={}", self.etag(), self.meta.size),
        })
    }
}
