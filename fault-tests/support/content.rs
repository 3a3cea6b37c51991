//! Test data: reproducible file contents with no zero byte, seeds, and a
//! small seeded generator.
//!
//! Every byte of a generated file is non-zero, so a zero read through a
//! shadow is always a defect (a page served from nothing), never data.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// splitmix64 finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The byte at `off` of the file with content id `id`; never zero.
pub fn byte_at(id: u64, off: u64) -> u8 {
    let h = mix(id.wrapping_mul(0xA24B_AED4_963E_E407) ^ (off >> 3));
    let b = (h >> ((off & 7) * 8)) as u8;
    if b == 0 { 0x5A } else { b }
}

/// Fills `buf` with the bytes of content `id` starting at `off`.
pub fn fill(id: u64, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(id, off + i as u64);
    }
}

/// The bytes of content `id` in `off..off+len`.
pub fn bytes(id: u64, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(id, off, &mut v);
    v
}

/// The first offset (absolute) where `got` differs from content `id` at `off`.
pub fn first_mismatch(id: u64, off: u64, got: &[u8]) -> Option<u64> {
    got.iter()
        .enumerate()
        .find(|&(i, &b)| b != byte_at(id, off + i as u64))
        .map(|(i, _)| off + i as u64)
}

/// Writes a file of `size` bytes of content `id` at `dir/name`.
pub fn write_file(dir: &Path, name: &str, id: u64, size: u64) -> PathBuf {
    let path = dir.join(name);
    let mut f = File::create(&path).expect("create test file");
    let mut off = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill(id, off, &mut buf[..n]);
        f.write_all(&buf[..n]).expect("write test file");
        off += n as u64;
    }
    f.sync_all().ok();
    path
}

/// Overwrites `off..off+len` of `path` with content `id` (same offsets), and
/// moves the mtime a few seconds past the old one so the change is visible
/// in the metadata even within one timestamp tick of the file's creation.
pub fn rewrite(path: &Path, id: u64, off: u64, len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open test file for writing");
    let old = f.metadata().expect("stat").modified().expect("mtime");
    f.write_all_at(&bytes(id, off, len), off)
        .expect("rewrite test file");
    f.set_modified(old + std::time::Duration::from_secs(7))
        .expect("set mtime");
}

/// The suite's base seed: `FAULT_SEED` if set (decimal or 0x-hex), else a
/// fixed default, so every run is reproducible.
pub fn base_seed() -> u64 {
    match std::env::var("FAULT_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|_| panic!("FAULT_SEED={s:?} is not a number"))
        }
        Err(_) => 0x005E_ED0F_FA17,
    }
}

/// A seed for one test: the base seed mixed with the test's name.
pub fn seed_for(test: &str) -> u64 {
    test.bytes().fold(base_seed(), |h, b| mix(h ^ u64::from(b)))
}

/// A small seeded generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}
