//! The S3 client: `object_store`'s Amazon S3 store, with our own deadline
//! per request and bounded retries with backoff, so that every failure is
//! counted and no wait is unbounded. `object_store` retries nothing itself.

use super::stats::ObjectCounters;
use super::url::{ObjectConfig, ObjectUrl};
use crate::object_error::ObjectError;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientConfigKey, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use std::sync::Arc;
use std::time::Instant;

/// What the open's HEAD found: the version every read is pinned to.
#[derive(Debug, Clone)]
pub struct Head {
    pub size: u64,
    pub etag: String,
    /// Seconds and nanoseconds since the epoch.
    pub last_modified: (i64, i64),
}

/// One bucket's store, and the key read. Shared by the tasks that fetch;
/// holds no runtime (tasks may drop it on a runtime thread).
pub(super) struct Client {
    store: AmazonS3,
    path: ObjPath,
    pub url: ObjectUrl,
    pub endpoint: String,
    pub cfg: ObjectConfig,
    pub counters: Arc<ObjectCounters>,
}

/// Whether credentials, or an explicit way to find them, are in the
/// environment. Without them `object_store` would ask the cloud instance
/// metadata service, an address outside this machine: refused instead.
fn credentials_given() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let truthy = |k: &str| {
        std::env::var(k).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"))
    };
    set("AWS_ACCESS_KEY_ID")
        || truthy("AWS_SKIP_SIGNATURE")
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        || set("AWS_METADATA_ENDPOINT")
}

/// The HTTP status a failure carries in its text, where the store's
/// client gives no typed error for it (listings).
fn status_of(e: &object_store::Error) -> Option<u16> {
    let t = chain(e);
    let at = t.find("status code: ")? + "status code: ".len();
    t.get(at..at + 3)?.parse().ok()
}

/// Whether a failure may pass if tried again: anything but an answer that
/// will not change (missing, refused, precondition failed, another 4xx
/// but a timeout or too many requests).
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    if let Some(s) = status_of(e) {
        if (400..500).contains(&s) && s != 408 && s != 429 {
            return false;
        }
    }
    !matches!(
        e,
        E::NotFound { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
    )
}

/// The store's path for `key`: parsed, or taken as it is where it does not
/// parse (keys with characters the store's paths escape).
fn obj_path(key: &str) -> ObjPath {
    ObjPath::parse(key).unwrap_or_else(|_| ObjPath::from(key))
}

/// The error's text with its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Client {
    /// A client for `url`, configured from the standard AWS variables.
    pub fn new(url: &ObjectUrl, cfg: &ObjectConfig) -> Result<Client, ObjectError> {
        let u = url.to_string();
        if cfg.credentials.is_none() && !credentials_given() {
            return Err(ObjectError::NoCredentials { url: u });
        }
        let mut b = AmazonS3Builder::from_env();
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some((id, secret)) = &cfg.credentials {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let b = b
            .with_bucket_name(&url.bucket)
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: cfg.deadline,
                ..RetryConfig::default()
            })
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", cfg.deadline.as_millis()),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", cfg.deadline.as_millis().min(5000)),
            );
        let endpoint = b
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .unwrap_or_else(|| {
                let region = b
                    .get_config_value(&AmazonS3ConfigKey::Region)
                    .unwrap_or_else(|| "us-east-1".into());
                format!("https://s3.{region}.amazonaws.com")
            });
        // Plain http and no proxy: no TLS, so the system's trust store is
        // not loaded (reading and parsing it took a few milliseconds of
        // every open, 147 files here).
        let proxy = b.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::ProxyUrl));
        let b = match endpoint.starts_with("http://") && proxy.is_none() {
            true => b.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::NoSystemCertificates),
                "true",
            ),
            false => b,
        };
        let store = b.build().map_err(|e| ObjectError::Client {
            url: u.clone(),
            detail: chain(&e),
        })?;
        let path = obj_path(&url.key);
        Ok(Client {
            store,
            path,
            url: url.clone(),
            endpoint,
            cfg: cfg.clone(),
            counters: Arc::new(ObjectCounters::default()),
        })
    }

    fn url_s(&self) -> String {
        self.url.to_string()
    }

    /// A client of the same store for another key of the bucket, with its
    /// own counters.
    pub fn for_key(&self, key: &str) -> Client {
        let url = ObjectUrl {
            bucket: self.url.bucket.clone(),
            key: key.to_string(),
        };
        Client {
            store: self.store.clone(),
            path: obj_path(key),
            url,
            endpoint: self.endpoint.clone(),
            cfg: self.cfg.clone(),
            counters: Arc::new(ObjectCounters::default()),
        }
    }

    /// One listing of the "directory" `prefix` (no trailing slash; empty:
    /// the bucket's top) with `/` as the delimiter, retried like a HEAD:
    /// the objects directly in it and the prefixes below it.
    pub async fn list_dir(&self, prefix: &str) -> Result<object_store::ListResult, ObjectError> {
        let p = (!prefix.is_empty()).then(|| obj_path(prefix));
        self.with_retries(None::<fn(&object_store::ListResult) -> u64>, || {
            self.store.list_with_delimiter(p.as_ref())
        })
        .await
        .map_err(|f| self.list_failed(f))
    }

    /// One page of the "directory" `prefix` (no trailing slash; empty:
    /// the bucket's top), `/` as the delimiter, at most `max` items (objects
    /// and common prefixes) with keys after `after` (ListObjectsV2
    /// `start-after`), retried like a HEAD. The listing, and whether the
    /// store has more after it.
    pub async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<(object_store::ListResult, bool), ObjectError> {
        use object_store::list::{PaginatedListOptions, PaginatedListStore};
        let p = (!prefix.is_empty()).then(|| format!("{prefix}/"));
        let r = self
            .with_retries(
                None::<fn(&object_store::list::PaginatedListResult) -> u64>,
                || {
                    self.store.list_paginated(
                        p.as_deref(),
                        PaginatedListOptions {
                            offset: after.map(str::to_string),
                            delimiter: Some("/".into()),
                            max_keys: Some(max),
                            ..PaginatedListOptions::default()
                        },
                    )
                },
            )
            .await
            .map_err(|f| self.list_failed(f))?;
        Ok((r.result, r.page_token.is_some()))
    }

    /// A HEAD of `key` of the bucket; `None` if there is no such object.
    pub async fn head_of(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        self.head_at(&obj_path(key)).await
    }

    /// A HEAD of `p`, retried on transient failures; `None` if there is no
    /// such object.
    async fn head_at(&self, p: &ObjPath) -> Result<Option<ObjectMeta>, ObjectError> {
        match self
            .with_retries(None::<fn(&ObjectMeta) -> u64>, || self.store.head(p))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(Fail::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(f) => Err(self.explain(f, 0, 0)),
        }
    }

    /// One HEAD (retried on transient failures): size, ETag, last-modified.
    /// A missing object is told apart from a missing bucket with one
    /// listing, so the error names which.
    pub async fn head(&self) -> Result<Head, ObjectError> {
        let Some(meta) = self.head_at(&self.path).await? else {
            return Err(self.why_missing().await);
        };
        let etag = meta
            .e_tag
            .clone()
            .ok_or(ObjectError::NoEtag { url: self.url_s() })?;
        Ok(Head {
            size: meta.size,
            etag,
            last_modified: (
                meta.last_modified.timestamp(),
                meta.last_modified.timestamp_subsec_nanos() as i64,
            ),
        })
    }

    /// After a HEAD found nothing: is it the bucket, the key, or a prefix?
    async fn why_missing(&self) -> ObjectError {
        let prefix = ObjPath::from(self.url.key.as_str());
        let listed = tokio::time::timeout(
            self.cfg.deadline,
            self.store.list_with_delimiter(Some(&prefix)),
        )
        .await;
        match listed {
            Ok(Ok(l)) if !l.objects.is_empty() || !l.common_prefixes.is_empty() => {
                ObjectError::IsPrefix {
                    url: self.url_s(),
                    key: self.url.key.clone(),
                }
            }
            Ok(Ok(_)) => ObjectError::NoKey {
                url: self.url_s(),
                bucket: self.url.bucket.clone(),
                key: self.url.key.clone(),
                endpoint: self.endpoint.clone(),
            },
            Ok(Err(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            )) => ObjectError::Denied {
                url: self.url_s(),
                endpoint: self.endpoint.clone(),
                detail: chain(&e),
            },
            _ => ObjectError::NoBucket {
                url: self.url_s(),
                bucket: self.url.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
        }
    }

    /// Bytes `start..end` of the version `etag`, with `If-Match`, cut into
    /// pieces of `block` bytes (the last one shorter): each piece is its
    /// own buffer, filled straight from the body as it arrives (one copy
    /// of every byte, no buffer of the whole answer). A `412`, or an answer
    /// from another version, is [`ObjectError::Changed`].
    pub async fn fetch(
        &self,
        start: u64,
        end: u64,
        block: u64,
        etag: &str,
    ) -> Result<Vec<Vec<u8>>, ObjectError> {
        let want = end - start;
        let got = self
            .with_retries(Some(|b: &Body| b.received), || async {
                let opts = GetOptions {
                    if_match: Some(etag.to_string()),
                    range: Some(GetRange::Bounded(start..end)),
                    ..GetOptions::default()
                };
                let r = self.store.get_opts(&self.path, opts).await?;
                let theirs = r.meta.e_tag.clone();
                if theirs.as_deref().is_some_and(|t| t != etag) {
                    // Another version: its body is never read.
                    return Ok(Body {
                        blocks: Vec::new(),
                        received: 0,
                        theirs,
                    });
                }
                Body::read(r.into_stream(), want, block, theirs).await
            })
            .await;
        match got {
            Ok(body) => {
                if body.theirs.as_deref().is_some_and(|t| t != etag) {
                    let t = body.theirs.unwrap_or_default();
                    return Err(self.changed(etag, format!("ETag {t}")));
                }
                if body.received != want {
                    // A 200 with the whole object (the range ignored) or a
                    // short body: never served as these bytes.
                    let e = ObjectError::Failed {
                        url: self.url_s(),
                        endpoint: self.endpoint.clone(),
                        start,
                        end,
                        attempts: 1,
                        deadline_ms: self.cfg.deadline.as_millis() as u64,
                        detail: format!("the store sent {} bytes", body.received),
                    };
                    self.counters.failed(e.to_string());
                    return Err(e);
                }
                Ok(body.blocks)
            }
            Err(Fail::Store(object_store::Error::Precondition { .. })) => {
                Err(self.changed(etag, "412 Precondition Failed".into()))
            }
            Err(Fail::Store(object_store::Error::NotFound { .. })) => {
                Err(self.changed(etag, "404: the object is gone".into()))
            }
            Err(f) => {
                let e = self.explain(f, start, end);
                self.counters.failed(e.to_string());
                Err(e)
            }
        }
    }

    fn changed(&self, etag: &str, how: String) -> ObjectError {
        let e = ObjectError::Changed {
            url: self.url_s(),
            etag: etag.to_string(),
            how,
        };
        self.counters.failed(e.to_string());
        e
    }

    /// A listing that failed: refused (401, 403), no bucket (404), or
    /// failed for good after its retries.
    fn list_failed(&self, f: Fail) -> ObjectError {
        if let Fail::Store(e) = &f {
            match status_of(e) {
                Some(401 | 403) => {
                    return ObjectError::Denied {
                        url: self.url_s(),
                        endpoint: self.endpoint.clone(),
                        detail: format!("listing: HTTP {}", status_of(e).unwrap_or(403)),
                    };
                }
                Some(404) => {
                    return ObjectError::NoBucket {
                        url: self.url_s(),
                        bucket: self.url.bucket.clone(),
                        endpoint: self.endpoint.clone(),
                    };
                }
                _ => {}
            }
        }
        match self.explain(f, 0, 0) {
            ObjectError::Failed {
                url,
                endpoint,
                attempts,
                deadline_ms,
                detail,
                ..
            } => ObjectError::ListFailed {
                url,
                endpoint,
                attempts,
                deadline_ms,
                detail,
            },
            e => e,
        }
    }

    fn explain(&self, f: Fail, start: u64, end: u64) -> ObjectError {
        let detail = match f {
            Fail::Store(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => {
                return ObjectError::Denied {
                    url: self.url_s(),
                    endpoint: self.endpoint.clone(),
                    detail: chain(&e),
                };
            }
            Fail::Store(e) => chain(&e),
            Fail::Deadline => format!(
                "no complete answer within the deadline of {} ms",
                self.cfg.deadline.as_millis()
            ),
        };
        ObjectError::Failed {
            url: self.url_s(),
            endpoint: self.endpoint.clone(),
            start,
            end,
            attempts: self.cfg.retries + 1,
            deadline_ms: self.cfg.deadline.as_millis() as u64,
            detail,
        }
    }

    /// Runs `op` with the deadline, retrying transient failures with
    /// backoff. A GET (`len` given: its answer's size) counts its requests,
    /// retries, bytes and latency; a HEAD counts nothing.
    async fn with_retries<T, L, F, Fut>(&self, len: Option<L>, op: F) -> Result<T, Fail>
    where
        L: Fn(&T) -> u64,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let c = &self.counters;
        let get = len.is_some();
        let mut last = Fail::Deadline;
        for attempt in 0..=self.cfg.retries {
            if attempt > 0 {
                if get {
                    ObjectCounters::add(&c.retries, 1);
                }
                tokio::time::sleep(self.cfg.backoff_for(attempt)).await;
            }
            if get {
                ObjectCounters::add(&c.requests, 1);
            }
            let t = Instant::now();
            match tokio::time::timeout(self.cfg.deadline, op()).await {
                Ok(Ok(v)) => {
                    if let Some(len) = &len {
                        ObjectCounters::add(&c.bytes_fetched, len(&v));
                        c.latency(t.elapsed().as_micros() as u64);
                    }
                    return Ok(v);
                }
                Ok(Err(e)) if !transient(&e) => return Err(Fail::Store(e)),
                Ok(Err(e)) => last = Fail::Store(e),
                Err(_) => last = Fail::Deadline,
            }
        }
        Err(last)
    }
}

/// One GET's answer, cut into blocks.
struct Body {
    blocks: Vec<Vec<u8>>,
    /// Body bytes received (more than asked for when the store ignored the
    /// range: those are counted, not kept).
    received: u64,
    /// The answer's ETag.
    theirs: Option<String>,
}

impl Body {
    /// Reads `stream` (`want` bytes expected) into buffers of `block`
    /// bytes each, allocated as the bytes arrive.
    async fn read<S, B>(
        mut stream: S,
        want: u64,
        block: u64,
        theirs: Option<String>,
    ) -> object_store::Result<Body>
    where
        S: futures_util::Stream<Item = object_store::Result<B>> + Unpin,
        B: AsRef<[u8]>,
    {
        use futures_util::StreamExt;
        let block = block as usize;
        let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(want.div_ceil(block as u64) as usize);
        let mut left = want as usize;
        let mut received = 0u64;
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            received += piece.as_ref().len() as u64;
            let mut p: &[u8] = piece.as_ref();
            while !p.is_empty() && left > 0 {
                if blocks.last().is_none_or(|b| b.len() == block) {
                    blocks.push(Vec::with_capacity(block.min(left)));
                }
                let Some(cur) = blocks.last_mut() else { break };
                let n = (block - cur.len()).min(p.len()).min(left);
                cur.extend_from_slice(&p[..n]);
                p = &p[n..];
                left -= n;
            }
        }
        Ok(Body {
            blocks,
            received,
            theirs,
        })
    }
}

/// Why an attempt (the last one) failed.
enum Fail {
    Store(object_store::Error),
    Deadline,
}

impl From<object_store::Error> for Fail {
    fn from(e: object_store::Error) -> Fail {
        Fail::Store(e)
    }
}
