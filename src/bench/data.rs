//! The benchmark's own data: a private work directory and a file of seeded
//! random bytes in it, written, synced and read once so that it is warm in
//! the host page cache before the first run.

use crate::access::Rng;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Prefix of the work directories `bench` creates (and of nothing else).
pub const PREFIX: &str = "shadowfd-bench-";

/// A directory under the temp root, removed with everything in it on drop.
pub struct Workdir {
    path: PathBuf,
}

impl Workdir {
    /// Creates `ROOT/shadowfd-bench-PID-N` for the first free N.
    pub fn create(root: &Path) -> io::Result<Workdir> {
        let pid = std::process::id();
        for n in 0..1000 {
            let path = root.join(format!("{PREFIX}{pid}-{n}"));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Workdir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot create a work directory in {}: {e}", root.display()),
                    ));
                }
            }
        }
        Err(io::Error::other(format!(
            "no free work directory name under {}",
            root.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!(
                    "shadowfd: warning: could not remove {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// The PID a work directory name was made by, if the name is one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Whether a process with this PID exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Writes `size` bytes from a splitmix64 stream seeded with `seed` to `path`,
/// then syncs it (so that writeback does not run during the measurements).
pub fn write_random(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for w in buf[..n.next_multiple_of(8)].chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// The `k`-th 8-byte word [`write_random`] writes with `seed` (the
/// splitmix64 stream is a counter, so any word is computed directly).
pub fn expected_word(seed: u64, k: u64) -> u64 {
    Rng::new(seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))).next()
}

/// The byte at `offset` of the data [`write_random`] writes with `seed`.
pub fn expected_byte(seed: u64, offset: u64) -> u8 {
    expected_word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// The offset of the first byte of `got` (which starts at `offset` of the
/// file) that differs from the data written with `seed`.
pub fn first_mismatch(got: &[u8], offset: u64, seed: u64) -> Option<u64> {
    // The bytes before the first 8-byte offset of the file, byte-wise; then
    // whole words, compared as words; then the tail, byte-wise.
    let lead = (((8 - offset % 8) % 8) as usize).min(got.len());
    if let Some(m) = first_mismatch_bytes(&got[..lead], offset, seed) {
        return Some(m);
    }
    let body = &got[lead..];
    let first = (offset + lead as u64) / 8;
    let whole = body.len() / 8 * 8;
    for (k, w) in body[..whole].chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        if v != expected_word(seed, first + k as u64) {
            let at = lead + k * 8;
            return first_mismatch_bytes(&got[at..at + 8], offset + at as u64, seed);
        }
    }
    let at = lead + whole;
    first_mismatch_bytes(&got[at..], offset + at as u64, seed)
}

/// [`first_mismatch`] one byte at a time.
fn first_mismatch_bytes(got: &[u8], offset: u64, seed: u64) -> Option<u64> {
    let mut i = 0usize;
    while i < got.len() {
        let at = offset + i as u64;
        let word = expected_word(seed, at / 8).to_le_bytes();
        let skip = (at % 8) as usize;
        let n = (8 - skip).min(got.len() - i);
        if got[i..i + n] != word[skip..skip + n] {
            let j = (0..n).find(|&j| got[i + j] != word[skip + j]).unwrap_or(0);
            return Some(at + j as u64);
        }
        i += n;
    }
    None
}

/// Reads `path` to the end, so that its pages are in the page cache.
pub fn warm(path: &Path) -> io::Result<()> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_file_is_seeded_and_sized() {
        let w = Workdir::create(&std::env::temp_dir()).unwrap();
        let (a, b, c) = (w.path().join("a"), w.path().join("b"), w.path().join("c"));
        write_random(&a, 12_345, 9).unwrap();
        write_random(&b, 12_345, 9).unwrap();
        write_random(&c, 12_345, 10).unwrap();
        let (a, b, c) = (
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            std::fs::read(c).unwrap(),
        );
        assert_eq!(a.len(), 12_345);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let dir = w.path().to_path_buf();
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(owner_pid(&name), Some(std::process::id()));
        drop(w);
        assert!(!dir.exists());
    }

    #[test]
    fn expected_bytes_are_the_written_ones() {
        let w = Workdir::create(&std::env::temp_dir()).unwrap();
        let p = w.path().join("a");
        write_random(&p, (1 << 20) + 13, 5).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(first_mismatch(&got, 0, 5), None);
        assert_eq!(first_mismatch(&got[1001..(1 << 20) + 7], 1001, 5), None);
        assert_eq!(expected_byte(5, 1 << 20), got[1 << 20]);
        assert_eq!(first_mismatch(&got, 0, 6), Some(0));
        let mut bad = got[4096..8192].to_vec();
        bad[77] ^= 1;
        assert_eq!(first_mismatch(&bad, 4096, 5), Some(4096 + 77));
        assert!(
            first_mismatch(&[0u8; 4096], 8192, 5).is_some(),
            "zeros are caught"
        );
        // Unaligned starts and ends: the first wrong byte is named, in the
        // head, the words or the tail.
        for (from, to, wrong) in [(1001, 9000, 1003), (1001, 9000, 4444), (1001, 9003, 9001)] {
            let mut bad = got[from..to].to_vec();
            bad[wrong - from] ^= 0x80;
            bad[to - from - 1] ^= 0x01;
            assert_eq!(
                first_mismatch(&bad, from as u64, 5),
                Some(wrong as u64),
                "{from}..{to}"
            );
        }
        assert_eq!(first_mismatch(&got[3..5], 3, 5), None);
    }

    #[test]
    fn owner_pid_only_matches_our_names() {
        assert_eq!(owner_pid("shadowfd-bench-42-0"), Some(42));
        assert_eq!(owner_pid("shadowfd-bench-42"), None);
        assert_eq!(owner_pid("other-42-0"), None);
        assert_eq!(owner_pid("shadowfd-bench-x-0"), None);
    }
}
