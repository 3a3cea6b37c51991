//! Where a shadow's bytes come from.
//!
//! The engine only ever sees a [`Source`]: positional reads plus metadata. A
//! host file ([`FileSource`]) is the first backend; a file inside a disk image
//! or a callback into an in-process kernel fits the same trait.

mod file;
#[cfg(feature = "image")]
pub mod image;
#[cfg(feature = "object")]
pub mod object;

pub use file::FileSource;
pub(crate) use file::{meta_if_named, meta_of};
#[cfg(feature = "image")]
pub use image::{ImageAccess, ImageError, ImageSource};
#[cfg(feature = "object")]
pub use object::{ObjectConfig, ObjectError, ObjectSource};

use std::io;

// In a leaf module, so that the error type can name it without importing
// this layer.
pub use crate::file_kind::FileKind;

/// A point in time, as stored in an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: i64,
}

impl Timestamp {
    /// The modification time of a host file.
    pub fn mtime_of(m: &std::fs::Metadata) -> Timestamp {
        use std::os::unix::fs::MetadataExt;
        Timestamp {
            sec: m.mtime(),
            nsec: m.mtime_nsec(),
        }
    }

    /// The status-change time of a host file.
    pub fn ctime_of(m: &std::fs::Metadata) -> Timestamp {
        use std::os::unix::fs::MetadataExt;
        Timestamp {
            sec: m.ctime(),
            nsec: m.ctime_nsec(),
        }
    }
}

/// A source's metadata: what staleness compares.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SourceMeta {
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// Identity of the container (the device of a host file, or the image
    /// file's device and inode for a file inside an image).
    pub device: u64,
    /// Identity of the file within its container (inode number).
    pub inode: u64,
    pub kind: FileKind,
}

/// A readable, fixed-identity file that a shadow copies from.
///
/// Implementations must be safe to call from several threads at once: the
/// fault service reads different chunks in parallel.
pub trait Source: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`, like `pread(2)`. Returns the
    /// count read; 0 means end of file. Short reads are allowed.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The source's metadata as it is now. Returns an error of kind
    /// [`io::ErrorKind::NotFound`] once the source is gone (deleted or
    /// replaced by another file).
    fn metadata(&self) -> io::Result<SourceMeta>;

    /// The metadata a lazy shadow checks on every fill, to see whether the
    /// bytes may have changed. Defaults to [`Source::metadata`]; a backend
    /// may answer more cheaply by leaving out what only tells whether the
    /// source is still reachable by name (a host file answers with one
    /// `fstat` and skips the `stat` of its path).
    fn fill_metadata(&self) -> io::Result<SourceMeta> {
        self.metadata()
    }

    /// A short human name for messages, such as the path.
    fn name(&self) -> String;

    /// The source's bytes in this process's memory, if it can offer them:
    /// a read-only shared mapping of its file, for example. Fills then copy
    /// from there with one `UFFDIO_COPY`, straight into the shadow, instead
    /// of reading into a buffer first. The engine never reads the range
    /// itself: only the kernel does, inside `UFFDIO_COPY`, where a page
    /// that cannot be read (the file shrank under the mapping) is an error
    /// (`EFAULT`), not a `SIGBUS` of the engine; the fill then reads that
    /// part with [`Source::read_at`], which says where the source ends.
    /// Defaults to `None`: every fill uses `read_at`.
    fn mapped(&self) -> Option<Mapped> {
        None
    }

    /// Who the source is, for working-set records (docs/worksets.md):
    /// `None` (the default) if it cannot say, and then nothing is recorded
    /// or replayed for it. A backend that answers must change
    /// [`SourceIdentity::version`] whenever its bytes may have changed.
    fn identity(&self) -> Option<SourceIdentity> {
        None
    }
}

/// A source's identity ([`Source::identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    /// Which source this is, stable while it stays the same file or
    /// object (a host file: its device and inode numbers). Records are
    /// found by it.
    pub which: String,
    /// The version of its content (a host file: size, mtime and ctime in
    /// ns). A record of another version is discarded.
    pub version: String,
}

impl SourceIdentity {
    /// A host file's identity from its metadata.
    pub fn of_file(m: &SourceMeta) -> SourceIdentity {
        SourceIdentity {
            which: format!("file dev={} ino={}", m.device, m.inode),
            version: format!(
                "size={} mtime={}.{:09} ctime={}.{:09}",
                m.size, m.mtime.sec, m.mtime.nsec, m.ctime.sec, m.ctime.nsec
            ),
        }
    }

    /// An identity the embedder chose for a callback source: `key` names
    /// the content, so it is both which source and its version.
    pub fn embedder(key: &str) -> SourceIdentity {
        SourceIdentity {
            which: format!("key {key}"),
            version: String::new(),
        }
    }
}

/// A source's bytes mapped in memory ([`Source::mapped`]): byte `i` of the
/// source is at `addr + i` for `i < len`. Only an address; nothing in this
/// crate dereferences it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    addr: u64,
    len: u64,
}

impl Mapped {
    /// # Safety
    /// `addr..addr + len` must be a mapping in this process that holds the
    /// source's bytes from offset 0 (pages past the source's current end
    /// may fault), that nothing registers with a userfaultfd, and that stays
    /// mapped for as long as the source that returns it lives. The engine
    /// copies from it into shadows that consumers read.
    pub unsafe fn new(addr: *const u8, len: usize) -> Mapped {
        Mapped {
            addr: addr as u64,
            len: len as u64,
        }
    }

    /// The address of the source's first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// How many bytes are mapped.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A pointer to a source is a source (`Arc<dyn Source>`, `Box<dyn Source>`).
macro_rules! forward_source {
    ($($ptr:ident)::+) => {
        impl<S: Source + ?Sized> Source for $($ptr)::+<S> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                (**self).read_at(buf, offset)
            }
            fn metadata(&self) -> io::Result<SourceMeta> {
                (**self).metadata()
            }
            fn fill_metadata(&self) -> io::Result<SourceMeta> {
                (**self).fill_metadata()
            }
            fn name(&self) -> String {
                (**self).name()
            }
            fn mapped(&self) -> Option<Mapped> {
                (**self).mapped()
            }
            fn identity(&self) -> Option<SourceIdentity> {
                (**self).identity()
            }
        }
    };
}

forward_source!(std::sync::Arc);
forward_source!(Box);

/// How [`read_full`] stopped early.
#[derive(Debug)]
pub(crate) enum ReadFail {
    /// The source returned an error; `done` bytes were read before it.
    Error { done: usize, error: io::Error },
    /// The source reported end of file after `done` bytes.
    Eof { done: usize },
}

/// Reads exactly `buf.len()` bytes at `offset`, looping over short reads and
/// retrying `EINTR`. End of file before the buffer is full is a failure:
/// missing bytes are never replaced by zeros.
pub(crate) fn read_full(src: &dyn Source, buf: &mut [u8], offset: u64) -> Result<(), ReadFail> {
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(ReadFail::Eof { done }),
            Ok(n) => done += n.min(buf.len() - done),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(ReadFail::Error { done, error }),
        }
    }
    Ok(())
}
