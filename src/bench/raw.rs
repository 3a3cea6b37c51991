//! The floors the shadows are compared with.
//!
//! - [`RawRegion`] (mode `raw`): a minimal userfaultfd handler over a memfd
//!   of the file's size. One thread blocks in `read(2)` on the userfaultfd
//!   and answers each fault with one `pread` of the faulting chunk from the
//!   file into a buffer and one `UFFDIO_COPY`. No readahead, no workers, no
//!   bookkeeping: the cost of the mechanism itself. The thread runs on the
//!   CPU the opening (touching) thread was on, `SCHED_IDLE`, so that its
//!   wakes leave the touching thread there, and the bench keeps the touching
//!   thread on that CPU for the run ([`PinHere`]): the placement the
//!   engine's readers get (docs/design.md). Unpinned, a fault's round trip
//!   on a VM is mostly two cross-CPU wakes.
//! - [`CopyRegion`] (mode `memcpy`): a fresh memfd, mapped, filled with one
//!   `memcpy` from a copy of the file already in memory: the cost of putting
//!   the bytes into a shadow-like mapping at all.
//!
//! The userfaultfd ABI is written out here (include/uapi/linux/userfaultfd.h),
//! only what is used.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOC(dir, 0xAA, nr, size)` of the userfaultfd ioctls.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_WRITE_READ: u64 = 3;
const IOC_READ: u64 = 2;
const UFFDIO_API: u64 = ioc(IOC_WRITE_READ, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_WRITE_READ, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_WRITE_READ, 0x03, 40);
/// `USERFAULTFD_IOC_NEW` of /dev/userfaultfd: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg` (32 bytes): the event byte, then for a page fault the
/// flags at offset 8 and the address at offset 16.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

pub(super) fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `UFFD_USER_MODE_ONLY`: a userfaultfd that takes faults of user mode
/// only, which an unprivileged process may have when
/// `vm.unprivileged_userfaultfd=0` (the bench's readers touch pages from
/// user mode).
const UFFD_USER_MODE_ONLY: libc::c_long = 1;

/// A userfaultfd with the API handshake done and shmem MISSING faults
/// enabled: `userfaultfd(2)`; where that is refused
/// (`vm.unprivileged_userfaultfd=0` without the capability), a user-mode-only
/// one, or one from `/dev/userfaultfd`.
pub fn userfaultfd() -> io::Result<OwnedFd> {
    let make = |flags: libc::c_long| {
        // SAFETY: userfaultfd(2) takes only flags; it returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        // SAFETY: a descriptor just created is owned only here.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    let cloexec = libc::O_CLOEXEC as libc::c_long;
    let uffd = if let Some(fd) = make(cloexec) {
        fd
    } else if let Some(fd) = make(cloexec | UFFD_USER_MODE_ONLY) {
        fd
    } else {
        let first = os_err("userfaultfd(2)");
        let dev = File::open("/dev/userfaultfd")
            .map_err(|e| io::Error::new(e.kind(), format!("{first}; /dev/userfaultfd: {e}")))?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as its
        // argument and returns a new descriptor or -1; `dev` is open.
        let fd = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as _,
                libc::O_CLOEXEC as libc::c_long,
            )
        };
        if fd < 0 {
            return Err(os_err(&format!("{first}; USERFAULTFD_IOC_NEW")));
        }
        // SAFETY: as above, a fresh descriptor owned only here.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_MISSING_SHMEM,
        ioctls: 0,
    };
    // SAFETY: `api` is a live uffdio_api the kernel reads and writes back.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
        return Err(os_err("UFFDIO_API with UFFD_FEATURE_MISSING_SHMEM"));
    }
    Ok(uffd)
}

/// Why the `raw` mode cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    userfaultfd()
        .err()
        .map(|e| format!("no userfaultfd for the raw handler: {e}"))
}

/// A new memfd of `len` bytes.
pub(super) fn memfd(name: &std::ffi::CStr, len: u64) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os_err("memfd_create"));
    }
    // SAFETY: the descriptor was just created and is owned only here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate of our own memfd; no mapping of it exists yet.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(os_err("ftruncate memfd"));
    }
    Ok(fd)
}

/// A shared mapping of `len` bytes of `fd`; unmapped on drop.
pub(super) struct Mapping {
    pub(super) addr: u64,
    len: usize,
}

impl Mapping {
    pub(super) fn new(fd: &OwnedFd, len: usize, prot: libc::c_int) -> io::Result<Mapping> {
        // SAFETY: a new mapping at an address the kernel picks (NULL hint, no
        // MAP_FIXED): it aliases no Rust object; the fd is open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap memfd"));
        }
        Ok(Mapping {
            addr: p as u64,
            len,
        })
    }
}

impl Mapping {
    /// `UFFDIO_REGISTER` (MISSING) of the whole mapping with `uffd`.
    pub(super) fn register_missing(&self, uffd: &OwnedFd) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: self.addr,
                len: self.len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a live uffdio_register over our own mapping.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } < 0 {
            return Err(os_err("UFFDIO_REGISTER"));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this handle mapped; no slice
        // borrowed from it outlives the owner (`RawRegion`, `CopyRegion`).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

pub(super) fn allocated(fd: &OwnedFd) -> io::Result<u64> {
    let f = fd.try_clone().map(File::from)?;
    Ok(f.metadata()?.blocks() * 512)
}

/// The handler's view: where the mapping is, how it is cut. The `raw`
/// mode runs it on a thread of the bench; `raw-remote` in another process
/// (`raw_remote.rs`), where every ioctl acts on the bench's address space.
pub(super) struct Handler {
    pub(super) uffd: RawFd,
    pub(super) file: File,
    pub(super) addr: u64,
    /// Bytes of data (the file's size).
    pub(super) size: u64,
    /// The data rounded up to pages; the stop page starts here.
    pub(super) data_len: u64,
    pub(super) chunk: u64,
    pub(super) page: u64,
    pub(super) faults: Arc<AtomicU64>,
}

impl Handler {
    /// Blocks in read(2) for each fault and answers it, until the stop page
    /// faults. On an error it unregisters the whole range (which wakes the
    /// faulting thread: its retry then sees a plain zero page, never a hang)
    /// and returns the error.
    pub(super) fn run(self) -> io::Result<()> {
        let r = self.serve();
        if r.is_err() {
            let mut range = UffdioRange {
                start: self.addr,
                len: self.data_len + self.page,
            };
            // SAFETY: `range` is a live uffdio_range over the registered
            // mapping (ours, or for raw-remote the bench's, which stays
            // mapped until this handler is reaped); the kernel checks it.
            unsafe { libc::ioctl(self.uffd, UFFDIO_UNREGISTER as _, &mut range) };
        }
        r
    }

    fn serve(&self) -> io::Result<()> {
        let mut buf = vec![0u8; self.chunk as usize];
        loop {
            let mut m = UffdMsg::default();
            // SAFETY: reads at most one 32-byte uffd_msg into a live local of
            // that size; the uffd stays open until this thread is joined.
            let n = unsafe {
                libc::read(
                    self.uffd,
                    (&mut m as *mut UffdMsg).cast(),
                    size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(io::Error::new(e.kind(), format!("read(userfaultfd): {e}")));
            }
            if n as usize != size_of::<UffdMsg>() || m.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let off = (m.address - self.addr) & !(self.page - 1);
            if off >= self.data_len {
                // The stop page: fill it (zeros), wake the stopper, leave.
                buf[..self.page as usize].fill(0);
                self.copy(off, &buf[..self.page as usize])?;
                return Ok(());
            }
            // Counted before the copy wakes the faulting thread, so that
            // the count is complete once the touching is.
            self.faults.fetch_add(1, Ordering::Relaxed);
            let start = off / self.chunk * self.chunk;
            let end = (start + self.chunk).min(self.data_len);
            let len = (end - start) as usize;
            let want = (self.size.min(end) - start) as usize;
            self.file
                .read_exact_at(&mut buf[..want], start)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("pread of {want} bytes at {start}: {e}"))
                })?;
            buf[want..len].fill(0);
            self.copy(start, &buf[..len])?;
        }
    }

    /// One `UFFDIO_COPY` of `src` to `off` in the mapping, waking the
    /// faulting thread. A page already there (EEXIST) only needs the wake.
    fn copy(&self, off: u64, src: &[u8]) -> io::Result<()> {
        let mut done = 0u64;
        while done < src.len() as u64 {
            let mut c = UffdioCopy {
                dst: self.addr + off + done,
                src: src.as_ptr() as u64 + done,
                len: src.len() as u64 - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `c` is a live uffdio_copy; dst..dst+len lies in the
            // registered mapping (page-aligned), src..src+len in `buf`.
            let r = unsafe { libc::ioctl(self.uffd, UFFDIO_COPY as _, &mut c) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => done += c.copy.max(0) as u64,
                Some(libc::EEXIST) => {
                    let mut range = UffdioRange {
                        start: self.addr + off,
                        len: src.len() as u64,
                    };
                    // SAFETY: `range` is a live uffdio_range in our mapping.
                    if unsafe { libc::ioctl(self.uffd, UFFDIO_WAKE as _, &mut range) } < 0 {
                        return Err(os_err("UFFDIO_WAKE"));
                    }
                    return Ok(());
                }
                _ => return Err(io::Error::new(e.kind(), format!("UFFDIO_COPY: {e}"))),
            }
        }
        Ok(())
    }
}

/// The bytes a handler fills per fault for `--chunk` `chunk`: at least a
/// page, in whole pages.
pub(super) fn fill_unit(chunk: u64, page: u64) -> u64 {
    chunk.max(page).next_multiple_of(page)
}

/// Keeps the calling thread on the CPU it runs on until dropped, then
/// gives it back the CPUs it was allowed before. The `raw` floor has one
/// handler thread, on that CPU: a touching thread that moved away would be
/// answered across CPUs from then on (the engine has a reader on every
/// CPU; the floor does not).
pub struct PinHere {
    old: Option<libc::cpu_set_t>,
}

impl PinHere {
    pub fn new() -> PinHere {
        // SAFETY: a zeroed cpu_set_t is a valid (empty) set, filled by
        // sched_getaffinity for the calling thread (pid 0).
        let old = unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut old) == 0).then_some(old)
        };
        // SAFETY: no arguments.
        pin_to(unsafe { libc::sched_getcpu() });
        PinHere { old }
    }
}

impl Drop for PinHere {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            // SAFETY: `old` is the set sched_getaffinity gave; pid 0 is the
            // calling thread (the guard stays on the thread that made it).
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

/// Pins the calling thread to `cpu` (best effort: nothing for a CPU number
/// outside the set's range, or a refusal).
fn pin_to(cpu: libc::c_int) {
    let Ok(cpu) = usize::try_from(cpu) else {
        return;
    };
    if cpu >= libc::CPU_SETSIZE as usize {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid (empty) set; CPU_SET writes
    // inside it (cpu checked above); pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins the calling thread to `cpu` and makes it `SCHED_IDLE` (which any
/// thread may do to itself), so that the threads it wakes stay on `cpu`.
/// Best effort: the floor still works without either.
pub(super) fn place_on(cpu: libc::c_int) {
    pin_to(cpu);
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is a valid sched_param; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) };
}

/// The `raw` mode: a memfd of the file's size (plus one stop page), mapped
/// shared and read-only, registered MISSING with a userfaultfd made here,
/// and one handler thread. Dropping it stops the thread (it touches the stop
/// page, which the handler answers and then returns), then unmaps and closes.
pub struct RawRegion {
    // Field order is drop order after `Drop::drop`: the mapping before the
    // userfaultfd and the memfd.
    map: Mapping,
    _uffd: OwnedFd,
    memfd: OwnedFd,
    data_len: u64,
    size: u64,
    thread: Option<JoinHandle<io::Result<()>>>,
    faults: Arc<AtomicU64>,
}

impl RawRegion {
    /// Opens `path` and sets the region up over its `size` bytes; faults are
    /// answered `chunk` bytes (a multiple of `page`) at a time.
    pub fn open(path: &Path, size: u64, chunk: u64, page: u64) -> io::Result<RawRegion> {
        let file = File::open(path)?;
        let data_len = size.div_ceil(page) * page;
        let memfd = memfd(c"shadowfd-bench-raw", data_len + page)?;
        let uffd = userfaultfd()?;
        let map = Mapping::new(&memfd, (data_len + page) as usize, libc::PROT_READ)?;
        map.register_missing(&uffd)?;
        let faults = Arc::new(AtomicU64::new(0));
        let handler = Handler {
            uffd: uffd.as_raw_fd(),
            file,
            addr: map.addr,
            size,
            data_len,
            chunk: fill_unit(chunk, page),
            page,
            faults: faults.clone(),
        };
        // SAFETY: no arguments.
        let cpu = unsafe { libc::sched_getcpu() };
        let thread = std::thread::Builder::new()
            .name("bench-raw-uffd".into())
            .spawn(move || {
                place_on(cpu);
                handler.run()
            })?;
        Ok(RawRegion {
            map,
            _uffd: uffd,
            memfd,
            data_len,
            size,
            thread: Some(thread),
            faults,
        })
    }

    /// Faults received so far (the stop page not counted); complete once the
    /// touching thread has read every page it touched.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    pub fn resident_bytes(&self) -> io::Result<u64> {
        allocated(&self.memfd)
    }

    /// Stops the handler and reports its error, if it had one.
    pub fn close(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        // A read of the stop page faults (the handler answers and returns),
        // or, if the handler already failed and unregistered the range, reads
        // a zero page: neither can hang.
        // SAFETY: the stop page lies inside our live mapping.
        std::hint::black_box(unsafe {
            std::ptr::read_volatile((self.map.addr + self.data_len) as *const u8)
        });
        match t.join() {
            Ok(r) => r,
            Err(_) => Err(io::Error::other("the raw handler thread panicked")),
        }
    }
}

impl std::ops::Deref for RawRegion {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `size` bytes of our live PROT_READ mapping; a
        // missing page is filled by the handler before a load completes.
        unsafe { std::slice::from_raw_parts(self.map.addr as *const u8, self.size as usize) }
    }
}

impl Drop for RawRegion {
    fn drop(&mut self) {
        let _ = self.stop();
        // The fields drop next: the mapping, then the userfaultfd, the memfd.
    }
}

/// The `memcpy` mode: a fresh memfd of the file's size, mapped shared and
/// writable, filled by one `memcpy` from `src` (the file, already in memory).
pub struct CopyRegion {
    map: Mapping,
    memfd: OwnedFd,
    size: usize,
}

impl CopyRegion {
    pub fn fill(src: &[u8], page: u64) -> io::Result<CopyRegion> {
        let len = (src.len() as u64).div_ceil(page) * page;
        let memfd = memfd(c"shadowfd-bench-memcpy", len)?;
        let map = Mapping::new(&memfd, len as usize, libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the destination is our new writable mapping of at least
        // `src.len()` bytes, which cannot overlap the heap buffer `src`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), map.addr as *mut u8, src.len());
        }
        Ok(CopyRegion {
            map,
            memfd,
            size: src.len(),
        })
    }

    pub fn resident_bytes(&self) -> io::Result<u64> {
        allocated(&self.memfd)
    }
}

impl std::ops::Deref for CopyRegion {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `size` bytes of our live mapping; nothing writes
        // to it after `fill`.
        unsafe { std::slice::from_raw_parts(self.map.addr as *const u8, self.size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_region_serves_the_file_and_stops() {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        for chunk in [4096, 8192] {
            let r = RawRegion::open(&p, data.len() as u64, chunk, 4096).unwrap();
            assert_eq!(&r[..], &data[..]);
            assert_eq!(r.faults(), (data.len() as u64).div_ceil(chunk));
            r.close().unwrap();
        }
        // Dropped without a touch: stops as well.
        drop(RawRegion::open(&p, data.len() as u64, 4096, 4096).unwrap());
        let c = CopyRegion::fill(&data, 4096).unwrap();
        assert_eq!(&c[..], &data[..]);
    }

    #[test]
    fn a_failing_handler_wakes_the_toucher_and_reports() {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 4 * 4096]).unwrap();
        let r = RawRegion::open(&p, 4 * 4096, 4096, 4096).unwrap();
        assert_eq!(r[0], 7);
        // The source shrinks: the next pread comes up short, the handler
        // fails and unregisters; the touch completes (a zero page).
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert_eq!(r[2 * 4096], 0);
        let e = r.close().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("pread"), "{e}");
    }
}
