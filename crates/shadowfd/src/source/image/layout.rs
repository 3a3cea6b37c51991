//! The few pieces of the ext2/3/4 on-disk format that `ext4-view` keeps
//! private and the direct read path needs: the inode table, an inode's
//! number, `ctime` and flags, directory entries, and a file's block map
//! (extent tree or indirect blocks) turned into a sorted list of [`Run`]s.
//!
//! Written from the published format description (the kernel's
//! `Documentation/filesystems/ext4/`); all fields are little-endian.
//! `ext4-view` verifies the superblock, group descriptors and every inode and
//! directory block on the path when the image is opened; the extent blocks
//! of the file itself are read only here, so their `metadata_csum` checksums
//! are verified here, as `e2fsck` and the kernel do.

use super::Timestamp;
use crate::source::FileKind;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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

/// `i_flags` bits.
const FLAG_ENCRYPT: u32 = 0x800;
const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;

/// Extent tree node magic (`eh_magic`).
const EXTENT_MAGIC: u16 = 0xF30A;
/// Deepest extent tree the format allows.
const MAX_EXTENT_DEPTH: u16 = 5;
/// `ee_len` above this marks an unwritten (preallocated) extent, which reads
/// as zeros.
const EXTENT_INIT_MAX: u16 = 32768;

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

fn corrupt<T>(msg: impl Into<String>) -> LResult<T> {
    Err(LayoutError::Corrupt(msg.into()))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    csum_seed: Option<u32>,
}

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
        let mut raw = vec![0u8; self.inode_size as usize];
        read_exact(
            f,
            &mut raw,
            table * self.block_size + index * u64::from(self.inode_size),
        )?;
        Ok(Inode::parse(ino, &raw))
    }

    /// The first block of `group`'s inode table, from its descriptor.
    fn inode_table(&self, f: &File, group: u32) -> LResult<u64> {
        let mut d = [0u8; 64];
        let d = &mut d[..self.desc_size.min(64) as usize];
        read_exact(f, d, self.gdt_at + u64::from(group) * self.desc_size)?;
        let lo = u64::from(u32_at(d, 0x8));
        let hi = if d.len() >= 64 {
            u64::from(u32_at(d, 0x28))
        } else {
            0
        };
        Ok(hi << 32 | lo)
    }

    fn check_block(&self, what: &str, ino: u32, start: u64, len: u64) -> LResult<()> {
        if start == 0 || start.checked_add(len).is_none_or(|e| e > self.blocks_count) {
            return corrupt(format!(
                "inode {ino}: {what} {start}+{len} lies outside the filesystem's {} blocks",
                self.blocks_count
            ));
        }
        Ok(())
    }

    fn read_block(&self, f: &File, block: u64) -> LResult<Vec<u8>> {
        let mut b = vec![0u8; self.block_size as usize];
        read_exact(f, &mut b, block * self.block_size)?;
        Ok(b)
    }

    /// The block map of `inode`: mapped runs in logical order, clipped to
    /// the file's size. Everything else is a hole.
    pub fn runs(&self, f: &File, inode: &Inode) -> LResult<Vec<Run>> {
        if inode.flags & FLAG_INLINE_DATA != 0 {
            return Err(LayoutError::Unsupported(
                "its data is stored inline in the inode (inline_data)".into(),
            ));
        }
        let nblocks = inode.size.div_ceil(self.block_size);
        let mut out = Runs {
            runs: Vec::new(),
            nblocks,
            extents_end: 0,
            last_unwritten: false,
            mapped: 0,
            limit: self.blocks_count,
            visited: std::collections::HashSet::new(),
        };
        if inode.flags & FLAG_EXTENTS != 0 {
            self.walk_extents(f, inode, &inode.block, None, &mut out)?;
        } else {
            self.walk_block_map(f, inode, &mut out)?;
        }
        Ok(out.runs)
    }

    /// One extent tree node: the root lives in `i_block` (`at` is `None`),
    /// the others in the blocks `at` names.
    fn walk_extents(
        &self,
        f: &File,
        inode: &Inode,
        node: &[u8],
        at: Option<(u64, u16)>,
        out: &mut Runs,
    ) -> LResult<()> {
        let ino = inode.ino;
        let place = match at {
            Some((block, _)) => format!("extent block {block}"),
            None => "the extent root in the inode".to_string(),
        };
        if node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC {
            return corrupt(format!("inode {ino}: bad extent header in {place}"));
        }
        let entries = usize::from(u16_at(node, 2));
        let max = usize::from(u16_at(node, 4));
        let depth = u16_at(node, 6);
        if depth > MAX_EXTENT_DEPTH || at.is_some_and(|(_, w)| w != depth) {
            return corrupt(format!(
                "inode {ino}: bad extent tree depth {depth} in {place}"
            ));
        }
        if entries > max || 12 + max * 12 > node.len() {
            return corrupt(format!(
                "inode {ino}: {place} claims {entries} entries of at most {max}, more than it \
                 can hold"
            ));
        }
        if let (Some((block, _)), Some(seed)) = (at, self.csum_seed) {
            // The tail after the node's `eh_max` slots: CRC-32C over the
            // filesystem seed, the inode number and generation, and the node.
            let tail = 12 + max * 12;
            if tail + 4 > node.len() {
                return corrupt(format!(
                    "inode {ino}: extent block {block} has no room for its checksum"
                ));
            }
            let seed = super::crc32c::crc32c(seed, &ino.to_le_bytes());
            let seed = super::crc32c::crc32c(seed, &inode.generation.to_le_bytes());
            let computed = super::crc32c::crc32c(seed, &node[..tail]);
            let stored = u32_at(node, tail);
            if computed != stored {
                return corrupt(format!(
                    "inode {ino}: extent block {block} fails its metadata_csum checksum \
                     (stored {stored:#010x}, computed {computed:#010x})"
                ));
            }
        }
        let mut prev: Option<u64> = None;
        for e in node[12..12 + entries * 12].chunks_exact(12) {
            let logical = u64::from(u32_at(e, 0));
            if prev.is_some_and(|p| logical <= p) {
                return corrupt(format!(
                    "inode {ino}: extent entries out of order in {place}"
                ));
            }
            prev = Some(logical);
            if depth == 0 {
                let raw_len = u16_at(e, 4);
                if raw_len == 0 {
                    return corrupt(format!("inode {ino}: zero-length extent in {place}"));
                }
                let unwritten = raw_len > EXTENT_INIT_MAX;
                let len = u64::from(if unwritten {
                    raw_len - EXTENT_INIT_MAX
                } else {
                    raw_len
                });
                // Extents, written or not, may not overlap: which one would
                // hold the bytes is undefined (e2fsck repairs it).
                if logical < out.extents_end {
                    let kind = |u: bool| if u { "unwritten " } else { "" };
                    return corrupt(format!(
                        "inode {ino}: the {}extent at logical block {logical} in {place} \
                         overlaps the {}extent before it, which ends at logical block {}",
                        kind(unwritten),
                        kind(out.last_unwritten),
                        out.extents_end
                    ));
                }
                out.extents_end = logical + len;
                out.last_unwritten = unwritten;
                if unwritten {
                    // Allocated but reads as zeros, i.e. a hole.
                    continue;
                }
                let start = u64::from(u16_at(e, 6)) << 32 | u64::from(u32_at(e, 8));
                self.check_block("extent", ino, start, len)?;
                out.push(ino, logical, start, len)?;
            } else {
                let child = u64::from(u16_at(e, 8)) << 32 | u64::from(u32_at(e, 4));
                self.check_block("extent index block", ino, child, 1)?;
                if logical >= out.nblocks {
                    break;
                }
                out.visit(ino, child)?;
                let block = self.read_block(f, child)?;
                self.walk_extents(f, inode, &block, Some((child, depth - 1)), out)?;
            }
        }
        Ok(())
    }

    /// The ext2/ext3 map: 12 direct pointers, then single, double and triple
    /// indirect blocks of 32-bit pointers. A zero pointer is a hole.
    fn walk_block_map(&self, f: &File, inode: &Inode, out: &mut Runs) -> LResult<()> {
        let per = self.block_size / 4;
        let ptr = |i: usize| u64::from(u32_at(&inode.block, i * 4));
        for i in 0..12 {
            if ptr(i) != 0 {
                self.check_block("block", inode.ino, ptr(i), 1)?;
                out.push(inode.ino, i as u64, ptr(i), 1)?;
            }
        }
        let mut first = 12u64;
        let mut span = per;
        for (level, slot) in [(1u32, 12usize), (2, 13), (3, 14)] {
            if first >= out.nblocks {
                break;
            }
            if ptr(slot) != 0 {
                self.walk_indirect(f, inode.ino, ptr(slot), level, first, out)?;
            }
            first += span;
            span = span.saturating_mul(per);
        }
        Ok(())
    }

    fn walk_indirect(
        &self,
        f: &File,
        ino: u32,
        block: u64,
        level: u32,
        first: u64,
        out: &mut Runs,
    ) -> LResult<()> {
        self.check_block("indirect block", ino, block, 1)?;
        out.visit(ino, block)?;
        let per = self.block_size / 4;
        let child_span = per.pow(level - 1);
        let data = self.read_block(f, block)?;
        for (i, p) in data.chunks_exact(4).enumerate() {
            let logical = first + i as u64 * child_span;
            if logical >= out.nblocks {
                break;
            }
            let p = u64::from(u32_at(p, 0));
            if p == 0 {
                continue;
            }
            if level == 1 {
                self.check_block("block", ino, p, 1)?;
                out.push(ino, logical, p, 1)?;
            } else {
                self.walk_indirect(f, ino, p, level - 1, logical, out)?;
            }
        }
        Ok(())
    }

    /// The target a symlink inode stores: inline in `i_block` up to 59
    /// bytes (a "fast" symlink), in its data blocks beyond.
    pub fn symlink_target(&self, f: &File, inode: &Inode) -> LResult<Vec<u8>> {
        if inode.kind() != FileKind::Symlink || inode.size == 0 || inode.size > 4096 {
            return corrupt(format!("inode {}: not a readable symlink", inode.ino));
        }
        let len = inode.size as usize;
        if len <= 59 {
            return Ok(inode.block[..len].to_vec());
        }
        let mut out = vec![0u8; len];
        for r in self.runs(f, inode)? {
            let from = (r.logical * self.block_size) as usize;
            let to = (from + (r.len * self.block_size) as usize).min(len);
            if from < to {
                read_exact(f, &mut out[from..to], r.physical * self.block_size)?;
            }
        }
        Ok(out)
    }

    /// Calls `visit(name, inode)` for each entry of directory `dir` in the
    /// order of its blocks (one linear scan), until it returns `true`;
    /// whether one did.
    fn scan(
        &self,
        f: &File,
        dir: &Inode,
        mut visit: impl FnMut(&[u8], u32) -> bool,
    ) -> LResult<bool> {
        if dir.kind() != FileKind::Directory {
            return Err(LayoutError::NotADirectory);
        }
        let mut buf = vec![0u8; self.block_size as usize];
        let blocks = self
            .runs(f, dir)?
            .into_iter()
            .flat_map(|r| r.physical..r.physical + r.len);
        for b in blocks {
            read_exact(f, &mut buf, b * self.block_size)?;
            let block = buf.as_slice();
            let mut at = 0usize;
            while at + 8 <= block.len() {
                let ino = u32_at(block, at);
                let mut rec_len = usize::from(u16_at(block, at + 4));
                if block.len() == 65536 && (rec_len == 0 || rec_len == 65535) {
                    // How a 64 KiB block's single entry spells 65536.
                    rec_len = block.len();
                }
                let name_len = usize::from(block[at + 6]);
                if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
                    return corrupt(format!("directory inode {}: bad entry", dir.ino));
                }
                if ino != 0 && visit(&block[at + 8..at + 8 + name_len], ino) {
                    return Ok(true);
                }
                at += rec_len;
            }
        }
        Ok(false)
    }

    /// Every named entry of directory `dir` (name, inode number) but `.`
    /// and `..`, in the order of its blocks: for an index of the directory
    /// (super::index).
    pub fn entries(&self, f: &File, dir: &Inode) -> LResult<Vec<(Vec<u8>, u32)>> {
        let mut out = Vec::new();
        self.scan(f, dir, |name, ino| {
            if name != b"." && name != b".." {
                out.push((name.to_vec(), ino));
            }
            false
        })?;
        Ok(out)
    }

    /// Finds `name` in directory `dir` by a linear scan of its entries (an
    /// htree directory keeps every entry in such a linear layout too).
    pub fn lookup(&self, f: &File, dir: &Inode, name: &[u8]) -> LResult<u32> {
        let mut found = 0;
        let hit = self.scan(f, dir, |n, ino| {
            found = ino;
            n == name
        })?;
        if hit {
            Ok(found)
        } else {
            Err(LayoutError::NotFound)
        }
    }

    /// Walks `components` (plain names, no `.`, `..` or symlinks) from the
    /// root directory; returns the final inode.
    pub fn resolve<'a>(
        &self,
        f: &File,
        components: impl IntoIterator<Item = &'a [u8]>,
    ) -> LResult<Inode> {
        let mut inode = self.inode(f, ROOT_INO)?;
        for name in components {
            let ino = self.lookup(f, &inode, name)?;
            inode = self.inode(f, ino)?;
        }
        Ok(inode)
    }
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
    flags: u32,
    generation: u32,
    block: [u8; 60],
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

/// A contiguous mapped piece of a file, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

struct Runs {
    runs: Vec<Run>,
    nblocks: u64,
    /// The logical end of the last extent seen, written or unwritten.
    extents_end: u64,
    /// Whether that extent is unwritten.
    last_unwritten: bool,
    /// Blocks mapped so far, and the most a sound map can have (the
    /// filesystem's block count): a crafted map cannot make us allocate or
    /// walk more than the image holds.
    mapped: u64,
    limit: u64,
    /// Index and indirect blocks seen: each may be used once, which keeps a
    /// crafted map with shared nodes or loops from taking exponential time.
    visited: std::collections::HashSet<u64>,
}

impl Runs {
    fn visit(&mut self, ino: u32, block: u64) -> LResult<()> {
        if !self.visited.insert(block) {
            return corrupt(format!("inode {ino}: map block {block} is used twice"));
        }
        Ok(())
    }

    /// Appends a mapped piece, clipped to the file size and merged with the
    /// previous one when both halves are contiguous.
    fn push(&mut self, ino: u32, logical: u64, physical: u64, len: u64) -> LResult<()> {
        if logical >= self.nblocks || len == 0 {
            return Ok(());
        }
        let len = len.min(self.nblocks - logical);
        self.mapped += len;
        if self.mapped > self.limit {
            return corrupt(format!(
                "inode {ino}: the block map covers more blocks than the filesystem's {}",
                self.limit
            ));
        }
        if let Some(last) = self.runs.last_mut() {
            if logical < last.logical + last.len {
                return corrupt(format!("inode {ino}: overlapping or unsorted block map"));
            }
            if last.logical + last.len == logical && last.physical + last.len == physical {
                last.len += len;
                return Ok(());
            }
        }
        self.runs.push(Run {
            logical,
            physical,
            len,
        });
        Ok(())
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

    #[test]
    fn runs_merge_clip_and_reject_overlaps() {
        let mut r = Runs {
            runs: Vec::new(),
            nblocks: 10,
            extents_end: 0,
            last_unwritten: false,
            mapped: 0,
            limit: 1000,
            visited: Default::default(),
        };
        r.push(1, 0, 100, 2).unwrap();
        r.push(1, 2, 102, 3).unwrap();
        r.push(1, 6, 200, 9).unwrap();
        assert_eq!(
            r.runs,
            vec![
                Run {
                    logical: 0,
                    physical: 100,
                    len: 5
                },
                Run {
                    logical: 6,
                    physical: 200,
                    len: 4
                },
            ]
        );
        assert!(matches!(r.push(1, 7, 300, 1), Err(LayoutError::Corrupt(_))));
    }

    #[test]
    fn maps_may_not_cover_more_than_the_filesystem_or_reuse_map_blocks() {
        let mut r = Runs {
            runs: Vec::new(),
            nblocks: u64::MAX,
            extents_end: 0,
            last_unwritten: false,
            mapped: 0,
            limit: 8,
            visited: Default::default(),
        };
        r.push(1, 0, 100, 8).unwrap();
        assert!(matches!(r.push(1, 8, 300, 1), Err(LayoutError::Corrupt(_))));
        r.visit(1, 5).unwrap();
        assert!(matches!(r.visit(1, 5), Err(LayoutError::Corrupt(_))));
    }
}
