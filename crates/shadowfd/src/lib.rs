//! # shadowfd
//!
//! Host-mmappable copies ("shadows") of files the host kernel cannot map
//! itself, filled lazily through `userfaultfd(2)` or eagerly into a sealed
//! memfd where userfaultfd is unavailable.
//!
//! ```no_run
//! use shadowfd::{Config, Engine, Share};
//! let engine = Engine::new(Config::from_env()?)?;
//! let shadow = engine.open_path("/usr/lib/x86_64-linux-gnu/libc.so.6")?;
//! let map = shadow.map(Share::Private)?;
//! assert_eq!(&map[..4], b"\x7fELF");
//! # Ok::<(), shadowfd::Error>(())
//! ```
//!
//! Layout: [`source`] (where bytes come from), [`shadow`] (the shadow object
//! and its mappings), `eager` (the copy-at-open path), `fault` (the
//! userfaultfd fault service), [`config`], [`uffd`] (the kernel interface).

pub mod config;
mod eager;
mod engine;
mod error;
mod fault;
mod harden;
pub mod remote;
pub mod shadow;
pub mod source;
mod stats;
pub mod uffd;

pub use config::{Config, Mode, StalePolicy};
pub use engine::Engine;
pub use error::{Error, Result};
pub use harden::harden_process;
pub use remote::RemoteMapping;
pub use shadow::{Mapping, Served, Shadow, Share, Staleness};
pub use source::{FileSource, Source, SourceMeta};
pub use stats::Stats;

/// The system page size.
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize })
}
