//! Lazy shadows: faults from many threads, both sharing kinds, populate and
//! materialize, staleness policies, shutdown with live mappings.

mod common;

use common::*;
use shadowfd::{Config, Engine, Error, Mode, Share, StalePolicy, Staleness};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier};

fn lazy_engine(f: impl FnOnce(&mut Config)) -> Engine {
    let mut c = config(Mode::Lazy);
    f(&mut c);
    Engine::new(c).expect("lazy engine")
}

#[test]
fn bytes_are_identical_at_awkward_sizes_in_both_sharing_kinds() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = lazy_engine(|_| {});
    for (i, n) in [0usize, 1, 4095, 4096, 4097, (3 << 20) + 123, (5 << 20) - 7]
        .into_iter()
        .enumerate()
    {
        let data = pattern(n, 100 + i as u64);
        let path = file_with(dir.path(), &format!("f{n}"), &data);
        for share in [Share::Shared, Share::Private] {
            let shadow = engine.open(&path).unwrap();
            assert_eq!(shadow.mode(), Mode::Lazy);
            let map = shadow.map(share).unwrap();
            assert_eq!(first_diff(&map, &data), None, "size {n} {share:?}");
        }
    }
}

#[test]
fn many_threads_fault_the_same_and_different_pages() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = 24 << 20;
    let data = Arc::new(pattern(n, 7));
    let path = file_with(dir.path(), "f", &data);
    // Small chunks and no readahead: as many distinct fills as possible.
    let engine = lazy_engine(|c| {
        c.chunk_size = 16 << 10;
        c.readahead = 0;
        c.workers = 4;
    });
    let shadow = engine.open(&path).unwrap();
    let shared = Arc::new(shadow.map(Share::Shared).unwrap());
    let private = Arc::new(shadow.map(Share::Private).unwrap());
    let threads = 16;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (shared, private, data, barrier) = (
                shared.clone(),
                private.clone(),
                data.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                barrier.wait();
                let page = 4096;
                // Every thread walks the same first 2 MiB in the same order ...
                for off in (0..(2 << 20)).step_by(page) {
                    assert_eq!(shared[off], data[off], "thread {t}, same page {off}");
                }
                // ... then its own stripe, alternating the two mappings.
                let stripe = (n - (2 << 20)) / threads;
                let base = (2 << 20) + t * stripe;
                for (k, off) in (base..base + stripe).step_by(page).enumerate() {
                    let m = if k % 2 == 0 { &shared } else { &private };
                    assert_eq!(m[off], data[off], "thread {t}, own page {off}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a faulting thread panicked");
    }
    assert_eq!(first_diff(&shared, &data), None);
    assert_eq!(first_diff(&private, &data), None);
    let st = shadow.stats();
    assert_eq!(st.bytes_filled, n as u64, "every byte filled exactly once");
    assert_eq!(st.chunks_filled, (n as u64).div_ceil(16 << 10));
    assert_eq!(st.errors, 0);
}

#[test]
fn nothing_is_read_before_first_touch_and_a_random_touch_fills_little() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = 64 << 20;
    let data = pattern(n, 8);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|_| {});
    let shadow = engine.open(&path).unwrap();
    assert_eq!(shadow.resident_bytes().unwrap(), 0);
    let map = shadow.map(Share::Private).unwrap();
    assert_eq!(shadow.stats().bytes_filled, 0);
    let off = 40 << 20;
    assert_eq!(map[off + 17], data[off + 17]);
    let st = shadow.stats();
    assert_eq!(st.bytes_filled, engine.config().chunk_size);
    assert_eq!(shadow.resident_bytes().unwrap(), engine.config().chunk_size);
    assert_eq!(st.faults, 1);
}

#[test]
fn populated_and_materialized_shadows_read_right_unregistered() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = (6 << 20) + 5;
    let data = pattern(n, 9);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|_| {});
    let shadow = engine.open(&path).unwrap();

    // The raw descriptor is withheld while pages are unfilled.
    assert!(matches!(shadow.fd(), Err(Error::NotMaterialized { .. })));
    assert!(matches!(
        shadow.reopen_readonly(),
        Err(Error::NotMaterialized { .. })
    ));

    // A populated range reads right through read(2)-style access.
    shadow.populate(1 << 20, 100_000).unwrap();
    let mut buf = vec![0u8; 100_000];
    assert_eq!(shadow.read_at(&mut buf, 1 << 20).unwrap(), buf.len());
    assert_eq!(&buf[..], &data[1 << 20..(1 << 20) + 100_000]);
    assert!(shadow.populate(n as u64 - 10, 11).is_err(), "past the end");

    shadow.materialize().unwrap();
    assert!(shadow.is_materialized());
    let fd = shadow.reopen_readonly().unwrap();
    // An ordinary, unregistered mapping of the handed-out descriptor.
    // SAFETY: a fresh read-only shared mapping of `n` bytes of a sealed memfd.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` maps `n` readable bytes that nothing writes.
    let seen = unsafe { std::slice::from_raw_parts(p as *const u8, n) };
    assert_eq!(first_diff(seen, &data), None);
    // SAFETY: unmapping the range mapped above.
    unsafe { libc::munmap(p, n) };

    // Host writes are refused: F_SEAL_FUTURE_WRITE and friends.
    let want = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
    assert_eq!(shadow.seals().unwrap() & want, want);
    let path = format!("/proc/self/fd/{}", shadow.fd().unwrap().as_raw_fd());
    let mut rw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(
        rw.write(b"x").unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
}

fn rewrite_in_place(path: &std::path::Path, at: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    // Make sure the mtime moves even on coarse clocks.
    let t = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    f.set_modified(t).unwrap();
}

#[test]
fn detect_policy_keeps_filling_and_reports_the_change() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = 4 << 20;
    let data = pattern(n, 10);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|c| c.readahead = 0);
    let shadow = engine.open(&path).unwrap();
    let map = shadow.map(Share::Shared).unwrap();
    assert_eq!(map[0], data[0]);
    assert_eq!(shadow.staleness().unwrap(), Staleness::Unchanged);
    let newer = pattern(4096, 11);
    rewrite_in_place(&path, 3 << 20, &newer);
    // A fill after the change serves what the source holds now, and says so.
    assert_eq!(map[3 << 20], newer[0]);
    assert!(shadow.stats().source_changed);
    assert!(matches!(shadow.staleness().unwrap(), Staleness::Changed(_)));
    // What was filled before stays as it was.
    assert_eq!(&map[..4096], &data[..4096]);
}

#[test]
fn strict_policy_refuses_fills_after_a_change() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = 4 << 20;
    let data = pattern(n, 12);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|c| {
        c.readahead = 0;
        c.stale = StalePolicy::Strict;
    });
    let shadow = engine.open(&path).unwrap();
    shadow.populate(0, 4096).unwrap();
    rewrite_in_place(&path, 2 << 20, &pattern(4096, 13));
    let e = shadow.populate(2 << 20, 4096).unwrap_err();
    assert!(matches!(e, Error::Unfillable { .. }), "{e:?}");
    assert!(e.to_string().contains("changed"), "{e}");
    assert!(shadow.stats().poisoned_pages > 0);
    assert!(shadow.stats().errors > 0);
    // Pages filled before the change are still served.
    let mut b = [0u8; 4096];
    shadow.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[..], &data[..4096]);
    assert!(!shadow.is_materialized());
    assert!(shadow.materialize().is_err());
}

#[test]
fn mappings_outlive_the_engine_and_the_shadow_without_zeros() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = 8 << 20;
    let data = pattern(n, 14);
    let path = file_with(dir.path(), "f", &data);
    let engine = lazy_engine(|c| c.readahead = 0);
    let shadow = engine.open(&path).unwrap();
    let shared = shadow.map(Share::Shared).unwrap();
    let private = shadow.map(Share::Private).unwrap();
    assert_eq!(shared[0], data[0]);
    drop(shadow);
    drop(engine);
    // Every unfilled page is still filled from the source, never zeros.
    assert_eq!(first_diff(&shared, &data), None);
    drop(shared);
    assert_eq!(first_diff(&private, &data), None);
}

#[test]
fn engine_stats_add_up_over_shadows() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = lazy_engine(|c| c.readahead = 0);
    let a = file_with(dir.path(), "a", &pattern(1 << 20, 15));
    let b = file_with(dir.path(), "b", &pattern(1 << 20, 16));
    let sa = engine.open(&a).unwrap();
    let sb = engine.open(&b).unwrap();
    sa.populate(0, 1 << 20).unwrap();
    sb.populate(0, 4096).unwrap();
    let e = engine.stats();
    assert_eq!(
        e.bytes_filled,
        sa.stats().bytes_filled + sb.stats().bytes_filled
    );
    assert_eq!(e.resident_bytes, (1 << 20) + engine.config().chunk_size);
    drop(sa);
    assert_eq!(engine.stats().resident_bytes, engine.config().chunk_size);
}

/// Zero pages planted in a lazy memfd (`fallocate`, which its seals allow)
/// are overwritten by the fill before any consumer sees them: a fault filled
/// straight into a shared range, or through the alias for a private one
/// (from the file's mapping), finds the page present and heals it.
#[test]
fn planted_pages_are_healed_by_fills_in_both_sharing_kinds() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let page = shadowfd::page_size();
    let n = 64 * page;
    let data = pattern(n, 31);
    let path = file_with(dir.path(), "planted", &data);
    let engine = lazy_engine(|c| c.readahead = 0);
    for share in [Share::Shared, Share::Private] {
        let shadow = engine.open(&path).unwrap();
        // SAFETY: fallocate on the shadow's own memfd, as another process
        // holding it could; it allocates zero pages and writes nothing.
        let r = unsafe { libc::fallocate(shadow.mapping_fd().as_raw_fd(), 0, 0, (n / 2) as i64) };
        assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
        let map = shadow.map(share).unwrap();
        // Single faults first (every third page, backwards), then the rest.
        for p in (0..64).rev().step_by(3) {
            assert_eq!(map[p * page], data[p * page], "page {p} {share:?}");
        }
        assert_eq!(first_diff(&map, &data), None, "{share:?}");
        let st = shadow.stats();
        assert_eq!(st.healed_pages, 32, "{share:?} {st:?}");
        assert_eq!((st.errors, st.poisoned_pages), (0, 0), "{share:?} {st:?}");
    }
}

/// A host file that counts the metadata reads fills make.
struct CountingMeta {
    inner: shadowfd::source::FileSource,
    fill_checks: Arc<std::sync::atomic::AtomicU64>,
}

impl shadowfd::source::Source for CountingMeta {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn metadata(&self) -> std::io::Result<shadowfd::source::SourceMeta> {
        self.inner.metadata()
    }
    fn fill_metadata(&self) -> std::io::Result<shadowfd::source::SourceMeta> {
        self.fill_checks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.fill_metadata()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// `detect` checks the source at most once a millisecond on a stream of
/// 4 KiB faults (one `fstat` per fault was a twentieth of a fault's cost);
/// `strict` still checks every fill. Both fill every page right.
#[test]
fn detect_checks_the_source_at_most_once_a_millisecond_and_strict_on_every_fill() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = 16 << 20;
    let data = pattern(n, 12);
    let path = file_with(dir.path(), "f", &data);
    for stale in [StalePolicy::Detect, StalePolicy::Strict] {
        let engine = lazy_engine(|c| {
            c.readahead = 0;
            c.chunk_size = 4096;
            c.stale = stale;
        });
        let checks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let shadow = engine
            .open(CountingMeta {
                inner: shadowfd::source::FileSource::open(&path).unwrap(),
                fill_checks: checks.clone(),
            })
            .unwrap();
        let map = shadow.map(Share::Shared).unwrap();
        let started = std::time::Instant::now();
        let pages = n / 4096;
        for i in 0..pages {
            // Every third page: no two touches share a run.
            let p = (i * 3) % pages;
            assert_eq!(map[p * 4096], data[p * 4096], "{stale:?} page {p}");
        }
        let ms = started.elapsed().as_millis() as u64;
        let fills = shadow.stats().chunks_filled;
        let checks = checks.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(fills, pages as u64, "{stale:?}: one fill per page");
        match stale {
            StalePolicy::Strict => {
                assert!(checks >= fills, "strict: {checks} checks, {fills} fills")
            }
            _ => assert!(
                // Two workers may both take one millisecond's check.
                checks <= 2 * ms + 4 && checks < fills,
                "detect: {checks} checks for {fills} fills in {ms} ms"
            ),
        }
    }
}
