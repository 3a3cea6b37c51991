//! The fault service: where a lazy shadow's page faults are served.
//!
//! One userfaultfd per engine. A reader thread ([`service`]) reads fault
//! messages in batches and maps each address to its shadow and chunk; a pool
//! of workers fills chunks from the source with `UFFDIO_COPY` ([`fill`]);
//! sequential access is detected and read ahead ([`readahead`]). Per-shadow
//! state (chunk table, poisoned pages, registered mappings) is in [`lazy`].
//!
//! Rules the code keeps:
//! - No thread of the service ever reads or writes registered memory: source
//!   bytes go into worker-owned heap buffers and reach the shadow only through
//!   `UFFDIO_COPY`.
//! - Every fault message is answered: filled and woken, woken because the
//!   chunk was already filled, or poisoned.
//! - The userfaultfd outlives every registered range: shadows and mappings
//!   hold the service alive, so no page can fall through to zeros.

mod fill;
mod lazy;
mod readahead;
pub(crate) mod remote;
mod service;

pub(crate) use lazy::{LazyShadow, Registration, register_readable};
pub(crate) use service::Service;
