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
//! table is built, `ext4-view` lists the same directory and every entry's
//! kind and size must match what shadowfd's own reader finds (once per
//! directory, where the slow path checked once per open).
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

type Names = Arc<HashMap<Vec<u8>, u32>>;

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
        let Some(&next) = table.get(name) else {
            return Ok(Walk::NotFound);
        };
        ino = next;
        path.push(b'/');
        path.extend_from_slice(name);
    }
    let inode = geo.inode(image, ino).map_err(layout)?;
    if inode.kind() == FileKind::Symlink {
        return Ok(Walk::Slow);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    Ok(Walk::Found(inode, path))
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
    agree(image, img, geo, dir_path, &entries)?;
    let n = entries.len();
    let t: Names = Arc::new(entries.into_iter().collect());
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
/// names, and that each is of the same kind and size, as shadowfd's reader.
fn agree(
    image: &File,
    img: &str,
    geo: &Geometry,
    dir_path: &[u8],
    ours: &[(Vec<u8>, u32)],
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
    let clone = image
        .try_clone()
        .map_err(|e| Fail::Image(e.kind(), format!("cannot reopen the image: {e}")))?;
    let fs = ext4_view::Ext4::load(Box::new(Pread(clone))).map_err(|e| ext4_fail(e, img, shown))?;
    let mut theirs: HashMap<Vec<u8>, (ext4_view::FileType, u64)> = HashMap::new();
    for e in fs.read_dir(shown).map_err(|e| ext4_fail(e, img, shown))? {
        let e = e.map_err(|e| ext4_fail(e, img, shown))?;
        let name = e.file_name().as_ref().to_vec();
        if name == b"." || name == b".." {
            continue;
        }
        let ty = e.file_type().map_err(|e| ext4_fail(e, img, shown))?;
        let len = e.metadata().map_err(|e| ext4_fail(e, img, shown))?.len();
        theirs.insert(name, (ty, len));
    }
    if theirs.len() != ours.len() {
        return Err(differ(format!(
            "{} entries against {}",
            theirs.len(),
            ours.len()
        )));
    }
    for (name, ino) in ours {
        let Some((ty, len)) = theirs.get(name) else {
            return Err(differ(format!(
                "only shadowfd finds {}",
                String::from_utf8_lossy(name)
            )));
        };
        let inode = geo.inode(image, *ino).map_err(|e| {
            let (k, r) = image_fail(e, img);
            Fail::Image(k, r)
        })?;
        let same_kind = match inode.kind() {
            FileKind::Regular => ty.is_regular_file(),
            FileKind::Directory => ty.is_dir(),
            FileKind::Symlink => ty.is_symlink(),
            FileKind::Other => !(ty.is_regular_file() || ty.is_dir() || ty.is_symlink()),
        };
        if !same_kind || *len != inode.size {
            return Err(differ(format!(
                "{}: inode {}, {} bytes against {len}",
                String::from_utf8_lossy(name),
                inode.ino,
                inode.size
            )));
        }
    }
    Ok(())
}
