//! Working-set records: which chunks of a source a run needed first, in
//! the order it needed them, stored so that the next run of the same
//! source can fill them ahead of the touch (docs/worksets.md).
//!
//! A record is one file per source in a directory
//! ([`default_dir`]: `$XDG_CACHE_HOME/shadowfd/worksets`). Its name is a
//! hash of the source's stable identity ([`RecordKey::which`]); inside are
//! that identity in full and the version it was recorded against
//! ([`RecordKey::version`]), so that a hash collision is never mistaken for
//! the source and a record of an older version is discarded.
//!
//! Format (little endian), version 2:
//!
//! ```text
//! magic "SHFDWSET" | format u32 = 2 | chunk u64 | size u64 | created u64 (Unix s)
//! which_len u32 | which | version_len u32 | version | count u64 | count × chunk u64
//! count × age u8
//! xxh3-64 of every byte before it, u64
//! ```
//!
//! A chunk's age is how many runs in a row have not touched it since one
//! did ([`KEEP_RUNS`]). Version 1 had no ages; it is read with every age 0.
//!
//! Records are written to a temporary file in the same directory and
//! renamed over the old one, so readers see a whole record or none, and two
//! processes storing the same identity at once leave one of theirs.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SHFDWSET";
/// The record format this build writes (it reads this and format 1).
pub const FORMAT: u32 = 2;
/// Runs a merged record remembers: a chunk that this many runs in a row
/// did not touch is dropped from it (docs/worksets.md, Merging).
pub const KEEP_RUNS: u8 = 4;
/// The file name extension of a record.
pub const EXT: &str = "ws";
/// Longest identity string a record holds.
const MAX_KEY: usize = 64 << 10;
/// Most chunks a record holds (64 Mi chunks: 256 GiB at 4 KiB).
const MAX_CHUNKS: u64 = 64 << 20;

/// What a record is keyed by: which source (stable while the source is the
/// same file or object) and the version of its content it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    pub which: String,
    pub version: String,
}

/// A working set: the chunks a run needed first, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: RecordKey,
    /// Chunk size of the indexes in `chunks`, in bytes.
    pub chunk: u64,
    /// The source's size when recorded.
    pub size: u64,
    /// When it was stored, in seconds since the Unix epoch.
    pub created: u64,
    /// Chunk indexes in the order they were first needed, each once.
    pub chunks: Vec<u64>,
    /// For each of `chunks`, how many runs in a row since the last that
    /// touched it have not (0: the latest run touched it); below
    /// [`KEEP_RUNS`].
    pub ages: Vec<u8>,
}

/// Why a record file was not read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: not a working-set record, or a damaged one ({why}); it is ignored, and \
         replaced by the next record of its source (remove it with `shadowfd workset rm`)"
    )]
    Corrupt { path: PathBuf, why: String },
}

pub use crate::config::default_workset_dir as default_dir;

/// The file that holds the record of the source `which` in `dir`.
pub fn record_path(dir: &Path, which: &str) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(which.as_bytes());
    dir.join(format!("{h:016x}.{EXT}"))
}

impl Record {
    /// The record as stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.key.which.len() + 8 * self.chunks.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT.to_le_bytes());
        for v in [self.chunk, self.size, self.created] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for s in [&self.key.which, &self.key.version] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            b.extend_from_slice(&c.to_le_bytes());
        }
        for i in 0..self.chunks.len() {
            b.push(self.ages.get(i).copied().unwrap_or(0));
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads a stored record; the error says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Record, String> {
        if b.len() < MAGIC.len() + 4 + 8 || &b[..MAGIC.len()] != MAGIC {
            return Err("no record header".into());
        }
        let (body, sum) = b.split_at(b.len() - 8);
        let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        let mut r = Reader { b: body, at: 8 };
        let format = r.u32()?;
        if format != FORMAT && format != 1 {
            return Err(format!(
                "record format {format}, this build reads formats 1 and {FORMAT}"
            ));
        }
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err("checksum mismatch (truncated or overwritten)".into());
        }
        let (chunk, size, created) = (r.u64()?, r.u64()?, r.u64()?);
        if chunk == 0 || !chunk.is_power_of_two() {
            return Err(format!("chunk size {chunk} is not a power of two"));
        }
        let which = r.string()?;
        let version = r.string()?;
        let count = r.u64()?;
        let per_chunk = if format == 1 { 8 } else { 9 };
        if count > MAX_CHUNKS || count * per_chunk != (r.b.len() - r.at) as u64 {
            return Err(format!(
                "chunk count {count} does not match the record's length"
            ));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            chunks.push(r.u64()?);
        }
        let ages = if format == 1 {
            vec![0; count as usize]
        } else {
            let a = r.take(count as usize)?.to_vec();
            if let Some(bad) = a.iter().find(|&&x| x >= KEEP_RUNS) {
                return Err(format!("a chunk of age {bad}; ages stay below {KEEP_RUNS}"));
            }
            a
        };
        Ok(Record {
            key: RecordKey { which, version },
            chunk,
            size,
            created,
            chunks,
            ages,
        })
    }

    /// Reads the record file at `path`.
    pub fn read(path: &Path) -> Result<Record, RecordError> {
        let b = std::fs::read(path).map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Record::decode(&b).map_err(|why| RecordError::Corrupt {
            path: path.to_path_buf(),
            why,
        })
    }

    /// Stores the record in `dir` (made, mode 0700, if missing) under its
    /// key, atomically: a temporary file renamed over the old record.
    /// Returns the record's path.
    pub fn store(&self, dir: &Path) -> io::Result<PathBuf> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = record_path(dir, &self.key.which);
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{}.{}.{seq}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("record"),
            std::process::id()
        ));
        let write = || -> io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&self.encode())?;
            std::fs::rename(&tmp, &path)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Ok(path)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| format!("ends early, at byte {}", self.b.len()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        if n > MAX_KEY {
            return Err(format!("a key of {n} bytes (at most {MAX_KEY})"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a key that is not UTF-8".into())
    }
}

/// What [`load`] found for a source.
#[derive(Debug)]
pub enum Loaded {
    /// No record of this source.
    None,
    /// A record of this version of the source.
    Found(Record),
    /// A record of another version of the source: it was removed.
    Stale(Record),
    /// A record file that could not be read; left in place (the next store
    /// replaces it).
    Unreadable(RecordError),
}

/// The record of `key` in `dir`. One of another version is removed and
/// returned as [`Loaded::Stale`], never to be replayed.
pub fn load(dir: &Path, key: &RecordKey) -> Loaded {
    let path = record_path(dir, &key.which);
    match Record::read(&path) {
        Err(RecordError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Loaded::None
        }
        Err(e) => Loaded::Unreadable(e),
        // Another source whose key hashes alike: not ours.
        Ok(r) if r.key.which != key.which => Loaded::None,
        Ok(r) if r.key.version != key.version => {
            let _ = std::fs::remove_file(&path);
            Loaded::Stale(r)
        }
        Ok(r) => Loaded::Found(r),
    }
}

/// Every record file in `dir` (`*.ws`) with what reading it gave, by path.
pub fn list(dir: &Path) -> io::Result<Vec<(PathBuf, Result<Record, RecordError>)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == EXT) {
            let r = Record::read(&p);
            out.push((p, r));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            key: RecordKey {
                which: "file:1:2".into(),
                version: "size=3".into(),
            },
            chunk: 4096,
            size: 1 << 20,
            created: 7,
            chunks: vec![5, 1, 200],
            ages: vec![0, 3, 1],
        }
    }

    /// A record of format 1 (no ages) reads with every age 0; an age at
    /// or past [`KEEP_RUNS`] is refused.
    #[test]
    fn format_1_reads_with_age_0_and_a_bad_age_is_refused() {
        let r = sample();
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC);
        v1.extend_from_slice(&1u32.to_le_bytes());
        for v in [r.chunk, r.size, r.created] {
            v1.extend_from_slice(&v.to_le_bytes());
        }
        for s in [&r.key.which, &r.key.version] {
            v1.extend_from_slice(&(s.len() as u32).to_le_bytes());
            v1.extend_from_slice(s.as_bytes());
        }
        v1.extend_from_slice(&(r.chunks.len() as u64).to_le_bytes());
        for c in &r.chunks {
            v1.extend_from_slice(&c.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        let got = Record::decode(&v1).unwrap();
        assert_eq!(got.chunks, r.chunks);
        assert_eq!(got.ages, vec![0; 3]);

        let mut old = r.clone();
        old.ages[1] = KEEP_RUNS;
        let e = Record::decode(&old.encode()).unwrap_err();
        assert!(e.contains("age 4"), "{e}");
    }

    #[test]
    fn a_record_round_trips_and_any_damage_is_refused() {
        let r = sample();
        let b = r.encode();
        assert_eq!(Record::decode(&b).unwrap(), r);
        for cut in [0, 4, 12, b.len() / 2, b.len() - 1] {
            assert!(Record::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        for at in [9, 20, b.len() - 12, b.len() - 1] {
            let mut d = b.clone();
            d[at] ^= 0x40;
            assert!(Record::decode(&d).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn store_load_and_a_stale_version_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample();
        let p = r.store(dir.path()).unwrap();
        assert_eq!(p, record_path(dir.path(), "file:1:2"));
        assert!(matches!(load(dir.path(), &r.key), Loaded::Found(x) if x == r));
        let newer = RecordKey {
            which: r.key.which.clone(),
            version: "size=4".into(),
        };
        assert!(matches!(load(dir.path(), &newer), Loaded::Stale(_)));
        assert!(!p.exists());
        assert!(matches!(load(dir.path(), &r.key), Loaded::None));
        // Only the record is left: no temporary files.
        r.store(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
