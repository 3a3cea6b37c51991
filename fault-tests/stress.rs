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
use shadowfd::{Mapping, Shadow, Share};
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
        let cfg = {
            let mut c = lazy_config();
            c.chunk_size = chunk;
            c.readahead = readahead;
            c.workers = 3;
            c
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
        let shadow = engines[(i % 3) as usize].open(src.clone()).unwrap();
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

/// Bad pages of the faulty stress shadow, from the seed.
fn bad_pages(seed: u64, npages: u64) -> std::collections::BTreeSet<u64> {
    let mut rng = Rng::new(seed ^ 0xBAD);
    (0..12).map(|_| rng.below(npages)).collect()
}

#[test]
fn random_work_with_bad_pages_errors_exactly_there() {
    let seed = content::seed_for("stress bad pages");
    bounded(
        "random_work_with_bad_pages_errors_exactly_there",
        move || {
            let cfg = {
                let mut c = lazy_config();
                c.chunk_size = 16 << 10;
                c.workers = 3;
                c
            };
            let Some(engine) = lazy_engine("stress bad pages", cfg) else {
                return;
            };
            let dir = tempdir();
            let id = 0xBAD5;
            let size: u64 = (6 << 20) + 1234;
            let npages = size.div_ceil(page());
            let bad = Arc::new(bad_pages(seed, npages));
            let path = write_file(dir.path(), "src", id, size);
            let plan = Plan {
                eio: bad
                    .iter()
                    .map(|p| p * page() + 17..p * page() + 18)
                    .collect(),
                eio_partial: true,
                max_read: Some(20_000),
                ..Plan::default()
            };
            let src = Injected::open(&path, plan);
            let shadow = Arc::new(engine.open(src.clone()).unwrap());
            let maps = Arc::new([
                shadow.map(Share::Shared).unwrap(),
                shadow.map(Share::Private).unwrap(),
            ]);
            let deadline = Instant::now() + Duration::from_millis(1500);
            let hs: Vec<_> = (0..6u64)
                .map(|t| {
                    let (shadow, maps, bad) = (shadow.clone(), maps.clone(), bad.clone());
                    std::thread::spawn(move || {
                        let seed = seed ^ ((t + 1) << 40);
                        let mut rng = Rng::new(seed);
                        let mut buf = vec![0u8; 96 << 10];
                        while Instant::now() < deadline {
                            let off = rng.below(size);
                            let len = (1 + rng.below(96 << 10)).min(size - off);
                            let (fp, lp) = (off / page(), (off + len - 1) / page());
                            let first_bad = bad.range(fp..=lp).next().copied();
                            match rng.below(3) {
                                0 => {
                                    // Mappings: only ranges without a bad page
                                    // (this process must not take the SIGBUS).
                                    if first_bad.is_none() {
                                        let m = &maps[rng.below(2) as usize];
                                        let got = &m[off as usize..(off + len) as usize];
                                        check(got, id, off, seed, "mapping near bad pages");
                                    }
                                }
                                1 => match (shadow.populate(off, len), first_bad) {
                                    (Ok(()), None) => {}
                                    (Err(shadowfd::Error::Unfillable { offset, .. }), Some(b))
                                        if offset == b * page() => {}
                                    (r, b) => panic!(
                                        "seed {seed:#x}: populate({off}, {len}) = {r:?}, \
                                     first bad page {b:?}"
                                    ),
                                },
                                _ => {
                                    let r = shadow.read_at(&mut buf[..len as usize], off);
                                    match (r, first_bad) {
                                        (Ok(n), None) => {
                                            assert_eq!(n as u64, len, "seed {seed:#x}");
                                            check(
                                                &buf[..n],
                                                id,
                                                off,
                                                seed,
                                                "read_at near bad pages",
                                            );
                                        }
                                        (Err(_), Some(_)) => {}
                                        (r, b) => panic!(
                                            "seed {seed:#x}: read_at({off}, {len}) = {r:?}, \
                                         first bad page {b:?}"
                                        ),
                                    }
                                }
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            // Settle everything, then the poisoned set is exactly the bad pages.
            assert!(shadow.materialize().is_err(), "seed {seed:#x}");
            let got: Vec<u64> = shadow
                .poisoned_pages()
                .iter()
                .map(|(p, _)| p / page())
                .collect();
            let want: Vec<u64> = bad.iter().copied().collect();
            assert_eq!(got, want, "seed {seed:#x}: poisoned pages");
            let st = shadow.stats();
            assert_eq!(
                st.poisoned_pages,
                want.len() as u64,
                "seed {seed:#x}: {st:?}"
            );
            assert!(!shadow.is_materialized() && shadow.fd().is_err());
        },
    );
}

fn sigbus_child() {
    use crate::support::child::{self, param, param_u64};
    child::begin();
    let seed = param_u64("SEED");
    let size = param_u64("SIZE");
    let id = param_u64("ID");
    let npages = size.div_ceil(page());
    let bad = bad_pages(seed, npages);
    let engine = shadowfd::Engine::new({
        let mut c = lazy_config();
        c.chunk_size = 16 << 10;
        c.workers = 3;
        c
    })
    .unwrap();
    let plan = Plan {
        eio: bad
            .iter()
            .map(|p| p * page() + 17..p * page() + 18)
            .collect(),
        ..Plan::default()
    };
    let shadow = engine
        .open(Injected::open(param("PATH").as_ref(), plan))
        .unwrap();
    let share = if seed % 2 == 0 {
        Share::Shared
    } else {
        Share::Private
    };
    let map = Arc::new(shadow.map(share).unwrap());
    child::watch_sigbus(&map);
    let hs: Vec<_> = (0..8u64)
        .map(|t| {
            let map = map.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ ((t + 1) << 40));
                for _ in 0..2000 {
                    let p = rng.below(npages);
                    let off = p * page();
                    let end = (off + page()).min(size);
                    let got = &map[off as usize..end as usize];
                    if let Some(at) = first_mismatch(id, off, got) {
                        child::report("bad", format!("{p} {at}"));
                        std::process::abort();
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn concurrent_consumers_get_sigbus_only_on_bad_pages() {
    use crate::support::child;
    use crate::test_name;
    if child::role().is_some() {
        return sigbus_child();
    }
    if !lazy_available("stress sigbus") {
        return;
    }
    let base = content::seed_for("stress sigbus");
    let dir = tempdir();
    let id = 0x5B05;
    let size: u64 = (2 << 20) + 99;
    let path = write_file(dir.path(), "src", id, size);
    for k in 0..4 {
        let seed = base.wrapping_add(k);
        let o = child::spawn(
            &test_name!(concurrent_consumers_get_sigbus_only_on_bad_pages),
            "sigbus",
            &[
                ("PATH", path.display().to_string()),
                ("SEED", seed.to_string()),
                ("SIZE", size.to_string()),
                ("ID", id.to_string()),
            ],
        );
        let bad = bad_pages(seed, size.div_ceil(page()));
        assert!(
            o.values("bad").is_empty(),
            "seed {seed:#x}: wrong bytes\n{}",
            o.describe()
        );
        assert_eq!(
            o.signal(),
            Some(libc::SIGBUS),
            "seed {seed:#x}\n{}",
            o.describe()
        );
        let at = o.numbers("sigbus");
        assert!(!at.is_empty(), "seed {seed:#x}\n{}", o.describe());
        for a in at {
            assert!(
                bad.contains(&(a / page())),
                "seed {seed:#x}: SIGBUS at offset {a}, page {} is not bad ({bad:?})",
                a / page()
            );
        }
    }
}
