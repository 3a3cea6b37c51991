//! A host file read with `pread64`.

use super::{FileKind, Source, SourceMeta, Timestamp};
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

impl FileSource {
    /// Opens `path` read-only (following symlinks). Any file type opens;
    /// shadows refuse non-regular ones with a clear error. The open is
    /// non-blocking, so a FIFO or device is refused instead of waited on
    /// (regular files ignore the flag).
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileSource> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        Ok(FileSource { file, path })
    }

    /// The path this source was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn metadata(&self) -> io::Result<SourceMeta> {
        let m = self.file.metadata()?;
        let gone = || io::Error::new(io::ErrorKind::NotFound, "the source file is gone");
        if m.nlink() == 0 {
            return Err(gone());
        }
        match std::fs::metadata(&self.path) {
            Ok(p) if p.dev() == m.dev() && p.ino() == m.ino() => Ok(meta_of(&m)),
            Ok(_) => Err(gone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(gone()),
            Err(e) => Err(e),
        }
    }

    fn fill_metadata(&self) -> io::Result<SourceMeta> {
        // The open descriptor's inode is what fills read: its size and times
        // tell whether the bytes changed. Whether the path still names it
        // does not matter to the bytes.
        Ok(meta_of(&self.file.metadata()?))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}
