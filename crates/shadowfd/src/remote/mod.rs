//! Consumers in other processes: a server that serves many client
//! processes from one engine, and the client side.
//!
//! A sandbox usually maps shadows in a *guest* process, not in the process
//! that holds the engine. The client connects over a Unix socket and says
//! first which protocol it speaks (version 4, docs/protocol.md), sending its
//! own userfaultfd if it has one. It OPENs files by path and MAPs them: a
//! lazy mapping is the shadow's memfd mapped `PROT_NONE`, registered with
//! the client's userfaultfd for MISSING and MINOR faults and ATTACHed; the
//! server serves its faults through that userfaultfd, acting on the
//! client's memory. A client without a userfaultfd gets a sealed descriptor
//! instead (the eager fallback, within the server's size cap), and any
//! client can FILL a range for `read()`-style use.
//!
//! A consumer that abuses the descriptor (maps it unregistered, `read`s it,
//! reopens it and `fallocate`s it) spoils only its own view: every
//! registered range faults on every page it has not been given by the
//! server, and the server overwrites planted pages before it maps them
//! (docs/security.md).
//!
//! - [`Server`]: the engine side of many clients (`shadowfd serve`).
//! - [`Client`], [`RemoteFile`], [`RemoteMapping`]: the client side.
//! - [`serve`] and [`RemoteMapping::receive`]: one shadow, one client, over
//!   a connected pair.

mod client;
mod server;
mod tree;
pub mod wire;

pub use client::{
    Client, ClientOptions, PathInfo, PathKind, RemoteFile, RemoteMapOptions, RemoteMapping,
    SmallAnswer,
};
pub use server::{
    EventLog, LogLimiter, MAX_PENDING, MAX_RANGES, MAX_RANGES_TOTAL, PEER_TIMEOUT, RESERVED_RANGES,
    Served, Server, ServerOptions, SourceHook, Tree, serve,
};
pub use wire::DirEntry;
