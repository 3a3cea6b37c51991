//! What the kernel maps at an address of a process: `PROCMAP_QUERY` (Linux
//! 6.11) on its `/proc/PID/maps`, one ioctl and no text to parse.
//!
//! The fault service asks it about faults in ranges the kernel grew in place
//! (`mremap` sends no userfaultfd event for that): the mapping there names
//! the memfd (its inode) and the offset it shows.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `struct procmap_query` of `linux/fs.h`.
#[repr(C)]
#[derive(Debug, Default)]
struct procmap_query {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const _: () = assert!(std::mem::size_of::<procmap_query>() == 104);

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong =
    nix::request_code_readwrite!(b'f', 17, std::mem::size_of::<procmap_query>()) as _;
/// `vma_flags` bit: a `MAP_SHARED` mapping.
const PROCMAP_QUERY_VMA_SHARED: u64 = 8;
/// `query_flags` bit: the mapping that holds the address, or else the next.
const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

/// One mapping (VMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vma {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Inode of the mapped file (0 for anonymous memory).
    pub inode: u64,
    pub shared: bool,
}

/// An open `/proc/PID/maps`.
pub(crate) struct Maps {
    file: File,
}

impl Maps {
    /// This process's maps, if `/proc` is there.
    pub(crate) fn open_self() -> Option<Maps> {
        File::open("/proc/self/maps").ok().map(|file| Maps { file })
    }

    /// Process `pid`'s maps (needs the right to read its memory map: the
    /// same user and a dumpable process, or `CAP_SYS_PTRACE`). The file
    /// holds on to that process's address space, not to the number.
    pub(crate) fn open_pid(pid: u32) -> io::Result<Maps> {
        File::open(format!("/proc/{pid}/maps")).map(|file| Maps { file })
    }

    /// The mapping that holds `addr`, if any (and if the kernel has
    /// `PROCMAP_QUERY`).
    pub(crate) fn query(&self, addr: u64) -> Option<Vma> {
        self.ask(addr, 0)
            .filter(|v| v.start <= addr && addr < v.end)
    }

    /// Whether the kernel answers `PROCMAP_QUERY` (Linux 6.11+): asked once
    /// per process (the kernel does not change under it).
    pub(crate) fn works(&self) -> bool {
        static HERE: u8 = 0;
        static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WORKS.get_or_init(|| self.query(std::ptr::from_ref(&HERE) as u64).is_some())
    }

    /// The parts of `lo..hi` where the process maps file `inode` at the
    /// offsets a mapping of it from `offset` (at `lo`) would show: what is
    /// still a mapping's own after its user moved or cut it.
    pub(crate) fn showing(&self, lo: u64, hi: u64, inode: u64, offset: u64) -> Vec<(u64, u64)> {
        let mut parts = Vec::new();
        let mut at = lo;
        while at < hi {
            let Some(v) = self.ask(at, PROCMAP_QUERY_COVERING_OR_NEXT_VMA) else {
                break;
            };
            let (a, b) = (v.start.max(at), v.end.min(hi));
            if a >= b {
                break;
            }
            if v.inode == inode && v.offset + (a - v.start) == offset + (a - lo) {
                parts.push((a, b - a));
            }
            at = b;
        }
        parts
    }

    fn ask(&self, addr: u64, flags: u64) -> Option<Vma> {
        let mut q = procmap_query {
            size: std::mem::size_of::<procmap_query>() as u64,
            query_flags: flags,
            query_addr: addr,
            ..Default::default()
        };
        // SAFETY: `q` is a live, correctly sized procmap_query with no name
        // or build-id buffers (sizes 0); the kernel fills in the rest.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), PROCMAP_QUERY, &mut q) };
        if r < 0 {
            return None;
        }
        Some(Vma {
            start: q.vma_start,
            end: q.vma_end,
            offset: q.vma_offset,
            inode: q.inode,
            shared: q.vma_flags & PROCMAP_QUERY_VMA_SHARED != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_matches_the_kernel_header() {
        assert_eq!(PROCMAP_QUERY, 0xc068_6611);
    }

    #[test]
    fn a_shared_file_mapping_is_named_with_its_offset_and_inode() {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile_in_tmp();
        let page = crate::page_size();
        f.set_len(4 * page as u64).unwrap();
        let ino = f.metadata().unwrap().ino();
        // SAFETY: a fresh shared mapping of our own file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                page as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let maps = Maps::open_self().expect("/proc/self/maps");
        let v = maps
            .query(p as u64 + page as u64)
            .expect("PROCMAP_QUERY (Linux 6.11+)");
        assert_eq!(v.start, p as u64);
        assert_eq!(v.end, p as u64 + 2 * page as u64);
        assert_eq!(v.offset, page as u64);
        assert_eq!(v.inode, ino);
        assert!(v.shared);
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(p, 2 * page) };
        assert!(
            maps.query(p as u64)
                .is_none_or(|v| v.start != p as u64 || v.inode != ino)
        );
    }

    #[test]
    fn what_is_left_of_a_cut_mapping_is_shown_and_nothing_else() {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile_in_tmp();
        let page = crate::page_size();
        f.set_len(8 * page as u64).unwrap();
        let ino = f.metadata().unwrap().ino();
        // SAFETY: a fresh private mapping of our own file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                page as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64;
        let pg = page as u64;
        // SAFETY: the second page of the mapping made above.
        let r = unsafe { libc::munmap(p.cast::<u8>().add(page).cast(), page) };
        assert_eq!(r, 0);
        let maps = Maps::open_self().expect("/proc/self/maps");
        let parts = maps.showing(a, a + 4 * pg, ino, pg);
        assert_eq!(parts, vec![(a, pg), (a + 2 * pg, 2 * pg)]);
        // Another offset, or another file: none of it.
        assert!(maps.showing(a, a + 4 * pg, ino, 0).is_empty());
        assert!(maps.showing(a, a + 4 * pg, ino + 1, pg).is_empty());
        // SAFETY: the rest of the mapping made above.
        unsafe {
            libc::munmap(p, page);
            libc::munmap(p.cast::<u8>().add(2 * page).cast(), 2 * page);
        }
    }

    fn tempfile_in_tmp() -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("shadowfd-maps-{}-{n}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
