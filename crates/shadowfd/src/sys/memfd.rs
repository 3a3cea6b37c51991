//! An owned memfd with sealing, plus the small set of calls shadows make on it.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Seals of an eager shadow: contents and size frozen, seal set frozen.
pub const EAGER_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
/// Seals of a lazy shadow, added after its fill mapping is registered.
/// `F_SEAL_WRITE` would make `UFFDIO_REGISTER` fail; `F_SEAL_FUTURE_WRITE`
/// stops `write(2)` and new writable mappings while `UFFDIO_COPY` still works.
pub const LAZY_SEALS: libc::c_int =
    libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// A sealable memfd of a fixed size.
#[derive(Debug)]
pub struct Memfd {
    file: File,
}

impl Memfd {
    /// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)` then `ftruncate(size)`.
    /// The file is sparse: no memory is used until pages are filled.
    pub fn create(name: &str, size: u64) -> Result<Memfd> {
        let cname = CString::new(format!("shadowfd:{}", name.replace('\0', "?")))
            .unwrap_or_else(|_| CString::new("shadowfd").expect("static name has no NUL"));
        // SAFETY: `cname` is a valid NUL-terminated string; flags are valid memfd flags.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(Error::sys("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|e| Error::sys(format!("ftruncate memfd to {size} bytes"), e))?;
        Ok(Memfd { file })
    }

    /// Bytes of memory the memfd holds (`st_blocks * 512`).
    pub fn resident_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::sys("fstat memfd", e))?;
        Ok(m.blocks() * 512)
    }

    /// The memfd's inode number (what `/proc/PID/maps` names it by).
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::sys("fstat memfd", e))?;
        Ok(m.ino())
    }

    /// Adds `F_SEAL_*` flags.
    pub fn add_seals(&self, seals: libc::c_int) -> Result<()> {
        // SAFETY: F_ADD_SEALS takes an int argument; the fd is ours and open.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if r < 0 {
            return Err(Error::sys(
                "fcntl(F_ADD_SEALS)",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// The current `F_SEAL_*` set.
    pub fn seals(&self) -> Result<libc::c_int> {
        seals_of(self.file.as_fd())
    }

    /// `pwrite` all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// `pread` into `buf` at `offset`; returns the count read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    /// A new `O_RDONLY` descriptor of the same memfd, opened through
    /// `/proc/self/fd`, so that its holder cannot write even without seals.
    pub fn reopen_readonly(&self) -> Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        std::fs::OpenOptions::new()
            .read(true)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|e| Error::sys(format!("reopen {path} read-only"), e))
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `fcntl(F_GET_SEALS)` on any descriptor.
pub fn seals_of(fd: BorrowedFd<'_>) -> Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument; the fd is borrowed and open.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        return Err(Error::sys(
            "fcntl(F_GET_SEALS)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(r)
}
