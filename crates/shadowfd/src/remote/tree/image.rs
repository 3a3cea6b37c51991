//! An ext2/3/4 image served: STAT, LIST and OPEN of paths inside it.
//!
//! The image is opened once, when serving starts, and held for the
//! server's life ([`crate::source::image::OpenImage`]): each request costs
//! one `stat` of the image's path to see that it is still the image held,
//! unchanged (else it is opened and checked again), then lookups in the
//! image's directory indexes.

use super::{ListPage, Opened, PathStat, Refusal, ServedTree};
use crate::remote::wire;
#[cfg(feature = "image")]
use crate::source::FileKind;
#[cfg(feature = "image")]
use std::io;
use std::path::Path;

/// The served image.
pub(crate) struct ImageTree {
    #[cfg(feature = "image")]
    image: crate::source::image::OpenImage,
}

impl ImageTree {
    pub fn open(image: &Path) -> crate::Result<ImageTree> {
        #[cfg(feature = "image")]
        {
            let image =
                crate::source::image::OpenImage::open(image).map_err(|e| crate::Error::Open {
                    // The error names the image (or the path in it) itself.
                    path: e.location().into(),
                    source: io::Error::new(e.kind(), e.reason().to_string()),
                })?;
            Ok(ImageTree { image })
        }
        #[cfg(not(feature = "image"))]
        {
            std::fs::metadata(image).map_err(|e| crate::Error::Open {
                path: image.into(),
                source: e,
            })?;
            Ok(ImageTree {})
        }
    }
}

#[cfg(not(feature = "image"))]
fn no_image() -> Refusal {
    (
        wire::E_IO,
        "this build has no image support (feature `image`)".into(),
    )
}

#[cfg(not(feature = "image"))]
impl ServedTree for ImageTree {
    fn kind(&self) -> &'static str {
        "image"
    }

    fn stat(&self, _rel: &[u8]) -> Result<PathStat, Refusal> {
        Err(no_image())
    }

    fn list(&self, _rel: &[u8], _cursor: u64) -> Result<ListPage, Refusal> {
        Err(no_image())
    }

    fn open(&self, _rel: &[u8]) -> Result<Opened, Refusal> {
        Err(no_image())
    }
}

#[cfg(feature = "image")]
impl ServedTree for ImageTree {
    fn kind(&self) -> &'static str {
        "image"
    }

    /// STAT of a path inside the image.
    fn stat(&self, rel: &[u8]) -> Result<PathStat, Refusal> {
        let s = self.image.stat(rel).map_err(|e| image_refusal(e, false))?;
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

    /// LIST of a directory inside the image (the cursor is a byte position
    /// in the directory's data).
    fn list(&self, rel: &[u8], cursor: u64) -> Result<ListPage, Refusal> {
        use crate::source::image::dir::ListError;
        let p = self
            .image
            .list(rel, cursor, wire::LIST_MAX_ENTRIES, wire::LIST_PAGE_BYTES)
            .map_err(|e| match e {
                ListError::Image(e) => image_refusal(e, true),
                ListError::BadCursor(m) => (wire::E_RANGE, m),
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

    /// Opens the regular file `rel` inside the image, by the inode its
    /// path leads to in the image as it is now.
    fn open(&self, rel: &[u8]) -> Result<Opened, Refusal> {
        let (src, meta) = self.image.open_file(rel).map_err(|e| {
            let code = match e.kind() {
                io::ErrorKind::NotFound => wire::E_NOT_FOUND,
                io::ErrorKind::PermissionDenied => wire::E_ACCESS,
                _ => wire::E_IO,
            };
            (code, format!("{}: {}", e.location(), e.reason()))
        })?;
        if meta.kind != FileKind::Regular {
            return Err((
                wire::E_NOT_REGULAR,
                format!(
                    "{:?} in the image is a {}; only regular files can be shadowed",
                    format!("/{}", String::from_utf8_lossy(rel)),
                    meta.kind.as_str()
                ),
            ));
        }
        Ok(Opened {
            container: src.image_identity(),
            source: std::sync::Arc::new(src),
            meta,
        })
    }
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
