//! The mapping API: ranges at an offset and length, shared and private, at a
//! fixed address in a caller's reservation, and mappings the caller made
//! itself and registers; lazy and eager; byte-exact against the source.
//! Also the paths that reach a lazy mapping through the kernel (`write(2)`
//! from it, `process_vm_readv` of it) rather than by a direct touch.

mod common;

use common::{engine, file_with, first_diff, lazy_available, pattern};
use shadowfd::{Error, Mode, Shadow, Share};
use std::ptr::NonNull;

const PAGE: usize = 4096;
/// Eleven pages and a bit: the last page ends mid-page.
const SIZE: usize = 11 * PAGE + 1234;

fn modes() -> Vec<Mode> {
    if lazy_available() {
        vec![Mode::Lazy, Mode::Eager]
    } else {
        vec![Mode::Eager]
    }
}

fn each(f: impl Fn(Mode, Share, &Shadow, &[u8])) {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(SIZE, 77);
    let path = file_with(dir.path(), "src.bin", &data);
    for mode in modes() {
        let e = engine(mode);
        for share in [Share::Shared, Share::Private] {
            // A fresh shadow each time: every lazy page starts unfilled.
            let s = e.open(&path).unwrap();
            assert_eq!(s.mode(), mode);
            f(mode, share, &s, &data);
        }
    }
}

/// A `PROT_NONE` anonymous reservation of `len` bytes, released on drop.
struct Reservation {
    ptr: NonNull<u8>,
    len: usize,
}

impl Reservation {
    fn new(len: usize) -> Reservation {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Reservation {
            ptr: NonNull::new(p.cast()).unwrap(),
            len,
        }
    }

    fn at(&self, off: usize) -> NonNull<u8> {
        NonNull::new(self.ptr.as_ptr().wrapping_add(off)).unwrap()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: our own reservation; nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The protection of the mapping at `addr` as `/proc/self/maps` shows it.
fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for l in maps.lines() {
        let range = l.split(' ').next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return l.split(' ').nth(1).unwrap().to_string();
        }
    }
    panic!("no mapping at {addr:#x}")
}

#[test]
fn ranges_at_an_offset_and_length() {
    each(|mode, share, s, data| {
        for (off, len) in [(0, PAGE), (PAGE, 3 * PAGE + 17), (4 * PAGE, 5 * PAGE)] {
            let m = s
                .map_options()
                .offset(off as u64)
                .len(len as u64)
                .share(share)
                .map()
                .unwrap();
            assert_eq!(m.len(), len);
            assert_eq!(m.is_lazy(), mode == Mode::Lazy);
            assert_eq!(
                first_diff(&m, &data[off..off + len]),
                None,
                "{mode:?} {share:?} {off}+{len}"
            );
        }
    });
}

#[test]
fn a_range_may_end_mid_page_only_at_the_end_of_the_shadow() {
    each(|mode, share, s, data| {
        let off = 8 * PAGE;
        let m = s
            .map_options()
            .offset(off as u64)
            .share(share)
            .map()
            .unwrap();
        assert_eq!(m.len(), SIZE - off, "default length: to the end");
        assert_eq!(first_diff(&m, &data[off..]), None, "{mode:?} {share:?}");
        // Past the end, and an unaligned offset, are refused with the values.
        let e = s
            .map_options()
            .offset(off as u64)
            .len((SIZE - off + 1) as u64)
            .map()
            .unwrap_err();
        assert!(matches!(e, Error::Range { .. }), "{e}");
        let e = s.map_options().offset(100).len(10).map().unwrap_err();
        assert!(matches!(e, Error::Align { value: 100, .. }), "{e}");
        assert!(e.to_string().contains("page size"), "{e}");
    });
}

#[test]
fn fixed_mappings_land_in_a_reservation_and_give_it_back() {
    each(|mode, share, s, data| {
        let res = Reservation::new(8 * PAGE);
        let at = res.at(2 * PAGE);
        let (off, len) = (3 * PAGE, 4 * PAGE + 99);
        // SAFETY: `at..at+5 pages` lies in our reservation; nothing borrows it.
        let m = unsafe {
            s.map_options()
                .offset(off as u64)
                .len(len as u64)
                .share(share)
                .map_fixed(at)
        }
        .unwrap();
        assert_eq!(m.as_ptr(), at.as_ptr() as *const u8);
        assert_eq!(
            first_diff(&m, &data[off..off + len]),
            None,
            "{mode:?} {share:?} fixed"
        );
        drop(m);
        // The range is a PROT_NONE reservation again, not a hole.
        assert_eq!(perms_at(at.as_ptr() as usize), "---p");
        // An unaligned fixed address is refused.
        // SAFETY: refused before anything is mapped.
        let e = unsafe { s.map_options().len(PAGE as u64).map_fixed(res.at(10)) }.unwrap_err();
        assert!(matches!(e, Error::Align { .. }), "{e}");
    });
}

/// The caller maps the shadow's descriptor itself, touches it before
/// registering (planting whatever an unregistered mapping sees), then
/// registers it: from then on it reads the source, byte for byte.
#[test]
fn caller_made_mappings_are_registered_and_read_the_source() {
    each(|mode, share, s, data| {
        let (off, len) = (2 * PAGE, SIZE - 2 * PAGE);
        let maplen = len.div_ceil(PAGE) * PAGE;
        let flags = match share {
            Share::Shared => libc::MAP_SHARED,
            _ => libc::MAP_PRIVATE,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only mapping of the shadow's descriptor.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                maplen,
                libc::PROT_READ,
                flags,
                s.mapping_fd().as_raw_fd(),
                off as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = NonNull::new(p.cast::<u8>()).unwrap();
        // An unregistered touch of every page: zeros for unfilled lazy pages.
        // SAFETY: the mapping is readable for `maplen` bytes.
        let before: u64 = (0..maplen)
            .step_by(PAGE)
            .map(|i| unsafe { addr.as_ptr().add(i).read_volatile() } as u64)
            .sum();
        if mode == Mode::Lazy {
            assert_eq!(
                before, 0,
                "an unregistered mapping of a lazy shadow reads holes"
            );
        }
        // SAFETY: our own read-only mapping of this shadow at `off`; no
        // reference into it is live and no other thread touches it.
        let reg = unsafe { s.register(addr, len as u64, off as u64) }.unwrap();
        assert_eq!(reg.is_registered(), mode == Mode::Lazy);
        // SAFETY: `len` bytes are mapped readable until the munmap below.
        let view = unsafe { std::slice::from_raw_parts(addr.as_ptr(), len) };
        assert_eq!(
            first_diff(view, &data[off..]),
            None,
            "{mode:?} {share:?} registered after an unregistered touch"
        );
        drop(reg);
        // SAFETY: our own mapping, no longer borrowed.
        unsafe { libc::munmap(p, maplen) };
        // The planted pages did not reach the shadow's other consumers.
        let m = s.map(share).unwrap();
        assert_eq!(first_diff(&m, data), None, "{mode:?} {share:?} afterwards");
    });
}

/// `write(2)` from a lazy mapping makes the kernel fault it in (a
/// kernel-mode fault on the consumer range), and `process_vm_readv` reads it
/// from another process: both see the source.
#[test]
fn kernel_mediated_reads_of_a_mapping_see_the_source() {
    each(|mode, share, s, data| {
        let dir = tempfile::tempdir().unwrap();
        let m = s.map(share).unwrap();
        let out = dir.path().join("out");
        std::fs::write(&out, &m[..]).unwrap();
        assert_eq!(
            first_diff(&std::fs::read(&out).unwrap(), data),
            None,
            "{mode:?} {share:?} write(2) from the mapping"
        );
        drop(m);
        let m = s.map(share).unwrap();
        let me = std::process::id() as libc::pid_t;
        let addr = m.as_ptr() as usize;
        // A child process reads our mapping, which it never had.
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut buf = vec![0u8; SIZE];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: SIZE,
            };
            let remote = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: SIZE,
            };
            // SAFETY: valid iovecs over our buffer and the parent's range.
            let n = unsafe { libc::process_vm_readv(me, &local, 1, &remote, 1, 0) };
            let ok = n == SIZE as isize && buf == data;
            // SAFETY: leave the forked child without running destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{mode:?} {share:?}: process_vm_readv of the mapping did not read the source"
        );
    });
}
