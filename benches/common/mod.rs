//! Helpers shared by the criterion benches: data files and engines.

#![allow(dead_code)]

use shadowfd::{Config, Engine, Mode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// Short measurements so that `cargo bench` takes minutes, not hours.
pub fn quick() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

/// Writes `size` bytes of seeded pseudo-random data to `dir/name`, syncs it
/// and reads it back once, so that it is warm in the page cache.
pub fn data_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).expect("create bench data");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ size;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        f.write_all(&buf[..n]).expect("write bench data");
        left -= n as u64;
    }
    f.sync_all().expect("sync bench data");
    let _ = std::fs::read(&path).expect("warm bench data");
    path
}

/// An engine of `mode` with the given chunk size and readahead; the eager
/// cap is raised to `max_size`.
pub fn engine(mode: Mode, chunk: u64, readahead: u64, max_size: u64) -> Engine {
    let mut c = Config::default();
    c.mode = mode;
    c.chunk_size = chunk;
    c.readahead = readahead;
    c.max_size = c.max_size.max(max_size).min(c.memory_budget);
    Engine::new(c).expect("engine")
}

/// A seeded permutation of `0..n`.
pub fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}
