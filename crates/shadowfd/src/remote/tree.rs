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
                "a path of {} bytes; the limit is {} bytes (PATH_MAX): send it shorter, \
                 without `.` components or repeated slashes",
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

/// What STAT answers for a path (since protocol version 4).
#[derive(Debug, Clone)]
pub(crate) struct PathStat {
    /// [`wire::KIND_FILE`], [`wire::KIND_DIR`] or [`wire::KIND_OTHER`].
    pub kind: u64,
    pub size: u64,
    pub device: u64,
    pub inode: u64,
    pub mtime: crate::source::Timestamp,
    pub nlink: u64,
}

/// One page of LIST (since protocol version 4).
#[derive(Debug, Clone)]
pub(crate) struct ListPage {
    pub entries: Vec<wire::DirEntry>,
    /// The cursor of the next page.
    pub next: u64,
    /// Whether this is the last page.
    pub end: bool,
}

fn kind_of_mode(mode: u32) -> u64 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => wire::KIND_FILE,
        libc::S_IFDIR => wire::KIND_DIR,
        _ => wire::KIND_OTHER,
    }
}

fn shown(rel: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(rel))
}

/// STAT of `rel` beneath the root: confined like OPEN (symlinks followed
/// inside the tree only).
pub(crate) fn stat_root(dir: &Arc<OwnedFd>, rel: &[u8]) -> std::result::Result<PathStat, Refusal> {
    use std::os::unix::fs::MetadataExt;
    let name = shown(rel);
    let fd = open_beneath(dir.as_fd(), rel, libc::O_PATH).map_err(|e| refusal_of(&name, &e))?;
    let m = File::from(fd)
        .metadata()
        .map_err(|e| refusal_of(&name, &e))?;
    Ok(PathStat {
        kind: kind_of_mode(m.mode()),
        size: m.size(),
        device: m.dev(),
        inode: m.ino(),
        mtime: crate::source::Timestamp::mtime_of(&m),
        nlink: m.nlink(),
    })
}

fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &[u8]) -> Option<libc::stat64> {
    let c = CString::new(name).ok()?;
    // SAFETY: stat64 is plain data; all-zero is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: a live directory descriptor, a NUL-terminated single name
    // and a stat64 to fill.
    let r = unsafe {
        libc::fstatat64(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    (r == 0).then_some(st)
}

/// LIST of the directory `rel` beneath the root, from `cursor` (0 for the
/// first page; then the `next` of the page before). Entries are the
/// regular files and directories in it; a symlink is listed as what it
/// leads to inside the tree, and left out if it leads nowhere or out of the
/// tree (as OPEN refuses it); sockets, FIFOs and devices are left out.
pub(crate) fn list_root(
    dir: &Arc<OwnedFd>,
    rel: &[u8],
    cursor: u64,
) -> std::result::Result<ListPage, Refusal> {
    let name = shown(rel);
    let pfd = open_beneath(dir.as_fd(), rel, libc::O_PATH).map_err(|e| refusal_of(&name, &e))?;
    let pfile = File::from(pfd);
    let m = pfile.metadata().map_err(|e| refusal_of(&name, &e))?;
    if !m.is_dir() {
        return Err((
            wire::E_NOT_DIR,
            format!("{name:?} is not a directory; LIST takes a directory"),
        ));
    }
    // SAFETY: a live O_PATH directory descriptor and a NUL-terminated name.
    let raw = unsafe {
        libc::openat(
            pfile.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(refusal_of(&name, &io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let dfd = unsafe { OwnedFd::from_raw_fd(raw) };
    if cursor != 0 {
        if cursor > i64::MAX as u64 {
            return Err((
                wire::E_RANGE,
                format!("LIST cursor {cursor} is not one a LIST reply gave; start with 0"),
            ));
        }
        // SAFETY: a live directory descriptor; a directory offset.
        if unsafe { libc::lseek64(dfd.as_raw_fd(), cursor as i64, libc::SEEK_SET) } < 0 {
            return Err((
                wire::E_RANGE,
                format!(
                    "LIST cursor {cursor} of {name:?}: {}; start with 0",
                    io::Error::last_os_error()
                ),
            ));
        }
    }
    let mut page = ListPage {
        entries: Vec::new(),
        next: cursor,
        end: false,
    };
    let mut bytes = 0usize;
    let mut scanned = 0usize;
    let mut buf = vec![0u8; 32 << 10];
    loop {
        // SAFETY: a live directory descriptor and a writable buffer of the
        // length passed.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dfd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(refusal_of(&name, &io::Error::last_os_error()));
        }
        if n == 0 {
            page.end = true;
            return Ok(page);
        }
        let mut at = 0usize;
        while at < n as usize {
            let d_off = u64::from_le_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes"));
            let reclen = usize::from(u16::from_le_bytes([buf[at + 16], buf[at + 17]]));
            let nm = &buf[at + 19..at + reclen];
            let nm = &nm[..nm.iter().position(|&b| b == 0).unwrap_or(nm.len())];
            if nm != b"." && nm != b".." {
                if page.entries.len() >= wire::LIST_MAX_ENTRIES
                    || bytes >= wire::LIST_PAGE_BYTES
                    || scanned >= 4 * wire::LIST_MAX_ENTRIES
                {
                    return Ok(page);
                }
                scanned += 1;
                if let Some(e) = root_entry(dir, rel, dfd.as_fd(), nm) {
                    bytes += wire::LIST_ENTRY_HEAD + nm.len();
                    page.entries.push(e);
                }
            }
            page.next = d_off;
            at += reclen;
        }
    }
}

/// One entry of a root listing, or `None` if it is left out.
fn root_entry(
    root: &Arc<OwnedFd>,
    rel: &[u8],
    dfd: BorrowedFd<'_>,
    nm: &[u8],
) -> Option<wire::DirEntry> {
    let st = fstatat_nofollow(dfd, nm)?;
    let (kind, inode) = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => (wire::KIND_FILE, st.st_ino),
        libc::S_IFDIR => (wire::KIND_DIR, st.st_ino),
        libc::S_IFLNK => {
            use std::os::unix::fs::MetadataExt;
            let mut p = rel.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(nm);
            let fd = open_beneath(root.as_fd(), &p, libc::O_PATH).ok()?;
            let m = File::from(fd).metadata().ok()?;
            match kind_of_mode(m.mode()) {
                wire::KIND_OTHER => return None,
                k => (k, m.ino()),
            }
        }
        _ => return None,
    };
    Some(wire::DirEntry {
        name: nm.to_vec(),
        kind,
        inode,
    })
}

#[cfg(feature = "image")]
fn image_refusal(e: crate::source::ImageError, list: bool) -> Refusal {
    let code = match e.kind() {
        io::ErrorKind::NotFound => wire::E_NOT_FOUND,
        io::ErrorKind::PermissionDenied => wire::E_ACCESS,
        io::ErrorKind::NotADirectory if list => wire::E_NOT_DIR,
        io::ErrorKind::NotADirectory => wire::E_NOT_FOUND,
        _ => wire::E_IO,
    };
    (code, format!("{}: {}", e.location(), e.reason()))
}

/// STAT of a path inside an image.
pub(crate) fn stat_in_image(image: &Path, rel: &[u8]) -> std::result::Result<PathStat, Refusal> {
    #[cfg(feature = "image")]
    {
        let s = crate::source::image::dir::stat(image, rel).map_err(|e| image_refusal(e, false))?;
        Ok(PathStat {
            kind: match s.kind {
                FileKind::Regular => wire::KIND_FILE,
                FileKind::Directory => wire::KIND_DIR,
                _ => wire::KIND_OTHER,
            },
            size: s.size,
            device: s.device,
            inode: s.inode,
            mtime: s.mtime,
            nlink: s.nlink,
        })
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

/// LIST of a directory inside an image (the cursor is a byte position in
/// the directory's data).
pub(crate) fn list_in_image(
    image: &Path,
    rel: &[u8],
    cursor: u64,
) -> std::result::Result<ListPage, Refusal> {
    #[cfg(feature = "image")]
    {
        let p = crate::source::image::dir::list(
            image,
            rel,
            cursor,
            wire::LIST_MAX_ENTRIES,
            wire::LIST_PAGE_BYTES,
        )
        .map_err(|e| match e {
            crate::source::image::dir::ListError::Image(e) => image_refusal(e, true),
            crate::source::image::dir::ListError::BadCursor(m) => (wire::E_RANGE, m),
        })?;
        let entries = p
            .entries
            .into_iter()
            .map(|e| wire::DirEntry {
                name: e.name,
                kind: if e.kind == FileKind::Directory {
                    wire::KIND_DIR
                } else {
                    wire::KIND_FILE
                },
                inode: e.inode,
            })
            .collect();
        Ok(ListPage {
            entries,
            next: p.next,
            end: p.end,
        })
    }
    #[cfg(not(feature = "image"))]
    {
        let _ = (image, rel, cursor);
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
