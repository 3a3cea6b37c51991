//! The disk chunk cache: one file per fetched block, so that a second run
//! (or another process) does not fetch it again.
//!
//! - **Key.** A directory per object version, named by a 128-bit hash of
//!   (endpoint, bucket, key, ETag); a file per block index within it. A new
//!   version of the object has another ETag and so other files: a cached
//!   block is never served for another version.
//! - **Checked on every read, page by page.** A file holds a header (magic
//!   with the format version, the block's index and length, an XXH3-64 of
//!   the table that follows), a table of one XXH3-64 per 4 KiB page of the
//!   block (each seeded with the version, the block and the page), and the
//!   bytes. A read checks the header and the table, then only the pages it
//!   returns: a hit that serves 64 KiB of a 256 KiB block reads and hashes
//!   64 KiB. A file that is short, for another block, or whose table or
//!   pages read do not match is deleted and the block fetched again (a
//!   long one too, when read whole). A read costs `openat` (`O_NOATIME`),
//!   a `pread` of the header and table, a `pread` of the pages, `close`.
//! - **Crash-safe and shared.** A block is written to a temporary file in
//!   the same directory and renamed into place, so a reader (in this or any
//!   other process) sees either no file or a whole one; a crash leaves at
//!   most a temporary file, removed by the next eviction pass.
//! - **Bounded, least recently used first.** Eviction goes by a file's
//!   modification time. A hit does not write it: the first hit on a block
//!   in this [`ChunkCache`] notes the block, and the notes are written
//!   ([`ChunkCache::flush_touches`]) in batches off the reader's thread and
//!   when the cache is dropped. When the bytes written since the last pass
//!   could have taken the directory over its bound, a pass lists every file
//!   and deletes the oldest until it is under 90 % of the bound. Processes
//!   sharing the directory each run passes; a file deleted under a reader
//!   stays readable through its open descriptor.
//! - **Format version.** Files live under `v2/`; a directory of an older
//!   format (`v1/`, one checksum per block) is removed whole at open.
//!
//! The checksums guard against torn writes and corruption, not against
//! someone who may write the directory: the cache is as trusted as the
//! account it belongs to (docs/object-store.md).

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// This format's directory under the cache's top directory.
const FORMAT_DIR: &str = "v2";
/// Directories of older formats, removed at open.
const OLD_FORMAT_DIRS: &[&str] = &["v1"];
const MAGIC: &[u8; 8] = b"SHFDCHK2";
/// Magic, index, length, the table's checksum.
const HEADER: usize = 8 + 8 + 8 + 8;
/// The unit a checksum covers.
const PAGE: usize = 4096;
/// Blocks noted as used before a batch of modification times is due.
const TOUCH_BATCH: usize = 64;

/// Block `index`'s file name (as `{index:010}`) in `buf`: the digits.
fn format_index(mut index: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    while index > 0 || i > buf.len() - 10 {
        i -= 1;
        buf[i] = b'0' + (index % 10) as u8;
        index /= 10;
    }
    &buf[i..]
}

/// The bytes before block data of `len` bytes: the header and its table.
fn data_offset(len: usize) -> usize {
    HEADER + len.div_ceil(PAGE) * 8
}

/// The bound of a cache directory and what this process knows of its
/// use: shared by the [`ChunkCache`]s of one served tree, so that opening
/// a version does not list the whole directory again.
#[derive(Debug)]
pub struct CacheBudget {
    /// This format's directory (holds every version's directory).
    top: PathBuf,
    max_bytes: u64,
    /// Bytes written since the last eviction pass, and the total found
    /// then ([`NOT_COUNTED`] until this process's first pass).
    written: AtomicU64,
    found: AtomicU64,
}

/// [`CacheBudget::found`] before the first pass.
const NOT_COUNTED: u64 = u64::MAX;

impl CacheBudget {
    /// The cache under `top` (created mode 0700 if missing), bounded to
    /// `max_bytes`: removes older formats' directories. The first eviction
    /// pass comes with the first write: only writes take the directory
    /// over its bound, and a reader of a warm cache lists nothing (the pass
    /// at open cost 10-25 ms for 4,096 files, 2026-12-07).
    pub fn open(top: &Path, max_bytes: u64) -> io::Result<Arc<CacheBudget>> {
        fs::create_dir_all(top.join(FORMAT_DIR))?;
        let _ = fs::set_permissions(top, fs::Permissions::from_mode(0o700));
        for old in OLD_FORMAT_DIRS {
            let _ = fs::remove_dir_all(top.join(old));
        }
        let b = CacheBudget {
            top: top.join(FORMAT_DIR),
            max_bytes,
            written: AtomicU64::new(0),
            found: AtomicU64::new(NOT_COUNTED),
        };
        Ok(Arc::new(b))
    }

    /// Counts `n` bytes written; a pass if they could have taken the
    /// directory over the bound.
    fn wrote(&self, n: u64) {
        let w = self.written.fetch_add(n, Ordering::Relaxed) + n;
        if self.found.load(Ordering::Relaxed).saturating_add(w) > self.max_bytes {
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
        let Ok(versions) = fs::read_dir(&self.top) else {
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
    /// This version's directory, and it open: chunk files are opened
    /// relative to it.
    dir: PathBuf,
    dirfd: OwnedFd,
    /// Seeds each checksum: the version's identity.
    seed: u64,
    /// Blocks hit since open (their times are written once), and those
    /// whose time is still to write.
    touched: parking_lot::Mutex<(HashSet<u64>, Vec<u64>)>,
}

impl Drop for ChunkCache {
    fn drop(&mut self) {
        self.flush_touches();
    }
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

/// An open chunk file whose header and table passed their checks.
struct Checked {
    file: File,
    table: Vec<u64>,
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
        let dir = budget.top.join(format!("{h:032x}"));
        fs::create_dir_all(&dir)?;
        let dirfd = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir)?
            .into();
        Ok(ChunkCache {
            budget: budget.clone(),
            dir,
            dirfd,
            seed: xxh3_64(id.as_bytes()),
            touched: parking_lot::Mutex::new((HashSet::new(), Vec::new())),
        })
    }

    /// Where block `index` lives.
    pub fn path_of(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:010}"))
    }

    /// Opens block `index`'s file for reading (no symbolic link, no wait
    /// on a FIFO), relative to the version's directory, without updating
    /// its access time where the file is ours (`O_NOATIME`): under
    /// `relatime` the first read after a write or a touch would otherwise
    /// write the inode, on the reader's thread.
    fn open_block(&self, index: u64) -> Option<File> {
        let mut name = [b'0'; 20];
        let digits = format_index(index, &mut name);
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(&self.dirfd, digits, flags | OFlag::O_NOATIME, Mode::empty()) {
            Ok(fd) => Some(File::from(fd)),
            // Not the file's owner (a directory shared between users).
            Err(nix::errno::Errno::EPERM) => {
                nix::fcntl::openat(&self.dirfd, digits, flags, Mode::empty())
                    .ok()
                    .map(File::from)
            }
            Err(_) => None,
        }
    }

    /// The seed of block `index`'s table checksum.
    fn block_seed(&self, index: u64) -> u64 {
        self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The checksum of page `page` of block `index`.
    fn page_sum(&self, index: u64, page: usize, data: &[u8]) -> u64 {
        let s = self.block_seed(index) ^ (page as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        xxh3_64_with_seed(data, s)
    }

    /// Whether `data` are the pages from `first_page` on of block `index`,
    /// as `table` says.
    fn pages_match(&self, index: u64, first_page: usize, data: &[u8], table: &[u64]) -> bool {
        data.chunks(PAGE).enumerate().all(|(k, d)| {
            table.get(first_page + k) == Some(&self.page_sum(index, first_page + k, d))
        })
    }

    /// Opens block `index`'s file and checks that its header is this
    /// block's and its table matches its checksum. A file that fails is
    /// removed.
    fn open_checked(&self, index: u64, len: usize) -> Result<Checked, Miss> {
        let file = self.open_block(index).ok_or(Miss::Absent)?;
        match self.check_header(&file, index, len) {
            Some(table) => Ok(Checked { file, table }),
            None => {
                let _ = fs::remove_file(self.path_of(index));
                Err(Miss::Refused)
            }
        }
    }

    /// No `fstat`: a file too short for its header and table fails the
    /// read here, one too short for a page fails that page's read, and
    /// what is not a regular file fails its first read (a directory, a
    /// FIFO opened without waiting) or its checksums (a device). Bytes
    /// past the block's end are never served; a whole-block read
    /// ([`ChunkCache::get`]) refuses them.
    fn check_header(&self, f: &File, index: u64, len: usize) -> Option<Vec<u64>> {
        let off = data_offset(len);
        let mut hdr = vec![0u8; off];
        f.read_exact_at(&mut hdr, 0).ok()?;
        let word = |i: usize| u64::from_le_bytes(hdr[i..i + 8].try_into().unwrap_or([0; 8]));
        if &hdr[..8] != MAGIC || word(8) != index || word(16) != len as u64 {
            return None;
        }
        if word(24) != xxh3_64_with_seed(&hdr[HEADER..], self.block_seed(index)) {
            return None;
        }
        Some((HEADER..off).step_by(8).map(word).collect())
    }

    /// Notes a hit on block `index` for the eviction order; true when a
    /// batch of times is due ([`ChunkCache::flush_touches`]).
    fn hit(&self, index: u64) -> bool {
        let mut t = self.touched.lock();
        if t.0.insert(index) {
            t.1.push(index);
        }
        t.1.len() >= TOUCH_BATCH
    }

    /// Writes the noted blocks' modification times (now): the eviction
    /// order. One `utimensat` per block, relative to the version's
    /// directory (no descriptor opened); a file gone since is skipped.
    pub fn flush_touches(&self) {
        use nix::sys::stat::{UtimensatFlags, utimensat};
        use nix::sys::time::TimeSpec;
        let due = std::mem::take(&mut self.touched.lock().1);
        for i in due {
            let mut name = [b'0'; 20];
            let digits = format_index(i, &mut name);
            let _ = utimensat(
                &self.dirfd,
                digits,
                &TimeSpec::UTIME_OMIT,
                &TimeSpec::UTIME_NOW,
                UtimensatFlags::NoFollowSymlink,
            );
        }
    }

    /// Block `index` of `len` bytes if a whole, matching copy is cached,
    /// and whether a batch of times is due (the caller runs
    /// [`ChunkCache::flush_touches`], off the reader's thread if it can).
    /// `Err` carries whether a file was there and refused (it is removed).
    pub fn get(&self, index: u64, len: usize) -> Result<(Vec<u8>, bool), Miss> {
        let mut c = self.open_checked(index, len)?;
        let mut data = Vec::with_capacity(len);
        let read = c
            .file
            .seek(SeekFrom::Start(data_offset(len) as u64))
            .and_then(|_| (&mut c.file).take(len as u64 + 1).read_to_end(&mut data));
        if read.is_ok_and(|n| n == len) && self.pages_match(index, 0, &data, &c.table) {
            return Ok((data, self.hit(index)));
        }
        let _ = fs::remove_file(self.path_of(index));
        Err(Miss::Refused)
    }

    /// Reads `buf.len()` bytes at `from` within block `index` (of `len`
    /// bytes) straight into `buf`, checking only the pages they fall in.
    /// Ok carries whether a batch of times is due, as for
    /// [`ChunkCache::get`]. On `Err`, `buf` holds nothing to serve.
    pub fn read(&self, index: u64, len: usize, from: usize, buf: &mut [u8]) -> Result<bool, Miss> {
        let to = from + buf.len();
        if to > len {
            return Err(Miss::Absent);
        }
        let c = self.open_checked(index, len)?;
        let first = from / PAGE;
        let (a, b) = (first * PAGE, (to.div_ceil(PAGE) * PAGE).min(len));
        let at = (data_offset(len) + a) as u64;
        let ok = if a == from && b == to {
            c.file.read_exact_at(buf, at).is_ok() && self.pages_match(index, first, buf, &c.table)
        } else {
            // Pages cut by the range's ends: read them whole aside.
            let mut pages = vec![0u8; b - a];
            let ok = c.file.read_exact_at(&mut pages, at).is_ok()
                && self.pages_match(index, first, &pages, &c.table);
            if ok {
                buf.copy_from_slice(&pages[from - a..to - a]);
            }
            ok
        };
        if ok {
            return Ok(self.hit(index));
        }
        let _ = fs::remove_file(self.path_of(index));
        Err(Miss::Refused)
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
            let mut hdr = Vec::with_capacity(data_offset(data.len()));
            hdr.extend_from_slice(MAGIC);
            hdr.extend_from_slice(&index.to_le_bytes());
            hdr.extend_from_slice(&(data.len() as u64).to_le_bytes());
            hdr.extend_from_slice(&[0; 8]);
            for (p, d) in data.chunks(PAGE).enumerate() {
                hdr.extend_from_slice(&self.page_sum(index, p, d).to_le_bytes());
            }
            let table_sum = xxh3_64_with_seed(&hdr[HEADER..], self.block_seed(index));
            hdr[24..32].copy_from_slice(&table_sum.to_le_bytes());
            f.write_all(&hdr)?;
            f.write_all(data)?;
            fs::rename(&tmp, &path)
        };
        let r = write();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
            return r;
        }
        self.budget
            .wrote((data_offset(data.len()) + data.len()) as u64);
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
#[path = "cache_tests.rs"]
mod tests;
