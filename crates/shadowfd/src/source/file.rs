//! A host file read with `pread64`.

use super::{FileKind, Mapped, Source, SourceMeta, Timestamp};
use crate::sys::mmap::RawMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A regular file on the host, opened once and read with `pread64`.
///
/// It counts as gone once it is unlinked, or once its path names another
/// file (it was replaced by a rename).
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    /// The file mapped read-only and shared at its size at open, offered to
    /// fills ([`Source::mapped`]); `None` if it is empty or cannot be mapped.
    map: Option<RawMap>,
}

/// A read-only `MAP_SHARED` mapping of the first `len` bytes of `file`, or
/// `None` (a file system that cannot map, an empty file). Only its address
/// is ever used (by the kernel, inside `UFFDIO_COPY`): a read of a page past
/// the file's current end would raise `SIGBUS` here.
fn map_whole(file: &File, len: u64) -> Option<RawMap> {
    use std::os::fd::AsFd;
    let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
    RawMap::new(file.as_fd(), 0, len, libc::PROT_READ, libc::MAP_SHARED).ok()
}

/// The metadata of the open `file` if its name, looked up again by
/// `lookup`, still leads to it; else a `NotFound` error saying it is gone
/// (unlinked, or replaced by a rename).
pub(crate) fn meta_if_named(
    file: &File,
    lookup: impl FnOnce() -> io::Result<std::fs::Metadata>,
) -> io::Result<SourceMeta> {
    let m = file.metadata()?;
    let gone = || io::Error::new(io::ErrorKind::NotFound, "the source file is gone");
    if m.nlink() == 0 {
        return Err(gone());
    }
    match lookup() {
        Ok(p) if p.dev() == m.dev() && p.ino() == m.ino() => Ok(meta_of(&m)),
        Ok(_) => Err(gone()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(gone()),
        Err(e) => Err(e),
    }
}

pub(crate) fn meta_of(m: &std::fs::Metadata) -> SourceMeta {
    let ft = m.file_type();
    let kind = if ft.is_file() {
        FileKind::Regular
    } else if ft.is_dir() {
        FileKind::Directory
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    SourceMeta {
        size: m.size(),
        mtime: Timestamp::mtime_of(m),
        ctime: Timestamp::ctime_of(m),
        device: m.dev(),
        inode: m.ino(),
        kind,
    }
}

/// [`meta_of`] for what `fstat(2)` returned.
fn meta_of_stat(st: &libc::stat) -> SourceMeta {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::Regular,
        libc::S_IFDIR => FileKind::Directory,
        libc::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    SourceMeta {
        size: st.st_size as u64,
        mtime: Timestamp {
            sec: st.st_mtime as i64,
            nsec: st.st_mtime_nsec as i64,
        },
        ctime: Timestamp {
            sec: st.st_ctime as i64,
            nsec: st.st_ctime_nsec as i64,
        },
        device: st.st_dev as u64,
        inode: st.st_ino as u64,
        kind,
    }
}

impl FileSource {
    /// Opens `path` read-only (following symlinks). Any file type opens;
    /// shadows refuse non-regular ones with a clear error. The open is
    /// non-blocking, so a FIFO or device is refused instead of waited on
    /// (regular files ignore the flag).
    ///
    /// Files whose size says nothing about their contents are refused here
    /// with [`io::ErrorKind::Unsupported`]: those on procfs, sysfs and the
    /// other pseudo filesystems the kernel generates on read (`/proc/meminfo`
    /// reports 0 bytes, a sysfs attribute 4096), recognised by `fstatfs`.
    /// A shadow copies exactly the size a file reports, so it would be empty
    /// or fail; see "Files whose size lies" in `docs/shadows.md`. A socket
    /// (which `open(2)` refuses with `ENXIO`) is named as such.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileSource> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref().to_path_buf();
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                use std::os::unix::fs::FileTypeExt;
                let socket = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
                let what = if socket {
                    "a socket"
                } else {
                    "a device or special file with nothing behind it"
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "not a regular file ({what}); only regular files can be shadowed \
                         (open: {e})"
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        if let Some(fs) = pseudo_filesystem(&file) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the file is on {fs}, a pseudo filesystem whose files are generated when \
                     read: the size they report (often 0 or 4096 bytes) says nothing about \
                     their contents, and a shadow copies exactly the size a file reports. Copy the contents to a regular \
                     file first (e.g. `cat {p} > FILE`) and shadow FILE",
                    p = path.display()
                ),
            ));
        }
        let map = file
            .metadata()
            .ok()
            .filter(|m| m.file_type().is_file())
            .and_then(|m| map_whole(&file, m.size()));
        Ok(FileSource { file, path, map })
    }

    /// The path this source was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `f_type` of the pseudo filesystems whose files report a size unrelated
/// to their contents (`linux/magic.h`).
const PSEUDO_FILESYSTEMS: &[(i64, &str)] = &[
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7366_6373, "securityfs"),
    (0x0027_e0eb, "cgroupfs"),
    (0x6367_7270, "cgroup2fs"),
    (0x6265_6570, "configfs"),
    (0xcafe_4a11, "bpffs"),
    (0x6165_676c, "pstore"),
    (0xde5e_81e4, "efivarfs"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x6e73_6673, "nsfs"),
    (0x6573_5543, "fusectl"),
];

/// The name of the pseudo filesystem `file` is on, if it is on one.
fn pseudo_filesystem(file: &std::fs::File) -> Option<&'static str> {
    use std::os::fd::AsRawFd;
    // SAFETY: statfs is plain data that fstatfs fills in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64 & 0xffff_ffff;
    PSEUDO_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

impl Source for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn metadata(&self) -> io::Result<SourceMeta> {
        meta_if_named(&self.file, || std::fs::metadata(&self.path))
    }

    fn fill_metadata(&self) -> io::Result<SourceMeta> {
        // The open descriptor's inode is what fills read: its size and times
        // tell whether the bytes changed. Whether the path still names it
        // does not matter to the bytes. Plain fstat(2): the same fields as
        // the statx(2) behind `File::metadata`, about 30% cheaper (once per
        // fill).
        use std::os::fd::AsRawFd;
        // SAFETY: stat is plain data that fstat fills in.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a valid out-pointer.
        if unsafe { libc::fstat(self.file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(meta_of_stat(&st))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn mapped(&self) -> Option<Mapped> {
        let m = self.map.as_ref()?;
        // SAFETY: a read-only shared mapping of this file from offset 0,
        // made here, never registered, unmapped only when this source drops.
        Some(unsafe { Mapped::new(m.as_ptr(), m.len()) })
    }

    /// Device and inode; size, mtime and ctime in ns (one `fstat`).
    fn identity(&self) -> Option<super::SourceIdentity> {
        Some(super::SourceIdentity::of_file(&self.fill_metadata().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_metadata_matches_metadata() {
        let dir = std::env::temp_dir().join(format!("shadowfd-meta-{}", std::process::id()));
        std::fs::write(&dir, b"twelve bytes").unwrap();
        let s = FileSource::open(&dir).unwrap();
        let a = s.metadata().unwrap();
        let b = s.fill_metadata().unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(a, b);
        assert_eq!((b.size, b.kind), (12, FileKind::Regular));
    }
}
