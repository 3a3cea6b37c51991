//! Directories inside an ext2/3/4 image, for the server's STAT and LIST
//! requests: what a path is, and one page of a directory's entries.
//!
//! Paths are resolved the way [`super::ImageSource::open`] resolves them
//! (symlinks inside the image followed, within the image). A listing reads
//! the directory's blocks linearly (an htree directory keeps every entry in
//! that layout too); its cursor is the byte position of the next entry in
//! the directory's data, so a page can start where the last one ended.

use super::layout::{self, Geometry, Inode, LayoutError};
use super::{
    Fail, ImageError, Pread, Stamp, Timestamp, ext4_fail, image_fail, long_symlink, mix, resolve,
    show,
};
use crate::source::FileKind;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a path inside an image is (symlinks followed).
#[derive(Debug, Clone)]
pub(crate) struct ImageStat {
    pub kind: FileKind,
    pub size: u64,
    /// The image's identity, as [`super::ImageSource`] reports it.
    pub device: u64,
    pub inode: u64,
    pub mtime: Timestamp,
    pub nlink: u64,
}

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

struct Opened {
    image: File,
    img: String,
    identity: u64,
    /// What identifies the image as it is now, for the cache.
    key: (std::path::PathBuf, u64, u64, Stamp),
}

/// The image loaded by `ext4-view` (validated as [`super::ImageSource::open`]
/// validates it) and its geometry, kept per thread (a server serves each
/// client on a thread of its own) while the image file is unchanged: a
/// listing with a STAT per entry then costs a lookup each, not a load.
struct Loaded {
    key: (std::path::PathBuf, u64, u64, Stamp),
    fs: ext4_view::Ext4,
    geo: Geometry,
    /// Inodes of the entries listed so far, by their canonical path in the
    /// image (the listed directory's path with symlinks, `.` and `..`
    /// resolved, `/`, the name), however the client spelled the directory:
    /// the STAT of each entry that usually follows a listing then needs no
    /// walk (a lookup in a large directory reads all its blocks).
    names: std::collections::HashMap<Vec<u8>, u32>,
    /// What `names` holds, in bytes ([`NAME_COST`] per entry plus its key).
    name_bytes: usize,
}

/// Listed entries remembered per thread at most; then forgotten at once.
const MAX_NAMES: usize = 1 << 16;
/// Bytes of remembered entries per thread (each a key of its canonical
/// path plus [`NAME_COST`]) at most; then forgotten at once. With one
/// thread per client, a server holds at most this much per client.
const MAX_NAME_BYTES: usize = 4 << 20;
/// What one remembered entry costs besides its key's bytes: the table's
/// slot (a `Vec` and a `u32`, with the control byte and spare capacity)
/// and the key's allocation.
const NAME_COST: usize = 64;

thread_local! {
    static LOADED: std::cell::RefCell<Option<Loaded>> = const { std::cell::RefCell::new(None) };
}

fn open_image(image_path: &Path) -> Result<Opened, ImageError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let img = image_path.display().to_string();
    let at_image = |kind, reason: String| ImageError {
        location: img.clone(),
        kind,
        reason,
    };
    let image = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(image_path)
        .map_err(|e| at_image(e.kind(), format!("cannot open the image file: {e}")))?;
    let st = image
        .metadata()
        .map_err(|e| at_image(e.kind(), format!("cannot stat the image file: {e}")))?;
    let ft = st.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(at_image(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device, so not a filesystem image".into(),
        ));
    }
    Ok(Opened {
        image,
        img,
        identity: mix(st.dev(), st.ino()),
        key: (image_path.to_path_buf(), st.dev(), st.ino(), Stamp::of(&st)),
    })
}

fn absolute(inner: &[u8]) -> Vec<u8> {
    let mut p = inner.to_vec();
    if p.first() != Some(&b'/') {
        p.insert(0, b'/');
    }
    p
}

/// `inner` (an absolute path) with empty and `.` components dropped, or
/// `None` if it has a `..` (which only a walk can resolve: a symlink may
/// come before it).
fn lexical(inner: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(inner.len());
    for c in inner.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => {
                out.push(b'/');
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Some(out)
}

/// The geometry, the inode `inner` leads to, and its canonical path
/// (`/`-separated, symlinks, `.` and `..` resolved; `/` for the root).
fn found(o: &Opened, inner: &[u8]) -> Result<(Geometry, Inode, Vec<u8>), ImageError> {
    let name = format!("{}:{}", o.img, show(inner));
    let located = |f: Fail| match f {
        Fail::Image(kind, reason) => ImageError {
            location: o.img.clone(),
            kind,
            reason,
        },
        Fail::Path(kind, reason) => ImageError {
            location: name.clone(),
            kind,
            reason,
        },
    };
    LOADED.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|l| l.key != o.key) {
            *cell = None;
            // The same checks as opening a file in the image (superblock,
            // features, journal), then a handle to keep.
            let root = resolve(&o.image, &o.img, b"/").map_err(located)?;
            let clone = o.image.try_clone().map_err(|e| ImageError {
                location: o.img.clone(),
                kind: e.kind(),
                reason: format!("cannot reopen the image: {e}"),
            })?;
            let fs = ext4_view::Ext4::load(Box::new(Pread(clone)))
                .map_err(|e| located(ext4_fail(e, &o.img, b"/")))?;
            *cell = Some(Loaded {
                key: o.key.clone(),
                fs,
                geo: root.geo,
                names: std::collections::HashMap::new(),
                name_bytes: 0,
            });
        }
        let l = cell.as_ref().expect("loaded above");
        // A plain path through the directory indexes (index.rs).
        match super::index::walk(&o.image, &o.img, &l.geo, inner).map_err(located)? {
            super::index::Walk::Found(inode, path) => return Ok((l.geo.clone(), inode, path)),
            super::index::Walk::NotFound => {
                return Err(located(ext4_fail(
                    ext4_view::Ext4Error::NotFound,
                    &o.img,
                    inner,
                )));
            }
            super::index::Walk::NotADirectory => {
                return Err(located(ext4_fail(
                    ext4_view::Ext4Error::NotADirectory,
                    &o.img,
                    inner,
                )));
            }
            super::index::Walk::Slow => {}
        }
        let canonical = l.fs.canonicalize(inner).map_err(|e| {
            located(
                long_symlink(&o.image, &l.geo, &e).unwrap_or_else(|| ext4_fail(e, &o.img, inner)),
            )
        })?;
        let names: Vec<Vec<u8>> = canonical
            .components()
            .filter_map(|c| match c {
                ext4_view::Component::Normal(n) => Some(n.as_ref().to_vec()),
                _ => None,
            })
            .collect();
        let inode = l
            .geo
            .resolve(&o.image, names.iter().map(Vec::as_slice))
            .map_err(|e| match e {
                LayoutError::NotFound => {
                    located(ext4_fail(ext4_view::Ext4Error::NotFound, &o.img, inner))
                }
                LayoutError::NotADirectory => located(ext4_fail(
                    ext4_view::Ext4Error::NotADirectory,
                    &o.img,
                    inner,
                )),
                other => layout_err(o, other),
            })?;
        let mut path = Vec::new();
        for n in &names {
            path.push(b'/');
            path.extend_from_slice(n);
        }
        if path.is_empty() {
            path.push(b'/');
        }
        Ok((l.geo.clone(), inode, path))
    })
}

fn layout_err(o: &Opened, e: LayoutError) -> ImageError {
    let (kind, reason) = image_fail(e, &o.img);
    ImageError {
        location: o.img.clone(),
        kind,
        reason,
    }
}

/// What `path_in_image` names in the image at `image_path`.
pub(crate) fn stat(image_path: &Path, path_in_image: &[u8]) -> Result<ImageStat, ImageError> {
    let o = open_image(image_path)?;
    let inner = absolute(path_in_image);
    let inode = match listed(&o, &inner) {
        Some(i) => i,
        None => found(&o, &inner)?.1,
    };
    Ok(ImageStat {
        kind: inode.kind(),
        size: inode.size,
        device: o.identity,
        inode: u64::from(inode.ino),
        mtime: inode.mtime,
        nlink: u64::from(inode.links),
    })
}

/// The inode of `inner` if a listing of its directory in this image, as
/// it is now, named it (looked up by `inner` with `.` and empty
/// components dropped; a path with `..` or a symlink before its last
/// component is walked instead).
fn listed(o: &Opened, inner: &[u8]) -> Option<Inode> {
    let key = lexical(inner)?;
    let (geo, ino) = LOADED.with(|cell| {
        let cell = cell.borrow();
        let l = cell.as_ref().filter(|l| l.key == o.key)?;
        Some((l.geo.clone(), *l.names.get(&key)?))
    })?;
    let inode = geo.inode(&o.image, ino).ok()?;
    inode.in_use().then_some(inode)
}

/// Remembers the entries of a page listed in the directory whose
/// canonical path is `dir`.
fn remember(o: &Opened, dir: &[u8], entries: &[ImageEntry]) {
    LOADED.with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(l) = cell.as_mut().filter(|l| l.key == o.key) else {
            return;
        };
        let cost: usize = entries
            .iter()
            .map(|e| dir.len() + 1 + e.name.len() + NAME_COST)
            .sum();
        if l.names.len() + entries.len() > MAX_NAMES || l.name_bytes + cost > MAX_NAME_BYTES {
            // A new table: `clear` would keep the old one's capacity.
            l.names = std::collections::HashMap::new();
            l.name_bytes = 0;
        }
        for e in entries {
            let mut p = dir.to_vec();
            if p.last() != Some(&b'/') {
                p.push(b'/');
            }
            p.extend_from_slice(&e.name);
            let n = p.len() + NAME_COST;
            if l.names.insert(p, e.inode as u32).is_none() {
                l.name_bytes += n;
            }
        }
    });
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// One page of the directory `path_in_image`, from byte `cursor` of its
/// data: at most `max_entries` entries, stopping once their names total
/// `max_bytes`. `.` and `..` are left out; symbolic links are listed as
/// what they lead to within the image (and left out if they lead nowhere),
/// as are sockets, FIFOs and devices.
pub(crate) fn list(
    image_path: &Path,
    path_in_image: &[u8],
    cursor: u64,
    max_entries: usize,
    max_bytes: usize,
) -> Result<ImagePage, ListError> {
    let o = open_image(image_path)?;
    let inner = absolute(path_in_image);
    let (page, canonical) = list_in(&o, &inner, cursor, max_entries, max_bytes)?;
    remember(&o, &canonical, &page.entries);
    Ok(page)
}

fn list_in(
    o: &Opened,
    inner: &[u8],
    cursor: u64,
    max_entries: usize,
    max_bytes: usize,
) -> Result<(ImagePage, Vec<u8>), ListError> {
    let inner = inner.to_vec();
    let (geo, dir, canonical) = found(o, &inner)?;
    if dir.kind() != FileKind::Directory {
        return Err(ListError::Image(ImageError {
            location: format!("{}:{}", o.img, show(&inner)),
            kind: io::ErrorKind::NotADirectory,
            reason: format!("not a directory (a {})", dir.kind().as_str()),
        }));
    }
    let bs = geo.block_size;
    let runs = geo
        .runs(&o.image, &dir)
        .map_err(|e| ListError::Image(layout_err(o, e)))?;
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
            o.img,
            show(&inner)
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
            return Ok((page, canonical));
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
            .map_err(|e| ListError::Image(layout_err(o, e)))?;
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
                return Err(ListError::Image(layout_err(
                    o,
                    LayoutError::Corrupt(format!("directory inode {}: bad entry", dir.ino)),
                )));
            }
            let name = &buf[at + 8..at + 8 + name_len];
            let here = lblock * bs + at as u64;
            if ino != 0 && name != b"." && name != b".." && !name.is_empty() {
                if page.entries.len() >= max_entries || bytes >= max_bytes {
                    page.next = here;
                    return Ok((page, canonical));
                }
                let ftype = if typed { buf[at + 7] } else { 0 };
                if matches!(ftype, 0 | 7) {
                    if links >= MAX_LINKS_PER_PAGE {
                        page.next = here;
                        return Ok((page, canonical));
                    }
                    links += 1;
                }
                let kind = match ftype {
                    1 => Some((FileKind::Regular, u64::from(ino))),
                    2 => Some((FileKind::Directory, u64::from(ino))),
                    // A symlink, or no type recorded: look.
                    0 | 7 => entry_kind(o, &geo, &inner, name, ino),
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
    Ok((page, canonical))
}

/// The kind and inode an entry leads to (symlinks followed within the
/// image); `None` for a dangling link and anything but files and
/// directories.
fn entry_kind(
    o: &Opened,
    geo: &Geometry,
    dir: &[u8],
    name: &[u8],
    ino: u32,
) -> Option<(FileKind, u64)> {
    let inode = geo.inode(&o.image, ino).ok()?;
    let inode = if inode.kind() == FileKind::Symlink {
        let mut p = dir.to_vec();
        if p.last() != Some(&b'/') {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        found(o, &p).ok()?.1
    } else {
        inode
    };
    match inode.kind() {
        k @ (FileKind::Regular | FileKind::Directory) => Some((k, u64::from(inode.ino))),
        _ => None,
    }
}
