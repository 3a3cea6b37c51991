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

mod blocks;
mod crc32c;
pub(crate) mod dir;
mod fail;
mod file;
mod handle;
mod index;
mod layout;
mod resolve;
mod threaded;
mod view;

use super::Timestamp;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

pub use file::ImageSource;
pub(crate) use handle::{OpenImage, batch};

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

/// Mixes the image's device and inode numbers into one identity.
fn mix(dev: u64, ino: u64) -> u64 {
    let mut z = dev.rotate_left(32) ^ ino;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `inner` made absolute (a path inside an image is taken from its root).
fn absolute(inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(inner.len() + 1);
    if inner.first() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(inner);
    p
}

/// The human form of a path inside the image.
fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The later of two times.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_depends_on_both_numbers() {
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(mix(1, 2), mix(1, 3));
        assert_ne!(mix(1, 2), mix(3, 2));
    }
}
