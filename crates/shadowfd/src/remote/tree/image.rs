//! An ext2/3/4 image served: STAT, LIST and OPEN of paths inside it.

use super::{ListPage, Opened, PathStat, Refusal, ServedTree};
use crate::remote::wire;
#[cfg(feature = "image")]
use crate::source::{FileKind, Source};
#[cfg(feature = "image")]
use std::io;
use std::path::{Path, PathBuf};

/// The served image, named by its path (opened per request).
pub(crate) struct ImageTree {
    image: PathBuf,
}

impl ImageTree {
    pub fn open(image: &Path) -> crate::Result<ImageTree> {
        std::fs::metadata(image).map_err(|e| crate::Error::Open {
            path: image.into(),
            source: e,
        })?;
        Ok(ImageTree {
            image: image.into(),
        })
    }
}

impl ServedTree for ImageTree {
    fn kind(&self) -> &'static str {
        "image"
    }

    fn stat(&self, rel: &[u8]) -> Result<PathStat, Refusal> {
        stat_in_image(&self.image, rel)
    }

    fn list(&self, rel: &[u8], cursor: u64) -> Result<ListPage, Refusal> {
        list_in_image(&self.image, rel, cursor)
    }

    fn open(&self, rel: &[u8]) -> Result<Opened, Refusal> {
        open_in_image(&self.image, rel)
    }
}

/// Opens the regular file `rel` inside the image.
fn open_in_image(image: &Path, rel: &[u8]) -> Result<Opened, Refusal> {
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
        Ok(Opened {
            container: src.image_identity(),
            source: std::sync::Arc::new(src),
            meta,
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
fn stat_in_image(image: &Path, rel: &[u8]) -> Result<PathStat, Refusal> {
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
fn list_in_image(image: &Path, rel: &[u8], cursor: u64) -> Result<ListPage, Refusal> {
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
