//! Consumers in other processes.
//!
//! A sandbox usually maps shadows in a *guest* process, not in the process
//! that holds the engine. For an eager or materialized shadow the memfd can
//! simply be passed over a Unix socket. For a lazy one, the consumer process
//! makes its own userfaultfd and sends it first; it then receives the memfd,
//! maps it `PROT_NONE`, registers the mapping for MISSING and MINOR faults
//! and says where; the engine serves the consumer's faults through that
//! userfaultfd, acting on the consumer's memory.
//!
//! A consumer that abuses the descriptor (maps it unregistered, `read`s it,
//! reopens it and `fallocate`s it) spoils only its own view: every
//! registered range faults on every page it has not been given by the
//! engine, and the engine overwrites planted pages before it maps them
//! (docs/security.md).
//!
//! Engine side: [`serve`] on one end of a connected `UnixStream`. Consumer
//! side: [`RemoteMapping::receive`] on the other end.

mod client;
mod server;
pub(crate) mod wire;

pub use client::RemoteMapping;
pub use server::{PEER_TIMEOUT, Served, serve};
