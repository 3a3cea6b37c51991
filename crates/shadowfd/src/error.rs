//! The crate's error type. Every message names the value at fault and, where
//! there is one, the way to fix it.

use std::io;
use std::path::PathBuf;

/// Errors returned by shadowfd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} is not a regular file ({kind}); only regular files can be shadowed")]
    NotRegular { what: String, kind: &'static str },
    #[error(
        "{what} is {size} bytes ({size_h}), over the eager size cap of {cap} bytes ({cap_h}). \
         Raise the cap with `--max-size SIZE` or the SHADOWFD_MAX_SIZE environment variable \
         (e.g. --max-size {suggest}; the cap may not exceed the memory budget, which \
         `--memory-budget` sets), or use a lazy shadow (`--mode lazy`)"
    )]
    TooLarge {
        what: String,
        size: u64,
        size_h: String,
        cap: u64,
        cap_h: String,
        suggest: String,
    },
    #[error("invalid {what} {value:?}: {why}")]
    Config {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("lazy mode is not available here: {0}")]
    LazyUnavailable(String),
    #[error("{what}: reading the source at offset {offset} failed: {source}")]
    SourceRead {
        what: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "{what}: the source ended at offset {at}, before its recorded size of {size} bytes \
         (it shrank or returned a short read); no zeros are served in its place"
    )]
    SourceShort { what: String, at: u64, size: u64 },
    #[error(
        "{what}: the bytes at {offset}..{end} could not be filled ({reason}); a mapping \
         raises SIGBUS there"
    )]
    Unfillable {
        what: String,
        offset: u64,
        end: u64,
        reason: String,
    },
    #[error(
        "{what}: the lazy memory budget of {budget} bytes is used up ({resident} bytes resident). \
         Raise it with `--memory-budget SIZE` or SHADOWFD_MEMORY_BUDGET"
    )]
    Budget {
        what: String,
        budget: u64,
        resident: u64,
    },
    #[error(
        "{what}: this lazy shadow is not materialized; its descriptor would show zeros for \
         unfilled pages. Call `materialize()` first or map it through the engine"
    )]
    NotMaterialized { what: String },
    #[error(
        "{what}: the source changed while it was being copied ({attempts} attempts); \
         retry when it is no longer being written"
    )]
    SourceChanged { what: String, attempts: u32 },
    #[error(
        "the shadow memfd of {what} was tampered with by another process while it was being \
         copied ({how}); the copy is refused. Make this process non-dumpable \
         (shadowfd::harden_process) or run it as a separate uid, so that other processes \
         cannot open it through /proc/PID/fd"
    )]
    Tampered {
        what: String,
        how: String,
        /// Where the first difference was found (the start of the differing
        /// block, or where the memfd ended), when there is one.
        offset: Option<u64>,
    },
    #[error("range {offset}+{len} is outside the shadow of {size} bytes")]
    Range { offset: u64, len: u64, size: u64 },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn sys(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Sys {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
