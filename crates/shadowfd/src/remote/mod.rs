//! Consumers in other processes.
//!
//! A sandbox usually maps shadows in a *guest* process, not in the process
//! that holds the engine. For an eager or materialized shadow the memfd can
//! simply be passed over a Unix socket. A lazy one cannot: any unregistered
//! touch of it would read zeros (docs/shadows.md). So the consumer process
//! makes its own userfaultfd, registers its mapping with it, and passes that
//! userfaultfd back over the socket (`SCM_RIGHTS`); the engine then serves
//! the consumer's faults through it, acting on the consumer's memory.
//!
//! Server side: [`crate::Shadow::serve`] on one end of a connected
//! `UnixStream`. Consumer side: [`RemoteMapping::receive`] on the other end.
//!
//! The protocol trusts the consumer to use this module: a process that maps
//! the received memfd without registering it would read zeros, and leave zero
//! pages behind for everyone.

mod client;
pub(crate) mod wire;

pub use client::RemoteMapping;
