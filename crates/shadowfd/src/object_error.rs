//! What can go wrong with an object source (`source::object`), each case
//! naming the URL and the fix. A leaf, so that `error.rs` can carry it.

use std::io;

/// An object source's failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    #[error("{url}: not an object URL: {why}. Write it as s3://BUCKET/KEY")]
    BadUrl { url: String, why: String },
    #[error("{what}={value:?} is not accepted: {why}")]
    Config {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "{url}: no credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
         AWS_ENDPOINT_URL for a store other than AWS), or AWS_SKIP_SIGNATURE=true for a public \
         bucket"
    )]
    NoCredentials { url: String },
    #[error("{url}: the object store client could not be set up: {detail}")]
    Client { url: String, detail: String },
    #[error(
        "{url}: access denied by {endpoint} ({detail}). Check AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY and AWS_REGION, and that the key may read the bucket"
    )]
    Denied {
        url: String,
        endpoint: String,
        detail: String,
    },
    #[error(
        "{url}: there is no bucket {bucket:?} at {endpoint}. Check the bucket name, or \
         AWS_ENDPOINT_URL if the bucket lives on another store"
    )]
    NoBucket {
        url: String,
        bucket: String,
        endpoint: String,
    },
    #[error(
        "{url}: there is no object {key:?} in bucket {bucket:?} at {endpoint}. Check the key \
         (it is case-sensitive, without a leading '/')"
    )]
    NoKey {
        url: String,
        bucket: String,
        key: String,
        endpoint: String,
    },
    #[error(
        "{url}: the object changed since it was opened (its ETag was {etag}; the store \
         answered {how}); its old bytes are no longer served. Open it again"
    )]
    Changed {
        url: String,
        etag: String,
        how: String,
    },
    #[error(
        "{url}: reading bytes {start}..{end} failed after {attempts} attempts (deadline \
         {deadline_ms} ms each): {detail}. Check that {endpoint} is reachable; raise \
         SHADOWFD_OBJECT_DEADLINE or SHADOWFD_OBJECT_RETRIES for a slow store"
    )]
    Failed {
        url: String,
        endpoint: String,
        start: u64,
        end: u64,
        attempts: u32,
        deadline_ms: u64,
        detail: String,
    },
    #[error(
        "{url}: listing it failed after {attempts} attempts (deadline {deadline_ms} ms \
         each): {detail}. Check that {endpoint} is reachable; raise SHADOWFD_OBJECT_DEADLINE \
         or SHADOWFD_OBJECT_RETRIES for a slow store"
    )]
    ListFailed {
        url: String,
        endpoint: String,
        attempts: u32,
        deadline_ms: u64,
        detail: String,
    },
    #[error("{url}: the object has no ETag, so its version cannot be pinned; it is refused")]
    NoEtag { url: String },
    #[error("{url}: {key:?} is a directory (a prefix), not an object")]
    IsPrefix { url: String, key: String },
}

impl ObjectError {
    /// The `io::Error` a [`crate::Source`] answers with: `NotFound` for a
    /// missing object (the engine's "gone"), `TimedOut` for a spent
    /// deadline, `PermissionDenied` for a refusal, else `Other`.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            ObjectError::NoKey { .. } | ObjectError::NoBucket { .. } => io::ErrorKind::NotFound,
            ObjectError::Denied { .. } | ObjectError::NoCredentials { .. } => {
                io::ErrorKind::PermissionDenied
            }
            ObjectError::Failed { detail, .. } if detail.contains("deadline") => {
                io::ErrorKind::TimedOut
            }
            ObjectError::BadUrl { .. } | ObjectError::Config { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}
