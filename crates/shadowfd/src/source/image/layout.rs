//! The few pieces of the ext2/3/4 on-disk format that `ext4-view` keeps
//! private and the direct read path needs: the inode table, an inode's
//! number, `ctime` and flags, directory entries, and a file's block map
//! (extent tree or indirect blocks) turned into a sorted list of [`Run`]s.
//!
//! Written from the published format description (the kernel's
//! `Documentation/filesystems/ext4/`); all fields are little-endian.
//! `ext4-view` verifies the superblock, group descriptors and every inode and
//! directory block on the path when the image is opened. A file's block map
//! and what is read through it (directory entries, long symlink targets)
//! are in [`super::blocks`].

use super::Timestamp;
use crate::source::FileKind;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// `s_magic`.
const MAGIC: u16 = 0xEF53;
/// Byte offset of the superblock in the image.
pub(super) const SUPERBLOCK_AT: u64 = 1024;
/// Byte offset of `s_magic` in the image.
pub(super) const MAGIC_AT: u64 = SUPERBLOCK_AT + 0x38;

/// `s_feature_incompat` bits this module reads or checks.
pub(super) const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_64BIT: u32 = 0x80;
/// `s_checksum_seed` holds the checksum seed (`metadata_csum_seed`).
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// `s_feature_ro_compat`: metadata blocks carry CRC-32C checksums.
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// The incompatible features shadowfd cannot read, with their `mke2fs -O`
/// names. `ext4-view` refuses the same set (and any bit it does not know).
pub(super) const UNSUPPORTED_INCOMPAT: &[(u32, &str)] = &[
    (0x1, "compression"),
    (0x8, "journal_dev"),
    (0x10, "meta_bg"),
    (0x100, "mmp"),
    (0x400, "ea_inode"),
    (0x1000, "dirdata"),
    (0x4000, "large_dir"),
    (0x8000, "inline_data"),
    (0x2_0000, "casefold"),
];
/// The incompatible features known to be readable: filetype, recover (refused
/// separately), extent, 64bit, flex_bg, csum_seed, encrypt (files are checked
/// one by one).
const KNOWN_INCOMPAT: u32 = 0x2 | 0x4 | 0x40 | 0x80 | 0x200 | 0x2000 | 0x1_0000;

/// The `s_feature_incompat` bits set in `incompat` that are neither known to
/// be readable nor listed in [`UNSUPPORTED_INCOMPAT`].
pub(super) fn unknown_incompat(incompat: u32) -> Vec<u32> {
    let listed = UNSUPPORTED_INCOMPAT.iter().fold(0, |a, (b, _)| a | b);
    (0..32)
        .map(|i| 1u32 << i)
        .filter(|b| incompat & b != 0 && (KNOWN_INCOMPAT | listed) & b == 0)
        .collect()
}

/// `i_flags` bit: the file's data is encrypted (fscrypt).
const FLAG_ENCRYPT: u32 = 0x800;

/// What went wrong while reading the format.
#[derive(Debug)]
pub(super) enum LayoutError {
    Io(io::Error),
    /// The bytes contradict the format.
    Corrupt(String),
    /// Valid, but something this reader does not handle.
    Unsupported(String),
    /// A path component does not exist.
    NotFound,
    /// A path component that must be a directory is not one.
    NotADirectory,
}

impl From<io::Error> for LayoutError {
    fn from(e: io::Error) -> Self {
        LayoutError::Io(e)
    }
}

pub(super) type LResult<T> = Result<T, LayoutError>;

pub(super) fn corrupt<T>(msg: impl Into<String>) -> LResult<T> {
    Err(LayoutError::Corrupt(msg.into()))
}

pub(super) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(super) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads exactly `buf.len()` bytes at `off`; the image ending early is
/// reported as a truncated image.
pub(super) fn read_exact(f: &File, buf: &mut [u8], off: u64) -> LResult<()> {
    match f.read_exact_at(buf, off) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => corrupt(format!(
            "the image file ends before byte {} (is it truncated?)",
            off + buf.len() as u64
        )),
        Err(e) => Err(e.into()),
    }
}

/// The filesystem's shape: enough to find any inode and block.
#[derive(Debug, Clone)]
pub(super) struct Geometry {
    pub block_size: u64,
    pub blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u32,
    groups: u64,
    /// Byte offset of the group descriptor table, and one descriptor's size.
    gdt_at: u64,
    desc_size: u64,
    pub incompat: u32,
    /// Under `metadata_csum`: the filesystem's checksum seed (CRC-32C of
    /// the UUID, or `s_checksum_seed`).
    pub(super) csum_seed: Option<u32>,
    /// Each group's inode table block once its descriptor was read (0: not
    /// yet), shared by the clones of this geometry. A geometry belongs to
    /// one state of the image (it is read again whenever the image file
    /// changes), so what it remembers cannot go stale.
    tables: std::sync::Arc<[AtomicU64]>,
    /// Which reading of the superblock this is (clones share it): what the
    /// per-thread inode table [`Chunk`] belongs to.
    serial: u64,
}

/// The bytes of an inode table read around the last inode a thread read.
struct Chunk {
    serial: u64,
    /// Where they start in the image.
    at: u64,
    bytes: Vec<u8>,
}

/// Bytes of an inode table read at once (and kept per thread).
const CHUNK_BYTES: u64 = 4096;

static SERIALS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static CHUNK: std::cell::RefCell<Option<Chunk>> = const { std::cell::RefCell::new(None) };
}

/// Groups whose inode table locations a geometry remembers at most (8 bytes
/// each); past this, descriptors are read per inode as before.
const MAX_CACHED_GROUPS: u64 = 1 << 16;

impl Geometry {
    /// Reads the superblock (group descriptors are read when needed).
    pub fn read(f: &File) -> LResult<Geometry> {
        let mut sb = [0u8; 1024];
        read_exact(f, &mut sb, SUPERBLOCK_AT)?;
        if u16_at(&sb, 0x38) != MAGIC {
            return corrupt("no ext superblock magic");
        }
        let log = u32_at(&sb, 0x18);
        if log > 6 {
            return corrupt(format!("block size 2^(10+{log}) is invalid"));
        }
        let block_size = 1024u64 << log;
        let incompat = u32_at(&sb, 0x60);
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u64::from(u32_at(&sb, 0x4));
        if is64 {
            blocks_count |= u64::from(u32_at(&sb, 0x150)) << 32;
        }
        // Every block must exist in the image: this bounds all block
        // arithmetic and every map walk by the image's real size. (Seeking
        // to the end also sizes a block device; the reads use pread, so the
        // file offset does not matter.)
        let image_len = {
            use std::io::{Seek, SeekFrom};
            let mut handle = f;
            handle.seek(SeekFrom::End(0))?
        };
        if blocks_count > image_len / block_size {
            return corrupt(format!(
                "the superblock counts {blocks_count} blocks of {block_size} bytes, but the image \
                 holds only {image_len} bytes (was it truncated?)"
            ));
        }
        let inodes_count = u32_at(&sb, 0x0);
        let first_data_block = u64::from(u32_at(&sb, 0x14));
        let blocks_per_group = u64::from(u32_at(&sb, 0x20));
        let inodes_per_group = u32_at(&sb, 0x28);
        let rev = u32_at(&sb, 0x4C);
        let inode_size = if rev == 0 {
            128
        } else {
            u32::from(u16_at(&sb, 0x58))
        };
        if blocks_per_group == 0 || inodes_per_group == 0 {
            return corrupt("zero blocks or inodes per group");
        }
        if inode_size < 128 || u64::from(inode_size) > block_size || !inode_size.is_power_of_two() {
            return corrupt(format!("inode size {inode_size} is invalid"));
        }
        let desc_size = if is64 {
            u64::from(u16_at(&sb, 0xFE))
        } else {
            32
        };
        if desc_size < 32 || desc_size > block_size || (is64 && desc_size < 64) {
            return corrupt(format!("group descriptor size {desc_size} is invalid"));
        }
        if first_data_block >= blocks_count {
            return corrupt("the first data block lies past the end");
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if groups > u64::from(u32::MAX) {
            return corrupt("too many block groups");
        }
        // The descriptor table starts in the block after the one holding the
        // superblock (byte 1024): block 2 with 1 KiB blocks, block 1
        // otherwise, whatever s_first_data_block says (it is 0 with bigalloc
        // even for 1 KiB blocks). Descriptors are read when an inode needs one.
        let gdt_at = (SUPERBLOCK_AT / block_size + 1) * block_size;
        let csum_seed = (u32_at(&sb, 0x64) & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                u32_at(&sb, 0x270)
            } else {
                super::crc32c::crc32c(!0, &sb[0x68..0x78])
            }
        });
        Ok(Geometry {
            block_size,
            blocks_count,
            inodes_count,
            inodes_per_group,
            inode_size,
            groups,
            gdt_at,
            desc_size,
            incompat,
            csum_seed,
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            tables: (0..groups.min(MAX_CACHED_GROUPS))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// Reads inode number `ino`.
    pub fn inode(&self, f: &File, ino: u32) -> LResult<Inode> {
        if ino == 0 || ino > self.inodes_count {
            return corrupt(format!("inode number {ino} is out of range"));
        }
        let group = (ino - 1) / self.inodes_per_group;
        let index = u64::from((ino - 1) % self.inodes_per_group);
        if u64::from(group) >= self.groups {
            return corrupt(format!("inode {ino} lies in a missing block group"));
        }
        let table = self.inode_table(f, group)?;
        if table == 0 || table >= self.blocks_count {
            return corrupt(format!("block group {group} has an invalid inode table"));
        }
        let raw = self.inode_bytes(f, table * self.block_size, index)?;
        if let Some(seed) = self.csum_seed {
            verify_inode(seed, ino, &raw)?;
        }
        Ok(Inode::parse(ino, &raw))
    }

    /// The bytes of inode `index` of the inode table at byte `table`. The
    /// 4 KiB of the table around it are read and kept per thread for this
    /// geometry (one state of the image): a walk through a directory reads
    /// its inodes in table order, 16 of 256 bytes per read instead of one.
    fn inode_bytes(&self, f: &File, table: u64, index: u64) -> LResult<Vec<u8>> {
        let isz = u64::from(self.inode_size);
        let off = index * isz;
        let span = CHUNK_BYTES.max(isz);
        let start = off - off % span;
        let len = span.min(u64::from(self.inodes_per_group) * isz - start);
        let at = (off - start) as usize;
        let kept = CHUNK.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|k| k.serial == self.serial && k.at == table + start)
                .map(|k| k.bytes[at..at + isz as usize].to_vec())
        });
        if let Some(raw) = kept {
            return Ok(raw);
        }
        let mut bytes = vec![0u8; len as usize];
        if read_exact(f, &mut bytes, table + start).is_err() {
            // The table may be cut short around this inode: read it alone,
            // which reports what is wrong if it is.
            let mut raw = vec![0u8; isz as usize];
            read_exact(f, &mut raw, table + off)?;
            return Ok(raw);
        }
        let raw = bytes[at..at + isz as usize].to_vec();
        CHUNK.with(|c| {
            *c.borrow_mut() = Some(Chunk {
                serial: self.serial,
                at: table + start,
                bytes,
            })
        });
        Ok(raw)
    }

    /// The first block of `group`'s inode table, from its descriptor.
    fn inode_table(&self, f: &File, group: u32) -> LResult<u64> {
        let known = self.tables.get(group as usize);
        if let Some(t) = known.map(|t| t.load(Ordering::Relaxed)).filter(|&t| t != 0) {
            return Ok(t);
        }
        let mut d = [0u8; 64];
        let d = &mut d[..self.desc_size.min(64) as usize];
        read_exact(f, d, self.gdt_at + u64::from(group) * self.desc_size)?;
        let lo = u64::from(u32_at(d, 0x8));
        let hi = if d.len() >= 64 {
            u64::from(u32_at(d, 0x28))
        } else {
            0
        };
        let table = hi << 32 | lo;
        if let Some(t) = known {
            t.store(table, Ordering::Relaxed);
        }
        Ok(table)
    }
}

/// Under `metadata_csum`: checks inode `ino`'s checksum, CRC-32C over the
/// filesystem seed, the inode number and generation, and the inode with
/// its two checksum fields (`l_i_checksum_lo` at 0x7C, `i_checksum_hi` at
/// 0x82 when the inode's extra space holds it) read as zeros. An inode of
/// all zeros (never used) carries no checksum, as e2fsprogs treats it.
fn verify_inode(seed: u32, ino: u32, raw: &[u8]) -> LResult<()> {
    const LO: usize = 0x7C;
    const HI: usize = 0x82;
    if raw.iter().all(|&b| b == 0) {
        return Ok(());
    }
    let extra = if raw.len() > 128 {
        usize::from(u16_at(raw, 0x80))
    } else {
        0
    };
    let has_hi = raw.len() >= HI + 2 && HI + 2 <= 128 + extra;
    let crc = |c: u32, d: &[u8]| super::crc32c::crc32c(c, d);
    let mut c = crc(seed, &ino.to_le_bytes());
    c = crc(c, &raw[0x64..0x68]);
    c = crc(c, &raw[..LO]);
    c = crc(c, &[0, 0]);
    let (stored, computed) = if has_hi {
        c = crc(c, &raw[LO + 2..HI]);
        c = crc(c, &[0, 0]);
        c = crc(c, &raw[HI + 2..]);
        let stored = u32::from(u16_at(raw, LO)) | u32::from(u16_at(raw, HI)) << 16;
        (stored, c)
    } else {
        c = crc(c, &raw[LO + 2..]);
        (u32::from(u16_at(raw, LO)), c & 0xFFFF)
    };
    if stored != computed {
        return corrupt(format!(
            "inode {ino} fails its metadata_csum checksum (stored {stored:#010x}, computed \
             {computed:#010x})"
        ));
    }
    Ok(())
}

/// The root directory's inode number.
pub(super) const ROOT_INO: u32 = 2;

/// The parts of an inode shadowfd uses.
#[derive(Debug, Clone)]
pub(super) struct Inode {
    pub ino: u32,
    mode: u16,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub links: u16,
    pub dtime: u32,
    pub(super) flags: u32,
    /// `i_generation`: a new file in a reused inode number has another.
    pub generation: u32,
    pub(super) block: [u8; 60],
}

/// Decodes a 32-bit seconds field plus its `_extra` word (two epoch bits,
/// thirty nanosecond bits).
fn timestamp(sec: u32, extra: Option<u32>) -> Timestamp {
    let mut t = Timestamp {
        sec: i64::from(sec as i32),
        nsec: 0,
    };
    if let Some(x) = extra {
        t.sec += i64::from(x & 3) << 32;
        t.nsec = i64::from(x >> 2);
    }
    t
}

impl Inode {
    fn parse(ino: u32, raw: &[u8]) -> Inode {
        // `i_extra_isize` says how much of the space past the first 128
        // bytes is in use; the `_extra` time words live there.
        let extra_isize = if raw.len() > 128 {
            usize::from(u16_at(raw, 0x80))
        } else {
            0
        };
        let extra = |off: usize| {
            (off + 4 <= 128 + extra_isize && off + 4 <= raw.len()).then(|| u32_at(raw, off))
        };
        Inode {
            ino,
            mode: u16_at(raw, 0x0),
            size: u64::from(u32_at(raw, 0x6C)) << 32 | u64::from(u32_at(raw, 0x4)),
            ctime: timestamp(u32_at(raw, 0xC), extra(0x84)),
            mtime: timestamp(u32_at(raw, 0x10), extra(0x88)),
            dtime: u32_at(raw, 0x14),
            links: u16_at(raw, 0x1A),
            flags: u32_at(raw, 0x20),
            generation: u32_at(raw, 0x64),
            block: raw[0x28..0x28 + 60].try_into().expect("60 bytes"),
        }
    }

    pub fn kind(&self) -> FileKind {
        match self.mode & 0xF000 {
            0x8000 => FileKind::Regular,
            0x4000 => FileKind::Directory,
            0xA000 => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }

    /// Whether the inode is in use (not deleted).
    pub fn in_use(&self) -> bool {
        self.mode != 0 && self.links != 0 && self.dtime == 0
    }

    pub fn encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_decode_epoch_bits_and_nanoseconds() {
        assert_eq!(timestamp(5, None), Timestamp { sec: 5, nsec: 0 });
        // Negative 32-bit seconds are before 1970.
        assert_eq!(timestamp(u32::MAX, None).sec, -1);
        // Epoch bits extend the range past 2038; the rest is nanoseconds.
        let t = timestamp(0, Some(1 | (999_999_999 << 2)));
        assert_eq!(
            t,
            Timestamp {
                sec: 1 << 32,
                nsec: 999_999_999
            }
        );
    }

    #[test]
    fn unknown_feature_bits_are_reported() {
        assert_eq!(unknown_incompat(0x2 | 0x40 | 0x80), Vec::<u32>::new());
        assert_eq!(
            unknown_incompat(0x8000),
            Vec::<u32>::new(),
            "listed, not unknown"
        );
        assert_eq!(unknown_incompat(0x2 | 0x100_0000), vec![0x100_0000]);
    }
}
