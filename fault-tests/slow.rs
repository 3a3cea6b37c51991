//! Scenario 4: a slow source under many concurrent faults.
//!
//! Promise: with many threads faulting the same and different chunks of a
//! slow source at once, there is no deadlock and no lost wake-up, every byte
//! is exact, and each page is read from the source exactly once (concurrent
//! faults on one chunk wait for one fill). A read that is stuck does not
//! stop the other chunks from being served.

use crate::support::*;
use shadowfd::Share;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const ID: u64 = 0x510;
const CHUNK: u64 = 32 << 10;
const THREADS: usize = 24;

#[test]
fn many_threads_fault_a_slow_source_at_once() {
    let seed = content::seed_for("slow");
    let cfg = {
        let mut c = lazy_config();
        c.chunk_size = CHUNK;
        c.readahead = 0; // exact counting: only touched chunks are read
        c.workers = 4;
        c
    };
    let Some(engine) = lazy_engine("slow source", cfg) else {
        return;
    };
    let dir = tempdir();
    let size = (2 << 20) - 333;
    let path = write_file(dir.path(), "src", ID, size);
    let src = Injected::open(
        &path,
        Plan {
            delay: Some(Duration::from_millis(4)),
            ..Plan::default()
        },
    );
    let shadow = Arc::new(engine.open(src.clone()).unwrap());
    let shared = Arc::new(shadow.map(Share::Shared).unwrap());
    let npages = size.div_ceil(page());
    let checked = with_timeout(120, "24 threads faulting a slow source", move || {
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (shadow, shared, barrier) = (shadow.clone(), shared.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed ^ t as u64);
                    let mut order: Vec<u64> = (0..npages).collect();
                    rng.shuffle(&mut order);
                    // Some threads use their own mapping (shared or private),
                    // some populate + read_at, most the common mapping.
                    let own = match t % 6 {
                        1 => Some(shadow.map(Share::Private).unwrap()),
                        2 => Some(shadow.map(Share::Shared).unwrap()),
                        _ => None,
                    };
                    barrier.wait();
                    let mut buf = vec![0u8; page() as usize];
                    for p in order {
                        let off = p * page();
                        let len = page().min(size - off) as usize;
                        if t % 6 == 3 {
                            shadow.populate(off, len as u64).unwrap();
                            shadow.read_at(&mut buf[..len], off).unwrap();
                            assert_bytes(&buf[..len], ID, off, "read_at (seed {seed:#x})");
                        } else {
                            let m: &[u8] = own.as_deref().unwrap_or(&shared);
                            let got = &m[off as usize..off as usize + len];
                            assert_bytes(got, ID, off, &format!("thread {t} (seed {seed:#x})"));
                        }
                    }
                    npages
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
    });
    assert_eq!(checked, npages * THREADS as u64);
    let reread = src.reread_pages();
    assert!(
        reread.is_empty(),
        "pages read more than once (page, times): {reread:?} (seed {seed:#x})"
    );
    assert_eq!(src.delivered().len() as u64, npages, "every page read once");
    let nchunks = size.div_ceil(CHUNK);
    let st = engine.stats();
    assert_eq!(st.chunks_filled, nchunks, "{st:?}");
    assert_eq!(st.bytes_filled, npages * page(), "{st:?}");
    assert_eq!((st.errors, st.poisoned_pages), (0, 0), "{st:?}");
    assert!(src.max_in_flight() >= 2, "the fills did not overlap");
}

#[test]
fn a_stuck_read_does_not_block_other_chunks() {
    let cfg = {
        let mut c = lazy_config();
        c.chunk_size = CHUNK;
        c.readahead = 0;
        c.workers = 2;
        c
    };
    let Some(engine) = lazy_engine("stuck read", cfg) else {
        return;
    };
    let dir = tempdir();
    let size = 1 << 20;
    let path = write_file(dir.path(), "src", ID, size);
    let gate = Gate::new();
    let src = Injected::open(
        &path,
        Plan {
            gate: Some((0..CHUNK, gate.clone())),
            ..Plan::default()
        },
    );
    let shadow = Arc::new(engine.open(src.clone()).unwrap());
    let map = Arc::new(shadow.map(Share::Shared).unwrap());
    // A consumer faults chunk 0, whose read is held at the gate...
    let m = map.clone();
    let stuck = std::thread::spawn(move || {
        assert_bytes(&m[..CHUNK as usize], ID, 0, "the held chunk");
    });
    assert!(
        gate.wait_arrivals(1, Duration::from_secs(20)),
        "read of chunk 0 never started"
    );
    // ...while the other chunks are served, by mapping and by populate.
    let m = map.clone();
    let sh = shadow.clone();
    with_timeout(60, "other chunks while one read is stuck", move || {
        assert_bytes(&m[CHUNK as usize..], ID, CHUNK, "chunks 1..");
        sh.populate(CHUNK, size - CHUNK).unwrap();
    });
    assert!(
        !stuck.is_finished(),
        "the held chunk was served before its read finished"
    );
    gate.open();
    with_timeout(60, "the held chunk after the gate opened", move || {
        stuck.join().unwrap()
    });
    assert!(src.reread_pages().is_empty());
    assert_eq!(gate.arrivals(), 1, "chunk 0 was read more than once");
}

/// Every worker held in a stuck read of one shadow (two workers, two
/// chunks held at the gate) does not stop another shadow of the same
/// engine: a spare worker serves it, byte-exact, while the held chunks
/// stay held. Before, the other shadow's faults waited for the gate.
#[test]
fn reads_stuck_in_one_shadow_do_not_hold_the_others() {
    let cfg = {
        let mut c = lazy_config();
        c.chunk_size = CHUNK;
        c.readahead = 0;
        c.workers = 2;
        c
    };
    let Some(engine) = lazy_engine("stuck shadow", cfg) else {
        return;
    };
    let engine = Arc::new(engine);
    let dir = tempdir();
    let size = 1 << 20;
    let gate = Gate::new();
    let held = Injected::open(
        &write_file(dir.path(), "held", ID, size),
        Plan {
            gate: Some((0..2 * CHUNK, gate.clone())),
            ..Plan::default()
        },
    );
    let other = write_file(dir.path(), "other", ID + 1, size);
    let held = Arc::new(engine.open(held).unwrap());
    let map = Arc::new(held.map(Share::Shared).unwrap());
    // Two consumers fault the two gated chunks: both workers read there.
    let stuck: Vec<_> = (0..2u64)
        .map(|c| {
            let m = map.clone();
            std::thread::spawn(move || {
                let at = (c * CHUNK) as usize;
                assert_bytes(&m[at..at + CHUNK as usize], ID, c * CHUNK, "a held chunk");
            })
        })
        .collect();
    assert!(
        gate.wait_arrivals(2, Duration::from_secs(20)),
        "the reads of the two held chunks never started"
    );
    let e = engine.clone();
    with_timeout(30, "another shadow while every worker is held", move || {
        let o = e.open(other).unwrap();
        let m = o.map(Share::Private).unwrap();
        assert_bytes(&m[..], ID + 1, 0, "the other shadow");
    });
    assert!(
        stuck.iter().all(|t| !t.is_finished()),
        "a held chunk was served before its read finished"
    );
    assert!(engine.stats().spare_workers >= 1, "{:?}", engine.stats());
    gate.open();
    for t in stuck {
        with_timeout(60, "the held chunks after the gate opened", move || {
            t.join().unwrap()
        });
    }
}
