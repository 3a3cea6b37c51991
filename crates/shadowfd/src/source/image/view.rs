//! A file inside an image as one contiguous read-only mapping: each run of
//! its blocks is the image file mapped in place (`MAP_SHARED | MAP_FIXED`
//! over a reservation), holes are anonymous zero pages. Fills then copy
//! from it with one `UFFDIO_COPY` ([`crate::source::Source::mapped`]),
//! as they do from a host file, instead of reading into a buffer first and
//! copying again: a sequential scan of a file in an image pays one copy a
//! byte, not two.
//!
//! Made on the first fill that asks, and only for files of at least
//! [`VIEW_MIN`] whose blocks are whole pages and whose runs are few
//! ([`VIEW_MAX_RUNS`]): a server with thousands of small files open keeps
//! its mapping count low, and a block size under the page size (1 KiB
//! ext2 images) cannot be mapped in place. The view shows the block map
//! read at open, as `read_at` does; a write to the image is the staleness
//! policy's business (docs/staleness.md), and a page the image no longer
//! holds (the image was truncated) makes the kernel's copy fail with
//! `EFAULT`, after which the fill reads that part with `read_at`, which
//! says where the image ends.

use crate::sys::mmap::RawMap;
use std::fs::File;
use std::os::fd::AsFd;

/// Files smaller than this are read with `read_at` only.
pub(super) const VIEW_MIN: u64 = 1 << 20;

/// Files in more runs than this are read with `read_at` only (each run is
/// a mapping of its own).
pub(super) const VIEW_MAX_RUNS: usize = 256;

/// The mapping ([`ExtentView::addr`], [`ExtentView::len`] bytes: the file's
/// size rounded up to a page).
pub(super) struct ExtentView {
    /// The runs, mapped over `base`; dropped first (fields drop in order).
    _runs: Vec<RawMap>,
    base: RawMap,
}

impl ExtentView {
    /// The view of a file of `size` bytes whose runs are `extents`
    /// (`(offset, image_offset, len)` in bytes, sorted, as
    /// [`super::ImageSource::extents`] gives them) in `image`; `None` where
    /// it cannot or should not be made (see the module documentation).
    pub(super) fn build(
        image: &File,
        extents: &[(u64, u64, u64)],
        size: u64,
    ) -> Option<ExtentView> {
        let page = crate::page_size() as u64;
        let len = size.div_ceil(page) * page;
        let aligned = extents
            .iter()
            .all(|&(o, p, _)| o % page == 0 && p % page == 0);
        if size < VIEW_MIN || extents.len() > VIEW_MAX_RUNS || !aligned {
            return None;
        }
        let base = RawMap::reserve(len as usize).ok()?;
        // SAFETY: our own fresh reservation, which nothing refers into:
        // holes read as the zero page.
        unsafe { base.protect(libc::PROT_READ) }.ok()?;
        let mut runs = Vec::with_capacity(extents.len());
        for &(off, at, n) in extents {
            if off >= len {
                break;
            }
            let n = n.min(len - off);
            // SAFETY: `off..off + n` lies inside our reservation `base`
            // (clipped above, page-aligned), which no Rust reference points
            // into and no other thread uses yet.
            let m = unsafe {
                RawMap::map(
                    Some(base.as_ptr().add(off as usize)),
                    image.as_fd(),
                    (at, n as usize),
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                )
            };
            runs.push(m.ok()?);
        }
        Some(ExtentView { _runs: runs, base })
    }

    pub(super) fn addr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.base.len()
    }
}
