//! Regressions for hazards found in review: each once lost data or hung.
//! Scenarios that change process-wide state (mlockall, signal handlers) run
//! in a child: the test binary re-executes itself with a role variable.

mod common;

use common::*;
use shadowfd::source::{FileSource, Source, SourceMeta};
use shadowfd::{Config, Engine, Mode, Share};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn lazy_engine(f: impl FnOnce(&mut Config)) -> Engine {
    let mut c = config(Mode::Lazy);
    f(&mut c);
    Engine::new(c).expect("lazy engine")
}

/// Re-runs this binary's test `name` alone, with `vars` set; its exit status.
fn child(name: &str, vars: &[(&str, &std::path::Path)]) -> std::process::ExitStatus {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in vars {
        c.env(k, v);
    }
    c.status().unwrap()
}

/// Reads one byte of a mapping the way a consumer does.
fn touch(m: &shadowfd::Mapping, off: usize) -> u8 {
    std::hint::black_box(m[off])
}

/// Touches `map[off]` on a new thread; true if it finished within `secs`.
fn touch_finishes(map: &Arc<shadowfd::Mapping>, off: usize, secs: u64) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let m = map.clone();
    std::thread::spawn(move || {
        let _ = tx.send(touch(&m, off));
    });
    rx.recv_timeout(Duration::from_secs(secs)).is_ok()
}

/// A file source whose `metadata()` panics after the first call (the one
/// `Engine::open` makes).
struct PanickyMeta {
    inner: FileSource,
    calls: AtomicU64,
}

impl Source for PanickyMeta {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn metadata(&self) -> io::Result<SourceMeta> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= 1 {
            panic!("metadata panicked");
        }
        self.inner.metadata()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

#[test]
fn a_panicking_source_metadata_does_not_stop_the_engine() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = file_with(dir.path(), "a", &pattern(1 << 20, 1));
    let b = file_with(dir.path(), "b", &pattern(1 << 20, 2));
    let engine = lazy_engine(|c| {
        c.workers = 1;
        c.readahead = 0;
    });
    let sa = engine
        .open(PanickyMeta {
            inner: FileSource::open(&a).unwrap(),
            calls: AtomicU64::new(0),
        })
        .unwrap();
    let sb = engine.open(&b).unwrap();
    let ma = Arc::new(sa.map(Share::Shared).unwrap());
    let mb = Arc::new(sb.map(Share::Shared).unwrap());
    let a_ok = touch_finishes(&ma, 0, 5);
    let b_ok = touch_finishes(&mb, 0, 5);
    if !(a_ok && b_ok) {
        // Blocked threads would be torn down under us: leak everything.
        std::mem::forget((ma, mb, sa, sb, engine));
        panic!("touch of shadow a finished: {a_ok}, of unrelated shadow b: {b_ok}");
    }
    // The panic counts as a change: the fill went on (detect policy).
    assert!(sa.stats().source_changed);
    assert_eq!(mb[5], pattern(1 << 20, 2)[5]);
}

/// After a scan, a backward jump and one sequential step, forward random
/// touches must fill one chunk each, as on a fresh shadow.
#[test]
fn random_touches_after_a_scan_fill_only_their_chunks() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let engine = lazy_engine(|c| c.workers = 2);
    let run = |scan_first: bool| -> u64 {
        let s = engine.open(&path).unwrap();
        let m = s.map(Share::Shared).unwrap();
        if scan_first {
            for off in (40 << 20..44 << 20).step_by(4096) {
                touch(&m, off);
            }
        }
        touch(&m, 0);
        touch(&m, 4096);
        // Chunks filled on demand (by a fault's run), not by readahead: a
        // readahead fill that completes meanwhile adds to both counters, so
        // no wait for queued readahead is needed.
        let demand = || {
            let st = s.stats();
            st.chunks_filled - st.readahead_chunks
        };
        let before = demand();
        for mib in (4..32).step_by(2) {
            touch(&m, mib << 20);
        }
        demand() - before
    };
    let control = run(false);
    let after_scan = run(true);
    assert_eq!(control, 14, "one chunk per random touch");
    assert_eq!(after_scan, control, "14 random touches after a scan");
}

/// Under a memory budget, sequential readahead may only use half of it, so
/// that random demand touches after a scan still fit.
#[test]
fn random_touches_after_a_scan_stay_within_the_budget() {
    if !lazy_available() {
        return;
    }
    if let Ok(path) = std::env::var("HAZARD_BUDGET_PATH") {
        let scan = std::env::var("HAZARD_BUDGET_SCAN").is_ok();
        let engine = lazy_engine(|c| {
            c.memory_budget = 8 << 20;
            c.max_size = 8 << 20;
            c.readahead = 2 << 20;
            c.workers = 2;
        });
        let s = engine.open(&path).unwrap();
        let m = s.map(Share::Shared).unwrap();
        if scan {
            for off in (900 << 20..902 << 20).step_by(4096) {
                touch(&m, off);
            }
        }
        touch(&m, 0);
        touch(&m, 4096);
        for mib in (4..800).step_by(2) {
            touch(&m, mib << 20);
        }
        assert!(s.stats().resident_bytes <= 8 << 20);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let name = "random_touches_after_a_scan_stay_within_the_budget";
    let plain = child(name, &[("HAZARD_BUDGET_PATH", &path)]);
    assert!(plain.success(), "without a scan: {plain:?}");
    let p = std::path::Path::new("1");
    let scan = child(
        name,
        &[("HAZARD_BUDGET_PATH", &path), ("HAZARD_BUDGET_SCAN", p)],
    );
    assert!(
        scan.success(),
        "398 random touches after a 2 MiB scan: {scan:?}"
    );
}

/// A process that called mlockall(MCL_FUTURE) gets new mappings populated
/// inside mmap(2)/mremap(2). Lazy mappings are made PROT_NONE, registered,
/// then made readable, so nothing reaches the memfd unregistered.
#[test]
fn under_mlockall_future_lazy_shadows_read_the_source() {
    if !lazy_available() {
        return;
    }
    if let Ok(path) = std::env::var("HAZARD_MLOCK_PATH") {
        // SAFETY: mlockall has no memory-safety preconditions.
        let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
        assert_eq!(r, 0, "mlockall: {}", io::Error::last_os_error());
        let data = std::fs::read(&path).unwrap();
        let engine = lazy_engine(|c| c.readahead = 0);
        let s = engine.open(&path).unwrap();
        for share in [Share::Shared, Share::Private] {
            let m = s.map(share).unwrap();
            assert_eq!(first_diff(&m, &data), None, "{share:?} under mlockall");
        }
        s.materialize().unwrap();
        let mut b = vec![0u8; data.len()];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(first_diff(&b, &data), None, "read_at after materialize");
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = file_with(dir.path(), "f", &pattern(1 << 20, 9));
    let st = child(
        "under_mlockall_future_lazy_shadows_read_the_source",
        &[("HAZARD_MLOCK_PATH", &path)],
    );
    assert!(st.success(), "child under mlockall: {st:?}");
}

/// A read through /proc/self/mem (gdb, gcore, profilers) of the engine's own
/// mappings must not leave a zero page behind, nor spin a worker: afterwards
/// every consumer still reads the source.
#[test]
fn proc_self_mem_reads_of_engine_mappings_leave_no_zero_pages() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(1 << 20, 10);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|c| c.readahead = 0);
    let s = engine.open(&path).unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = format!("shadowfd:{}", path.display());
    let addrs: Vec<u64> = maps
        .lines()
        .filter(|l| l.contains(&name))
        .map(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap())
        .collect();
    assert!(addrs.len() >= 2, "fill and template mappings: {addrs:?}");
    let read = |at: u64| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let mem = std::fs::File::open("/proc/self/mem").unwrap();
            let mut b = [0u8; 8];
            let r = mem.read_at(&mut b, at).map(|_| b);
            let _ = tx.send(r.map_err(|e| e.raw_os_error()));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a /proc/self/mem read blocked")
    };
    // Documented (docs/shadows.md): the kernel does not wait on a
    // userfaultfd for such reads, so an unfilled page fails with EIO, and a
    // filled one reads the source. Never zeros, never a spin.
    for (i, addr) in addrs.iter().enumerate() {
        let off = (i as u64 + 1) * 8192;
        assert_eq!(read(addr + off), Err(Some(libc::EIO)), "an unfilled page");
    }
    s.populate(0, data.len() as u64).unwrap();
    let mut served = 0;
    for (i, addr) in addrs.iter().enumerate() {
        let off = (i as u64 + 1) * 8192;
        let o = off as usize;
        // The fill alias has the page mapped: it reads the source. A range
        // registered for MINOR faults that has not mapped it yet fails.
        match read(addr + off) {
            Ok(b) => {
                assert_eq!(b[..], data[o..o + 8], "a filled page");
                served += 1;
            }
            Err(e) => assert_eq!(e, Some(libc::EIO), "a filled page"),
        }
    }
    assert!(served >= 1, "the alias reads filled pages");
    let m = s.map(Share::Private).unwrap();
    assert_eq!(
        first_diff(&m, &data),
        None,
        "consumers after /proc/self/mem reads"
    );
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Opening is constant time: the chunk table is allocated zeroed, so a 1 TiB
/// sparse source costs no memory until it is touched.
#[test]
fn opening_a_huge_sparse_source_costs_no_memory() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let engine = lazy_engine(|_| {});
    let before = rss_kib();
    let s = engine.open(&path).unwrap();
    let grew_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grew_mib < 16,
        "opening a 1 TiB sparse file grew RSS by {grew_mib} MiB"
    );
    assert_eq!(s.resident_bytes().unwrap(), 0);
}

/// Page 0 always fails to read; everything else is fine.
struct BadPage0 {
    inner: FileSource,
}

impl Source for BadPage0 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset < 4096 {
            return Err(io::Error::other("injected read error"));
        }
        self.inner.read_at(buf, offset)
    }
    fn metadata(&self) -> io::Result<SourceMeta> {
        self.inner.metadata()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

static SIGBUS_SEEN: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigbus(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Count the SIGBUS, then park this thread for good (the page stays
    // poisoned; nothing about the mapping is changed).
    SIGBUS_SEEN.fetch_add(1, Ordering::SeqCst);
    loop {
        // SAFETY: pause(2) is async-signal-safe and takes no arguments.
        unsafe { libc::pause() };
    }
}

/// Several threads touch the same poisoned page of a fresh mapping at once:
/// every one gets SIGBUS. A thread that starts waiting after the page was
/// poisoned must be woken (UFFDIO_POISON answers EEXIST for it).
#[test]
fn concurrent_touches_of_a_poisoned_page_all_get_sigbus() {
    if !lazy_available() {
        return;
    }
    if let Ok(path) = std::env::var("HAZARD_POISON_PATH") {
        // SAFETY: installs a handler that only touches an atomic and calls
        // pause(); the sigaction struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
        let engine = lazy_engine(|c| {
            c.readahead = 0;
            c.workers = 2;
        });
        let s = engine
            .open(BadPage0 {
                inner: FileSource::open(&path).unwrap(),
            })
            .unwrap();
        assert!(s.populate(0, 4096).is_err());
        let threads = 4;
        for iter in 0..300 {
            let share = if iter % 2 == 0 {
                Share::Private
            } else {
                Share::Shared
            };
            let m = Arc::new(s.map(share).unwrap());
            let barrier = Arc::new(std::sync::Barrier::new(threads));
            let want = SIGBUS_SEEN.load(Ordering::SeqCst) + threads as u64;
            for _ in 0..threads {
                let (m, b) = (m.clone(), barrier.clone());
                std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(move || {
                        b.wait();
                        touch(&m, 0);
                        unreachable!("page 0 is poisoned");
                    })
                    .unwrap();
            }
            let t0 = std::time::Instant::now();
            while SIGBUS_SEEN.load(Ordering::SeqCst) < want {
                if t0.elapsed() > Duration::from_secs(5) {
                    eprintln!("iteration {iter}: a thread is still blocked in the fault after 5 s");
                    std::process::exit(4);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = file_with(dir.path(), "f", &pattern(64 << 10, 5));
    let st = child(
        "concurrent_touches_of_a_poisoned_page_all_get_sigbus",
        &[("HAZARD_POISON_PATH", &path)],
    );
    assert!(st.success(), "{st:?}");
}

/// A file source whose reads from `slow_from` on take `delay`; counts the
/// slow reads started and records when it is dropped.
struct SlowTail {
    inner: FileSource,
    slow_from: u64,
    delay: Duration,
    slow_reads: Arc<AtomicU64>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Source for SlowTail {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.slow_from {
            self.slow_reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
        }
        self.inner.read_at(buf, offset)
    }
    fn metadata(&self) -> io::Result<SourceMeta> {
        self.inner.metadata()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

impl Drop for SlowTail {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// The C ABI's `release` once ran after the program's last free returned
/// (or never, if it exited first): a readahead in flight held the shadow.
/// The last holder now waits for that fill, so the source is gone when the
/// last drop returns.
#[test]
fn the_source_is_dropped_when_the_last_mapping_is_even_with_a_fill_in_flight() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let len = 32 << 20;
    let data = pattern(len, 7);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|c| c.readahead = 16 << 20);
    let slow_reads = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shadow = engine
        .open(SlowTail {
            inner: FileSource::open(&path).unwrap(),
            slow_from: 4 << 20,
            delay: Duration::from_millis(400),
            slow_reads: slow_reads.clone(),
            dropped: dropped.clone(),
        })
        .unwrap();
    let map = shadow.map(Share::Private).unwrap();
    // A sequential scan of the fast head starts readahead into the slow tail.
    for off in (0..4 << 20).step_by(4096) {
        assert_eq!(touch(&map, off), data[off]);
    }
    let started = std::time::Instant::now();
    while slow_reads.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        slow_reads.load(Ordering::SeqCst) > 0,
        "no readahead reached the slow part: the test did not set up a fill in flight"
    );
    drop(shadow);
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the mapping still holds it"
    );
    drop(map);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the last drop returned while a fill still held the source"
    );
}

/// Four threads map and unmap small ranges of one lazy shadow as fast as
/// they can, so that addresses are reused at once. A fault message that
/// went stale (its thread woken by another fill, its range since unmapped)
/// was once answered with a poison that landed in the range another thread
/// had just mapped at the same address: SIGBUS for a thread that never
/// faulted wrongly (about 1 run in 20 of the C ABI's `threads` case). Run
/// in a child, so that a SIGBUS fails this test and not the whole binary.
#[test]
fn mapping_and_unmapping_from_many_threads_never_poisons_a_new_range() {
    if !lazy_available() {
        return;
    }
    if let Ok(path) = std::env::var("HAZARD_REMAP_PATH") {
        let data = Arc::new(std::fs::read(&path).unwrap());
        let pages = data.len() / 4096;
        // A fresh engine and shadow each time: the race needs fills in
        // flight and every reader armed (as after a start), and the
        // threads' ranges overlap, so that one thread's fill answers (and
        // wakes) another's fault while that fault's message is being read.
        for _ in 0..30 {
            let engine = lazy_engine(|_| {});
            let shadow = Arc::new(engine.open(&path).unwrap());
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let (shadow, data) = (shadow.clone(), data.clone());
                    std::thread::spawn(move || {
                        for round in 0..40u64 {
                            let pg = ((t * 7 + round) as usize) % (pages - 2);
                            let share = if round % 2 == 0 {
                                Share::Shared
                            } else {
                                Share::Private
                            };
                            let m = shadow
                                .map_options()
                                .offset(pg as u64 * 4096)
                                .len(2 * 4096)
                                .share(share)
                                .map()
                                .unwrap();
                            assert_eq!(&m[..], &data[pg * 4096..(pg + 2) * 4096], "page {pg}");
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = file_with(dir.path(), "f", &pattern(13 * 4096 + 1234, 21));
    for _ in 0..5 {
        let st = child(
            "mapping_and_unmapping_from_many_threads_never_poisons_a_new_range",
            &[("HAZARD_REMAP_PATH", &path)],
        );
        assert!(st.success(), "child mapping from four threads: {st:?}");
    }
}
