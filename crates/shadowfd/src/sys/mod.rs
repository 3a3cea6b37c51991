//! The raw layer: thin, typed handles over the kernel interfaces the crate
//! uses, and nothing else. Nothing here knows about shadows or sources.
//!
//! - [`uffd_abi`]: the userfaultfd ABI (structs, constants, ioctls), checked
//!   against the kernel's `linux/userfaultfd.h` by size assertions and tests;
//! - [`uffd`]: an API-negotiated userfaultfd handle ([`Uffd`]) and its typed
//!   operations; [`probe`]: what this kernel and process allow;
//! - [`memfd`]: a sealable memfd; [`mmap`]: owned mappings and typed advice;
//! - [`event`]: eventfd and epoll, for the fault service's sleeping workers;
//!   [`sched`]: where a woken faulting thread runs; [`clock`]: the fault
//!   path's per-thread clock reading.

pub(crate) mod clock;
pub(crate) mod event;
pub(crate) mod maps;
pub(crate) mod memfd;
pub(crate) mod mmap;
pub(crate) mod probe;
pub(crate) mod sched;
pub(crate) mod uffd;
pub(crate) mod uffd_abi;

pub use mmap::{Advice, UncheckedAdvice};
pub use probe::{Access, Attempt, Probe, feature_names, probe};
pub(crate) use uffd::{Event, Fault, Uffd};
