//! What a server serves, behind one narrow trait: [`ServedTree`] answers
//! STAT, LIST and OPEN for a path below the served root. Each kind of tree
//! lives in its own file beside this one:
//!
//! - [`root`]: files beneath a host directory, opened with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`;
//! - [`image`]: files inside an ext2/3/4 image;
//! - `object`: the objects under an `s3://BUCKET/PREFIX/` (feature
//!   `object`).

use super::wire;
use crate::source::{Source, SourceMeta};
use std::path::PathBuf;
use std::sync::Arc;

mod image;
#[cfg(feature = "object")]
mod object;
mod root;

/// A refusal to send a client: protocol error code and message.
pub(crate) type Refusal = (u64, String);

/// What a server serves.
#[derive(Debug, Clone)]
pub enum Tree {
    /// Regular files beneath this host directory.
    Root(PathBuf),
    /// Regular files inside this ext2/3/4 image.
    Image(PathBuf),
    /// The objects under this `s3://BUCKET/PREFIX/`, read with these
    /// settings (the disk cache included); docs/object-store.md.
    #[cfg(feature = "object")]
    Object(String, crate::source::object::ObjectConfig),
}

/// A regular file opened in a served tree.
pub(crate) struct Opened {
    pub source: Arc<dyn Source>,
    /// Its metadata, read as it was opened.
    pub meta: SourceMeta,
    /// What holds it: (0, host device) for a host file, (image device,
    /// image inode) for a file inside an image. With the inode, size and
    /// mtime it keys the server's shadow table.
    pub container: (u64, u64),
}

/// A served tree: what STAT, LIST and OPEN see below its root. `rel` is a
/// path as [`relative`] returns it.
pub(crate) trait ServedTree: Send + Sync {
    /// What `status` calls this kind of tree.
    fn kind(&self) -> &'static str;
    /// What `rel` is (symlinks followed, within the tree).
    fn stat(&self, rel: &[u8]) -> Result<PathStat, Refusal>;
    /// One page of the directory `rel`, from `cursor` (0 for the first
    /// page; then the `next` of the page before).
    fn list(&self, rel: &[u8], cursor: u64) -> Result<ListPage, Refusal>;
    /// Opens the regular file `rel`.
    fn open(&self, rel: &[u8]) -> Result<Opened, Refusal>;
}

/// Opens `tree` for serving: the errors a user sees at `serve`'s start.
pub(crate) fn open(tree: &Tree) -> crate::Result<Arc<dyn ServedTree>> {
    Ok(match tree {
        Tree::Root(p) => Arc::new(root::RootTree::open(p)?),
        Tree::Image(p) => Arc::new(image::ImageTree::open(p)?),
        #[cfg(feature = "object")]
        Tree::Object(url, cfg) => Arc::new(object::ObjectServedTree::open(url, cfg.clone())?),
    })
}

/// What `status` adds to a shadow's JSON for its source: `,"object":{…}`
/// for an object served from a bucket prefix, else nothing.
pub(crate) fn source_json(meta: &SourceMeta) -> String {
    #[cfg(feature = "object")]
    {
        object::object_json(meta)
    }
    #[cfg(not(feature = "object"))]
    {
        let _ = meta;
        String::new()
    }
}

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

pub(super) fn kind_of_mode(mode: u32) -> u64 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => wire::KIND_FILE,
        libc::S_IFDIR => wire::KIND_DIR,
        _ => wire::KIND_OTHER,
    }
}

pub(super) fn shown(rel: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(rel))
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
}
