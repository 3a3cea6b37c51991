//! Opening an image file, checking its superblock and features, and
//! finding a path in it (through the directory indexes, or `ext4-view` for
//! paths with `..` or symbolic links).

use super::fail::{Fail, ext4_fail, image_fail, long_symlink};
use super::layout::{self, Geometry, Inode, LayoutError};
use super::{ImageError, Pread, index, show};
use crate::source::FileKind;
use std::fs::File;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The inode a path resolves to, and the canonical path (symlinks and
/// `.`/`..` resolved) it was found through.
pub(super) struct Found {
    pub geo: Geometry,
    pub inode: Inode,
    pub canonical: Vec<u8>,
}

/// Opens the filesystem in `image` and finds `inner` in it.
pub(super) fn resolve(image: &File, img: &str, inner: &[u8]) -> Result<Found, Fail> {
    let geo = check(image, img, inner)?;
    // A plain path goes through the directory indexes (index.rs); one
    // with `..` or a symbolic link on the way is resolved the slow way.
    if let Ok(key) = index::ImageKey::of(image) {
        if let Some((inode, canonical)) = walk(image, img, &geo, &key, inner)? {
            return Ok(Found {
                geo,
                inode,
                canonical,
            });
        }
    }
    let fs = load(image, img, inner)?;
    let (inode, canonical) = slow(image, img, &geo, &fs, inner)?;
    Ok(Found {
        geo,
        inode,
        canonical,
    })
}

/// Checks that `image` holds an ext2/3/4 filesystem shadowfd can read
/// (`inner`, the path wanted in it, is named in the messages); its
/// geometry.
pub(super) fn check(image: &File, img: &str, inner: &[u8]) -> Result<Geometry, Fail> {
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
    Ok(geo)
}

/// `inner` found through the directory indexes of the image as `key`
/// describes it: its inode and canonical path; `None` when the path needs
/// the slow way ([`slow`]).
pub(super) fn walk(
    image: &File,
    img: &str,
    geo: &Geometry,
    key: &index::ImageKey,
    inner: &[u8],
) -> Result<Option<(Inode, Vec<u8>)>, Fail> {
    match index::walk(image, img, geo, key, inner)? {
        index::Walk::Found(inode, canonical) => Ok(Some((inode, canonical))),
        index::Walk::NotFound => Err(ext4_fail(ext4_view::Ext4Error::NotFound, img, inner)),
        index::Walk::NotADirectory => {
            Err(ext4_fail(ext4_view::Ext4Error::NotADirectory, img, inner))
        }
        index::Walk::Slow => Ok(None),
    }
}

/// The image loaded by `ext4-view`, which validates its superblock and
/// group descriptors (and resolves what [`slow`] needs).
pub(super) fn load(image: &File, img: &str, inner: &[u8]) -> Result<ext4_view::Ext4, Fail> {
    let clone = image
        .try_clone()
        .map_err(|e| Fail::Image(e.kind(), format!("cannot reopen the image: {e}")))?;
    ext4_view::Ext4::load(Box::new(Pread(clone))).map_err(|e| ext4_fail(e, img, inner))
}

/// `inner` found the slow way: symlinks, `.` and `..` resolved by
/// `ext4-view` (`fs`, loaded from the image as `geo` describes it), the
/// inode found by shadowfd's reader, and both readers' answers compared.
pub(super) fn slow(
    image: &File,
    img: &str,
    geo: &Geometry,
    fs: &ext4_view::Ext4,
    inner: &[u8],
) -> Result<(Inode, Vec<u8>), Fail> {
    let canonical = fs
        .canonicalize(inner)
        .map_err(|e| long_symlink(image, geo, &e).unwrap_or_else(|| ext4_fail(e, img, inner)))?;
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
    Ok((inode, canonical.as_ref().to_vec()))
}

/// Opens the image file at `path` (shown as `img`) for reading, refusing
/// what cannot hold a filesystem; the file and its metadata.
pub(super) fn open_image_file(path: &Path, img: &str) -> Result<(File, Metadata), ImageError> {
    let at_image = |kind, reason: String| ImageError {
        location: img.to_string(),
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
            .open(path)
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
    Ok((image, st))
}
