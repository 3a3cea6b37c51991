//! Directory indexes of images: a path inside an image is found with one
//! hash lookup per component instead of a scan of each directory's blocks.
//!
//! A lookup in a directory of N entries reads all its blocks (an image made
//! with `mkfs.ext4 -d` has no htree index), so opening each of N files in
//! one directory cost O(N²): 20,000 small files took minutes. The first
//! lookup in a directory reads it whole into a name → inode table, kept
//! for the process and shared by every thread, keyed by the image as it is
//! now (device, inode, size, modification and change times of the image
//! file) and the directory's inode number: a changed image is a new key,
//! never a stale answer.
//!
//! Both readers must agree, as on the slow path ([`super::resolve`]): when a
//! table is built, `ext4-view` lists the same directory (verifying its
//! blocks' checksums) and must find the same names with the same file
//! types. An entry's inode is checked when the entry is used: its kind must
//! be the type its entry lists, and under `metadata_csum` its checksum must
//! hold (shadowfd's reader verifies it, as ext4-view does). Reading and
//! verifying every inode of a directory through ext4-view when it was
//! first indexed cost more than all the lookups after it for 20,000 files.
//!
//! Paths with `..` or with a symbolic link on the way are left to the slow
//! path, which resolves them through `ext4-view`.

use super::Pread;
use super::fail::{Fail, ext4_fail, image_fail};
use super::layout::{Geometry, Inode, LayoutError, ROOT_INO};
use crate::source::FileKind;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// The image file as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ImageKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ImageKey {
    pub(super) fn of(f: &File) -> io::Result<ImageKey> {
        Ok(ImageKey::of_meta(&f.metadata()?))
    }

    pub(super) fn of_meta(m: &std::fs::Metadata) -> ImageKey {
        ImageKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A directory's entries: name → (inode number, the entry's type byte).
type Names = Arc<HashMap<Vec<u8>, (u32, u8)>>;

/// Indexed entries kept at most (about 64 bytes each with their names);
/// past this every table is dropped at once and built again on use.
const MAX_ENTRIES: usize = 1 << 20;

struct Cache {
    tables: HashMap<(ImageKey, u32), Names>,
    entries: usize,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// What a walk with the indexes found.
pub(super) enum Walk {
    /// The inode and its canonical path (`/` for the root).
    Found(Inode, Vec<u8>),
    NotFound,
    NotADirectory,
    /// `..` or a symbolic link on the way: resolve the slow way.
    Slow,
}

/// Walks `inner` (an absolute path in the image) through the directory
/// indexes of the image as `key` describes it (its state when `geo` was
/// read).
pub(super) fn walk(
    image: &File,
    img: &str,
    geo: &Geometry,
    key: &ImageKey,
    inner: &[u8],
) -> Result<Walk, Fail> {
    let mut names: Vec<&[u8]> = Vec::new();
    for c in inner.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Ok(Walk::Slow),
            c => names.push(c),
        }
    }
    let layout = |e: LayoutError| {
        let (k, r) = image_fail(e, img);
        Fail::Image(k, r)
    };
    // A directory's inode is read only when its table is not kept yet: a
    // table is only ever built for a directory of this same image state.
    let mut ino = ROOT_INO;
    let mut entry_type = 0u8;
    let mut path = Vec::new();
    for name in names {
        let table = match cached(key, ino) {
            Some(t) => t,
            None => {
                let inode = geo.inode(image, ino).map_err(layout)?;
                match inode.kind() {
                    FileKind::Directory => {}
                    FileKind::Symlink => return Ok(Walk::Slow),
                    _ => return Ok(Walk::NotADirectory),
                }
                table(image, img, geo, key, &inode, &path)?
            }
        };
        let Some(&(next, ty)) = table.get(name) else {
            return Ok(Walk::NotFound);
        };
        ino = next;
        entry_type = ty;
        path.push(b'/');
        path.extend_from_slice(name);
    }
    let inode = geo.inode(image, ino).map_err(layout)?;
    // The entry's type (which ext4-view read the same when the table was
    // built) must be what the inode says it is.
    if entry_type != 0 && type_byte(inode.kind()) != Some(entry_type) && !other(&inode, entry_type)
    {
        let shown = String::from_utf8_lossy(&path);
        return Err(Fail::Image(
            io::ErrorKind::InvalidData,
            format!(
                "{shown} is listed in its directory as file type {entry_type} but its inode {} \
                 is a {}; check the filesystem with `e2fsck -fn {img}`",
                inode.ino,
                inode.kind().as_str()
            ),
        ));
    }
    if inode.kind() == FileKind::Symlink {
        return Ok(Walk::Slow);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    Ok(Walk::Found(inode, path))
}

/// The directory entry type byte of a kind (`None` for the kinds 3 to 6
/// stand for together).
fn type_byte(kind: FileKind) -> Option<u8> {
    match kind {
        FileKind::Regular => Some(1),
        FileKind::Directory => Some(2),
        FileKind::Symlink => Some(7),
        FileKind::Other => None,
    }
}

/// Whether `inode` is a device, FIFO or socket listed as one (types 3 to 6).
fn other(inode: &Inode, ty: u8) -> bool {
    inode.kind() == FileKind::Other && (3..=6).contains(&ty)
}

/// The kept table of directory inode `ino` in the image as `key` describes
/// it, if there is one.
fn cached(key: &ImageKey, ino: u32) -> Option<Names> {
    CACHE
        .lock()
        .as_ref()
        .and_then(|c| c.tables.get(&(key.clone(), ino)).cloned())
}

/// The name → inode table of directory `dir` (whose canonical path is
/// `dir_path`, empty for the root), built on first use.
fn table(
    image: &File,
    img: &str,
    geo: &Geometry,
    key: &ImageKey,
    dir: &Inode,
    dir_path: &[u8],
) -> Result<Names, Fail> {
    let k = (key.clone(), dir.ino);
    if let Some(t) = cached(key, dir.ino) {
        return Ok(t);
    }
    let entries = geo.entries(image, dir).map_err(|e| {
        let (k, r) = image_fail(e, img);
        Fail::Image(k, r)
    })?;
    let shown = if dir_path.is_empty() { b"/" } else { dir_path };
    let clone = image
        .try_clone()
        .map_err(|e| Fail::Image(e.kind(), format!("cannot reopen the image: {e}")))?;
    let fs = ext4_view::Ext4::load(Box::new(Pread(clone))).map_err(|e| ext4_fail(e, img, shown))?;
    agree(img, &fs, dir_path, &entries)?;
    let n = entries.len();
    let t: Names = Arc::new(
        entries
            .into_iter()
            .map(|(name, ino, ty)| (name, (ino, ty)))
            .collect(),
    );
    let mut c = CACHE.lock();
    let c = c.get_or_insert_with(|| Cache {
        tables: HashMap::new(),
        entries: 0,
    });
    if c.entries + n > MAX_ENTRIES {
        c.tables = HashMap::new();
        c.entries = 0;
    }
    if c.tables.insert(k, t.clone()).is_none() {
        c.entries += n;
    }
    Ok(t)
}

/// Checks that `ext4-view` lists the directory at `dir_path` with the same
/// names, each with the same file type, as shadowfd's reader. (Each
/// entry's inode is checked when it is used: [`walk`] compares its kind
/// with the listed type, and under `metadata_csum` shadowfd verifies the
/// inode's checksum as ext4-view does.)
fn agree(
    img: &str,
    fs: &ext4_view::Ext4,
    dir_path: &[u8],
    ours: &[(Vec<u8>, u32, u8)],
) -> Result<(), Fail> {
    let shown = if dir_path.is_empty() { b"/" } else { dir_path };
    let differ = |what: String| {
        Fail::Image(
            io::ErrorKind::InvalidData,
            format!(
                "directory {} reads differently through ext4-view and shadowfd ({what}); \
                 check the filesystem with `e2fsck -fn {img}`",
                String::from_utf8_lossy(shown)
            ),
        )
    };
    let mut theirs: HashMap<Vec<u8>, ext4_view::FileType> = HashMap::with_capacity(ours.len());
    for e in fs.read_dir(shown).map_err(|e| ext4_fail(e, img, shown))? {
        let e = e.map_err(|e| ext4_fail(e, img, shown))?;
        let name = e.file_name().as_ref().to_vec();
        if name == b"." || name == b".." {
            continue;
        }
        let ty = e.file_type().map_err(|e| ext4_fail(e, img, shown))?;
        theirs.insert(name, ty);
    }
    if theirs.len() != ours.len() {
        return Err(differ(format!(
            "{} entries against {}",
            theirs.len(),
            ours.len()
        )));
    }
    for (name, ino, ty) in ours {
        let Some(t) = theirs.get(name) else {
            return Err(differ(format!(
                "only shadowfd finds {}",
                String::from_utf8_lossy(name)
            )));
        };
        let same = match ty {
            1 => t.is_regular_file(),
            2 => t.is_dir(),
            7 => t.is_symlink(),
            _ => !(t.is_regular_file() || t.is_dir() || t.is_symlink()),
        };
        if !same {
            return Err(differ(format!(
                "{}: inode {ino}, file type {ty} against {t:?}",
                String::from_utf8_lossy(name)
            )));
        }
    }
    Ok(())
}
