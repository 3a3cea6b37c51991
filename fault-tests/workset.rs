//! Scenario: working sets (docs/worksets.md).
//!
//! Promise: a run's first needs are recorded, keyed by the source's
//! identity, and the next run of the same source fills them in recorded
//! order and maps them into its consumer ranges ahead of the touch, so a
//! replayed page costs no fault; a changed source's record is discarded; a
//! replay never takes more than the speculative half of the budget; and a
//! run that goes elsewhere stops the replay. Every byte read is the
//! source's.

use crate::support::*;
use shadowfd::workset::{Record, list};
use shadowfd::{Config, Engine, Shadow, Share, WorksetMode};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const ID: u64 = 0x3E75;

fn cfg(dir: &Path, mode: WorksetMode) -> Config {
    let mut c = lazy_config();
    c.workset = mode;
    c.workset_dir = Some(dir.to_path_buf());
    // Random touches only: no sequential run may add chunks to a record.
    c.readahead = 0;
    c
}

/// `n` distinct page offsets of a file of `size` bytes, in a seeded random
/// order (within `from..to` bytes).
fn pages(seed: u64, n: usize, from: u64, to: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let np = (to - from) / page();
    while out.len() < n {
        let p = from + rng.below(np) * page();
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// Touches one byte at each of `offs` of a fresh shared mapping of
/// `shadow` and checks each page's bytes.
fn touch(shadow: &Shadow, offs: &[u64]) {
    let map = shadow.map(Share::Shared).expect("map");
    for &o in offs {
        let p = page() as usize;
        assert_bytes(&map[o as usize..o as usize + p], ID, o, "a touched page");
    }
}

/// Waits until the shadow's replay has looked at every recorded chunk (or
/// stopped).
fn replay_settles(shadow: &Arc<Shadow>) {
    let t0 = std::time::Instant::now();
    while shadow.stats().workset_pending > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the replay did not settle within 60 s: {:?}",
            shadow.stats()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The one record in `dir`. Waits for it (at most 10 s): a shadow is
/// stored when it drops, and a test of this binary that spawns a process
/// forks the ranges mapped at that moment into the child, which hold the
/// shadow (and defer its drop) until the child's exec lets them go.
fn record_of(dir: &Path) -> Record {
    let t0 = std::time::Instant::now();
    while list(dir).expect("list records").is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut all = list(dir).expect("list records");
    assert_eq!(all.len(), 1, "one record: {all:?}");
    all.pop().unwrap().1.expect("a readable record")
}

/// Records a random 1% of a 64 MiB file's pages, then replays it: the
/// record holds exactly the touched pages in touch order, and the second
/// run takes no fault on them, whether its mapping was made before the
/// replay filled them or after.
#[test]
fn a_record_is_replayed_with_no_fault_on_replayed_pages() {
    let dir = tempdir();
    let state = tempdir();
    let size = 64 << 20;
    let path = write_file(dir.path(), "src", ID, size);
    let offs = pages(7, (size / page() / 100) as usize, 0, size);
    let Some(engine) = lazy_engine("workset replay", cfg(state.path(), WorksetMode::Auto)) else {
        return;
    };
    {
        let shadow = engine.open(&path).unwrap();
        touch(&shadow, &offs);
        let st = shadow.stats();
        assert_eq!(st.workset_recorded, offs.len() as u64, "{st:?}");
        assert_eq!(st.workset_replayed, 0, "{st:?}");
    }
    let r = record_of(state.path());
    let want: Vec<u64> = offs.iter().map(|o| o / page()).collect();
    assert_eq!(r.chunks, want, "the record is the first needs in order");
    assert_eq!((r.chunk, r.size), (page(), size));

    // Mapping made after the replay filled the pages.
    let shadow = Arc::new(engine.open(&path).unwrap());
    replay_settles(&shadow);
    touch(&shadow, &offs);
    let st = shadow.stats();
    assert_eq!(st.workset_replayed, offs.len() as u64, "{st:?}");
    assert_eq!(st.faults, 0, "a replayed page faulted: {st:?}");
    assert_eq!(st.workset_mapped_ahead, offs.len() as u64, "{st:?}");
    assert_eq!((st.workset_wasted, st.workset_diverged), (0, 0), "{st:?}");
    drop(shadow);

    // Mapping made before: the replay's fills map into it.
    let shadow = Arc::new(engine.open(&path).unwrap());
    let map = shadow.map(Share::Shared).expect("map");
    replay_settles(&shadow);
    for &o in &offs {
        let p = page() as usize;
        assert_bytes(&map[o as usize..o as usize + p], ID, o, "a replayed page");
    }
    let st = shadow.stats();
    assert_eq!(st.faults, 0, "a replayed page faulted: {st:?}");
    assert_eq!(st.workset_replayed, offs.len() as u64, "{st:?}");
    drop(map);
    drop(shadow);
    // Nothing new was needed: the record is as it was.
    assert_eq!(record_of(state.path()).chunks, want);
}

/// Merging with ageing: a first run touches pages A in the first half of
/// the file and B in the second; the next runs map and touch only the
/// first half. B's chunks, replayed but handed to no consumer, grow one run
/// older with each run and leave the record after [`KEEP_RUNS`] runs; A's
/// stay, in their order. Every byte read is the source's.
#[test]
fn chunks_no_run_touches_age_out_of_the_record() {
    use shadowfd::workset::KEEP_RUNS;
    let dir = tempdir();
    let state = tempdir();
    let size = 16 << 20;
    let half = size / 2;
    let path = write_file(dir.path(), "src", ID, size);
    let a = pages(11, 40, 0, half);
    let b = pages(12, 40, half, size);
    let Some(engine) = lazy_engine("workset ageing", cfg(state.path(), WorksetMode::Auto)) else {
        return;
    };
    {
        let shadow = engine.open(&path).unwrap();
        touch(&shadow, &[a.clone(), b.clone()].concat());
    }
    let want_a: Vec<u64> = a.iter().map(|o| o / page()).collect();
    let want_b: Vec<u64> = b.iter().map(|o| o / page()).collect();
    let r = record_of(state.path());
    assert_eq!(r.chunks, [want_a.clone(), want_b.clone()].concat());
    assert!(r.ages.iter().all(|&x| x == 0), "{:?}", r.ages);
    for run in 1..=KEEP_RUNS {
        let shadow = Arc::new(engine.open(&path).unwrap());
        replay_settles(&shadow);
        {
            let map = shadow
                .map_options()
                .len(half)
                .map()
                .expect("map the first half");
            for &o in &a {
                let p = page() as usize;
                assert_bytes(&map[o as usize..o as usize + p], ID, o, "a page of A");
            }
        }
        let st = shadow.stats();
        assert_eq!(st.workset_diverged, 0, "run {run}: {st:?}");
        drop(shadow);
        let r = record_of(state.path());
        if run < KEEP_RUNS {
            assert_eq!(
                r.chunks,
                [want_a.clone(), want_b.clone()].concat(),
                "run {run}"
            );
            let (aa, ab) = r.ages.split_at(want_a.len());
            assert!(aa.iter().all(|&x| x == 0), "run {run}: A aged: {aa:?}");
            assert!(ab.iter().all(|&x| x == run), "run {run}: B's ages {ab:?}");
        } else {
            assert_eq!(
                r.chunks, want_a,
                "run {run}: B has aged out, A stays in order"
            );
        }
    }
}

/// A touch (mtime) or a rewrite of the source discards its record: it is
/// removed, counted, and nothing is replayed.
#[test]
fn a_changed_source_discards_the_record() {
    let dir = tempdir();
    let state = tempdir();
    let size = 4 << 20;
    let path = write_file(dir.path(), "src", ID, size);
    let offs = pages(3, 100, 0, size);
    let Some(engine) = lazy_engine("workset stale", cfg(state.path(), WorksetMode::Record)) else {
        return;
    };
    let replay = Engine::new(cfg(state.path(), WorksetMode::Replay)).unwrap();
    for change in ["touch", "rewrite"] {
        touch(&engine.open(&path).unwrap(), &offs);
        assert_eq!(record_of(state.path()).chunks.len(), offs.len());
        match change {
            "touch" => {
                let f = std::fs::File::options().write(true).open(&path).unwrap();
                f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                    .unwrap();
            }
            _ => content::rewrite(&path, ID, 0, size as usize),
        }
        let shadow = Arc::new(replay.open(&path).unwrap());
        replay_settles(&shadow);
        touch(&shadow, &offs);
        let st = shadow.stats();
        assert_eq!(st.workset_discarded, 1, "{change}: {st:?}");
        assert_eq!(st.workset_replayed, 0, "{change}: {st:?}");
        assert!(st.faults >= offs.len() as u64, "{change}: {st:?}");
        assert!(list(state.path()).unwrap().is_empty(), "{change}: kept");
    }
}

/// A record of 8 MiB replayed under a 4 MiB budget fills no more than the
/// speculative half (2 MiB), and every recorded page still reads right.
#[test]
fn replay_stays_within_the_budget() {
    let dir = tempdir();
    let state = tempdir();
    let size = 32 << 20;
    let path = write_file(dir.path(), "src", ID, size);
    let offs = pages(11, 2048, 0, size);
    let Some(recorder) = lazy_engine("workset budget", cfg(state.path(), WorksetMode::Record))
    else {
        return;
    };
    touch(&recorder.open(&path).unwrap(), &offs);
    drop(recorder);
    assert_eq!(record_of(state.path()).chunks.len(), offs.len());
    let budget = 4 << 20;
    let mut c = cfg(state.path(), WorksetMode::Replay);
    c.memory_budget = budget;
    c.max_size = budget;
    let engine = Engine::new(c).unwrap();
    let shadow = Arc::new(engine.open(&path).unwrap());
    replay_settles(&shadow);
    let st = shadow.stats();
    assert!(st.workset_replayed > 0, "{st:?}");
    assert!(st.workset_replayed * page() <= budget / 2, "{st:?}");
    assert!(engine.resident_bytes() <= budget / 2, "{st:?}");
    assert_eq!(st.workset_pending, 0, "{st:?}");
    // The pages the replay filled, then as many more as the budget holds.
    let fits = (budget / page()) as usize - 64;
    touch(&shadow, &offs[..fits]);
    assert!(engine.resident_bytes() <= budget);
}

/// A run that needs other pages than its record stops the replay: the
/// replay's first fill is held at a gate while the consumer touches 100
/// pages outside the record; the replay then stops, counted, having filled
/// no more than that one chunk.
#[test]
fn a_divergent_run_stops_the_replay() {
    let dir = tempdir();
    let state = tempdir();
    let size = 32 << 20;
    let half = size / 2;
    let path = write_file(dir.path(), "src", ID, size);
    let recorded = pages(5, 1000, 0, half);
    let Some(engine) = lazy_engine("workset diverge", cfg(state.path(), WorksetMode::Replay))
    else {
        return;
    };
    {
        let rec = Engine::new(cfg(state.path(), WorksetMode::Record)).unwrap();
        touch(&rec.open(Injected::clean(&path)).unwrap(), &recorded);
    }
    assert_eq!(record_of(state.path()).chunks.len(), recorded.len());
    let gate = Gate::new();
    let src = Injected::open(
        &path,
        Plan {
            gate: Some((0..half, gate.clone())),
            ..Plan::default()
        },
    );
    let shadow = Arc::new(engine.open(src).unwrap());
    assert!(
        gate.wait_arrivals(1, Duration::from_secs(20)),
        "the replay's first read never came"
    );
    let elsewhere = pages(6, 100, half, size);
    let s = shadow.clone();
    with_timeout(60, "faults outside the record", move || {
        touch(&s, &elsewhere)
    });
    gate.open();
    replay_settles(&shadow);
    let st = shadow.stats();
    assert_eq!(st.workset_diverged, 1, "{st:?}");
    assert!(st.workset_replayed < 16, "{st:?}");
    assert_eq!(st.faults, 100, "{st:?}");
    touch(&shadow, &recorded);
}

/// A consumer in another process (served over a socket, its own
/// userfaultfd): its faults are recorded in order, and on the next open
/// the replayed chunks are mapped into its range ahead of the touch, with
/// `UFFDIO_CONTINUE` on its userfaultfd: it takes no fault on them.
#[test]
fn a_remote_consumers_faults_are_recorded_and_replayed() {
    let dir = tempdir();
    let state = tempdir();
    // The consumer child checks the remote test's content.
    let id = 0x6e;
    let path = write_file(dir.path(), "src", id, 4 << 20);
    let Some(engine) = lazy_engine("workset remote", cfg(state.path(), WorksetMode::Auto)) else {
        return;
    };
    let pages = [5u64, 700, 37, 900, 6];
    let list = pages.map(|p| p.to_string()).join(",");
    let serve = |shadow: &Shadow| {
        let (child, sock) = crate::remote::spawn_consumer(Some(&list));
        let served = shadowfd::remote::serve(shadow, sock).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("consumer ok") && text.contains("lazy=true"),
            "consumer failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        served.wait();
    };
    {
        let shadow = engine.open(&path).unwrap();
        serve(&shadow);
        assert_eq!(shadow.stats().workset_recorded, pages.len() as u64);
    }
    assert_eq!(record_of(state.path()).chunks, pages.to_vec());
    let shadow = Arc::new(engine.open(&path).unwrap());
    replay_settles(&shadow);
    serve(&shadow);
    let st = shadow.stats();
    assert_eq!(st.workset_replayed, pages.len() as u64, "{st:?}");
    assert_eq!(st.workset_mapped_ahead, pages.len() as u64, "{st:?}");
    assert_eq!(st.faults, 0, "a replayed page faulted: {st:?}");
    assert_eq!(st.workset_wasted, 0, "{st:?}");
    assert_eq!(
        st.chunks_filled,
        pages.len() as u64,
        "only the replay filled: {st:?}"
    );
}
