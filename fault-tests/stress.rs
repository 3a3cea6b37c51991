//! Scenario 11: stress. Several shadows on three engines (chunks of 4, 16
//! and 128 KiB; readahead on and off), many threads doing random work for a bounded time: touches
//! through long-lived shared and private mappings, fresh mappings made and
//! dropped, sequential scans (readahead), `populate`, `read_at`, and
//! `materialize`. Sources read short or slowly.
//!
//! Promise: every byte seen is the source's byte, no page is read from the
//! source twice, nothing errors, and it all ends (no deadlock). The run is
//! seeded (`FAULT_SEED` overrides); the seed is in every failure message.

use crate::support::*;
use shadowfd::{Config, Mapping, Shadow, Share};
use std::sync::Arc;
use std::time::{Duration, Instant};

const THREADS: usize = 8;
const RUN_FOR: Duration = Duration::from_millis(2500);

struct Item {
    id: u64,
    size: u64,
    shadow: Shadow,
    src: Arc<Injected>,
    shared: Mapping,
    private: Mapping,
}

fn check(got: &[u8], id: u64, off: u64, seed: u64, what: &str) {
    if let Some(at) = first_mismatch(id, off, got) {
        panic!(
            "seed {seed:#x}: {what}: shadow {id:#x} byte {at} is {:#04x}, the source has {:#04x} \
             (rerun with FAULT_SEED={})",
            got[(at - off) as usize],
            byte_at(id, at),
            content::base_seed()
        );
    }
}

#[test]
fn random_work_on_many_shadows_stays_exact() {
    let seed = content::seed_for("stress");
    let mut engines = Vec::new();
    for (chunk, readahead) in [(16 << 10, 8 << 20), (128 << 10, 2 << 20), (4 << 10, 0)] {
        let cfg = Config {
            chunk_size: chunk,
            readahead,
            workers: 3,
            ..lazy_config()
        };
        match lazy_engine("stress", cfg) {
            Some(e) => engines.push(e),
            None => return,
        }
    }
    let dir = tempdir();
    let mut rng = Rng::new(seed);
    let mut items = Vec::new();
    for i in 0..6u64 {
        let id = 0x57E5 + i;
        // Sizes of 1..8 MiB, not page multiples.
        let size = (1 << 20) + rng.below(7 << 20) + 1 + rng.below(page() - 1);
        let path = write_file(dir.path(), &format!("s{i}"), id, size);
        // Engine i % 3, source kind (i + i / 3) % 3: six distinct pairs.
        let plan = match (i + i / 3) % 3 {
            0 => Plan::default(),
            1 => Plan {
                max_read: Some(3000 + rng.below(5000) as usize),
                ..Plan::default()
            },
            _ => Plan {
                delay: Some(Duration::from_micros(300)),
                ..Plan::default()
            },
        };
        let src = Injected::open(&path, plan);
        let shadow = engines[(i % 3) as usize].open_arc(src.clone()).unwrap();
        let shared = shadow.map(Share::Shared).unwrap();
        let private = shadow.map(Share::Private).unwrap();
        items.push(Item {
            id,
            size,
            shadow,
            src,
            shared,
            private,
        });
    }
    let items = Arc::new(items);
    let work = items.clone();
    let ops = with_timeout(120, "stress run", move || {
        let deadline = Instant::now() + RUN_FOR;
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let items = work.clone();
                std::thread::spawn(move || {
                    let seed = seed ^ ((t as u64 + 1) << 32);
                    let mut rng = Rng::new(seed);
                    let mut ops = 0u64;
                    let mut buf = vec![0u8; 256 << 10];
                    while Instant::now() < deadline {
                        let it = &items[rng.below(items.len() as u64) as usize];
                        let off = rng.below(it.size);
                        let len = (1 + rng.below(64 << 10)).min(it.size - off);
                        let (o, l) = (off as usize, len as usize);
                        match rng.below(100) {
                            0..=34 => check(&it.shared[o..o + l], it.id, off, seed, "shared"),
                            35..=54 => check(&it.private[o..o + l], it.id, off, seed, "private"),
                            55..=64 => {
                                it.shadow.populate(off, len).unwrap_or_else(|e| {
                                    panic!("seed {seed:#x}: populate({off}, {len}): {e}")
                                });
                            }
                            65..=79 => {
                                let n = it.shadow.read_at(&mut buf[..l], off).unwrap();
                                assert_eq!(n, l, "seed {seed:#x}: short read_at");
                                check(&buf[..l], it.id, off, seed, "read_at");
                            }
                            80..=91 => {
                                let share = if rng.chance(50) {
                                    Share::Shared
                                } else {
                                    Share::Private
                                };
                                let m = it.shadow.map(share).unwrap();
                                for _ in 0..4 {
                                    let p = rng.below(it.size);
                                    let e = (p + 1 + rng.below(8192)).min(it.size);
                                    check(&m[p as usize..e as usize], it.id, p, seed, "fresh map");
                                }
                            }
                            92..=98 => {
                                // A sequential scan of up to 1 MiB: readahead.
                                let e = (off + (1 << 20)).min(it.size) as usize;
                                for p in (o..e).step_by(page() as usize) {
                                    let pe = (p + page() as usize).min(e);
                                    check(&it.shared[p..pe], it.id, p as u64, seed, "scan");
                                }
                            }
                            _ => {
                                it.shadow
                                    .materialize()
                                    .unwrap_or_else(|e| panic!("seed {seed:#x}: materialize: {e}"));
                            }
                        }
                        ops += 1;
                    }
                    ops
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
    });
    eprintln!("stress: {ops} operations in {RUN_FOR:?}, seed {seed:#x}");
    assert!(ops > 100, "seed {seed:#x}: only {ops} operations ran");
    for it in items.iter() {
        let reread = it.src.reread_pages();
        assert!(
            reread.is_empty(),
            "seed {seed:#x}: shadow {:#x}: pages read from the source more than once: {:?}",
            it.id,
            &reread[..reread.len().min(10)]
        );
        let st = it.shadow.stats();
        assert_eq!(
            (st.errors, st.poisoned_pages),
            (0, 0),
            "seed {seed:#x}: {st:?}"
        );
        assert!(st.last_error.is_none(), "seed {seed:#x}: {st:?}");
        // Finally everything, through the long-lived mappings.
        it.shadow.materialize().unwrap();
        check(&it.shared, it.id, 0, seed, "final shared");
        check(&it.private, it.id, 0, seed, "final private");
        assert!(it.src.reread_pages().is_empty(), "seed {seed:#x}");
        assert_eq!(
            it.src.delivered().len() as u64,
            it.size.div_ceil(page()),
            "seed {seed:#x}"
        );
    }
    // Tear down within a bound too.
    with_timeout(60, "stress teardown", move || {
        drop(items);
        drop(engines);
    });
}
