//! The disk chunk cache: one file per fetched block, so that a second run
//! (or another process) does not fetch it again.
//!
//! - **Key.** A directory per object version, named by a 128-bit hash of
//!   (endpoint, bucket, key, ETag); a file per block index within it. A new
//!   version of the object has another ETag and so other files: a cached
//!   block is never served for another version.
//! - **Checked on every read.** A file holds a header (magic, the block's
//!   index and length, an XXH3-128 of its bytes seeded with its key) and
//!   the bytes. A file that is short, long, for another block, or whose
//!   bytes do not match is deleted and the block fetched again.
//! - **Crash-safe and shared.** A block is written to a temporary file in
//!   the same directory and renamed into place, so a reader (in this or any
//!   other process) sees either no file or a whole one; a crash leaves at
//!   most a temporary file, removed by the next eviction pass.
//! - **Bounded, least recently used first.** A hit sets the file's
//!   modification time to now; when the bytes written since the last pass
//!   could have taken the directory over its bound, a pass lists every
//!   file and deletes the oldest until it is under 90 % of the bound.
//!   Processes sharing the directory each run passes; a file deleted under
//!   a reader stays readable through its open descriptor.
//!
//! The checksum guards against torn writes and corruption, not against
//! someone who may write the directory: the cache is as trusted as the
//! account it belongs to (docs/object-store.md).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128_with_seed};

const MAGIC: &[u8; 8] = b"SHFDCHK1";
const HEADER: usize = 8 + 8 + 8 + 16;

/// The bound of a cache directory and what this process knows of its
/// use: shared by the [`ChunkCache`]s of one served tree, so that opening
/// a version does not list the whole directory again.
#[derive(Debug)]
pub struct CacheBudget {
    /// The cache's top directory (holds every version's directory).
    top: PathBuf,
    max_bytes: u64,
    /// Bytes written since the last eviction pass, and the total found then.
    written: AtomicU64,
    found: AtomicU64,
}

impl CacheBudget {
    /// The cache under `top` (created mode 0700 if missing), bounded to
    /// `max_bytes`: one eviction pass now.
    pub fn open(top: &Path, max_bytes: u64) -> io::Result<Arc<CacheBudget>> {
        fs::create_dir_all(top.join("v1"))?;
        let _ = fs::set_permissions(top, fs::Permissions::from_mode(0o700));
        let b = CacheBudget {
            top: top.to_path_buf(),
            max_bytes,
            written: AtomicU64::new(0),
            found: AtomicU64::new(0),
        };
        b.found.store(b.evict(), Ordering::Relaxed);
        Ok(Arc::new(b))
    }

    /// Counts `n` bytes written; a pass if they could have taken the
    /// directory over the bound.
    fn wrote(&self, n: u64) {
        let w = self.written.fetch_add(n, Ordering::Relaxed) + n;
        if self.found.load(Ordering::Relaxed) + w > self.max_bytes {
            self.written.store(0, Ordering::Relaxed);
            self.found.store(self.evict(), Ordering::Relaxed);
        }
    }

    /// One eviction pass over every version's files: removes temporary
    /// files older than a minute, then the least recently used chunk files
    /// until the total is under 90 % of the bound (if it was over it).
    /// Returns the bytes left.
    fn evict(&self) -> u64 {
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        let now = std::time::SystemTime::now();
        let Ok(versions) = fs::read_dir(self.top.join("v1")) else {
            return 0;
        };
        for v in versions.flatten() {
            let Ok(entries) = fs::read_dir(v.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(m) = e.metadata() else { continue };
                if !m.is_file() {
                    continue;
                }
                let t = m.modified().unwrap_or(now);
                if e.file_name().to_string_lossy().contains(".tmp.") {
                    if now.duration_since(t).is_ok_and(|d| d.as_secs() > 60) {
                        let _ = fs::remove_file(e.path());
                    }
                    continue;
                }
                files.push((t, m.len(), e.path()));
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= self.max_bytes {
            return total;
        }
        files.sort();
        let target = self.max_bytes / 10 * 9;
        for (_, len, p) in files {
            if total <= target {
                break;
            }
            if fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
        total
    }
}

/// The chunk files of one object version.
#[derive(Debug)]
pub struct ChunkCache {
    budget: Arc<CacheBudget>,
    /// This version's directory.
    dir: PathBuf,
    /// Seeds each chunk's checksum: the version's identity.
    seed: u64,
}

/// A unique suffix for temporary files.
fn tmp_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        ".tmp.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl ChunkCache {
    /// The cache of the object version (endpoint, bucket, key, etag) under
    /// `top` (created mode 0700 if missing), bounded to `max_bytes`.
    pub fn open(top: &Path, max_bytes: u64, identity: [&str; 4]) -> io::Result<ChunkCache> {
        ChunkCache::open_in(&CacheBudget::open(top, max_bytes)?, identity)
    }

    /// The cache of the object version (endpoint, bucket, key, etag) in the
    /// directory `budget` bounds (no eviction pass until it writes).
    pub fn open_in(budget: &Arc<CacheBudget>, identity: [&str; 4]) -> io::Result<ChunkCache> {
        let id = identity.join("\0");
        let h = xxhash_rust::xxh3::xxh3_128(id.as_bytes());
        let dir = budget.top.join("v1").join(format!("{h:032x}"));
        fs::create_dir_all(&dir)?;
        Ok(ChunkCache {
            budget: budget.clone(),
            dir,
            seed: xxh3_64(id.as_bytes()),
        })
    }

    /// Where block `index` lives.
    pub fn path_of(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:010}"))
    }

    fn sum(&self, index: u64, data: &[u8]) -> u128 {
        xxh3_128_with_seed(data, self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Block `index` of `len` bytes if a whole, matching copy is cached.
    /// `Err` carries whether a file was there and refused (it is removed).
    pub fn get(&self, index: u64, len: usize) -> Result<Vec<u8>, Miss> {
        let path = self.path_of(index);
        let mut f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(_) => return Err(Miss::Absent),
        };
        match Self::read_checked(&mut f, len) {
            Some((hdr_index, sum, data)) if hdr_index == index && sum == self.sum(index, &data) => {
                // Recently used: eviction goes by modification time.
                let _ = f.set_modified(std::time::SystemTime::now());
                Ok(data)
            }
            _ => {
                let _ = fs::remove_file(&path);
                Err(Miss::Refused)
            }
        }
    }

    /// Reads a chunk file, refusing anything but a regular file of exactly
    /// the header and `len` bytes.
    fn read_checked(f: &mut File, len: usize) -> Option<(u64, u128, Vec<u8>)> {
        let m = f.metadata().ok()?;
        if !m.is_file() || m.len() != (HEADER + len) as u64 {
            return None;
        }
        let mut hdr = [0u8; HEADER];
        f.read_exact(&mut hdr).ok()?;
        if &hdr[..8] != MAGIC {
            return None;
        }
        let index = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
        let l = u64::from_le_bytes(hdr[16..24].try_into().ok()?);
        let sum = u128::from_le_bytes(hdr[24..40].try_into().ok()?);
        if l != len as u64 {
            return None;
        }
        let mut data = vec![0u8; len];
        f.read_exact(&mut data).ok()?;
        let mut extra = [0u8; 1];
        if f.read(&mut extra).ok()? != 0 {
            return None;
        }
        Some((index, sum, data))
    }

    /// Stores block `index`: a temporary file renamed into place. Errors
    /// (a full disk) only mean the block is not cached.
    pub fn put(&self, index: u64, data: &[u8]) -> io::Result<()> {
        let path = self.path_of(index);
        let tmp = self.dir.join(format!("{index:010}{}", tmp_suffix()));
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut hdr = Vec::with_capacity(HEADER);
            hdr.extend_from_slice(MAGIC);
            hdr.extend_from_slice(&index.to_le_bytes());
            hdr.extend_from_slice(&(data.len() as u64).to_le_bytes());
            hdr.extend_from_slice(&self.sum(index, data).to_le_bytes());
            f.write_all(&hdr)?;
            f.write_all(data)?;
            fs::rename(&tmp, &path)
        };
        let r = write();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
            return r;
        }
        self.budget.wrote((HEADER + data.len()) as u64);
        Ok(())
    }
}

/// Why [`ChunkCache::get`] had no block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No file.
    Absent,
    /// A file that failed the checks (removed).
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path, max: u64) -> ChunkCache {
        ChunkCache::open(dir, max, ["http://e", "b", "k", "\"etag\""]).unwrap()
    }

    #[test]
    fn round_trip_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let c = cache(d.path(), 1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(c.get(3, 8192), Err(Miss::Absent));
        c.put(3, &data).unwrap();
        assert_eq!(c.get(3, 8192).unwrap(), data);
        // Asked with another length: refused (and removed).
        assert_eq!(c.get(3, 4096), Err(Miss::Refused));
        assert_eq!(c.get(3, 8192), Err(Miss::Absent));
        // A flipped byte.
        c.put(3, &data).unwrap();
        let p = c.path_of(3);
        let mut bytes = fs::read(&p).unwrap();
        bytes[HEADER + 100] ^= 1;
        fs::write(&p, &bytes).unwrap();
        assert_eq!(c.get(3, 8192), Err(Miss::Refused));
        // Truncated.
        c.put(3, &data).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len((HEADER + 4000) as u64).unwrap();
        assert_eq!(c.get(3, 8192), Err(Miss::Refused));
        // Another block's file in this block's place.
        c.put(4, &data).unwrap();
        fs::rename(c.path_of(4), c.path_of(3)).unwrap();
        assert_eq!(c.get(3, 8192), Err(Miss::Refused));
        // Another version never sees this one's files.
        c.put(5, &data).unwrap();
        let other = ChunkCache::open(d.path(), 1 << 20, ["http://e", "b", "k", "\"new\""]).unwrap();
        assert_eq!(other.get(5, 8192), Err(Miss::Absent));
    }

    #[test]
    fn evicts_least_recently_used() {
        let d = tempfile::tempdir().unwrap();
        let block = 64 << 10;
        let c = cache(d.path(), 4 * (block as u64 + HEADER as u64));
        let data = vec![7u8; block];
        for i in 0..4 {
            c.put(i, &data).unwrap();
            // Distinct modification times, oldest first.
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i);
            File::options()
                .write(true)
                .open(c.path_of(i))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        // Block 0 used recently: block 1 is now the oldest.
        assert!(c.get(0, block).is_ok());
        c.put(4, &data).unwrap();
        assert!(c.get(0, block).is_ok(), "the recently used block stays");
        assert_eq!(c.get(1, block), Err(Miss::Absent), "the oldest is evicted");
        assert!(c.get(4, block).is_ok());
    }

    /// Versions opened in one budget count their writes together: the
    /// bound holds over all of them, with one pass at the budget's open.
    #[test]
    fn versions_sharing_a_budget_are_bounded_together() {
        let d = tempfile::tempdir().unwrap();
        let block = 64 << 10;
        let b = CacheBudget::open(d.path(), 3 * (block as u64 + HEADER as u64)).unwrap();
        let data = vec![9u8; block];
        let vs: Vec<ChunkCache> = (0..4)
            .map(|i| ChunkCache::open_in(&b, ["http://e", "b", &format!("k{i}"), "\"e\""]).unwrap())
            .collect();
        for (i, v) in vs.iter().enumerate() {
            v.put(0, &data).unwrap();
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i as u64);
            File::options()
                .write(true)
                .open(v.path_of(0))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        vs[3].put(1, &data).unwrap();
        let held = vs
            .iter()
            .flat_map(|v| [v.get(0, block).is_ok(), v.get(1, block).is_ok()])
            .filter(|&h| h)
            .count();
        assert!(held <= 3, "{held} blocks held over a bound of 3");
        assert_eq!(
            vs[0].get(0, block),
            Err(Miss::Absent),
            "the oldest version's block went first"
        );
        assert!(vs[3].get(1, block).is_ok(), "the newest stays");
    }
}
