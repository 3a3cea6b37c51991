//! What an object source is: its `s3://BUCKET/KEY` address, and the
//! settings its reads follow (block size, concurrency, deadline, retries,
//! the disk cache).

use crate::config::Size;
use crate::object_error::ObjectError;
use std::path::PathBuf;
use std::time::Duration;

/// `s3://BUCKET/KEY`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub bucket: String,
    pub key: String,
}

impl ObjectUrl {
    /// Whether `s` is meant as an object URL (`s3://…`), so that callers
    /// taking "a path or a URL" know which to open.
    pub fn is_url(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// Parses `s3://BUCKET/KEY`. The bucket must be a valid S3 bucket name
    /// (3 to 63 characters of `a-z0-9.-`), the key non-empty.
    pub fn parse(s: &str) -> Result<ObjectUrl, ObjectError> {
        let bad = |why: &str| ObjectError::BadUrl {
            url: s.to_string(),
            why: why.to_string(),
        };
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("there is no key after the bucket"))?;
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return Err(bad(
                "the bucket name must be 3 to 63 characters of a-z, 0-9, '.' and '-'",
            ));
        }
        Ok(ObjectUrl {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The key as a prefix: what `serve --root s3://B/P/` lists.
    pub fn as_prefix(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// The disk chunk cache's place and bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes of chunk files kept; the least recently used go first.
    pub max_bytes: u64,
}

/// The default cache bound (`SHADOWFD_CACHE_SIZE`).
pub const DEFAULT_CACHE_SIZE: u64 = 4 << 30;

impl CacheConfig {
    /// `$XDG_CACHE_HOME/shadowfd` (else `$HOME/.cache/shadowfd`), bounded
    /// by `SHADOWFD_CACHE_SIZE` (default 4 GiB). `None` when neither
    /// variable names a directory.
    pub fn from_env() -> Result<Option<CacheConfig>, ObjectError> {
        let max_bytes = match std::env::var("SHADOWFD_CACHE_SIZE") {
            Ok(v) => parse_size("SHADOWFD_CACHE_SIZE", &v)?,
            Err(_) => DEFAULT_CACHE_SIZE,
        };
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(h) => PathBuf::from(h).join(".cache"),
                None => return Ok(None),
            },
        };
        Ok(Some(CacheConfig {
            dir: base.join("shadowfd"),
            max_bytes,
        }))
    }
}

fn parse_size(what: &'static str, v: &str) -> Result<u64, ObjectError> {
    v.parse::<Size>()
        .map(|s| s.0)
        .map_err(|why| ObjectError::Config {
            what,
            value: v.to_string(),
            why,
        })
}

fn parse_count(what: &'static str, v: &str, max: u32) -> Result<u32, ObjectError> {
    match v.trim().parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(ObjectError::Config {
            what,
            value: v.to_string(),
            why: format!("expected a whole number from 0 to {max}"),
        }),
    }
}

fn parse_seconds(what: &'static str, v: &str) -> Result<Duration, ObjectError> {
    let t = v.trim();
    let t = t.strip_suffix('s').unwrap_or(t);
    match t.parse::<f64>() {
        Ok(s) if (0.05..=3600.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(ObjectError::Config {
            what,
            value: v.to_string(),
            why: "expected seconds from 0.05 to 3600, e.g. 10 or 2.5s".into(),
        }),
    }
}

/// How an [`super::ObjectSource`] reads.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct ObjectConfig {
    /// The unit fetched and cached (`SHADOWFD_OBJECT_BLOCK`, default
    /// 256 KiB, a multiple of 4 KiB from 4 KiB to 64 MiB).
    pub block: u64,
    /// Largest ranged GET: adjacent missing blocks are merged up to this
    /// (default 4 MiB).
    pub max_request: u64,
    /// GETs in flight at once per source (default 8).
    pub concurrency: usize,
    /// How far ahead a sequential reader's blocks are fetched
    /// (`SHADOWFD_OBJECT_READAHEAD`, default 32 MiB, 0 for none).
    pub readahead: u64,
    /// Blocks kept in memory, fetched but not yet read (default 64 MiB).
    pub memory: u64,
    /// The deadline of one request, body included
    /// (`SHADOWFD_OBJECT_DEADLINE`, seconds, default 10).
    pub deadline: Duration,
    /// Retries after a transient failure (5xx, reset, timeout)
    /// (`SHADOWFD_OBJECT_RETRIES`, default 3).
    pub retries: u32,
    /// First backoff; it doubles with every retry (default 100 ms).
    pub backoff: Duration,
    /// The disk chunk cache; `None` (the library's default) for none.
    pub cache: Option<CacheConfig>,
    /// The store's URL, instead of `AWS_ENDPOINT_URL` (plain `http://`
    /// is then allowed).
    pub endpoint: Option<String>,
    /// An access key ID and secret, instead of the AWS variables.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for ObjectConfig {
    /// Everything but the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectConfig")
            .field("block", &self.block)
            .field("max_request", &self.max_request)
            .field("concurrency", &self.concurrency)
            .field("readahead", &self.readahead)
            .field("memory", &self.memory)
            .field("deadline", &self.deadline)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("cache", &self.cache)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

impl Default for ObjectConfig {
    fn default() -> Self {
        ObjectConfig {
            block: 256 << 10,
            max_request: 4 << 20,
            concurrency: 8,
            readahead: 32 << 20,
            memory: 64 << 20,
            deadline: Duration::from_secs(10),
            retries: 3,
            backoff: Duration::from_millis(100),
            cache: None,
            endpoint: None,
            credentials: None,
        }
    }
}

impl ObjectConfig {
    /// Defaults overridden by `SHADOWFD_OBJECT_*`. The cache stays off:
    /// turn it on with [`CacheConfig::from_env`].
    pub fn from_env() -> Result<ObjectConfig, ObjectError> {
        let mut c = ObjectConfig::default();
        if let Ok(v) = std::env::var("SHADOWFD_OBJECT_BLOCK") {
            c.block = parse_size("SHADOWFD_OBJECT_BLOCK", &v)?;
        }
        if let Ok(v) = std::env::var("SHADOWFD_OBJECT_READAHEAD") {
            c.readahead = parse_size("SHADOWFD_OBJECT_READAHEAD", &v)?;
        }
        if let Ok(v) = std::env::var("SHADOWFD_OBJECT_DEADLINE") {
            c.deadline = parse_seconds("SHADOWFD_OBJECT_DEADLINE", &v)?;
        }
        if let Ok(v) = std::env::var("SHADOWFD_OBJECT_RETRIES") {
            c.retries = parse_count("SHADOWFD_OBJECT_RETRIES", &v, 20)?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the ranges, naming the value and what is accepted.
    pub fn validate(&self) -> Result<(), ObjectError> {
        let bad = |what, value: u64, why: &str| {
            Err(ObjectError::Config {
                what,
                value: value.to_string(),
                why: why.to_string(),
            })
        };
        if self.block < 4096 || self.block % 4096 != 0 || self.block > 64 << 20 {
            return bad(
                "SHADOWFD_OBJECT_BLOCK",
                self.block,
                "expected a multiple of 4 KiB from 4K to 64M, e.g. 256K",
            );
        }
        if self.max_request < self.block {
            return bad(
                "object max_request",
                self.max_request,
                "must be at least the block size",
            );
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return bad(
                "object concurrency",
                self.concurrency as u64,
                "expected 1 to 256",
            );
        }
        if self.readahead > 1 << 30 {
            return bad(
                "SHADOWFD_OBJECT_READAHEAD",
                self.readahead,
                "expected at most 1G, e.g. 32M, or 0 for none",
            );
        }
        Ok(())
    }

    /// The longest one block can take before its readers give up: one
    /// round of blocks read ahead queued before it, then every attempt's
    /// deadline and backoff, plus a margin.
    pub fn worst_case(&self) -> Duration {
        let mut t = self.deadline * (self.retries + 2) + Duration::from_secs(2);
        for i in 0..self.retries {
            t += self.backoff_for(i + 1);
        }
        t
    }

    /// The wait before retry `n` (1-based): `backoff` doubled each time,
    /// at most 5 s.
    pub fn backoff_for(&self, n: u32) -> Duration {
        (self.backoff * 2u32.saturating_pow(n.saturating_sub(1).min(16)))
            .min(Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_names_what_is_wrong() {
        let u = ObjectUrl::parse("s3://my-bucket/a/b.npy").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.key, "a/b.npy");
        assert_eq!(u.to_string(), "s3://my-bucket/a/b.npy");
        for (bad, why) in [
            ("http://x/y", "s3://"),
            ("s3://bucket", "no key"),
            ("s3://B/key", "bucket name"),
            ("s3://ab/key", "bucket name"),
        ] {
            let e = ObjectUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(why), "{e}");
        }
    }

    #[test]
    fn config_ranges_are_checked() {
        let mut c = ObjectConfig::default();
        c.validate().unwrap();
        c.block = 1000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("1000") && e.contains("4 KiB"), "{e}");
        let c = ObjectConfig::default();
        assert_eq!(c.backoff_for(1), Duration::from_millis(100));
        assert_eq!(c.backoff_for(3), Duration::from_millis(400));
        // The bounds docs/object-store.md quotes.
        assert_eq!(c.worst_case(), Duration::from_millis(52_700));
        let mut c = c;
        c.deadline = Duration::from_secs(1);
        c.retries = 1;
        assert_eq!(c.worst_case(), Duration::from_millis(5_100));
    }
}
