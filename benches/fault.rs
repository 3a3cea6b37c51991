//! Latency of one random 4 KiB fault in a lazy shadow (chunk 4 KiB, no
//! readahead) against the floor of the mechanism, measured in the same run:
//!
//! - `raw_copy`: a minimal handler written here with libc: a userfaultfd on
//!   a `MAP_SHARED` memfd region registered for missing pages, one thread
//!   that blocks in `read(2)` for the fault and answers with one
//!   `UFFDIO_COPY` of a page from memory;
//! - `raw_pread_copy`: the same, reading the page from the source file with
//!   `pread(2)` first (what any handler of a file must do);
//! - `raw_handoff_copy`: like `raw_pread_copy`, but the thread that reads the
//!   fault hands it to a second thread over a channel, which reads and copies
//!   (the shape of the library's reader + worker pool);
//! - `lazy_shadow`: the library.
//!
//! Every measured touch hits a page never touched before; the pages are
//! visited in a seeded random order. When a region runs out of fresh pages,
//! it is recycled outside the timed section.
//!
//! The raw handlers are unpinned, so the scheduler decides whether they run
//! on the faulting thread's CPU (about 3-7 µs a fault on a 2-vCPU VM) or on
//! another one (28-71 µs), and keeps that choice for a while: the
//! interleaved report gives the share of their faults answered on the
//! faulting thread's CPU. The library pins one reader per CPU and normally
//! answers there (crates/shadowfd/src/fault/service.rs).
//!
//! `fault_scaling` then reports random faults per second with 1, 2, 4 and 8
//! consumer threads, on one shared shadow and on a shadow each.

mod common;

use common::{MIB, data_file, engine, quick, shuffled};
use criterion::{Criterion, criterion_group, criterion_main};
use shadowfd::{Engine, Mapping, Mode, Shadow, Share};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * MIB;
const PAGE: u64 = 4096;

// The userfaultfd ABI (include/uapi/linux/userfaultfd.h), just what is used.
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_COPY: u64 = iowr(0x03, 40);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
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

/// The CPU the measuring thread was on when it last touched a page, for the
/// raw handlers to compare theirs with.
static CONSUMER_CPU: AtomicUsize = AtomicUsize::new(usize::MAX);

fn this_cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    unsafe { libc::sched_getcpu() as usize }
}

/// Faults a raw handler answered, and how many of them on the CPU of the
/// thread that faulted.
#[derive(Default)]
struct Placement {
    total: AtomicU64,
    local: AtomicU64,
}

impl Placement {
    fn record(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if this_cpu() == CONSUMER_CPU.load(Ordering::Relaxed) {
            self.local.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn check(r: libc::c_long, what: &str) -> io::Result<libc::c_long> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

/// Copies one page from `src` to `dst` in the registered range and wakes the
/// faulting thread. EEXIST (already there) is fine.
fn copy_page(uffd: i32, dst: u64, src: &[u8]) {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: PAGE,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `c` is a live uffdio_copy; dst is a page of the registered
    // range, src a live page-sized heap buffer outside it.
    let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY as _, &mut c) };
    if r < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "UFFDIO_COPY: {e}");
    }
}

/// Blocks until one page-fault message arrives; returns the page address.
fn read_fault(uffd: i32) -> u64 {
    loop {
        let mut m = UffdMsg::default();
        // SAFETY: reads at most one 32-byte uffd_msg into a live local.
        let n = unsafe { libc::read(uffd, (&mut m as *mut UffdMsg).cast(), 32) };
        if n == 32 && m.event == UFFD_EVENT_PAGEFAULT {
            return m.address & !(PAGE - 1);
        }
        let e = io::Error::last_os_error();
        assert!(
            n == 32 || e.raw_os_error() == Some(libc::EINTR),
            "read(userfaultfd): {e}"
        );
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Raw {
    /// Copy from memory.
    Copy,
    /// pread the page from the file, then copy.
    PreadCopy,
    /// Reader thread hands off to a worker, which preads and copies.
    Handoff,
}

/// A memfd region of `SIZE + PAGE` bytes registered for missing pages, with
/// its handler thread(s). The last page is the stop page: the handler exits
/// after serving it, and only `Drop` touches it.
struct RawRegion {
    memfd: OwnedFd,
    _uffd: OwnedFd,
    addr: u64,
    len: u64,
    threads: Vec<JoinHandle<()>>,
    placed: Arc<Placement>,
}

impl RawRegion {
    fn new(kind: Raw, source: &Path) -> io::Result<RawRegion> {
        let len = SIZE + PAGE;
        // SAFETY: memfd_create with a NUL-terminated name; returns a new fd.
        let fd = check(
            unsafe { libc::memfd_create(c"raw-bench".as_ptr(), libc::MFD_CLOEXEC) } as _,
            "memfd_create",
        )?;
        // SAFETY: the descriptor was just created and is owned only here.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        check(
            // SAFETY: ftruncate on our own memfd.
            unsafe { libc::ftruncate(memfd.as_raw_fd(), len as i64) } as _,
            "ftruncate",
        )?;
        // SAFETY: userfaultfd(2) with valid flags; returns a new fd or -1.
        let fd = check(
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) },
            "userfaultfd",
        )?;
        // SAFETY: as above, a fresh descriptor owned only here.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        check(
            // SAFETY: `api` is a live uffdio_api for the handshake.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } as _,
            "UFFDIO_API",
        )?;
        // SAFETY: a new shared read-only mapping of our memfd at an address
        // the kernel picks; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = p as u64;
        let mut reg = UffdioRegister {
            start: addr,
            len,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        check(
            // SAFETY: `reg` is a live uffdio_register over our own mapping.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } as _,
            "UFFDIO_REGISTER",
        )?;
        let stop_page = addr + SIZE;
        let file = Arc::new(File::open(source)?);
        let raw_uffd = uffd.as_raw_fd();
        let mut threads = Vec::new();
        let placed = Arc::new(Placement::default());
        let p = placed.clone();
        match kind {
            Raw::Copy | Raw::PreadCopy => {
                threads.push(std::thread::spawn(move || {
                    let mut page = vec![0x5Au8; PAGE as usize];
                    loop {
                        let a = read_fault(raw_uffd);
                        let off = a - addr;
                        if kind == Raw::PreadCopy && off < SIZE {
                            file.read_exact_at(&mut page, off).expect("pread");
                        }
                        copy_page(raw_uffd, a, &page);
                        p.record();
                        if a == stop_page {
                            return;
                        }
                    }
                }));
            }
            Raw::Handoff => {
                let (tx, rx) = crossbeam_channel::unbounded::<Option<u64>>();
                threads.push(std::thread::spawn(move || {
                    loop {
                        let a = read_fault(raw_uffd);
                        tx.send(Some(a)).expect("worker alive");
                        if a == stop_page {
                            let _ = tx.send(None);
                            return;
                        }
                    }
                }));
                threads.push(std::thread::spawn(move || {
                    let mut page = vec![0u8; PAGE as usize];
                    while let Ok(Some(a)) = rx.recv() {
                        let off = a - addr;
                        if off < SIZE {
                            file.read_exact_at(&mut page, off).expect("pread");
                        }
                        copy_page(raw_uffd, a, &page);
                        p.record();
                    }
                }));
            }
        }
        Ok(RawRegion {
            memfd,
            _uffd: uffd,
            addr,
            len,
            threads,
            placed,
        })
    }

    fn touch(&self, page: u64) -> u8 {
        // SAFETY: `page < len / PAGE`: the address lies in our live mapping;
        // a missing page is filled by the handler before the load completes.
        unsafe { std::ptr::read_volatile((self.addr + page * PAGE) as *const u8) }
    }

    /// Drops every filled page (except the stop page), so that the next
    /// touches fault again.
    fn recycle(&self) {
        // SAFETY: punches a hole in our own memfd; shmem then unmaps the pages
        // and later accesses fault as missing again.
        let r = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                SIZE as i64,
            )
        };
        assert_eq!(r, 0, "punch hole: {}", io::Error::last_os_error());
    }
}

impl Drop for RawRegion {
    fn drop(&mut self) {
        std::hint::black_box(self.touch(SIZE / PAGE)); // the handler exits after it
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // SAFETY: unmaps the mapping this struct created; no reference to it
        // is left. The uffd is closed after (field drop order).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len as usize);
        }
    }
}

/// The library's side: a lazy shadow (chunk 4 KiB, no readahead, so one
/// fault fills one page) and its shared mapping.
struct LazyRegion<'a> {
    engine: &'a Engine,
    path: &'a Path,
    cur: (Shadow, Mapping),
}

impl<'a> LazyRegion<'a> {
    fn new(engine: &'a Engine, path: &'a Path) -> Self {
        LazyRegion {
            engine,
            path,
            cur: Self::open(engine, path),
        }
    }
    fn open(engine: &Engine, path: &Path) -> (Shadow, Mapping) {
        let s = engine.open(path).expect("lazy open");
        let m = s.map(Share::Shared).expect("map");
        (s, m)
    }
}

/// Something whose pages fault on first touch.
trait Faulting {
    fn touch(&self, page: u64) -> u8;
    /// Makes every page fault again (untimed).
    fn recycle(&mut self);
    /// Faults answered so far, and how many on the faulting thread's CPU,
    /// where the bench can see it.
    fn placement(&self) -> Option<(u64, u64)> {
        None
    }
}

impl Faulting for RawRegion {
    fn touch(&self, page: u64) -> u8 {
        RawRegion::touch(self, page)
    }
    fn recycle(&mut self) {
        RawRegion::recycle(self)
    }
    fn placement(&self) -> Option<(u64, u64)> {
        let p = &self.placed;
        Some((
            p.total.load(Ordering::Relaxed),
            p.local.load(Ordering::Relaxed),
        ))
    }
}

impl Faulting for LazyRegion<'_> {
    fn touch(&self, page: u64) -> u8 {
        self.cur.1[(page * PAGE) as usize]
    }
    fn recycle(&mut self) {
        // The old shadow goes first, then a fresh one is opened.
        self.cur = Self::open(self.engine, self.path);
    }
}

/// Walks a seeded random order of the pages, resuming where it stopped.
struct Cursor<'o> {
    order: &'o [u64],
    next: usize,
}

impl Cursor<'_> {
    /// Times `iters` touches of fresh pages; recycling is not timed.
    fn run(&mut self, r: &mut dyn Faulting, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            if self.next == self.order.len() {
                r.recycle();
                self.next = 0;
            }
            let p = self.order[self.next];
            self.next += 1;
            CONSUMER_CPU.store(this_cpu(), Ordering::Relaxed);
            let t = Instant::now();
            std::hint::black_box(r.touch(p));
            total += t.elapsed();
        }
        total
    }

    /// Like [`Cursor::run`], returning each touch's latency in microseconds.
    fn each(&mut self, r: &mut dyn Faulting, iters: u64) -> Vec<f64> {
        (0..iters)
            .map(|_| self.run(r, 1).as_secs_f64() * 1e6)
            .collect()
    }
}

const RAW: [(&str, Raw); 3] = [
    ("raw_copy", Raw::Copy),
    ("raw_pread_copy", Raw::PreadCopy),
    ("raw_handoff_copy", Raw::Handoff),
];

fn fault_latency(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = data_file(dir.path(), "fault", SIZE);
    let order = shuffled(SIZE / PAGE, 7);
    let mut g = c.benchmark_group("fault_4k");
    for (name, kind) in RAW {
        let mut region = match RawRegion::new(kind, &path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fault_4k/{name} skipped: {e}");
                continue;
            }
        };
        let mut cur = Cursor {
            order: &order,
            next: 0,
        };
        g.bench_function(name, |b| b.iter_custom(|iters| cur.run(&mut region, iters)));
    }
    let engine = engine(Mode::Lazy, PAGE, 0, 0);
    let mut lazy = LazyRegion::new(&engine, &path);
    let mut cur = Cursor {
        order: &order,
        next: 0,
    };
    g.bench_function("lazy_shadow", |b| {
        b.iter_custom(|iters| cur.run(&mut lazy, iters))
    });
    g.finish();
}

/// The target is a ratio, so it is also measured interleaved: in each round
/// every contender serves a batch of faults back to back (order rotated per
/// round). Per round, the median fault latency of each contender; the ratio
/// is taken per round, and its median over the rounds is reported (robust to
/// bursts of load from other processes, which hit a round, not a contender).
fn fault_ratio(_c: &mut Criterion) {
    const ROUNDS: usize = 41;
    const BATCH: u64 = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = data_file(dir.path(), "fault", SIZE);
    let order = shuffled(SIZE / PAGE, 11);
    let engine = engine(Mode::Lazy, PAGE, 0, 0);
    let mut names = vec!["lazy_shadow"];
    let mut regions: Vec<Box<dyn Faulting>> = vec![Box::new(LazyRegion::new(&engine, &path))];
    for (name, kind) in RAW {
        match RawRegion::new(kind, &path) {
            Ok(r) => {
                names.push(name);
                regions.push(Box::new(r));
            }
            Err(e) => eprintln!("fault_ratio: {name} skipped: {e}"),
        }
    }
    let mut cursors: Vec<Cursor> = (0..regions.len())
        .map(|_| Cursor {
            order: &order,
            next: 0,
        })
        .collect();
    let n = regions.len();
    let mut medians = vec![Vec::new(); n];
    let mut all = vec![Vec::new(); n];
    // Per raw contender: rounds in which most faults were answered on the
    // faulting thread's CPU.
    let mut local_rounds = vec![0usize; n];
    // Per contender and round: whether that round was mostly local.
    let mut local_in = vec![Vec::new(); n];
    for round in 0..ROUNDS {
        for k in 0..n {
            let i = (k + round) % n;
            let before = regions[i].placement();
            let mut lat = cursors[i].each(&mut *regions[i], BATCH);
            if let (Some((t0, l0)), Some((t1, l1))) = (before, regions[i].placement()) {
                let local = (l1 - l0) * 2 > t1 - t0;
                local_rounds[i] += usize::from(local);
                local_in[i].push(local);
            }
            medians[i].push(median(&mut lat));
            all[i].extend(lat);
        }
    }
    println!("fault_4k interleaved: {ROUNDS} rounds x {BATCH} faults per contender");
    let mut p90 = vec![0.0; n];
    for i in 0..n {
        let a = &mut all[i];
        a.sort_by(f64::total_cmp);
        let q = |f: f64| a[((a.len() - 1) as f64 * f) as usize];
        p90[i] = q(0.9);
        let placed = match regions[i].placement() {
            Some((total, local)) => format!(
                "  on the faulting CPU: {:3.0}% of faults, mostly in {}/{ROUNDS} rounds",
                100.0 * local as f64 / total.max(1) as f64,
                local_rounds[i]
            ),
            None => String::new(),
        };
        println!(
            "  {:<18} p50 {:6.2} us  p90 {:6.2} us  p99 {:7.2} us{placed}",
            names[i],
            q(0.5),
            q(0.9),
            q(0.99)
        );
    }
    for i in 1..n {
        let mut r: Vec<f64> = medians[0]
            .iter()
            .zip(&medians[i])
            .map(|(l, x)| l / x)
            .collect();
        let (lo, hi) = (
            r.iter().copied().fold(f64::MAX, f64::min),
            r.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "  lazy_shadow / {:<18} {:.2}x  (median of per-round median ratios; rounds {:.2}..{:.2}); \
             p90 {:.2}x",
            names[i],
            median(&mut r),
            lo,
            hi,
            p90[0] / p90[i]
        );
        // The raw handlers are unpinned: the same ratio over the rounds in
        // which this one answered on the faulting thread's CPU, the floor.
        let mut local: Vec<f64> = medians[0]
            .iter()
            .zip(&medians[i])
            .zip(&local_in[i])
            .filter(|(_, l)| **l)
            .map(|((l, x), _)| l / x)
            .collect();
        if !local.is_empty() {
            let k = local.len();
            println!(
                "    in the {k} rounds where {} answered on the faulting CPU: {:.2}x",
                names[i],
                median(&mut local)
            );
        }
    }
}

/// Random 4 KiB faults per second with 1, 2, 4 and 8 consumer threads (all
/// released at once), on one shadow they share (each thread its own pages)
/// and on a shadow each. Every round runs every configuration, in a rotated
/// order; the median and range over the rounds are reported.
fn fault_scaling(_c: &mut Criterion) {
    const ROUNDS: usize = 5;
    const PER_THREAD: usize = 2048;
    const THREADS: [usize; 4] = [1, 2, 4, 8];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = data_file(dir.path(), "scale", SIZE);
    let order = shuffled(SIZE / PAGE, 13);
    assert!(order.len() >= PER_THREAD * 8);
    let engine = engine(Mode::Lazy, PAGE, 0, 0);
    let configs: Vec<(usize, bool)> = THREADS
        .iter()
        .flat_map(|&n| [(n, false), (n, true)])
        .collect();
    let mut rates = vec![Vec::new(); configs.len()];
    for round in 0..ROUNDS {
        for k in 0..configs.len() {
            let c = (k + round) % configs.len();
            let (n, separate) = configs[c];
            let shadows: Vec<Shadow> = (0..if separate { n } else { 1 })
                .map(|_| engine.open(&path).expect("lazy open"))
                .collect();
            let maps: Vec<Mapping> = shadows
                .iter()
                .map(|s| s.map(Share::Shared).expect("map"))
                .collect();
            // Each thread times itself: the main thread may be kept off the
            // CPU after the barrier until they are done.
            let start = Barrier::new(n);
            let spans: Vec<(Instant, Instant)> = std::thread::scope(|sc| {
                let threads: Vec<_> = (0..n)
                    .map(|t| {
                        let (m, pages) = if separate {
                            (&maps[t], &order[..PER_THREAD])
                        } else {
                            (&maps[0], &order[t * PER_THREAD..(t + 1) * PER_THREAD])
                        };
                        let start = &start;
                        sc.spawn(move || {
                            start.wait();
                            let t0 = Instant::now();
                            for &p in pages {
                                std::hint::black_box(m[(p * PAGE) as usize]);
                            }
                            (t0, Instant::now())
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let t0 = spans.iter().map(|s| s.0).min().unwrap();
            let t1 = spans.iter().map(|s| s.1).max().unwrap();
            let secs = (t1 - t0).as_secs_f64();
            rates[c].push((n * PER_THREAD) as f64 / secs);
        }
    }
    println!(
        "fault_scaling: random 4 KiB faults per second (chunk 4 KiB, no readahead, {} workers, \
         {PER_THREAD} faults per thread); median of {ROUNDS} rounds (min..max)",
        engine.config().workers
    );
    println!(
        "  {:>7}  {:<28} {:<28}",
        "threads", "one shadow", "a shadow each"
    );
    let k = |r: f64| format!("{:.1}k", r / 1e3);
    for (ti, &n) in THREADS.iter().enumerate() {
        let mut cells = Vec::new();
        for r in &mut rates[2 * ti..2 * ti + 2] {
            let (lo, hi) = (
                r.iter().copied().fold(f64::MAX, f64::min),
                r.iter().copied().fold(0.0, f64::max),
            );
            cells.push(format!("{} ({}..{})", k(median(r)), k(lo), k(hi)));
        }
        println!("  {n:>7}  {:<28} {:<28}", cells[0], cells[1]);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

criterion_group! {
    name = benches;
    config = quick().measurement_time(Duration::from_secs(4));
    targets = fault_latency, fault_ratio, fault_scaling
}
criterion_main!(benches);
