//! A read-only `MAP_SHARED` mapping of a host file (or a file on the FUSE
//! mount): the references the shadows are compared with.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// An owned mapping of a whole file, unmapped on drop.
pub struct FileMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl FileMap {
    /// Maps `len` (> 0) bytes of `file` read-only and shared.
    pub fn new(file: &File, len: usize) -> io::Result<FileMap> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map an empty file",
            ));
        }
        // SAFETY: a new mapping at an address the kernel chooses (NULL hint,
        // no MAP_FIXED) cannot alias any Rust object; the fd is open for the
        // duration of the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FileMap {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL without MAP_FIXED"),
            len,
        })
    }

    /// Bytes of the mapped file present in memory (`mincore`): the page cache
    /// pages of the file, whether or not this mapping has touched them.
    pub fn resident_bytes(&self) -> io::Result<u64> {
        let page = shadowfd::page_size();
        let mut vec = vec![0u8; self.len.div_ceil(page)];
        // SAFETY: the range is this live mapping; `vec` has one byte per page.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let pages = vec.iter().filter(|&&b| b & 1 != 0).count() as u64;
        Ok((pages * page as u64).min(self.len as u64))
    }
}

impl std::ops::Deref for FileMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live PROT_READ mapping owned by `self`;
        // the file is never truncated while mapped (the bench owns it).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this handle owns; no slice borrowed
        // from it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
