//! The crate's error type. Every message names the value at fault and, where
//! there is one, the way to fix it. A leaf: it imports only the leaf modules
//! `codes` and `file_kind`, and formatting an error does no I/O.

use std::io;
use std::path::PathBuf;

/// Errors returned by shadowfd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} is not a regular file ({}); only regular files can be shadowed", kind.as_str())]
    NotRegular {
        what: String,
        kind: crate::file_kind::FileKind,
    },
    #[error(
        "{what} is {size} bytes ({size_h}), over the eager size cap of {cap} bytes ({cap_h}). \
         Raise the cap with `--max-size SIZE` or the SHADOWFD_MAX_SIZE environment variable \
         (e.g. --max-size {suggest}; the cap may not exceed the memory budget, which \
         `--memory-budget` sets){}",
        lazy_hint(*lazy_possible)
    )]
    TooLarge {
        what: String,
        size: u64,
        size_h: String,
        cap: u64,
        cap_h: String,
        suggest: String,
        /// Whether a lazy shadow can be made in this process (the
        /// userfaultfd probe, run when the error was built): the message
        /// suggests `--mode lazy` only then.
        lazy_possible: bool,
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
        "{what}: the bytes at {offset}..{end} could not be filled ({cause}); a mapping \
         raises SIGBUS there"
    )]
    Unfillable {
        what: String,
        offset: u64,
        end: u64,
        cause: Cause,
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
    #[error(
        "{what} {value:#x} is not a multiple of the page size ({page} bytes); \
         round it down to a page boundary"
    )]
    Align {
        what: &'static str,
        value: u64,
        page: u64,
    },
    #[error("shadowfd remote protocol: {what}")]
    Protocol { what: String },
    /// The connection to a server broke: it hung up, or did not answer in
    /// time ([`Error::connection`] gives which).
    #[error("shadowfd remote protocol: {what}")]
    Connection { what: String, why: Connection },
    /// A server answered a request with ERROR. `code` is the protocol's
    /// error code (`shadowfd::remote::wire::E_*`, docs/protocol.md);
    /// [`Error::refusal_code`] gives it for any error.
    #[error(
        "shadowfd remote protocol: the server refused {request}: {} ({code}): {message}",
        crate::codes::code_name(*code)
    )]
    Refused {
        /// The request, as the client names it (`OPEN "a/b"`).
        request: String,
        code: u64,
        /// The server's message.
        message: String,
    },
    /// An object source could not be opened (`s3://…`): the message names
    /// the URL and the fix.
    #[cfg(feature = "object")]
    #[error(transparent)]
    Object(#[from] crate::object_error::ObjectError),
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// How a connection to a server broke ([`Error::Connection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Connection {
    /// The server closed the connection (it stopped, or dropped this
    /// client).
    Closed,
    /// The server did not answer within the client's timeout; the client
    /// closed the connection.
    TimedOut,
}

/// Why a page of a lazy shadow could not be filled: the cause in
/// [`Error::Unfillable`] and [`crate::Shadow::poisoned_pages`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Cause {
    /// The source's read failed at `offset`.
    #[error("source read error at offset {offset}: {message}")]
    SourceRead {
        offset: u64,
        /// The OS error number, when the source gave one.
        errno: Option<i32>,
        message: String,
    },
    /// The source ended at `offset`, before its recorded `size`.
    #[error(
        "the source ended before offset {offset} (recorded size {size}): it shrank or read short"
    )]
    SourceShort { offset: u64, size: u64 },
    /// The source panicked while reading.
    #[error("source read error: the source panicked while reading")]
    SourcePanicked,
    /// The source changed under `--stale strict`: since open, or during the
    /// fill itself.
    #[error(
        "the source changed {} (stale policy strict)",
        if *during_fill { "during the fill" } else { "since open" }
    )]
    SourceChanged { during_fill: bool },
    /// The lazy memory budget had no room for the `needed` bytes.
    #[error(
        "the lazy memory budget of {budget} bytes is used up ({resident} bytes resident, \
         {needed} more needed). Raise it with `--memory-budget SIZE` or \
         SHADOWFD_MEMORY_BUDGET"
    )]
    Budget {
        budget: u64,
        resident: u64,
        needed: u64,
    },
    /// The machine (`MemAvailable`, or the memory cgroup's limit) had only
    /// `room` bytes left, under the `margin` fills keep free.
    #[error(
        "the machine is low on memory: {room} bytes left (MemAvailable or the memory \
         cgroup's limit), under the {margin}-byte margin shadowfd keeps free; free memory \
         or lower `--memory-budget`"
    )]
    LowMemory { room: u64, margin: u64 },
    /// The fill itself panicked (a bug in shadowfd, reported and contained).
    #[error("the fill panicked (a bug in shadowfd; the engine goes on)")]
    FillPanicked,
    /// The memfd's pages could not be allocated.
    #[error("allocating the shadow's memory failed: {message}")]
    Allocate { errno: Option<i32>, message: String },
}

/// The end of the over-cap message: suggest a lazy shadow only where one
/// can be made (decided when the error was built: formatting does no I/O).
fn lazy_hint(lazy_possible: bool) -> &'static str {
    if lazy_possible {
        ", or use a lazy shadow (`--mode lazy`)"
    } else {
        ". A lazy shadow (`--mode lazy`) is not possible here: userfaultfd is unavailable \
         (`shadowfd probe` says why)"
    }
}

impl Error {
    /// How the connection to a server broke ([`Error::Connection`]), or
    /// `None` for any other error. Map this, never the message text.
    pub fn connection(&self) -> Option<Connection> {
        match self {
            Error::Connection { why, .. } => Some(*why),
            _ => None,
        }
    }

    /// The protocol error code a server answered with ([`Error::Refused`]),
    /// or `None` for any other error. Map this, never the message text
    /// (which holds the path, and so any code's name).
    pub fn refusal_code(&self) -> Option<u64> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn sys(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Sys {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
