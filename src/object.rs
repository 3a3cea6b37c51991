//! `s3://` targets: the disk cache options, the source's counters, and the
//! served tree of `serve --root s3://BUCKET/PREFIX/` and `run --root …`.

use crate::{Common, size_arg};
use clap::Args;
use shadowfd::Source;
use shadowfd::remote::Tree;
use shadowfd::source::object::{self as object, CACHE_WRITE_BOUND, ObjectUrl};
use shadowfd::source::object::{
    CacheConfig, ObjectConfig, ObjectCounters, ObjectSource, ObjectStats,
};
use shadowfd::{Config, Engine};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Waits, when dropped, for the disk cache writes of every object source
/// of the process (at most [`CACHE_WRITE_BOUND`]), and says on stderr how
/// many were abandoned. `main` holds one, so that every way out of it (a
/// result, an error, a panic) writes the blocks fetched first: the
/// sources themselves are not always dropped (`cat` keeps its shadow for
/// the SIGBUS handler's explanations to the end of the process).
pub struct FinishCacheWrites;

impl Drop for FinishCacheWrites {
    fn drop(&mut self) {
        finish_cache_writes();
    }
}

/// Before the process exits: waits (at most [`CACHE_WRITE_BOUND`]) until
/// every block an object source fetched and handed to the disk cache is
/// written; says on stderr how many were not, which the next run fetches
/// again.
pub fn finish_cache_writes() {
    let left = object::finish_cache_writes(CACHE_WRITE_BOUND);
    if left > 0 {
        eprintln!(
            "shadowfd: warning: {left} fetched block(s) not written to the disk cache within \
             {} s of exit, abandoned: the next run fetches them again",
            CACHE_WRITE_BOUND.as_secs()
        );
    }
}

/// The engine's fill unit for an object unless `--chunk` or SHADOWFD_CHUNK
/// sets it: a page, as for a local file. GETs are sized by the object
/// source's blocks and readahead, not by it; a larger unit only makes each
/// fault from the warm disk cache copy more (at 1 GiB random:0.01 a warm
/// run took 230 ms with 4 KiB against 442 ms with 64 KiB, 2026-12-07;
/// docs/benchmarks.md, "Object store").
pub const DEFAULT_CHUNK: u64 = 4 << 10;
/// The engine's readahead for an object unless `--readahead` or
/// SHADOWFD_READAHEAD sets it.
pub const DEFAULT_READAHEAD: u64 = 32 << 20;

/// Options for `s3://` targets.
#[derive(Args, Debug, Clone, Default)]
pub struct ObjectOpts {
    /// Disk chunk cache bound for s3:// objects, least recently used evicted
    /// [env: SHADOWFD_CACHE_SIZE] [default: 4G, in $XDG_CACHE_HOME/shadowfd]
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub cache_size: Option<u64>,
    /// Fetch every block of an s3:// object from the store (no disk cache).
    #[arg(long)]
    pub no_cache: bool,
    /// The counters of the last object source opened.
    #[arg(skip)]
    counters: Arc<Mutex<Option<Arc<ObjectCounters>>>>,
}

impl ObjectOpts {
    /// The settings from the environment; `cached`: with the disk cache
    /// unless `--no-cache`, bounded by `--cache-size` if given.
    pub fn config(&self, cached: bool) -> shadowfd::Result<ObjectConfig> {
        let mut cfg = ObjectConfig::from_env()?;
        if cached && !self.no_cache {
            cfg.cache = CacheConfig::from_env()?;
            if let (Some(c), Some(n)) = (cfg.cache.as_mut(), self.cache_size) {
                c.max_bytes = n;
            }
        }
        Ok(cfg)
    }

    /// Opens `url`; `cached`: through the disk cache unless `--no-cache`.
    pub fn open(&self, url: &str, cached: bool) -> shadowfd::Result<Arc<dyn Source>> {
        let cfg = self.config(cached)?;
        let src = ObjectSource::open_with(url, cfg)?;
        if cached {
            *self.counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(src.counters());
        }
        Ok(Arc::new(src))
    }

    /// What the last object source opened did, if one was.
    pub fn stats(&self) -> Option<ObjectStats> {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref().map(|c| c.snapshot())
    }
}

/// What `serve` and `run` serve for `--root ROOT` or `--image IMG`: a
/// bucket prefix when ROOT is `s3://BUCKET/PREFIX/`, with the disk cache
/// unless `--no-cache`.
pub fn served_tree(
    root: Option<&Path>,
    image: Option<&Path>,
    opts: &ObjectOpts,
) -> Option<shadowfd::Result<Tree>> {
    Some(match (root, image) {
        (Some(r), None) => match r.to_str().filter(|s| ObjectUrl::is_url(s)) {
            Some(url) => opts.config(true).map(|c| Tree::Object(url.to_string(), c)),
            None => Ok(Tree::Root(r.to_path_buf())),
        },
        (None, Some(i)) => Ok(Tree::Image(i.to_path_buf())),
        _ => return None,
    })
}

/// The engine for serving `tree`: objects get [`DEFAULT_CHUNK`] and
/// [`DEFAULT_READAHEAD`] unless a flag or variable sets them.
pub fn engine_for_tree(common: &Common, tree: &Tree) -> shadowfd::Result<Engine> {
    let mut c = common.config()?;
    if matches!(tree, Tree::Object(..)) {
        tune(&mut c, common);
    }
    Engine::new(c)
}

/// Sets the object fill unit and readahead, where neither a flag nor a
/// variable sets them.
pub fn tune(c: &mut Config, common: &Common) {
    if common.tuning.chunk.is_none() && std::env::var_os("SHADOWFD_CHUNK").is_none() {
        c.chunk_size = DEFAULT_CHUNK;
    }
    if common.tuning.readahead.is_none() && std::env::var_os("SHADOWFD_READAHEAD").is_none() {
        c.readahead = DEFAULT_READAHEAD;
    }
}

/// How `serve` names what it serves.
pub fn describe(tree: &Tree) -> String {
    match tree {
        Tree::Root(r) => format!("--root {}", r.display()),
        Tree::Image(i) => format!("--image {}", i.display()),
        Tree::Object(url, cfg) => format!(
            "--root {url} ({})",
            match &cfg.cache {
                Some(c) => format!(
                    "disk cache {} bounded at {} bytes",
                    c.dir.display(),
                    c.max_bytes
                ),
                None => "no disk cache".into(),
            }
        ),
    }
}
