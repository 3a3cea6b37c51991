//! A host directory served: files beneath it are opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so no path, symlink
//! or `/proc` magic link leads out of it.

use super::{ListPage, Opened, PathStat, Refusal, ServedTree, kind_of_mode, shown};
use crate::remote::wire;
use crate::source::{FileKind, Source, SourceMeta, meta_if_named, meta_of};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The served host directory.
pub(crate) struct RootTree {
    dir: Arc<OwnedFd>,
}

impl RootTree {
    pub fn open(root: &Path) -> crate::Result<RootTree> {
        Ok(RootTree {
            dir: open_root(root)?,
        })
    }
}

impl ServedTree for RootTree {
    fn kind(&self) -> &'static str {
        "root"
    }

    fn stat(&self, rel: &[u8]) -> Result<PathStat, Refusal> {
        stat_root(&self.dir, rel)
    }

    fn list(&self, rel: &[u8], cursor: u64) -> Result<ListPage, Refusal> {
        list_root(&self.dir, rel, cursor)
    }

    fn open(&self, rel: &[u8]) -> Result<Opened, Refusal> {
        let (f, meta) = RootFile::open(&self.dir, rel)?;
        Ok(Opened {
            source: Arc::new(f),
            container: (0, meta.device),
            meta,
        })
    }
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn open_beneath(dir: BorrowedFd<'_>, rel: &[u8], flags: i32) -> io::Result<OwnedFd> {
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
fn open_root(root: &Path) -> crate::Result<Arc<OwnedFd>> {
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

/// STAT of `rel` beneath the root: confined like OPEN (symlinks followed
/// inside the tree only).
fn stat_root(dir: &Arc<OwnedFd>, rel: &[u8]) -> std::result::Result<PathStat, Refusal> {
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
fn list_root(
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

#[cfg(test)]
mod tests {
    use super::*;

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
