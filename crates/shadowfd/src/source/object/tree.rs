//! The objects under a prefix of a bucket as a read-only tree: what
//! `serve --root s3://BUCKET/PREFIX/` serves.
//!
//! Directories are the prefixes the store lists with `/` as the delimiter
//! (ListObjectsV2's common prefixes), files the objects; a file is opened
//! as an [`ObjectSource`], pinned to the ETag its HEAD saw. Every source of
//! one tree shares its client and its runtime (two threads in all, not two
//! a file). Nothing is cached here: each listing and each stat asks the
//! store (one request, with the sources' deadline and retries), so the
//! tree shows what the bucket holds now, and an open file keeps the
//! version it opened.
//!
//! Paths are confined to the prefix by construction: a key is the prefix
//! joined with the path, and a path with an empty, `.` or `..` component is
//! refused (the store would take it literally, but a program would not).

use super::blocks::shut_down;
use super::cache::CacheBudget;
use super::client::Client;
use super::stats::ObjectCounters;
use super::url::{ObjectConfig, ObjectUrl};
use super::{ObjectError, ObjectSource, hash64, runtime};
use crate::source::SourceMeta;
use std::sync::Arc;

/// A file or a directory of an [`ObjectTree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Its name in its directory.
    pub name: String,
    pub dir: bool,
    /// Bytes (0 for a directory).
    pub size: u64,
    /// Last modified, seconds and nanoseconds since the epoch (0 for a
    /// directory, which the store does not date).
    pub mtime: (i64, i64),
    /// A file's inode: the hash of (key, ETag) its [`ObjectSource`]
    /// reports; a directory's: a hash of its prefix.
    pub inode: u64,
}

impl ObjectEntry {
    /// The directory whose key (without a trailing slash) is `key`.
    fn dir(name: String, key: &str) -> ObjectEntry {
        ObjectEntry {
            name,
            dir: true,
            size: 0,
            mtime: (0, 0),
            inode: hash64(&["prefix", key]),
        }
    }

    fn file(name: String, m: &object_store::ObjectMeta) -> ObjectEntry {
        ObjectEntry {
            name,
            dir: false,
            size: m.size,
            inode: hash64(&[m.location.as_ref(), m.e_tag.as_deref().unwrap_or("")]),
            mtime: (
                m.last_modified.timestamp(),
                m.last_modified.timestamp_subsec_nanos() as i64,
            ),
        }
    }
}

/// One page of a directory of an [`ObjectTree`] ([`ObjectTree::list_page`]).
#[derive(Debug, Clone, Default)]
pub struct ObjectPage {
    /// Each entry with its key (a directory's with its trailing slash), in
    /// the order of the keys: what `after` takes to go on after it.
    pub entries: Vec<(String, ObjectEntry)>,
    /// Whether the store has more after the last.
    pub more: bool,
}

/// The objects under `s3://BUCKET/PREFIX/` (see the module documentation).
pub struct ObjectTree {
    client: Client,
    /// The prefix without a trailing slash; empty for the whole bucket.
    prefix: String,
    cfg: ObjectConfig,
    /// The disk cache's budget, shared by every source the tree opens.
    budget: Option<Arc<CacheBudget>>,
    rt: Option<Arc<tokio::runtime::Runtime>>,
    url: String,
}

impl std::fmt::Debug for ObjectTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTree")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectTree {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            shut_down(rt);
        }
    }
}

impl ObjectTree {
    /// The tree under `url` (`s3://BUCKET`, `s3://BUCKET/` or
    /// `s3://BUCKET/PREFIX/`), checked with one listing: a missing bucket
    /// or refused credentials are an error here, naming the URL and the fix.
    pub fn open(url: &str, cfg: ObjectConfig) -> Result<ObjectTree, ObjectError> {
        cfg.validate()?;
        let whole = if url.starts_with("s3://") && !url["s3://".len()..].contains('/') {
            format!("{url}/")
        } else {
            url.to_string()
        };
        let u = ObjectUrl::parse(&whole)?;
        let prefix = u.key.trim_end_matches('/').to_string();
        if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
            return Err(ObjectError::BadUrl {
                url: url.to_string(),
                why: "the prefix has a `.` or `..` component or an empty one".into(),
            });
        }
        let client = Client::new(
            &ObjectUrl {
                bucket: u.bucket.clone(),
                key: prefix.clone(),
            },
            &cfg,
        )?;
        let rt = runtime(url)?;
        let budget = match &cfg.cache {
            Some(c) => {
                Some(CacheBudget::open(&c.dir, c.max_bytes).map_err(|e| super::cache_error(c, e))?)
            }
            None => None,
        };
        let tree = ObjectTree {
            client,
            prefix,
            cfg,
            budget,
            rt: Some(rt),
            url: whole,
        };
        tree.block_on(tree.client.list_dir(&tree.prefix))?;
        Ok(tree)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the tree")
            .block_on(f)
    }

    /// The URL it serves, as `s3://BUCKET/PREFIX/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key of `rel` (a path below the tree, without a leading slash;
    /// empty for the top), or why it is refused.
    fn key_of(&self, rel: &str) -> Result<String, ObjectError> {
        let rel = rel.trim_end_matches('/');
        if rel.is_empty() {
            return Ok(self.prefix.clone());
        }
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(ObjectError::BadUrl {
                url: format!("{}{rel}", self.url),
                why: "a path below the tree may not have an empty, `.` or `..` component".into(),
            });
        }
        Ok(if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        })
    }

    /// The entries of the directory `rel`, sorted by name; `None` if the
    /// store has nothing under it (and it is not the top).
    pub fn list(&self, rel: &str) -> Result<Option<Vec<ObjectEntry>>, ObjectError> {
        let key = self.key_of(rel)?;
        let l = self.block_on(self.client.list_dir(&key))?;
        let mut out: Vec<ObjectEntry> = l
            .common_prefixes
            .iter()
            .filter_map(|p| {
                p.filename()
                    .map(|n| ObjectEntry::dir(n.to_string(), p.as_ref()))
            })
            .collect();
        out.extend(l.objects.iter().filter_map(|o| {
            let name = o.location.filename()?.to_string();
            Some(ObjectEntry::file(name, o))
        }));
        if out.is_empty() && key != self.prefix {
            return Ok(None);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(Some(out))
    }

    /// What `rel` is: a file (an object with that key), a directory
    /// (objects under `rel/`), or `None`.
    pub fn stat(&self, rel: &str) -> Result<Option<ObjectEntry>, ObjectError> {
        let key = self.key_of(rel)?;
        let name = rel.rsplit('/').next().unwrap_or("").to_string();
        if key == self.prefix {
            return Ok(Some(ObjectEntry::dir(name, &key)));
        }
        if let Some(m) = self.block_on(self.client.head_of(&key))? {
            return Ok(Some(ObjectEntry::file(name, &m)));
        }
        let (l, _) = self.block_on(self.client.list_page(&key, None, 1))?;
        let any = !l.objects.is_empty() || !l.common_prefixes.is_empty();
        Ok(any.then(|| ObjectEntry::dir(name, &key)))
    }

    /// The device every entry and source of the tree reports: a hash of
    /// (endpoint, bucket), as [`ObjectSource`]'s.
    pub fn device(&self) -> u64 {
        hash64(&[&self.client.endpoint, &self.client.url.bucket])
    }

    /// One page of the directory `rel`: at most `max` (at least 2) of its
    /// entries whose keys come after `after` (the key of the last entry of
    /// the page before; `None` for the first page), each asked of the store
    /// once. `None` if the store has nothing under it (and it is not the
    /// top). A directory is listed once even where the store repeats it
    /// after `after` (its keys sort after its own); an object with the name
    /// of a directory on the same page is left out, as [`ObjectTree::list`]
    /// does.
    pub fn list_page(
        &self,
        rel: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Option<ObjectPage>, ObjectError> {
        let key = self.key_of(rel)?;
        let (l, more) = self.block_on(self.client.list_page(&key, after, max.max(2)))?;
        if l.objects.is_empty() && l.common_prefixes.is_empty() && after.is_none() {
            return Ok((key == self.prefix).then(ObjectPage::default));
        }
        let mut out: Vec<(String, ObjectEntry)> = l
            .common_prefixes
            .iter()
            .filter_map(|p| {
                let n = p.filename()?.to_string();
                Some((format!("{}/", p.as_ref()), ObjectEntry::dir(n, p.as_ref())))
            })
            .collect();
        let dirs: std::collections::HashSet<String> =
            out.iter().map(|(_, e)| e.name.clone()).collect();
        out.extend(l.objects.iter().filter_map(|o| {
            // The directory's own marker object (`KEY/`) is not in it.
            if o.location.as_ref().len() <= key.len() {
                return None;
            }
            let name = o.location.filename()?.to_string();
            (!dirs.contains(&name))
                .then(|| (o.location.as_ref().to_string(), ObjectEntry::file(name, o)))
        }));
        if let Some(a) = after {
            out.retain(|(k, _)| k.as_str() > a);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(ObjectPage { entries: out, more }))
    }

    /// Opens the file `rel` as a source pinned to its current ETag, sharing
    /// the tree's client and runtime; the tree's settings (cache included).
    pub fn open_file(&self, rel: &str) -> Result<ObjectSource, ObjectError> {
        self.open_file_sharing(rel, &|_| None)
    }

    /// As [`ObjectTree::open_file`]; `share` may give, for the metadata the
    /// open's HEAD found, the counters the source counts in (shared by the
    /// sources of one version) instead of counters of its own.
    pub fn open_file_sharing(
        &self,
        rel: &str,
        share: &dyn Fn(&SourceMeta) -> Option<Arc<ObjectCounters>>,
    ) -> Result<ObjectSource, ObjectError> {
        let key = self.key_of(rel)?;
        if key == self.prefix {
            return Err(ObjectError::IsPrefix {
                url: self.url.clone(),
                key,
            });
        }
        let rt = self
            .rt
            .clone()
            .expect("the runtime lives as long as the tree");
        ObjectSource::open_sharing(
            self.client.for_key(&key),
            self.cfg.clone(),
            rt,
            self.budget.as_ref(),
            share,
        )
    }
}
