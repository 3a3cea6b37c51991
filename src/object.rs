//! `s3://` targets: the disk cache options and the source's counters.

use crate::size_arg;
use clap::Args;
use shadowfd::Source;
use shadowfd::source::object::{
    CacheConfig, ObjectConfig, ObjectCounters, ObjectSource, ObjectStats,
};
use std::sync::{Arc, Mutex};

/// The engine's fill unit for an object unless `--chunk` or SHADOWFD_CHUNK
/// sets it: fewer faults for bytes that arrive a block at a time.
pub const DEFAULT_CHUNK: u64 = 64 << 10;
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
    /// Opens `url`; `cached`: through the disk cache unless `--no-cache`.
    pub fn open(&self, url: &str, cached: bool) -> shadowfd::Result<Arc<dyn Source>> {
        let mut cfg = ObjectConfig::from_env()?;
        if cached && !self.no_cache {
            cfg.cache = CacheConfig::from_env()?;
            if let (Some(c), Some(n)) = (cfg.cache.as_mut(), self.cache_size) {
                c.max_bytes = n;
            }
        }
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
