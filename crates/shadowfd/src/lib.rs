//! # shadowfd
//!
//! Host-mmappable copies ("shadows") of files the host kernel cannot map
//! itself, filled lazily through `userfaultfd(2)` or eagerly into a sealed
//! memfd where userfaultfd is unavailable.
//!
//! ```no_run
//! use shadowfd::{Config, Engine, Share};
//! let engine = Engine::new(Config::from_env()?)?;
//! let shadow = engine.open("/usr/lib/x86_64-linux-gnu/libc.so.6")?;
//! // The whole file, MAP_SHARED:
//! let map = shadow.map(Share::Shared)?;
//! assert_eq!(&map[..4], b"\x7fELF");
//! // One page-aligned range, MAP_PRIVATE, as ld.so maps a segment:
//! let seg = shadow
//!     .map_options()
//!     .offset(4096)
//!     .len(8192)
//!     .share(Share::Private)
//!     .map()?;
//! assert_eq!(&seg[..], &map[4096..4096 + 8192]);
//! # Ok::<(), shadowfd::Error>(())
//! ```
//!
//! Layers, each importing only those below it (docs/design.md; checked by
//! `tests/layering.rs`):
//! 1. leaves: the error type, counters, the protocol's error codes;
//! 2. `sys`: the raw layer (userfaultfd ABI and handle, memfd, mmap,
//!    eventfd/epoll);
//! 3. [`config`] and [`source`] (where bytes come from);
//! 4. `fault`: the fault service (workers, region table, chunk states),
//!    which knows shadows only through a narrow trait;
//! 5. [`shadow`]: eager and lazy shadows and their mappings;
//! 6. the [`Engine`]; 7. [`remote`]: consumers in other processes.

mod codes;
pub mod config;
mod eager;
mod engine;
mod error;
mod fault;
mod file_kind;
mod harden;
#[cfg(feature = "object")]
mod object_error;
pub mod remote;
pub mod shadow;
pub mod source;
mod stats;
mod sys;
pub mod workset;

pub use config::{Config, Mode, StalePolicy, WorksetMode};
pub use engine::{Engine, IntoSource, OpenOptions};
pub use error::{Cause, Connection, Error, Result};
pub use harden::harden_process;
pub use remote::RemoteMapping;
pub use shadow::{MapOptions, Mappable, Mapping, Registration, Shadow, Share, Staleness};
pub use source::{FileSource, Mapped, Source, SourceIdentity, SourceMeta};
pub use stats::Stats;
pub use sys::{Access, Advice, Attempt, Probe, UncheckedAdvice, feature_names, probe};

/// The system page size.
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize })
}
