//! The fault service: where every page fault of a lazy shadow is served.
//!
//! One userfaultfd per engine, read by a pool of workers ([`service`]),
//! which also read the userfaultfds of other processes handed to them (a
//! `serve` client's: [`Foreign`], `service/foreign.rs`) and of forked
//! children. A
//! worker that reads a fault looks its address up in the region table, which
//! maps each registered range to the [`FaultTarget`] it shows, and hands the
//! fault to that target. The target either answers at once (the chunk is
//! filled: map it; bad: poison it) or claims the chunk and returns
//! [`Work`], which the worker runs itself; further work of the same batch,
//! and readahead, go through queues to the other workers.
//!
//! The service knows shadows only through [`FaultTarget`]; the chunk state
//! table they keep is [`chunks::ChunkTable`].
//!
//! Rules the code keeps:
//! - No thread of the service reads or writes registered memory.
//! - Every fault message is answered: mapped, poisoned, or left to the thread
//!   filling its chunk, which answers every waiter when it is done. A fault
//!   on an address no region covers is poisoned (SIGBUS), never woken into
//!   a retry loop.
//! - The userfaultfd outlives every registered range: shadows and mappings
//!   hold the service alive, so no page can fall through to zeros.

pub(crate) mod buffer;
pub(crate) mod chunks;
mod forkwatch;
mod service;
pub(crate) mod spans;

pub(crate) use service::{Core, Foreign, Inbox, Service, in_service};

use crate::sys::Uffd;
use std::ops::Range;
use std::sync::Arc;

/// An address space the service serves, by the userfaultfd its ranges are
/// registered with: `None` for the engine's own, else a forked child's.
pub(crate) type Space<'a> = Option<&'a Arc<Uffd>>;

/// Why chunks are being filled: decides what the memory budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// A thread is waiting on the first chunk of the run.
    Fault,
    /// Readahead: nobody is waiting; a full budget gives the chunks back.
    Prefetch,
    /// `populate`/`materialize`: the caller asked for these bytes.
    Populate,
    /// A working-set replay step: speculative, as `Prefetch`; the target
    /// says what `chunks` means.
    Replay,
}

/// Chunks of a target to fill. For `Why::Fault` they are claimed already;
/// for `Why::Prefetch` the worker claims whichever are still empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Work {
    pub chunks: Range<u64>,
    pub why: Why,
    /// Where the target may install the chunks straight away, as the target
    /// chose when it claimed them (a faulting consumer range); `None`: the
    /// usual way.
    pub direct: Option<Direct>,
}

/// A place a target named for a fill to go straight into: its own key for
/// a consumer range, and the address there of the run's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Direct {
    pub consumer: u64,
    pub addr: u64,
}

/// A fault as the service hands it to its target.
pub(crate) struct Hit<'a> {
    /// The userfaultfd the faulting range is registered with.
    pub uffd: &'a Uffd,
    /// Page-aligned faulting address.
    pub addr: u64,
    /// Byte offset in the target that `addr` shows.
    pub offset: u64,
    /// Bytes from `addr` to the end of the registered range.
    pub limit: u64,
    /// The range is one of the target's own internal mappings, reached
    /// only by kernel-mediated access (`/proc/PID/mem`, `process_vm_readv`),
    /// not a consumer range that is answered when a fill completes.
    pub internal: bool,
}

/// What the fault service needs of a shadow: answer a fault, run work.
pub(crate) trait FaultTarget: Send + Sync {
    /// Answers `hit`, or claims chunks and returns the work to fill them.
    fn on_fault(&self, core: &Core, hit: Hit<'_>) -> Option<Work>;
    /// Runs `work` (from [`FaultTarget::on_fault`] or queued readahead).
    fn run(&self, core: &Core, work: Work);
    /// Memory of the budget was given back: fills refused for lack of it may
    /// be retried (called on targets that refused one since the last call).
    fn memory_freed(&self, core: &Core);

    // The kernel's mapping events, for the target's own list of consumer
    // ranges (those it answers when a fill completes). `uffd` is the one the
    // ranges are registered with: the engine's, or a forked child's.

    /// `lo..hi` of `uffd`'s address space was unmapped.
    fn on_unmap(&self, _core: &Core, _uffd: Space<'_>, _lo: u64, _hi: u64) {}
    /// `from..from+len` of `uffd`'s address space moved to `to` (the old
    /// place goes with an [`FaultTarget::on_unmap`] unless it was kept).
    fn on_remap(&self, _core: &Core, _uffd: Space<'_>, _from: u64, _to: u64, _len: u64) {}
    /// The address space of `parent` forked: the child's copies of the
    /// consumer ranges of `parent` are registered with `child`, which
    /// lives as long as the target is told nothing else.
    fn on_fork(&self, _core: &Core, _parent: Space<'_>, _child: &Arc<Uffd>) {}
    /// The kernel grew a consumer range: `start..start+len` shows the
    /// target from `offset` too.
    fn on_adopt(
        &self,
        _core: &Core,
        _uffd: Space<'_>,
        _start: u64,
        _len: u64,
        _offset: u64,
        _shared: bool,
    ) {
    }
    /// A range the engine adopted from the kernel's events (`on`: one
    /// more; else one fewer) holds the target: it lives as long as the
    /// kernel maps that range, whoever else lets go.
    fn hold_range(&self, _on: bool) {}
    /// This process is exiting while a forked child still maps
    /// `start..start+len` of `uffd` (the child's), showing the target from
    /// `offset`: the child's userfaultfd closes with this process and the
    /// kernel unregisters the range, whose holes would then read zeros.
    /// Pages the target vouches for are mapped there now, the others
    /// poisoned (`SIGBUS`).
    fn orphan(&self, _core: &Core, uffd: &Uffd, start: u64, len: u64, _offset: u64) {
        let _ = uffd.poison(start, len);
    }
}
