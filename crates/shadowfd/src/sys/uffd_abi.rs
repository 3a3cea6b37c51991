//! Raw userfaultfd ABI: structs, constants and the ioctl calls, nothing else.
//!
//! Everything here mirrors `include/uapi/linux/userfaultfd.h`. The typed API
//! in [`super`] is the only user; no other module issues userfaultfd ioctls.

#![allow(non_camel_case_types, dead_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u8 = 0xAA;

pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// Names of the feature bits, in bit order, for reports.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    (UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (UFFD_FEATURE_SIGBUS, "SIGBUS"),
    (UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    (UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    (UFFD_FEATURE_MOVE, "MOVE"),
];

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;

// ioctl numbers ("_UFFDIO_*" in the header).
const _UFFDIO_REGISTER: u8 = 0x00;
const _UFFDIO_UNREGISTER: u8 = 0x01;
const _UFFDIO_WAKE: u8 = 0x02;
const _UFFDIO_COPY: u8 = 0x03;
const _UFFDIO_CONTINUE: u8 = 0x07;
const _UFFDIO_POISON: u8 = 0x08;
const _UFFDIO_WRITEPROTECT: u8 = 0x06;
const _UFFDIO_API: u8 = 0x3F;
/// Bit of `uffdio_register.ioctls` that says UFFDIO_POISON works on the range.
pub const UFFDIO_POISON_BIT: u64 = 1 << _UFFDIO_POISON;
pub const UFFDIO_COPY_BIT: u64 = 1 << _UFFDIO_COPY;
/// Bit of `uffdio_register.ioctls` that says UFFDIO_CONTINUE works on the range.
pub const UFFDIO_CONTINUE_BIT: u64 = 1 << _UFFDIO_CONTINUE;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    pub mapped: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

/// `struct uffd_msg`: 32 bytes, the event byte first, then a union of three
/// words: `pagefault {flags, address, ptid}`, `fork {ufd}`,
/// `remap {from, to, len}`, `remove`/`unmap {start, end}`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    /// `arg.pagefault.flags`, or the first word of another arm.
    pub arg0: u64,
    /// `arg.pagefault.address`, or the second word of another arm.
    pub arg1: u64,
    /// `arg.pagefault.feat.ptid` and padding.
    pub arg2: u64,
}

const _: () = assert!(std::mem::size_of::<uffd_msg>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_copy>() == 40);
const _: () = assert!(std::mem::size_of::<uffdio_register>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_poison>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_continue>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_writeprotect>() == 24);

/// `_IOWR(UFFDIO, nr, T)` / `_IOR(UFFDIO, nr, T)` as a `c_ulong`.
macro_rules! uffd_ioctl {
    ($name:ident = $dir:ident($nr:expr, $t:ty)) => {
        const $name: libc::c_ulong = nix::$dir!(UFFDIO, $nr, std::mem::size_of::<$t>()) as _;
    };
}

uffd_ioctl!(UFFDIO_API = request_code_readwrite(_UFFDIO_API, uffdio_api));
uffd_ioctl!(UFFDIO_REGISTER = request_code_readwrite(_UFFDIO_REGISTER, uffdio_register));
uffd_ioctl!(UFFDIO_UNREGISTER = request_code_read(_UFFDIO_UNREGISTER, uffdio_range));
uffd_ioctl!(UFFDIO_WAKE = request_code_read(_UFFDIO_WAKE, uffdio_range));
uffd_ioctl!(UFFDIO_COPY = request_code_readwrite(_UFFDIO_COPY, uffdio_copy));
uffd_ioctl!(UFFDIO_CONTINUE = request_code_readwrite(_UFFDIO_CONTINUE, uffdio_continue));
uffd_ioctl!(UFFDIO_POISON = request_code_readwrite(_UFFDIO_POISON, uffdio_poison));
uffd_ioctl!(
    UFFDIO_WRITEPROTECT = request_code_readwrite(_UFFDIO_WRITEPROTECT, uffdio_writeprotect)
);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = nix::request_code_none!(UFFDIO, 0x00) as _;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `userfaultfd(2)`.
pub fn userfaultfd_syscall(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes one integer argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `ioctl(USERFAULTFD_IOC_NEW)` on an open `/dev/userfaultfd`.
pub fn userfaultfd_devnode(dev: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd.
    let fd = check(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) })?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API`: negotiate `features`; returns what the kernel filled in.
pub fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<uffdio_api> {
    let mut arg = uffdio_api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `arg` is a live, correctly sized uffdio_api the kernel reads and writes.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut arg) })?;
    Ok(arg)
}

/// `UFFDIO_REGISTER` in `mode` (`UFFDIO_REGISTER_MODE_*` bits); returns the
/// ioctls allowed on the range.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut arg = uffdio_register {
        range: uffdio_range { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: `arg` is a live uffdio_register; the kernel only inspects the range, not the memory.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut arg) })?;
    Ok(arg.ioctls)
}

/// `UFFDIO_UNREGISTER`; wakes any thread still waiting in the range.
pub fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = uffdio_range { start, len };
    // SAFETY: `arg` is a live uffdio_range read by the kernel.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut arg) })?;
    Ok(())
}

/// `UFFDIO_WAKE`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = uffdio_range { start, len };
    // SAFETY: `arg` is a live uffdio_range read by the kernel.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE, &mut arg) })?;
    Ok(())
}

/// `UFFDIO_COPY`. On failure returns the error and the bytes copied before it
/// (the kernel reports partial progress in `copy`).
///
/// # Safety
/// `src..src+len` must be readable memory of this process that is not
/// registered with any userfaultfd, and `dst` must be a range registered with
/// `fd`.
pub unsafe fn copy(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: *const u8,
    len: u64,
    mode: u64,
) -> Result<u64, (io::Error, u64)> {
    let mut arg = uffdio_copy {
        dst,
        src: src as u64,
        len,
        mode,
        copy: 0,
    };
    // SAFETY: caller guarantees `src` is readable for `len`; the kernel validates `dst`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY, &mut arg) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        let done = if arg.copy > 0 { arg.copy as u64 } else { 0 };
        return Err((err, done));
    }
    Ok(arg.copy as u64)
}

/// `UFFDIO_CONTINUE`: maps the page-cache pages of `start..start+len` into
/// the registered range. Returns the bytes mapped; on failure the error and
/// the bytes mapped before it.
pub fn continue_range(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    mode: u64,
) -> Result<u64, (io::Error, u64)> {
    let mut arg = uffdio_continue {
        range: uffdio_range { start, len },
        mode,
        mapped: 0,
    };
    // SAFETY: `arg` is a live uffdio_continue; the kernel validates the range
    // and maps only pages already in the page cache.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_CONTINUE, &mut arg) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return Err((err, arg.mapped.max(0) as u64));
    }
    Ok(arg.mapped.max(0) as u64)
}

/// `UFFDIO_WRITEPROTECT` with `mode`; the engine never registers a range
/// for write-protection, so with `mode` 0 this changes nothing and only says
/// whether the userfaultfd's address space is still alive (`ESRCH` once it
/// is gone).
pub fn writeprotect(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut arg = uffdio_writeprotect {
        range: uffdio_range { start, len },
        mode,
    };
    // SAFETY: `arg` is a live uffdio_writeprotect; the kernel validates the range.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg) })?;
    Ok(())
}

/// `UFFDIO_POISON`: the next access to the range raises SIGBUS.
pub fn poison(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut arg = uffdio_poison {
        range: uffdio_range { start, len },
        mode,
        updated: 0,
    };
    // SAFETY: `arg` is a live uffdio_poison; the kernel validates the range.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_POISON, &mut arg) })?;
    Ok(arg.updated.max(0) as u64)
}

/// The values `include/uapi/linux/userfaultfd.h` gives these names (the
/// `_IOWR`/`_IOR` encodings on x86-64 and arm64, and the feature bits), so a
/// typo in a number or a struct layout fails here, not in the kernel.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn feature_and_mode_bits_match_the_kernel_header() {
        assert_eq!(UFFD_FEATURE_MISSING_SHMEM, 0x20);
        assert_eq!(UFFD_FEATURE_THREAD_ID, 0x100);
        assert_eq!(UFFD_FEATURE_MINOR_SHMEM, 0x400);
        assert_eq!(UFFD_FEATURE_EXACT_ADDRESS, 0x800);
        assert_eq!(UFFD_FEATURE_POISON, 0x4000);
        assert_eq!(UFFDIO_REGISTER_MODE_MISSING, 1);
        assert_eq!(UFFDIO_REGISTER_MODE_MINOR, 4);
        assert_eq!(UFFD_EVENT_PAGEFAULT, 0x12);
        assert_eq!(UFFD_EVENT_FORK, 0x13);
        assert_eq!(UFFD_EVENT_REMAP, 0x14);
        assert_eq!(UFFD_EVENT_REMOVE, 0x15);
        assert_eq!(UFFD_EVENT_UNMAP, 0x16);
        assert_eq!(UFFD_FEATURE_EVENT_FORK, 0x2);
        assert_eq!(UFFD_FEATURE_EVENT_REMAP, 0x4);
        assert_eq!(UFFD_FEATURE_EVENT_REMOVE, 0x8);
        assert_eq!(UFFD_FEATURE_EVENT_UNMAP, 0x40);
        assert_eq!(UFFD_PAGEFAULT_FLAG_MINOR, 4);
    }
}
