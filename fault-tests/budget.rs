//! Scenario 9: a lazy shadow larger than the memory budget, touched beyond it.
//!
//! Promise: fills that would exceed the budget are refused for now: the
//! faulting thread gets SIGBUS (`populate` the budget error naming the budget
//! and how to raise it), nothing is recorded as bad, resident bytes never
//! exceed the budget, and once a shadow is dropped and gives its memory back,
//! the refused pages are filled normally, in mappings too.

use crate::support::child::{self, param};
use crate::support::*;
use crate::test_name;
use shadowfd::{Config, Engine, Error, Share};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const ID: u64 = 0xB0D6;
const BUDGET: u64 = 4 << 20;
const CHUNK: u64 = 64 << 10;
const FITS: u64 = BUDGET / CHUNK; // chunks that fit

fn cfg() -> Config {
    {
        let mut c = lazy_config();
        c.memory_budget = BUDGET;
        c.max_size = BUDGET; // validate(): the eager cap may not exceed the budget
        c.chunk_size = CHUNK;
        c.readahead = 0; // nothing filled ahead: exactly the touched chunks count
        c
    }
}

fn size() -> u64 {
    4 * BUDGET
}

fn check_budget_error(err: &Error, offset: u64) {
    match err {
        Error::Unfillable {
            offset: o, cause, ..
        } => {
            assert_eq!(*o, offset, "{err}");
            assert!(
                matches!(cause, shadowfd::Cause::Budget { budget: BUDGET, .. }),
                "{cause:?}"
            );
            let reason = cause.to_string();
            for want in [
                &format!("memory budget of {BUDGET} bytes"),
                "--memory-budget",
                "SHADOWFD_MEMORY_BUDGET",
            ] {
                assert!(reason.contains(want), "{reason:?} lacks {want:?}");
            }
        }
        other => panic!("expected the budget error, got {other:?}"),
    }
}

#[test]
fn fills_beyond_the_budget_are_refused_and_named() {
    bounded("fills_beyond_the_budget_are_refused_and_named", || {
        let Some(engine) = lazy_engine("budget", cfg()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let s = engine.open(&path).unwrap();
        for c in 0..FITS {
            s.populate(c * CHUNK, CHUNK).unwrap();
            assert!(s.resident_bytes().unwrap() <= BUDGET);
        }
        check_budget_error(&s.populate(FITS * CHUNK, 1).unwrap_err(), FITS * CHUNK);
        assert_eq!(s.resident_bytes().unwrap(), BUDGET, "memfd blocks");
        assert_eq!(engine.stats().resident_bytes, BUDGET);
        assert_eq!(
            s.poisoned_pages(),
            vec![],
            "a refusal is not recorded as bad"
        );
        assert_eq!(s.stats().budget_refusals, 1);
        // What fit is intact.
        let mut buf = vec![0u8; BUDGET as usize];
        s.read_at(&mut buf, 0).unwrap();
        assert_bytes(&buf, ID, 0, "the chunks within the budget");
        // The budget is per engine: another shadow cannot fill either...
        let other = engine.open(&path).unwrap();
        check_budget_error(&other.populate(0, 1).unwrap_err(), 0);
        // ...until the first one is dropped and gives its memory back: then
        // the very page that was refused is filled.
        drop(s);
        assert_eq!(engine.stats().resident_bytes, 0);
        other.populate(0, CHUNK).unwrap();
        assert_eq!(engine.stats().resident_bytes, CHUNK);
        let mut buf = vec![0u8; CHUNK as usize];
        other.read_at(&mut buf, 0).unwrap();
        assert_bytes(&buf, ID, 0, "the refused chunk, filled after the release");
        let st = other.stats();
        assert_eq!((st.poisoned_pages, st.budget_refusals), (0, 1), "{st:?}");
        assert!(st.last_error.unwrap().contains("--memory-budget"));
    });
}

#[test]
fn concurrent_fills_never_exceed_the_budget() {
    let Some(engine) = lazy_engine("budget concurrent", cfg()) else {
        return;
    };
    let seed = content::seed_for("budget concurrent");
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let a = Arc::new(engine.open(&path).unwrap());
    let b = Arc::new(engine.open(&path).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (a, b, done, peak) = (a.clone(), b.clone(), done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let r = a.resident_bytes().unwrap() + b.resident_bytes().unwrap();
                peak.fetch_max(r, Ordering::SeqCst);
                std::thread::yield_now();
            }
        })
    };
    let nchunks = size() / CHUNK;
    let ok = with_timeout(120, "concurrent budget fills", move || {
        let hs: Vec<_> = (0..8u64)
            .map(|t| {
                let (a, b) = (a.clone(), b.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed ^ t);
                    for _ in 0..200 {
                        let s = if rng.chance(50) { &a } else { &b };
                        let off = rng.below(nchunks) * CHUNK + rng.below(CHUNK);
                        if let Err(e) = s.populate(off, 1) {
                            check_budget_error(&e, off / page() * page());
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        // Each chunk is filled once or refused once; count the filled ones.
        let filled = |s: &shadowfd::Shadow| {
            (0..nchunks)
                .filter(|c| s.populate(c * CHUNK, 1).is_ok())
                .count() as u64
        };
        let n = filled(&a) + filled(&b);
        (n, a.resident_bytes().unwrap() + b.resident_bytes().unwrap())
    });
    done.store(true, Ordering::SeqCst);
    monitor.join().unwrap();
    let (filled, resident) = ok;
    assert_eq!(
        filled, FITS,
        "chunks filled across both shadows (seed {seed:#x})"
    );
    assert_eq!(resident, BUDGET, "(seed {seed:#x})");
    let p = peak.load(Ordering::SeqCst);
    assert!(
        p <= BUDGET,
        "resident peaked at {p} > budget {BUDGET} (seed {seed:#x})"
    );
    // Both shadows were dropped inside the closure: the budget is back.
    assert_eq!(engine.stats().resident_bytes, 0);
}

fn budget_child() {
    child::begin();
    let engine = Engine::new(cfg()).unwrap();
    let s = engine.open(param("PATH")).unwrap();
    let map = s.map(Share::Shared).unwrap();
    child::watch_sigbus(&map);
    for c in 0..size() / CHUNK {
        // Touch every page of the chunk, then report what is resident.
        for p in (c * CHUNK / page())..((c + 1) * CHUNK / page()) {
            let off = (p * page()) as usize;
            assert_bytes(
                &map[off..off + page() as usize],
                ID,
                off as u64,
                "budget child",
            );
        }
        child::report("chunk", format!("{c} {}", s.resident_bytes().unwrap()));
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn touching_past_the_budget_raises_sigbus() {
    if child::role().is_some() {
        return budget_child();
    }
    if !lazy_available("budget sigbus") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let o = child::spawn(
        &test_name!(touching_past_the_budget_raises_sigbus),
        "budget",
        &[("PATH", path.display().to_string())],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    assert_eq!(o.numbers("sigbus"), vec![FITS * CHUNK], "{}", o.describe());
    let chunks = o.values("chunk");
    assert_eq!(chunks.len() as u64, FITS, "{}", o.describe());
    for (c, line) in chunks.iter().enumerate() {
        let resident: u64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(resident, (c as u64 + 1) * CHUNK, "after chunk {c}");
        assert!(resident <= BUDGET);
    }
}

/// A mapping whose page was refused (SIGBUS for whoever faulted then) reads
/// that page normally once memory is given back: the refusal left only a
/// poison marker, which the release drops.
fn retry_child() {
    child::begin();
    let engine = Engine::new(cfg()).unwrap();
    let a = engine.open(param("PATH")).unwrap();
    let b = engine.open(param("PATH")).unwrap();
    let map = a.map(Share::Private).unwrap();
    child::watch_sigbus(&map);
    for c in 0..FITS {
        b.populate(c * CHUNK, CHUNK).unwrap();
    }
    let e = a.populate(0, 1).unwrap_err();
    check_budget_error(&e, 0);
    child::report("refusals", a.stats().budget_refusals);
    drop(b);
    assert_bytes(
        &map[..CHUNK as usize],
        ID,
        0,
        "the refused chunk after the release",
    );
    child::report("end", "read after the release");
}

#[test]
fn a_refused_page_is_served_once_memory_is_given_back() {
    if child::role().is_some() {
        return retry_child();
    }
    if !lazy_available("budget retry") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let o = child::spawn(
        &test_name!(a_refused_page_is_served_once_memory_is_given_back),
        "retry",
        &[("PATH", path.display().to_string())],
    );
    assert!(o.status.success(), "{}", o.describe());
    assert_eq!(o.numbers("refusals"), vec![1], "{}", o.describe());
    assert_eq!(
        o.values("end"),
        vec!["read after the release"],
        "{}",
        o.describe()
    );
}

#[test]
fn cli_explains_a_sigbus_from_the_budget() {
    if !lazy_available("budget cli") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 4 << 20);
    let o = run(cli(&[
        "map",
        "--mode",
        "lazy",
        "--memory-budget",
        "1M",
        "--max-size",
        "1M",
        "--readahead",
        "0",
        "--chunk",
        "32K",
        "--access",
        "seq",
        path.to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    // The cause, as the library knows it, not a list of guesses.
    for want in [
        "could not be filled at offset 1048576: the lazy memory budget of 1048576 bytes",
        "bytes resident",
        "--memory-budget",
    ] {
        assert!(o.stderr.contains(want), "{want:?}\n{}", o.describe());
    }
    assert!(
        !o.stderr.contains("failed to read there"),
        "{}",
        o.describe()
    );
}
