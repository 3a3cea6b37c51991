//! A file's blocks: its block map (extent tree or indirect blocks) turned
//! into a sorted list of [`Run`]s, and what is read through them: long
//! symlink targets and directory entries.
//!
//! The extent blocks of a file are read only here (`ext4-view` never sees
//! them on the direct read path), so their `metadata_csum` checksums are
//! verified here, as `e2fsck` and the kernel do.

use super::layout::{
    Geometry, Inode, LResult, LayoutError, ROOT_INO, corrupt, read_exact, u16_at, u32_at,
};
use crate::source::FileKind;
use std::fs::File;

/// `i_flags` bits.
const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;

/// Extent tree node magic (`eh_magic`).
const EXTENT_MAGIC: u16 = 0xF30A;
/// Deepest extent tree the format allows.
const MAX_EXTENT_DEPTH: u16 = 5;
/// `ee_len` above this marks an unwritten (preallocated) extent, which reads
/// as zeros.
const EXTENT_INIT_MAX: u16 = 32768;

impl Geometry {
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

    /// Calls `visit(name, inode, type)` for each entry of directory `dir` in the
    /// order of its blocks (one linear scan), until it returns `true`;
    /// whether one did.
    fn scan(
        &self,
        f: &File,
        dir: &Inode,
        mut visit: impl FnMut(&[u8], u32, u8) -> bool,
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
                if ino != 0 && visit(&block[at + 8..at + 8 + name_len], ino, block[at + 7]) {
                    return Ok(true);
                }
                at += rec_len;
            }
        }
        Ok(false)
    }

    /// Every named entry of directory `dir` (name, inode number, the
    /// entry's file type byte: 0 unknown, 1 regular, 2 directory, 7
    /// symlink, 3 to 6 others) but `.` and `..`, in the order of its
    /// blocks: for an index of the directory (super::index).
    pub fn entries(&self, f: &File, dir: &Inode) -> LResult<Vec<(Vec<u8>, u32, u8)>> {
        let mut out = Vec::new();
        self.scan(f, dir, |name, ino, ty| {
            if name != b"." && name != b".." {
                out.push((name.to_vec(), ino, ty));
            }
            false
        })?;
        Ok(out)
    }

    /// Finds `name` in directory `dir` by a linear scan of its entries (an
    /// htree directory keeps every entry in such a linear layout too).
    pub fn lookup(&self, f: &File, dir: &Inode, name: &[u8]) -> LResult<u32> {
        let mut found = 0;
        let hit = self.scan(f, dir, |n, ino, _| {
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
