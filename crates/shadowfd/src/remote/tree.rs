//! What a server serves: files beneath a host directory, opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, or files inside an
//! ext2/3/4 image.

use super::wire;
use crate::source::{FileKind, Source, SourceMeta, meta_if_named, meta_of};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A refusal to send a client: protocol error code and message.
pub(crate) type Refusal = (u64, String);

/// The part of a client's path below the served root: leading slashes
/// dropped (`/big.bin` and `big.bin` name the same file). Empty means the
/// root itself.
pub(crate) fn relative(path: &[u8]) -> std::result::Result<&[u8], Refusal> {
    if path.len() > wire::MAX_PATH {
        return Err((
            wire::E_RANGE,
            format!(
                "a path of {} bytes; the limit is {} bytes",
                path.len(),
                wire::MAX_PATH
            ),
        ));
    }
    if path.contains(&0) {
        return Err((
            wire::E_PROTOCOL,
            "the path contains a NUL byte; send it without a terminator".into(),
        ));
    }
    let mut p = path;
    while let [b'/', rest @ ..] = p {
        p = rest;
    }
    Ok(p)
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
pub(crate) fn open_beneath(dir: BorrowedFd<'_>, rel: &[u8], flags: i32) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { b".".as_slice() } else { rel };
    let c = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // openat2 refuses O_PATH with any flag but O_CLOEXEC, O_DIRECTORY and
    // O_NOFOLLOW.
    let extra = if flags & libc::O_PATH != 0 {
        libc::O_CLOEXEC
    } else {
        libc::O_CLOEXEC | libc::O_NOCTTY
    };
    how.flags = (flags | extra) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    for _ in 0..8 {
        // SAFETY: a live directory descriptor, a NUL-terminated path and an
        // open_how of the size passed; the kernel writes nothing back.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: openat2 returned a fresh descriptor nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a rename raced the walk; try again.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

fn refusal_of(path: &str, e: &io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ELOOP) => (
            wire::E_ESCAPE,
            format!(
                "{path:?} leaves the served tree (through `..`, an absolute symlink, a symlink out \
                 of it or a /proc magic link); name a file inside --root"
            ),
        ),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => (
            wire::E_NOT_FOUND,
            format!("{path:?}: no such file in the served tree"),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => (
            wire::E_ACCESS,
            format!("{path:?}: the server may not open it ({e})"),
        ),
        Some(libc::ENXIO) => (
            wire::E_NOT_REGULAR,
            format!("{path:?}: not a regular file (a socket or a device with nothing behind it)"),
        ),
        _ => (wire::E_IO, format!("{path:?}: {e}")),
    }
}

/// A host file opened beneath the served root.
pub(crate) struct RootFile {
    file: File,
    dir: Arc<OwnedFd>,
    rel: Vec<u8>,
    name: String,
}

impl RootFile {
    /// Opens `rel` beneath `dir`; its metadata comes with it.
    pub fn open(
        dir: &Arc<OwnedFd>,
        rel: &[u8],
    ) -> std::result::Result<(RootFile, SourceMeta), Refusal> {
        let name = format!("/{}", String::from_utf8_lossy(rel));
        let fd = open_beneath(dir.as_fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK)
            .map_err(|e| refusal_of(&name, &e))?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map(|m| meta_of(&m))
            .map_err(|e| refusal_of(&name, &e))?;
        if meta.kind != FileKind::Regular {
            return Err((
                wire::E_NOT_REGULAR,
                format!(
                    "{name:?} is a {}; only regular files can be shadowed",
                    meta.kind.as_str()
                ),
            ));
        }
        Ok((
            RootFile {
                file,
                dir: dir.clone(),
                rel: rel.to_vec(),
                name,
            },
            meta,
        ))
    }
}

impl Source for RootFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn metadata(&self) -> io::Result<SourceMeta> {
        meta_if_named(&self.file, || {
            File::from(open_beneath(self.dir.as_fd(), &self.rel, libc::O_PATH)?).metadata()
        })
    }

    fn fill_metadata(&self) -> io::Result<SourceMeta> {
        Ok(meta_of(&self.file.metadata()?))
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Opens the served root directory.
pub(crate) fn open_root(root: &Path) -> crate::Result<Arc<OwnedFd>> {
    let c = CString::new(root.as_os_str().as_bytes()).map_err(|_| crate::Error::Open {
        path: root.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"),
    })?;
    // SAFETY: a NUL-terminated path; the flags open a directory read-only.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(crate::Error::Open {
            path: root.into(),
            source: io::Error::new(
                io::Error::last_os_error().kind(),
                format!(
                    "{} (--root must name an existing directory)",
                    io::Error::last_os_error()
                ),
            ),
        });
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A file inside an image: its source, metadata and identity (image
/// device, image inode, inode inside the image).
pub(crate) type ImageFile = (Arc<dyn Source>, SourceMeta, (u64, u64, u64));

/// Where an image server's files come from.
pub(crate) fn open_in_image(
    image: &PathBuf,
    rel: &[u8],
) -> std::result::Result<ImageFile, Refusal> {
    #[cfg(feature = "image")]
    {
        use crate::source::ImageSource;
        let inner = format!("/{}", String::from_utf8_lossy(rel));
        let src = ImageSource::open(image, &inner).map_err(|e| {
            let code = match e.kind() {
                io::ErrorKind::NotFound => wire::E_NOT_FOUND,
                io::ErrorKind::PermissionDenied => wire::E_ACCESS,
                _ => wire::E_IO,
            };
            (code, format!("{}: {}", e.location(), e.reason()))
        })?;
        let meta = src
            .metadata()
            .map_err(|e| (wire::E_IO, format!("{inner:?} in the image: {e}")))?;
        if meta.kind != FileKind::Regular {
            return Err((
                wire::E_NOT_REGULAR,
                format!(
                    "{inner:?} in the image is a {}; only regular files can be shadowed",
                    meta.kind.as_str()
                ),
            ));
        }
        let (d, i) = src.image_identity();
        let id = (d, i, u64::from(src.inode_in_image()));
        Ok((Arc::new(src), meta, id))
    }
    #[cfg(not(feature = "image"))]
    {
        let _ = (image, rel);
        Err((
            wire::E_IO,
            "this build has no image support (feature `image`)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_slashes_are_dropped() {
        assert_eq!(relative(b"/big.bin").unwrap(), b"big.bin");
        assert_eq!(relative(b"//a/b").unwrap(), b"a/b");
        assert_eq!(relative(b"big.bin").unwrap(), b"big.bin");
        assert!(relative(b"a\0b").is_err());
    }

    #[test]
    fn escapes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("in")).unwrap();
        std::fs::write(d.path().join("secret"), b"x").unwrap();
        std::fs::write(d.path().join("in/ok"), b"y").unwrap();
        std::os::unix::fs::symlink("../secret", d.path().join("in/up")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("in/abs")).unwrap();
        let root = open_root(&d.path().join("in")).unwrap();
        let (ok, _) = RootFile::open(&root, b"ok").unwrap();
        assert_eq!(
            ok.metadata().unwrap().size,
            1,
            "the identity check reopens it"
        );
        for bad in [&b"../secret"[..], b"up", b"abs", b"x/../../secret"] {
            let code = RootFile::open(&root, bad).err().map(|r| r.0);
            assert!(
                code == Some(wire::E_ESCAPE) || code == Some(wire::E_NOT_FOUND),
                "{:?}: {code:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            RootFile::open(&root, b"../secret").err().map(|r| r.0),
            Some(wire::E_ESCAPE)
        );
        assert_eq!(
            RootFile::open(&root, b"up").err().map(|r| r.0),
            Some(wire::E_ESCAPE)
        );
    }
}
