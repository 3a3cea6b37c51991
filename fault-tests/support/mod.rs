//! Helpers shared by the scenarios.

pub mod attack;
pub mod child;
pub mod content;
pub mod inject;
pub mod seccomp;

use shadowfd::{Config, Engine, Mode, Shadow};
use std::time::Duration;

pub use content::{Rng, byte_at, bytes, first_mismatch, write_file};
pub use inject::{Gate, Injected, Plan, bytes_at};

/// The page size as u64.
pub fn page() -> u64 {
    shadowfd::page_size() as u64
}

/// A lazy configuration independent of `SHADOWFD_*` in the environment.
pub fn lazy_config() -> Config {
    {
        let mut c = Config::default();
        c.mode = Mode::Lazy;
        c.workers = 2;
        c
    }
}

pub fn eager_config() -> Config {
    {
        let mut c = Config::default();
        c.mode = Mode::Eager;
        c
    }
}

/// Whether lazy shadows work here. If not, says so on stderr (the caller
/// then skips): the only reason this suite skips anything.
pub fn lazy_available(test: &str) -> bool {
    let p = shadowfd::probe();
    if !p.lazy_usable {
        eprintln!(
            "SKIPPED {test}: lazy shadows need userfaultfd with MISSING_SHMEM, MINOR_SHMEM and POISON, \
             which this kernel does not offer: {}",
            p.reason.as_deref().unwrap_or_default()
        );
        // CI sets this: there, a kernel without lazy shadows is a failure,
        // not a reason to skip.
        assert!(
            std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_none_or(|v| v != "1"),
            "SHADOWFD_REQUIRE_LAZY=1 and lazy shadows are unavailable: {:?}",
            p.reason
        );
    }
    p.lazy_usable
}

/// An engine for `cfg` (lazy mode), or `None` (with a notice) where the
/// kernel lacks userfaultfd.
pub fn lazy_engine(test: &str, cfg: Config) -> Option<Engine> {
    if !lazy_available(test) {
        return None;
    }
    let e = Engine::new(cfg).expect("lazy engine");
    assert_eq!(e.mode(), Mode::Lazy);
    Some(e)
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs `f` on its own thread; fails the test if it does not finish within
/// `secs` (a deadlock), and re-raises its panic if it panicked.
pub fn with_timeout<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let h = std::thread::Builder::new()
        .name(format!("timeout:{what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sender dropped without sending"),
        },
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {secs} s (deadlock or lost wake-up?)")
        }
    }
}

/// Reads all of `shadow` through `read_at` (filling it) and compares with
/// content `id`.
pub fn assert_shadow_is(shadow: &Shadow, id: u64, what: &str) {
    let mut buf = vec![0u8; shadow.size() as usize];
    let n = shadow.read_at(&mut buf, 0).expect("read_at whole shadow");
    assert_eq!(n as u64, shadow.size(), "{what}: short read_at");
    if let Some(at) = first_mismatch(id, 0, &buf) {
        panic!("{what}: byte {at} differs from the source");
    }
}

/// Compares a mapping range with content `id`.
pub fn assert_bytes(got: &[u8], id: u64, off: u64, what: &str) {
    if let Some(at) = first_mismatch(id, off, got) {
        panic!(
            "{what}: byte {at} is {:#04x}, the source has {:#04x}",
            got[(at - off) as usize],
            byte_at(id, at)
        );
    }
}

/// Names of this process's threads that belong to a fault service.
pub fn service_threads() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for t in rd.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("comm")) {
                let c = c.trim().to_string();
                if c.starts_with("shadowfd-") {
                    v.push(c);
                }
            }
        }
    }
    v.sort();
    v
}

/// `Rss` in bytes of the mapping that starts at `addr`, from /proc/self/smaps.
pub fn smaps_rss(addr: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') {
            // A header: "start-end perms offset dev inode path".
            if let Some((a, _)) = first.split_once('-') {
                inside = usize::from_str_radix(a, 16) == Ok(addr);
            }
            continue;
        }
        if inside {
            if let Some(rest) = line.strip_prefix("Rss:") {
                let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
                return Some(kb * 1024);
            }
        }
    }
    None
}

/// The `shadowfd` CLI, with no `SHADOWFD_*` variable inherited.
pub fn cli(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_shadowfd"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SHADOWFD_") {
            c.env_remove(k);
        }
    }
    c.args(args);
    c
}

/// Runs a command with a 60 s limit.
pub fn run(cmd: std::process::Command) -> child::Outcome {
    let o = child::run(cmd, Duration::from_secs(60));
    assert!(!o.timed_out, "command timed out\n{}", o.describe());
    o
}

/// Runs a test body with a time bound (2 minutes): a regression that leaves
/// a consumer blocked in a fault fails the test instead of hanging the run.
pub fn bounded(what: &str, body: impl FnOnce() + Send + 'static) {
    with_timeout(120, what, body)
}
