//! A working-set replay on its own, with nobody touching the pages while it
//! runs: every recorded page is filled and mapped ahead (no fault on the
//! touch after), byte for byte the source's, whether the consumer range
//! was made before the replay (the fills go straight into it) or after it
//! (they go through the engine's alias, and the range is mapped when it is
//! made). Prints the replay's time per chunk (`--nocapture`);
//! `SHADOWFD_TEST_REPLAY_SIZE` sets the file's size in MiB (default 64M).

mod common;

use shadowfd::{Engine, Mode, Share, WorksetMode};
use std::time::{Duration, Instant};

fn settle(s: &shadowfd::Shadow) {
    let t0 = Instant::now();
    while s.stats().workset_pending > 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", s.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_replay_alone_fills_and_maps_every_recorded_page() {
    if !common::lazy_available() {
        return;
    }
    let size: usize = std::env::var("SHADOWFD_TEST_REPLAY_SIZE")
        .ok()
        .map(|v| {
            v.trim_end_matches('M')
                .parse::<usize>()
                .expect("a size in MiB, e.g. 64M")
                << 20
        })
        .unwrap_or(64 << 20);
    let t = tempfile::tempdir().unwrap();
    let data = common::pattern(size, 5);
    let file = common::file_with(t.path(), "src", &data);
    let page = 4096u64;
    let offs = common::pages(size as u64 / page, size / 4096 / 100, 9);
    let engine = |m| {
        let mut c = common::config(Mode::Lazy);
        c.workset = m;
        c.workset_dir = Some(t.path().join("ws"));
        c.readahead = 0;
        Engine::new(c).expect("engine")
    };
    {
        let e = engine(WorksetMode::Record);
        let s = e.open(&file).unwrap();
        let m = s.map(Share::Shared).unwrap();
        for &p in &offs {
            std::hint::black_box(m[(p * page) as usize]);
        }
    }
    let e = engine(WorksetMode::Replay);
    for mapped_first in [true, false] {
        let t0 = Instant::now();
        let s = e.open(&file).unwrap();
        let early = mapped_first.then(|| s.map(Share::Shared).unwrap());
        settle(&s);
        let took = t0.elapsed();
        let m = match early {
            Some(m) => m,
            None => s.map(Share::Shared).unwrap(),
        };
        for &p in &offs {
            let a = (p * page) as usize;
            assert!(
                m[a..a + page as usize] == data[a..a + page as usize],
                "page {p}"
            );
        }
        let st = s.stats();
        assert_eq!(st.faults, 0, "a replayed page faulted: {st:?}");
        assert_eq!(st.workset_replayed, offs.len() as u64, "{st:?}");
        println!(
            "replay of {} chunks, range made {}: {:.1} ms, {:.2} us per chunk",
            offs.len(),
            if mapped_first { "first" } else { "after" },
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / offs.len() as f64
        );
    }
}
