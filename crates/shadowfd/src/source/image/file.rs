//! [`ImageSource`]: one regular file inside an image, read with `pread64`
//! on the image through its resolved block map, and checked for staleness
//! against the image as it is now.

use super::blocks::Run;
use super::fail::{Fail, image_fail, located};
use super::handle::OpenImage;
use super::layout::{Geometry, LayoutError};
use super::resolve::{Found, open_image_file, resolve};
use super::threaded::ThreadReader;
use super::view::ExtentView;
use super::{ImageAccess, ImageError, Stamp, absolute, gone, later, mix, show};
use crate::source::{FileKind, Mapped, Source, SourceMeta};
use parking_lot::Mutex;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The result of checking the path against the image as it is now.
enum Verdict {
    /// The path still names our inode; this is the current geometry.
    Same(Geometry),
    /// The path is gone or names another file: why.
    Gone(String),
}

struct State {
    /// The image's stamp when `verdict` was worked out.
    stamp: Stamp,
    verdict: Verdict,
    /// The last full answer of `metadata()`, and the image stamp it was for.
    last: Option<(Stamp, SourceMeta)>,
}

/// A regular file inside an ext2/ext3/ext4 image file (or block device).
///
/// Metadata for staleness:
/// * `size`, `mtime`: the inode's, as stored in the image.
/// * `ctime`: the later of the inode's ctime and the image file's mtime. A
///   write anywhere in the image (it moves the image's mtime) thus reports
///   the file as changed (`ctime`), even when the write left this inode
///   alone: the image is the container, and shadowfd cannot tell which of
///   its blocks a write touched.
/// * `device`: the image file's identity (its `st_dev` and `st_ino` mixed
///   into one number); `inode`: the inode number inside the image.
///
/// The source is gone ([`io::ErrorKind::NotFound`]) once the image file is
/// deleted or another file stands at its path, once the path inside the
/// image no longer resolves or names another inode, or once the inode is
/// deleted.
pub struct ImageSource {
    image: Arc<File>,
    image_path: PathBuf,
    /// The path inside the image as given, made absolute.
    inner: Vec<u8>,
    name: String,
    ino: u32,
    /// The inode's `i_generation` at open.
    generation: u32,
    block_size: u64,
    /// Size at open: reads stop there.
    size: u64,
    runs: Vec<Run>,
    identity: u64,
    image_id: (u64, u64),
    thread: Option<ThreadReader>,
    /// The file as one mapping (`super::view`), made on the first fill
    /// that asks; `None` inside where it cannot be made.
    view: OnceLock<Option<ExtentView>>,
    state: Mutex<State>,
}

/// The image file a source is opened in, as it was opened and stat'ed.
pub(super) struct Opening<'a> {
    pub image: Arc<File>,
    pub image_path: &'a Path,
    /// Its `(st_dev, st_ino)`.
    pub id: (u64, u64),
    pub stamp: Stamp,
}

impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageSource")
            .field("name", &self.name)
            .field("inode", &self.ino)
            .field("size", &self.size)
            .field("runs", &self.runs.len())
            .finish_non_exhaustive()
    }
}

impl ImageSource {
    /// Opens `path_in_image` (absolute, or taken from the image's root;
    /// symlinks inside the image are followed) in the ext2/3/4 image
    /// `image_path`, with [`ImageAccess::Direct`].
    ///
    /// ```no_run
    /// use shadowfd::{Config, Engine, Share, source::ImageSource};
    /// let engine = Engine::new(Config::from_env()?)?;
    /// let shadow = engine.open(ImageSource::open("rootfs.img", "/usr/bin/ls")?)?;
    /// let map = shadow.map(Share::Private)?;
    /// assert_eq!(&map[..4], b"\x7fELF");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(
        image_path: impl AsRef<Path>,
        path_in_image: impl AsRef<Path>,
    ) -> Result<ImageSource, ImageError> {
        Self::open_with(image_path, path_in_image, ImageAccess::Direct)
    }

    /// Like [`ImageSource::open`], choosing how reads reach the image.
    pub fn open_with(
        image_path: impl AsRef<Path>,
        path_in_image: impl AsRef<Path>,
        access: ImageAccess,
    ) -> Result<ImageSource, ImageError> {
        let image_path = image_path.as_ref().to_path_buf();
        let inner = absolute(path_in_image.as_ref().as_os_str().as_bytes());
        let img = image_path.display().to_string();
        let (image, st) = open_image_file(&image_path, &img)?;
        let found = resolve(&image, &img, &inner).map_err(|f| located(f, &img, &inner))?;
        let at = Opening {
            image: Arc::new(image),
            image_path: &image_path,
            id: (st.dev(), st.ino()),
            stamp: Stamp::of(&st),
        };
        ImageSource::build(at, inner, found, access, false)
    }

    /// A source of the file `found` (the inode `inner` led to) in the image
    /// opened as `at` says. With `known`, `at.stamp` was checked just now
    /// against the image file's path, so the metadata worked out from
    /// `found` stands as the first [`Source::metadata`] answer.
    pub(super) fn build(
        at: Opening<'_>,
        inner: Vec<u8>,
        found: Found,
        access: ImageAccess,
        known: bool,
    ) -> Result<ImageSource, ImageError> {
        let img = at.image_path.display().to_string();
        let name = format!("{img}:{}", show(&inner));
        let at_image = |kind, reason: String| ImageError {
            location: img.clone(),
            kind,
            reason,
        };
        let image = at.image;
        let Found {
            geo,
            inode,
            canonical,
        } = found;
        let path_err = |kind, reason: String| ImageError {
            location: name.clone(),
            kind,
            reason,
        };
        if inode.encrypted() {
            return Err(path_err(
                io::ErrorKind::Unsupported,
                "the file is encrypted (fscrypt) and shadowfd reads images without keys. \
                 Copy it out of the mounted, unlocked filesystem and shadow the copy"
                    .into(),
            ));
        }
        let kind = inode.kind();
        let runs = if kind == FileKind::Regular {
            geo.runs(&image, &inode).map_err(|e| match e {
                LayoutError::Unsupported(why) => path_err(
                    io::ErrorKind::Unsupported,
                    format!(
                        "shadowfd cannot read this file: {why}. Copy it out with \
                         `debugfs -R 'dump {p} OUT' {img}` and shadow OUT",
                        p = show(&canonical)
                    ),
                ),
                other => {
                    let (k, r) = image_fail(other, &img);
                    path_err(k, r)
                }
            })?
        } else {
            Vec::new()
        };
        let thread = match (access, kind) {
            (ImageAccess::Thread, FileKind::Regular) => {
                let clone = image
                    .try_clone()
                    .map_err(|e| at_image(e.kind(), format!("cannot reopen the image: {e}")))?;
                Some(
                    ThreadReader::start(clone, canonical.clone())
                        .map_err(|e| path_err(e.kind(), e.to_string()))?,
                )
            }
            _ => None,
        };
        let last = known.then(|| {
            let meta = SourceMeta {
                size: inode.size,
                mtime: inode.mtime,
                ctime: later(inode.ctime, at.stamp.mtime),
                device: mix(at.id.0, at.id.1),
                inode: u64::from(inode.ino),
                kind,
            };
            (at.stamp, meta)
        });
        Ok(ImageSource {
            name,
            ino: inode.ino,
            block_size: geo.block_size,
            size: inode.size,
            runs,
            generation: inode.generation,
            identity: mix(at.id.0, at.id.1),
            image_id: at.id,
            thread,
            view: OnceLock::new(),
            state: Mutex::new(State {
                stamp: at.stamp,
                verdict: Verdict::Same(geo),
                last,
            }),
            image,
            image_path: at.image_path.to_path_buf(),
            inner,
        })
    }

    /// The image file this source reads.
    pub fn image_path(&self) -> &Path {
        &self.image_path
    }

    /// The path inside the image, as given (made absolute).
    pub fn path_in_image(&self) -> String {
        show(&self.inner)
    }

    /// The file's inode number inside the image.
    pub fn inode_in_image(&self) -> u32 {
        self.ino
    }

    /// The image file's `(st_dev, st_ino)` at open.
    pub fn image_identity(&self) -> (u64, u64) {
        self.image_id
    }

    /// Mapped extents of the file: `(offset, image_offset, len)` in bytes;
    /// everything else reads as zeros.
    pub fn extents(&self) -> Vec<(u64, u64, u64)> {
        let bs = self.block_size;
        self.runs
            .iter()
            .map(|r| (r.logical * bs, r.physical * bs, r.len * bs))
            .collect()
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (self.size - offset).min(buf.len() as u64) as usize;
        let bs = self.block_size;
        let mut i = self
            .runs
            .partition_point(|r| (r.logical + r.len) * bs <= offset);
        let mut pos = 0usize;
        while pos < want {
            let off = offset + pos as u64;
            let left = (want - pos) as u64;
            match self.runs.get(i) {
                Some(r) if r.logical * bs <= off => {
                    let end = (r.logical + r.len) * bs;
                    let n = left.min(end - off) as usize;
                    let at = r.physical * bs + (off - r.logical * bs);
                    let got = self.image.read_at(&mut buf[pos..pos + n], at)?;
                    if got == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "the image ends before byte {at}, where {} keeps its data \
                                 (was the image truncated?)",
                                self.name
                            ),
                        ));
                    }
                    pos += got;
                    if got < n {
                        break;
                    }
                    i += 1;
                }
                Some(r) => {
                    let n = left.min(r.logical * bs - off) as usize;
                    buf[pos..pos + n].fill(0);
                    pos += n;
                }
                None => {
                    buf[pos..want].fill(0);
                    pos = want;
                }
            }
        }
        Ok(pos)
    }

    /// Works out whether the path still names our inode in the image as it
    /// is now.
    fn recheck(&self) -> io::Result<Verdict> {
        match resolve(
            &self.image,
            &self.image_path.display().to_string(),
            &self.inner,
        ) {
            Ok(f) if f.inode.ino == self.ino => Ok(Verdict::Same(f.geo)),
            Ok(_) => Ok(Verdict::Gone(format!(
                "{} now names another file in the image",
                self.name
            ))),
            // The path no longer resolves: missing, a component that is no
            // longer a directory, a symlink loop, ...
            Err(Fail::Path(_, why)) => Ok(Verdict::Gone(format!(
                "{} is no longer in the image: {why}",
                self.name
            ))),
            // A genuine I/O error on the image file is reported as such.
            Err(Fail::Image(kind, why))
                if !matches!(
                    kind,
                    io::ErrorKind::InvalidData
                        | io::ErrorKind::Unsupported
                        | io::ErrorKind::UnexpectedEof
                ) =>
            {
                Err(io::Error::new(kind, format!("{}: {why}", self.name)))
            }
            // Corrupt, cut short, or now needing journal recovery (a
            // read-write mount): the file we copied can no longer be found
            // in a filesystem we can read.
            Err(Fail::Image(_, why)) => Ok(Verdict::Gone(format!(
                "{} no longer holds a filesystem we can read: {why}",
                self.image_path.display()
            ))),
        }
    }
}

impl OpenImage {
    /// Opens the file `path_in_image` in the image as it is now, by the
    /// inode its path leads to (no second open of the image or walk of the
    /// path); the source and its metadata.
    pub(crate) fn open_file(
        &self,
        path_in_image: &[u8],
    ) -> Result<(ImageSource, SourceMeta), ImageError> {
        let snap = self.snapshot()?;
        let inner = absolute(path_in_image);
        let (inode, canonical) = snap.find(self.shown(), &inner)?;
        let at = Opening {
            image: snap.image.clone(),
            image_path: self.path(),
            id: snap.id,
            stamp: snap.stamp,
        };
        let found = Found {
            geo: snap.geo.clone(),
            inode,
            canonical,
        };
        let src = ImageSource::build(at, inner, found, ImageAccess::Direct, true)?;
        let meta = src.state.lock().last.as_ref().map(|(_, m)| m.clone());
        match meta {
            Some(meta) => Ok((src, meta)),
            // `known` above: never here. Asking the image is right anyway.
            None => {
                let meta = src.metadata().map_err(|e| ImageError {
                    location: src.name.clone(),
                    kind: e.kind(),
                    reason: e.to_string(),
                })?;
                Ok((src, meta))
            }
        }
    }
}

impl Source for ImageSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.thread {
            Some(t) => t.read_at(buf, offset),
            None => self.read_direct(buf, offset),
        }
    }

    /// With [`ImageAccess::Direct`], a file of at least 1 MiB whose blocks
    /// are whole pages, in at most 256 runs: the image file mapped in
    /// place, run by run (`super::view`).
    fn mapped(&self) -> Option<Mapped> {
        if self.thread.is_some() {
            return None;
        }
        let view = self
            .view
            .get_or_init(|| ExtentView::build(&self.image, &self.extents(), self.size));
        let v = view.as_ref()?;
        // SAFETY: a read-only mapping made here that shows the file's bytes
        // from offset 0 (its runs in place, holes as zero pages), never
        // registered, unmapped only when this source drops.
        Some(unsafe { Mapped::new(v.addr(), v.len()) })
    }

    fn metadata(&self) -> io::Result<SourceMeta> {
        let st = self.image.metadata()?;
        let img = self.image_path.display();
        if st.nlink() == 0 {
            return Err(gone(format!("the image file {img} was deleted")));
        }
        match std::fs::metadata(&self.image_path) {
            Ok(p) if (p.dev(), p.ino()) == self.image_id => {}
            Ok(_) => return Err(gone(format!("another file now stands at {img}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(gone(format!("the image file {img} was deleted")));
            }
            Err(e) => return Err(e),
        }
        let stamp = Stamp::of(&st);
        let mut state = self.state.lock();
        if state.stamp != stamp {
            // The image was written: its layout and the path may have moved.
            state.verdict = self.recheck()?;
            state.stamp = stamp;
        }
        let geo = match &state.verdict {
            Verdict::Same(g) => g,
            Verdict::Gone(why) => return Err(gone(why.clone())),
        };
        let inode = geo.inode(&self.image, self.ino).map_err(|e| {
            let (k, r) = image_fail(e, &self.image_path.display().to_string());
            io::Error::new(k, format!("{}: {r}", self.name))
        })?;
        if !inode.in_use() {
            return Err(gone(format!("{} was deleted from the image", self.name)));
        }
        if inode.generation != self.generation {
            return Err(gone(format!(
                "{} was deleted from the image and its inode {} reused (generation {} now, {} \
                 at open)",
                self.name, self.ino, inode.generation, self.generation
            )));
        }
        let meta = SourceMeta {
            size: inode.size,
            mtime: inode.mtime,
            ctime: later(inode.ctime, stamp.mtime),
            device: self.identity,
            inode: u64::from(self.ino),
            kind: inode.kind(),
        };
        state.last = Some((stamp, meta.clone()));
        Ok(meta)
    }

    /// One `fstat` of the image while it is unchanged: the bytes of a file
    /// inside it cannot change unless the image is written, which moves its
    /// size or mtime. Otherwise, the full check.
    fn fill_metadata(&self) -> io::Result<SourceMeta> {
        let stamp = Stamp::of(&self.image.metadata()?);
        if let Some((at, meta)) = &self.state.lock().last {
            if *at == stamp {
                return Ok(meta.clone());
            }
        }
        self.metadata()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    /// The image's device and inode plus the file's inode number and
    /// generation (`i_generation`: a file deleted and another made in its
    /// inode number is another source); the
    /// version is the file's size, mtime and ctime (which also moves
    /// whenever the image file is written) in ns.
    fn identity(&self) -> Option<crate::source::SourceIdentity> {
        let m = self.metadata().ok()?;
        let (dev, ino) = self.image_id;
        Some(crate::source::SourceIdentity {
            which: format!(
                "image dev={dev} ino={ino} inode={} gen={}",
                self.ino, self.generation
            ),
            version: crate::source::SourceIdentity::of_file(&m).version,
        })
    }
}
