//! Directories inside an ext2/3/4 image, for the server's LIST requests:
//! one page of a directory's entries.
//!
//! Paths are resolved the way [`super::ImageSource::open`] resolves them
//! (symlinks inside the image followed, within the image). A listing reads
//! the directory's blocks linearly (an htree directory keeps every entry in
//! that layout too); its cursor is the byte position of the next entry in
//! the directory's data, so a page can start where the last one ended.

use super::fail::image_fail_at;
use super::handle::{OpenImage, Snapshot};
use super::layout::{self, LayoutError};
use super::{ImageError, absolute, show};
use crate::source::FileKind;
use std::io;

/// One entry of a directory inside an image.
#[derive(Debug, Clone)]
pub(crate) struct ImageEntry {
    pub name: Vec<u8>,
    /// Regular or directory (symlinks resolved; others left out).
    pub kind: FileKind,
    pub inode: u64,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub(crate) struct ImagePage {
    pub entries: Vec<ImageEntry>,
    /// Where the next page starts.
    pub next: u64,
    /// Whether this page is the directory's last.
    pub end: bool,
}

/// `s_feature_incompat`: directory entries carry a file type byte.
const INCOMPAT_FILETYPE: u32 = 0x2;
/// Directory blocks read by one [`list`] call at most.
const MAX_BLOCKS_PER_PAGE: u64 = 256;
/// Symbolic links resolved by one [`list`] call at most (each resolves a
/// path from the image's root).
const MAX_LINKS_PER_PAGE: usize = 64;

/// Why [`list`] failed.
#[derive(Debug)]
pub(crate) enum ListError {
    Image(ImageError),
    /// The cursor is not one a page gave: the message says why.
    BadCursor(String),
}

impl From<ImageError> for ListError {
    fn from(e: ImageError) -> Self {
        ListError::Image(e)
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl OpenImage {
    /// One page of the directory `path_in_image`, from byte `cursor` of
    /// its data: at most `max_entries` entries, stopping once their names
    /// total `max_bytes`. `.` and `..` are left out; symbolic links are
    /// listed as what they lead to within the image (and left out if they
    /// lead nowhere), as are sockets, FIFOs and devices.
    pub(crate) fn list(
        &self,
        path_in_image: &[u8],
        cursor: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<ImagePage, ListError> {
        let snap = self.snapshot()?;
        let inner = absolute(path_in_image);
        list_in(self.shown(), &snap, &inner, cursor, max_entries, max_bytes)
    }
}

fn list_in(
    img: &str,
    o: &Snapshot,
    inner: &[u8],
    cursor: u64,
    max_entries: usize,
    max_bytes: usize,
) -> Result<ImagePage, ListError> {
    let (dir, _) = o.find(img, inner)?;
    let geo = &o.geo;
    if dir.kind() != FileKind::Directory {
        return Err(ListError::Image(ImageError {
            location: format!("{img}:{}", show(inner)),
            kind: io::ErrorKind::NotADirectory,
            reason: format!("not a directory (a {})", dir.kind().as_str()),
        }));
    }
    let bs = geo.block_size;
    let runs = geo
        .runs(&o.image, &dir)
        .map_err(|e| ListError::Image(image_fail_at(img, e)))?;
    let size = dir.size;
    let mut page = ImagePage {
        entries: Vec::new(),
        next: cursor,
        end: false,
    };
    let mut bytes = 0usize;
    let mut blocks_read = 0u64;
    let mut buf = vec![0u8; bs as usize];
    let mut pos = cursor;
    let mut links = 0usize;
    let typed = geo.incompat & INCOMPAT_FILETYPE != 0;
    let bad_cursor = |why: &str| {
        ListError::BadCursor(format!(
            "LIST cursor {cursor} of {}:{}: {why}; start with 0 and pass on the cursor each \
             reply gives",
            img,
            show(inner)
        ))
    };
    if cursor > size {
        return Err(bad_cursor(&format!("past the directory's {size} bytes")));
    }
    while pos < size {
        let lblock = pos / bs;
        let in_block = (pos % bs) as usize;
        if blocks_read >= MAX_BLOCKS_PER_PAGE {
            page.next = pos;
            return Ok(page);
        }
        blocks_read += 1;
        let Some(r) = runs
            .iter()
            .find(|r| r.logical <= lblock && lblock < r.logical + r.len)
        else {
            // A hole in a directory holds no entries.
            pos = (lblock + 1) * bs;
            continue;
        };
        let phys = r.physical + (lblock - r.logical);
        layout::read_exact(&o.image, &mut buf, phys * bs)
            .map_err(|e| ListError::Image(image_fail_at(img, e)))?;
        // A cursor inside a block must be where an entry starts.
        let mut at = 0;
        while at < in_block && at + 8 <= buf.len() {
            let rec_len = usize::from(u16_at(&buf, at + 4));
            if rec_len < 8 {
                break;
            }
            at += rec_len;
        }
        if at != in_block {
            return Err(bad_cursor("not where an entry starts"));
        }
        while at + 8 <= buf.len() {
            let ino = u32_at(&buf, at);
            let mut rec_len = usize::from(u16_at(&buf, at + 4));
            if buf.len() == 65536 && (rec_len == 0 || rec_len == 65535) {
                rec_len = buf.len();
            }
            let name_len = if typed {
                usize::from(buf[at + 6])
            } else {
                usize::from(u16_at(&buf, at + 6))
            };
            if rec_len < 8 || at + rec_len > buf.len() || 8 + name_len > rec_len {
                return Err(ListError::Image(image_fail_at(
                    img,
                    LayoutError::Corrupt(format!("directory inode {}: bad entry", dir.ino)),
                )));
            }
            let name = &buf[at + 8..at + 8 + name_len];
            let here = lblock * bs + at as u64;
            if ino != 0 && name != b"." && name != b".." && !name.is_empty() {
                if page.entries.len() >= max_entries || bytes >= max_bytes {
                    page.next = here;
                    return Ok(page);
                }
                let ftype = if typed { buf[at + 7] } else { 0 };
                if matches!(ftype, 0 | 7) {
                    if links >= MAX_LINKS_PER_PAGE {
                        page.next = here;
                        return Ok(page);
                    }
                    links += 1;
                }
                let kind = match ftype {
                    1 => Some((FileKind::Regular, u64::from(ino))),
                    2 => Some((FileKind::Directory, u64::from(ino))),
                    // A symlink, or no type recorded: look.
                    0 | 7 => entry_kind(img, o, inner, name, ino),
                    _ => None,
                };
                if let Some((kind, inode)) = kind {
                    bytes += name.len() + 12;
                    page.entries.push(ImageEntry {
                        name: name.to_vec(),
                        kind,
                        inode,
                    });
                }
            }
            at += rec_len;
        }
        pos = (lblock + 1) * bs;
    }
    page.next = size.max(cursor);
    page.end = true;
    Ok(page)
}

/// The kind and inode an entry leads to (symlinks followed within the
/// image); `None` for a dangling link and anything but files and
/// directories.
fn entry_kind(
    img: &str,
    o: &Snapshot,
    dir: &[u8],
    name: &[u8],
    ino: u32,
) -> Option<(FileKind, u64)> {
    let inode = o.geo.inode(&o.image, ino).ok()?;
    let inode = if inode.kind() == FileKind::Symlink {
        let mut p = dir.to_vec();
        if p.last() != Some(&b'/') {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        o.find(img, &p).ok()?.0
    } else {
        inode
    };
    match inode.kind() {
        k @ (FileKind::Regular | FileKind::Directory) => Some((k, u64::from(inode.ino))),
        _ => None,
    }
}
