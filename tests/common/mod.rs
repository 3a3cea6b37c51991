//! Helpers shared by the integration tests: real files with known contents.
#![allow(dead_code)]

use shadowfd::{Config, Engine, Mode};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Deterministic bytes with no zero byte, so a page read as zeros never
/// passes for data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 255) as u8 + 1
        })
        .collect()
}

/// Writes `data` to a new file `name` in `dir`.
pub fn file_with(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    p
}

/// A configuration for tests: `mode`, defaults otherwise, no environment.
pub fn config(mode: Mode) -> Config {
    {
        let mut c = Config::default();
        c.mode = mode;
        c
    }
}

pub fn engine(mode: Mode) -> Engine {
    Engine::new(config(mode)).expect("engine")
}

/// Whether this kernel lets us use lazy shadows; tests that need them skip
/// (with a message) where it does not.
pub fn lazy_available() -> bool {
    let p = shadowfd::probe();
    if !p.lazy_usable {
        eprintln!(
            "SKIP: lazy shadows unavailable on this kernel: {}",
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

/// First differing offset of two slices, for assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
