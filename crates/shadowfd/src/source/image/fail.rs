//! What can go wrong while finding a path in an image, and the messages
//! (with their fixes) a user sees for it.

use super::layout::{Geometry, LayoutError};
use super::{ImageError, show};
use std::fs::File;
use std::io;

/// Everything that can go wrong while resolving, before it gets a location.
pub(super) enum Fail {
    /// The image is at fault (not ext, unsupported, corrupt, I/O).
    Image(io::ErrorKind, String),
    /// The path inside the image is at fault.
    Path(io::ErrorKind, String),
}

/// `f` with its location: the image `img`, or the path `inner` in it.
pub(super) fn located(f: Fail, img: &str, inner: &[u8]) -> ImageError {
    match f {
        Fail::Image(kind, reason) => ImageError {
            location: img.to_string(),
            kind,
            reason,
        },
        Fail::Path(kind, reason) => ImageError {
            location: format!("{img}:{}", show(inner)),
            kind,
            reason,
        },
    }
}

/// Maps a format error to (kind, reason), blaming the image.
pub(super) fn image_fail(e: LayoutError, img: &str) -> (io::ErrorKind, String) {
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

/// A format error as an [`ImageError`] blaming the image `img`.
pub(super) fn image_fail_at(img: &str, e: LayoutError) -> ImageError {
    let (kind, reason) = image_fail(e, img);
    ImageError {
        location: img.to_string(),
        kind,
        reason,
    }
}

/// The directory part of `p`, for the "list it with debugfs" hint.
pub(super) fn parent(p: &[u8]) -> String {
    let trimmed = p.strip_suffix(b"/").unwrap_or(p);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(0) | None => "/".into(),
        Some(i) => show(&trimmed[..i]),
    }
}

/// `ext4-view` calls a symlink whose target has a component over 255 bytes
/// corrupt. It is not: such a link is valid and resolves to nothing, as on
/// a mounted filesystem (`ENAMETOOLONG`). The path is at fault, not the image.
/// `None` when `e` is something else, or the target is really malformed.
pub(super) fn long_symlink(image: &File, geo: &Geometry, e: &ext4_view::Ext4Error) -> Option<Fail> {
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
pub(super) fn ext4_fail(e: ext4_view::Ext4Error, img: &str, inner: &[u8]) -> Fail {
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
}
