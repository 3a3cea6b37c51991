//! A regular file inside an ext2/ext3/ext4 image, read in user space.
//!
//! [`ImageSource::open`] checks the image with `ext4-view` (superblock,
//! group descriptors and journal are validated, metadata checksums
//! verified, symlinks resolved), then finds the file's inode and turns its
//! block map (extent tree or indirect blocks) into a sorted list of runs.
//! From then on a read is a binary search and `pread64` on the image, from
//! any thread at once: `ext4-view`'s handle is `Rc`-based and not `Send`,
//! so it is never touched by the fault-service workers. (The alternative,
//! a thread owning the handle and serving reads over a channel, is kept as
//! [`ImageAccess::Thread`] for comparison; `docs/images.md` has figures.)
//!
//! Staleness: size, mtime and ctime are the inode's, re-read from the image
//! on every [`Source::metadata`] call; the image file's own mtime counts as
//! a change too (see [`ImageSource`]).

mod crc32c;
pub(crate) mod dir;
mod index;
mod layout;
mod threaded;

use super::{FileKind, Source, SourceMeta, Timestamp};
use layout::{Geometry, Inode, LayoutError, Run};
use parking_lot::Mutex;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use threaded::ThreadReader;

/// How reads reach the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageAccess {
    /// The file's block map is resolved at open; reads are `pread64` on the
    /// image from the calling thread. Parallel, no copy beyond the read.
    #[default]
    Direct,
    /// A dedicated thread owns the `ext4-view` handle and serves every read.
    /// Serialised and slower (random reads seek from the file's start); kept
    /// to measure against [`ImageAccess::Direct`]. For measurement only: it
    /// inherits `ext4-view` 1.0.0's gaps, where unwritten (preallocated)
    /// extents read as their stale on-disk bytes and block-mapped files with
    /// holes in their indirect blocks fail to read.
    Thread,
}

/// Why an image file could not be opened. The message names the image (and
/// the path inside it when the path is at fault) and the fix where there is
/// one. Converts into an [`io::Error`] of the matching kind.
#[derive(Debug)]
pub struct ImageError {
    location: String,
    kind: io::ErrorKind,
    reason: String,
}

impl ImageError {
    /// Where the error is: `IMAGE` or `IMAGE:PATH`.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// What is wrong and how to fix it, without the location.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The closest [`io::ErrorKind`] (`NotFound` for a missing path, and so on).
    pub fn kind(&self) -> io::ErrorKind {
        self.kind
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

impl std::error::Error for ImageError {}

impl From<ImageError> for io::Error {
    fn from(e: ImageError) -> io::Error {
        io::Error::new(e.kind, e)
    }
}

/// `pread64` for `ext4-view`.
struct Pread(File);

impl ext4_view::Ext4Read for Pread {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.0.read_exact_at(dst, start_byte)?)
    }
}

/// What `stat` says about the image file; a difference means it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: Timestamp,
    ctime: Timestamp,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: m.size(),
            mtime: Timestamp::mtime_of(m),
            ctime: Timestamp::ctime_of(m),
        }
    }
}

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
    image: File,
    image_path: PathBuf,
    /// The path inside the image as given, made absolute.
    inner: Vec<u8>,
    name: String,
    ino: u32,
    block_size: u64,
    /// Size at open: reads stop there.
    size: u64,
    runs: Vec<Run>,
    identity: u64,
    image_id: (u64, u64),
    thread: Option<ThreadReader>,
    state: Mutex<State>,
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

/// Mixes the image's device and inode numbers into one identity.
fn mix(dev: u64, ino: u64) -> u64 {
    let mut z = dev.rotate_left(32) ^ ino;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The human form of a path inside the image.
fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The inode a path resolves to, and the canonical path (symlinks and
/// `.`/`..` resolved) it was found through.
struct Found {
    geo: Geometry,
    inode: Inode,
    canonical: Vec<u8>,
}

/// Everything that can go wrong while resolving, before it gets a location.
enum Fail {
    /// The image is at fault (not ext, unsupported, corrupt, I/O).
    Image(io::ErrorKind, String),
    /// The path inside the image is at fault.
    Path(io::ErrorKind, String),
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
        let mut inner = path_in_image.as_ref().as_os_str().as_bytes().to_vec();
        if inner.first() != Some(&b'/') {
            inner.insert(0, b'/');
        }
        let img = image_path.display().to_string();
        let name = format!("{img}:{}", show(&inner));
        let at_image = |kind, reason: String| ImageError {
            location: img.clone(),
            kind,
            reason,
        };
        // Non-blocking, so that a FIFO (or a terminal, a socket's path...)
        // is refused by its type below instead of waited on: opening a FIFO
        // for reading blocks until a writer comes, and reading it blocks too.
        let image = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&image_path)
                .map_err(|e| {
                    let reason = if e.raw_os_error() == Some(libc::ENXIO) {
                        "it is a socket or a device with nothing behind it, not a filesystem \
                         image; pass the image file with --image and the path inside it as PATH"
                            .to_string()
                    } else {
                        format!("cannot open the image file: {e}")
                    };
                    at_image(e.kind(), reason)
                })?
        };
        let st = image
            .metadata()
            .map_err(|e| at_image(e.kind(), format!("cannot stat the image file: {e}")))?;
        let ft = st.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            let kind = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_dir() {
                "a directory"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a special file"
            };
            return Err(at_image(
                io::ErrorKind::InvalidInput,
                format!(
                    "not a regular file or block device ({kind}), so not a filesystem \
                     image; pass the image file with --image and the path inside it as PATH"
                ),
            ));
        }
        // Regular files and block devices ignore O_NONBLOCK; clear it anyway
        // so the descriptor reads as an ordinary one.
        {
            use std::os::fd::AsRawFd;
            let fd = image.as_raw_fd();
            // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and
            // return plain integers.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            if flags >= 0 {
                // SAFETY: as above.
                unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
            }
        }
        let found = resolve(&image, &img, &inner).map_err(|f| match f {
            Fail::Image(kind, reason) => at_image(kind, reason),
            Fail::Path(kind, reason) => ImageError {
                location: name.clone(),
                kind,
                reason,
            },
        })?;
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
        Ok(ImageSource {
            name,
            ino: inode.ino,
            block_size: geo.block_size,
            size: inode.size,
            runs,
            identity: mix(st.dev(), st.ino()),
            image_id: (st.dev(), st.ino()),
            thread,
            state: Mutex::new(State {
                stamp: Stamp::of(&st),
                verdict: Verdict::Same(geo),
                last: None,
            }),
            image,
            image_path,
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

/// Maps a format error to (kind, reason), blaming the image.
fn image_fail(e: LayoutError, img: &str) -> (io::ErrorKind, String) {
    match e {
        LayoutError::Io(e) => (e.kind(), format!("reading the image failed: {e}")),
        LayoutError::Corrupt(why) => (
            io::ErrorKind::InvalidData,
            format!(
                "the filesystem is corrupt: {why}. Run e2fsck to check it: `e2fsck -fn {img}` \
                 (read-only; repair a copy with `e2fsck -fy`)"
            ),
        ),
        LayoutError::Unsupported(why) => (io::ErrorKind::Unsupported, why),
        LayoutError::NotFound => (io::ErrorKind::NotFound, "not found".into()),
        LayoutError::NotADirectory => (io::ErrorKind::NotADirectory, "not a directory".into()),
    }
}

/// The directory part of `p`, for the "list it with debugfs" hint.
fn parent(p: &[u8]) -> String {
    let trimmed = p.strip_suffix(b"/").unwrap_or(p);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(0) | None => "/".into(),
        Some(i) => show(&trimmed[..i]),
    }
}

/// Opens the filesystem in `image` and finds `inner` in it.
fn resolve(image: &File, img: &str, inner: &[u8]) -> Result<Found, Fail> {
    let not_ext = |why: String| {
        Fail::Image(
            io::ErrorKind::InvalidData,
            format!(
                "not an ext2/ext3/ext4 filesystem image ({why}). --image takes a filesystem \
                 image such as one made by mkfs.ext4; for a whole-disk image, extract the \
                 partition first (e.g. `losetup -P` or `dd skip=START`)"
            ),
        )
    };
    let mut magic = [0u8; 2];
    match image.read_exact_at(&mut magic, layout::MAGIC_AT) {
        Ok(()) if u16::from_le_bytes(magic) == 0xEF53 => {}
        Ok(()) => return Err(not_ext("no ext superblock magic at byte 1080".into())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            let len = image.metadata().map(|m| m.len()).unwrap_or(0);
            return Err(not_ext(format!(
                "it is only {len} bytes, too small to hold a superblock"
            )));
        }
        Err(e) => {
            return Err(Fail::Image(
                e.kind(),
                format!("reading the image failed: {e}"),
            ));
        }
    }
    let geo = Geometry::read(image).map_err(|e| {
        let (k, r) = image_fail(e, img);
        Fail::Image(k, r)
    })?;
    let bad: Vec<String> = layout::UNSUPPORTED_INCOMPAT
        .iter()
        .filter(|(bit, _)| geo.incompat & bit != 0)
        .map(|(_, n)| n.to_string())
        .chain(
            layout::unknown_incompat(geo.incompat)
                .into_iter()
                .map(|b| format!("unknown feature bit {b:#x}")),
        )
        .collect();
    if !bad.is_empty() {
        return Err(Fail::Image(
            io::ErrorKind::Unsupported,
            format!(
                "the filesystem uses features shadowfd cannot read: {}. Copy the file out with \
                 `debugfs -R 'dump {p} OUT' {img}` and shadow OUT instead",
                bad.join(", "),
                p = show(inner)
            ),
        ));
    }
    if geo.incompat & layout::INCOMPAT_RECOVER != 0 {
        return Err(Fail::Image(
            io::ErrorKind::Unsupported,
            format!(
                "the filesystem was not cleanly unmounted: its journal needs recovery, so the \
                 blocks in the image may be out of date. Unmount it cleanly, or replay the \
                 journal with `e2fsck -y -E journal_only {img}` (on a copy if it is in use)"
            ),
        ));
    }
    // A plain path goes through the directory indexes (index.rs); one
    // with `..` or a symbolic link on the way is resolved below.
    match index::walk(image, img, &geo, inner)? {
        index::Walk::Found(inode, canonical) => {
            return Ok(Found {
                geo,
                inode,
                canonical,
            });
        }
        index::Walk::NotFound => {
            return Err(ext4_fail(ext4_view::Ext4Error::NotFound, img, inner));
        }
        index::Walk::NotADirectory => {
            return Err(ext4_fail(ext4_view::Ext4Error::NotADirectory, img, inner));
        }
        index::Walk::Slow => {}
    }
    let clone = image
        .try_clone()
        .map_err(|e| Fail::Image(e.kind(), format!("cannot reopen the image: {e}")))?;
    let fs = ext4_view::Ext4::load(Box::new(Pread(clone))).map_err(|e| ext4_fail(e, img, inner))?;
    let canonical = fs
        .canonicalize(inner)
        .map_err(|e| long_symlink(image, &geo, &e).unwrap_or_else(|| ext4_fail(e, img, inner)))?;
    let names = canonical.components().filter_map(|c| match c {
        ext4_view::Component::Normal(n) => Some(n),
        _ => None,
    });
    let names: Vec<Vec<u8>> = names.map(|n| n.as_ref().to_vec()).collect();
    let inode = geo
        .resolve(image, names.iter().map(Vec::as_slice))
        .map_err(|e| match e {
            LayoutError::NotFound => ext4_fail(ext4_view::Ext4Error::NotFound, img, inner),
            LayoutError::NotADirectory => {
                ext4_fail(ext4_view::Ext4Error::NotADirectory, img, inner)
            }
            other => {
                let (k, r) = image_fail(other, img);
                Fail::Image(k, r)
            }
        })?;
    // Both readers must agree on what they found.
    let md = fs
        .metadata(&canonical)
        .map_err(|e| ext4_fail(e, img, inner))?;
    let theirs = md.file_type();
    let same_kind = match inode.kind() {
        FileKind::Regular => theirs.is_regular_file(),
        FileKind::Directory => theirs.is_dir(),
        FileKind::Symlink => theirs.is_symlink(),
        FileKind::Other => !(theirs.is_regular_file() || theirs.is_dir() || theirs.is_symlink()),
    };
    if md.len() != inode.size || !same_kind {
        return Err(Fail::Image(
            io::ErrorKind::InvalidData,
            format!(
                "inode {} of {} reads differently through ext4-view ({} bytes) and shadowfd \
                 ({} bytes); check the filesystem with `e2fsck -fn {img}`",
                inode.ino,
                show(inner),
                md.len(),
                inode.size
            ),
        ));
    }
    Ok(Found {
        geo,
        inode,
        canonical: canonical.as_ref().to_vec(),
    })
}

/// `ext4-view` calls a symlink whose target has a component over 255 bytes
/// corrupt. It is not: such a link is valid and resolves to nothing, as on
/// a mounted filesystem (`ENAMETOOLONG`). The path is at fault, not the image.
/// `None` when `e` is something else, or the target is really malformed.
fn long_symlink(image: &File, geo: &Geometry, e: &ext4_view::Ext4Error) -> Option<Fail> {
    let ext4_view::Ext4Error::Corrupt(c) = e else {
        return None;
    };
    // The message is "inode N has an invalid symlink path".
    let text = c.to_string();
    let ino: u32 = text
        .strip_prefix("inode ")?
        .strip_suffix(" has an invalid symlink path")?
        .parse()
        .ok()?;
    let inode = geo.inode(image, ino).ok()?;
    let target = geo.symlink_target(image, &inode).ok()?;
    if target.contains(&0) {
        return None;
    }
    let longest = target.split(|&b| b == b'/').map(<[u8]>::len).max()?;
    if longest <= 255 {
        return None;
    }
    let shown: String = show(&target).chars().take(48).collect();
    Some(Fail::Path(
        io::ErrorKind::InvalidInput,
        format!(
            "the path runs through a symbolic link (inode {ino}) to \"{shown}...\" ({} bytes), \
             which has a component of {longest} bytes: longer than the 255 bytes a name may \
             have, so the link leads nowhere (File name too long), as it would on a mounted \
             filesystem. The image is fine; name the file by a path without that link",
            target.len()
        ),
    ))
}

/// Maps an `ext4-view` error to a failure with a message and a fix.
fn ext4_fail(e: ext4_view::Ext4Error, img: &str, inner: &[u8]) -> Fail {
    use ext4_view::Ext4Error as E;
    let path = |kind, why: String| Fail::Path(kind, why);
    match e {
        E::NotFound => path(
            io::ErrorKind::NotFound,
            format!(
                "no such file or directory in the image. List what is there with \
                 `debugfs -R 'ls -l {}' {img}`",
                parent(inner)
            ),
        ),
        E::NotADirectory => path(
            io::ErrorKind::NotADirectory,
            "a component of the path is not a directory in the image".into(),
        ),
        E::TooManySymlinks => path(
            io::ErrorKind::InvalidInput,
            "too many levels of symbolic links in the image (a symlink loop?)".into(),
        ),
        E::PathTooLong => path(
            io::ErrorKind::InvalidInput,
            "the path is too long once the image's symlinks are resolved".into(),
        ),
        E::MalformedPath | E::NotAbsolute => path(
            io::ErrorKind::InvalidInput,
            "not a valid path inside an ext filesystem (a NUL byte, or a component over \
             the 255 bytes a name may have?)"
                .into(),
        ),
        E::Encrypted => path(
            io::ErrorKind::Unsupported,
            "the path runs through an encrypted (fscrypt) directory, which shadowfd cannot \
             read without keys. Copy the file out of the mounted, unlocked filesystem"
                .into(),
        ),
        E::Io(inner) => Fail::Image(
            io::ErrorKind::Other,
            format!("reading the image failed: {inner}"),
        ),
        E::Incompatible(i) => Fail::Image(
            io::ErrorKind::Unsupported,
            format!(
                "the filesystem is not supported ({i}). Copy the file out with \
                 `debugfs -R 'dump {p} OUT' {img}` and shadow OUT instead",
                p = show(inner)
            ),
        ),
        E::Corrupt(c) => Fail::Image(
            io::ErrorKind::InvalidData,
            format!(
                "the filesystem is corrupt: {c}. Run e2fsck to check it: `e2fsck -fn {img}` \
                 (read-only; repair a copy with `e2fsck -fy`)"
            ),
        ),
        other => Fail::Image(
            io::ErrorKind::Other,
            format!("reading the image failed: {other}"),
        ),
    }
}

fn later(a: Timestamp, b: Timestamp) -> Timestamp {
    if (a.sec, a.nsec) >= (b.sec, b.nsec) {
        a
    } else {
        b
    }
}

fn gone(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, why.into())
}

impl Source for ImageSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.thread {
            Some(t) => t.read_at(buf, offset),
            None => self.read_direct(buf, offset),
        }
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

    /// The image's device and inode plus the file's inode number; the
    /// version is the file's size, mtime and ctime (which also moves
    /// whenever the image file is written) in ns.
    fn identity(&self) -> Option<crate::source::SourceIdentity> {
        let m = self.metadata().ok()?;
        let (dev, ino) = self.image_id;
        Some(crate::source::SourceIdentity {
            which: format!("image dev={dev} ino={ino} inode={}", self.ino),
            version: crate::source::SourceIdentity::of_file(&m).version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_paths() {
        assert_eq!(parent(b"/a/b/c"), "/a/b");
        assert_eq!(parent(b"/a"), "/");
        assert_eq!(parent(b"/a/b/"), "/a");
        assert_eq!(parent(b"/"), "/");
    }

    #[test]
    fn identity_depends_on_both_numbers() {
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(mix(1, 2), mix(1, 3));
        assert_ne!(mix(1, 2), mix(3, 2));
    }
}
