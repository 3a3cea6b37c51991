//! The fault-injection suite: every scenario injects a fault into a real
//! source, a real userfaultfd service or a real kernel restriction, and
//! asserts the exact outcome. See fault-tests/README.md for the table of
//! scenarios and the promise each one proves.

mod support;

mod attack_eager;
mod attack_lazy;
mod bad_config;
mod budget;
mod consumers;
mod eio;
mod hostile;
mod huge;
mod inflight;
mod lifetime;
mod panic_source;
mod remote;
mod restricted;
mod serve;
mod short;
mod slow;
mod stale;
mod stress;
mod workset;
