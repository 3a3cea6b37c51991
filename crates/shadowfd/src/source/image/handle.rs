//! [`OpenImage`]: an image opened once for a server's life and shared by
//! all its threads. It answers what a path is ([`OpenImage::stat`]), one
//! page of a directory (`OpenImage::list`, in dir.rs) and opens a file
//! source by the inode it already found (`OpenImage::open_file`, in
//! file.rs), without opening the image file again, re-reading its
//! superblock or walking the path twice.
//!
//! Staleness: every request starts with one `stat` of the image's path
//! ([`OpenImage::snapshot`]). While the file at the path is the one held
//! (same device and inode) and unchanged (same size, mtime and ctime), the
//! held [`Snapshot`] answers; otherwise the image is opened and checked
//! again and a new snapshot replaces it, so an image replaced or written
//! underneath is seen at the next request. One request's answer comes from
//! one snapshot, never a mix. (An image written in place while a request
//! reads it can still be read half old, half new, as with any reader of a
//! file being written; SMALL checks the image's stamp again after reading
//! a file's bytes, and [`super::ImageSource`] does on every fill.)

use super::fail::{Fail, located};
use super::index::ImageKey;
use super::layout::{Geometry, Inode};
use super::resolve::{self, check, open_image_file};
use super::{ImageError, Stamp, Timestamp, absolute, mix};
use crate::source::FileKind;
use parking_lot::Mutex;
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// An ext2/3/4 image opened for serving: see the module documentation.
pub(crate) struct OpenImage {
    path: PathBuf,
    /// `path` as messages show it.
    img: String,
    current: Mutex<Arc<Snapshot>>,
}

/// The image file as it was at one moment, opened and checked.
pub(crate) struct Snapshot {
    pub(super) image: Arc<File>,
    /// The image file's `(st_dev, st_ino)`.
    pub(super) id: (u64, u64),
    pub(super) stamp: Stamp,
    pub(super) key: ImageKey,
    pub(super) geo: Geometry,
    /// Tells snapshots apart for the per-thread caches (a pointer could be
    /// reused once a snapshot is dropped).
    serial: u64,
}

static SERIALS: AtomicU64 = AtomicU64::new(1);

impl Snapshot {
    fn load(path: &Path, img: &str) -> Result<Snapshot, ImageError> {
        let (image, st) = open_image_file(path, img)?;
        // The same checks as opening a file in the image (superblock,
        // features, journal), and the root must be a directory.
        let geo = check(&image, img, b"/").map_err(|f| located(f, img, b"/"))?;
        let key = ImageKey::of_meta(&st);
        let snap = Snapshot {
            image: Arc::new(image),
            id: (st.dev(), st.ino()),
            stamp: Stamp::of(&st),
            key,
            geo,
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
        };
        let (root, _) = snap.find(img, b"/")?;
        if root.kind() != FileKind::Directory {
            return Err(ImageError {
                location: img.to_string(),
                kind: std::io::ErrorKind::InvalidData,
                reason: format!(
                    "the filesystem's root (inode 2) is a {}, not a directory; check it with \
                     `e2fsck -fn {img}`",
                    root.kind().as_str()
                ),
            });
        }
        Ok(snap)
    }

    /// Whether the file `st` describes is this snapshot's image, unchanged.
    fn is(&self, st: &std::fs::Metadata) -> bool {
        (st.dev(), st.ino()) == self.id && Stamp::of(st) == self.stamp
    }

    /// The image's identity as sources report it (`device`).
    pub(super) fn identity(&self) -> u64 {
        mix(self.id.0, self.id.1)
    }

    /// The inode `inner` (absolute) leads to and its canonical path, in the
    /// image as this snapshot has it.
    pub(super) fn find(&self, img: &str, inner: &[u8]) -> Result<(Inode, Vec<u8>), ImageError> {
        let here = |f: Fail| located(f, img, inner);
        if let Some(hit) = LAST.with(|l| {
            l.borrow()
                .as_ref()
                .filter(|l| l.serial == self.serial && l.inner == inner)
                .map(|l| (l.inode.clone(), l.canonical.clone()))
        }) {
            return Ok(hit);
        }
        let found =
            match resolve::walk(&self.image, img, &self.geo, &self.key, inner).map_err(here)? {
                Some(f) => f,
                None => SLOW.with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.as_ref().is_none_or(|s| s.serial != self.serial) {
                        *cell = None;
                        let fs = resolve::load(&self.image, img, inner).map_err(here)?;
                        *cell = Some(Slow {
                            serial: self.serial,
                            fs,
                        });
                    }
                    let s = cell.as_ref().expect("loaded above");
                    resolve::slow(&self.image, img, &self.geo, &s.fs, inner).map_err(here)
                })?,
            };
        LAST.with(|l| {
            *l.borrow_mut() = Some(Last {
                serial: self.serial,
                inner: inner.to_vec(),
                inode: found.0.clone(),
                canonical: found.1.clone(),
            })
        });
        Ok(found)
    }
}

/// The last path a thread found, in which snapshot: a STAT and the OPEN of
/// the same path that follows it (SMALL does both for each small file)
/// then walk once.
struct Last {
    serial: u64,
    inner: Vec<u8>,
    inode: Inode,
    canonical: Vec<u8>,
}

/// `ext4-view`'s handle on a snapshot's image, for paths with `..` or
/// symbolic links. It is `Rc`-based, so each thread loads its own, once
/// per snapshot and only when such a path comes.
struct Slow {
    serial: u64,
    fs: ext4_view::Ext4,
}

/// A batch's snapshots, by the address of their [`OpenImage`].
type Pins = Vec<(usize, Arc<Snapshot>)>;

thread_local! {
    static LAST: RefCell<Option<Last>> = const { RefCell::new(None) };
    static SLOW: RefCell<Option<Slow>> = const { RefCell::new(None) };
    /// Inside [`batch`]: the snapshot each image (by the address of its
    /// [`OpenImage`]) was checked as, once, in this batch.
    static PINNED: RefCell<Option<Pins>> = const { RefCell::new(None) };
}

/// Runs `f` as one request: every image it asks about is checked against
/// its path once (the first time), and that snapshot answers the rest of
/// `f`. For a request about many paths (SMALL): one `stat` of the image
/// instead of one per path and step, and every answer from one snapshot.
pub(crate) fn batch<R>(f: impl FnOnce() -> R) -> R {
    struct Unpin(bool);
    impl Drop for Unpin {
        fn drop(&mut self) {
            if self.0 {
                PINNED.with(|p| *p.borrow_mut() = None);
            }
        }
    }
    // A batch inside a batch keeps the outer one's pins.
    let outer = PINNED.with(|p| {
        let mut p = p.borrow_mut();
        let outer = p.is_some();
        if !outer {
            *p = Some(Vec::new());
        }
        outer
    });
    let _unpin = Unpin(!outer);
    f()
}

impl OpenImage {
    /// Opens and checks the image at `path`.
    pub(crate) fn open(path: &Path) -> Result<OpenImage, ImageError> {
        let img = path.display().to_string();
        let snap = Snapshot::load(path, &img)?;
        Ok(OpenImage {
            path: path.to_path_buf(),
            img,
            current: Mutex::new(Arc::new(snap)),
        })
    }

    /// The image file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `path` as messages show it.
    pub(super) fn shown(&self) -> &str {
        &self.img
    }

    /// The image as it is now: the held snapshot if the file at the path is
    /// still it, unchanged; otherwise a new one (one `stat` when nothing
    /// changed). Inside [`batch`], the snapshot this image was first
    /// checked as in the batch.
    pub(crate) fn snapshot(&self) -> Result<Arc<Snapshot>, ImageError> {
        let me = self as *const OpenImage as usize;
        let pinned = PINNED.with(|p| {
            p.borrow()
                .as_ref()
                .and_then(|v| v.iter().find(|(at, _)| *at == me).map(|(_, s)| s.clone()))
        });
        if let Some(s) = pinned {
            return Ok(s);
        }
        let snap = self.check()?;
        PINNED.with(|p| {
            if let Some(v) = p.borrow_mut().as_mut() {
                v.push((me, snap.clone()));
            }
        });
        Ok(snap)
    }

    /// The held snapshot if the file at the path is still it, unchanged;
    /// else a new one.
    fn check(&self) -> Result<Arc<Snapshot>, ImageError> {
        let st = std::fs::metadata(&self.path).map_err(|e| ImageError {
            location: self.img.clone(),
            kind: e.kind(),
            reason: format!("cannot open the image file: {e}"),
        })?;
        let held = self.current.lock().clone();
        if held.is(&st) {
            return Ok(held);
        }
        let fresh = Arc::new(Snapshot::load(&self.path, &self.img)?);
        *self.current.lock() = fresh.clone();
        Ok(fresh)
    }

    /// What `path_in_image` names in the image as it is now.
    pub(crate) fn stat(&self, path_in_image: &[u8]) -> Result<ImageStat, ImageError> {
        let snap = self.snapshot()?;
        let (inode, _) = snap.find(&self.img, &absolute(path_in_image))?;
        Ok(ImageStat {
            kind: inode.kind(),
            size: inode.size,
            device: snap.identity(),
            inode: u64::from(inode.ino),
            mtime: inode.mtime,
            nlink: u64::from(inode.links),
        })
    }
}
