//! The working-set prefetch before the first access (`workset_prefetch`,
//! docs/worksets.md): the first mapping (or `read_at`) of a replayed shadow
//! returns only once the first recorded chunks, up to the bound, are filled;
//! the touches after it take no fault on them, byte for byte the source's.
//! With no bound (the default) the first access does not wait.

mod common;

use shadowfd::{Engine, Mode, Share, WorksetMode};
use std::path::Path;

const PAGE: u64 = 4096;

fn engine(dir: &Path, mode: WorksetMode, prefetch: u64) -> Engine {
    let mut c = common::config(Mode::Lazy);
    c.workset = mode;
    c.workset_dir = Some(dir.join("ws"));
    c.workset_prefetch = prefetch;
    c.readahead = 0;
    Engine::new(c).expect("engine")
}

/// A 16 MiB file and a record of 1% of its pages, touched in a random
/// order: the file's bytes, its path and the recorded pages in order.
fn recorded(dir: &Path) -> (Vec<u8>, std::path::PathBuf, Vec<u64>) {
    let size = 16usize << 20;
    let data = common::pattern(size, 21);
    let file = common::file_with(dir, "src", &data);
    let offs = common::pages(size as u64 / PAGE, size / 4096 / 100, 4);
    let e = engine(dir, WorksetMode::Record, 0);
    let s = e.open(&file).unwrap();
    let m = s.map(Share::Shared).unwrap();
    for &p in &offs {
        std::hint::black_box(m[(p * PAGE) as usize]);
    }
    drop(m);
    drop(s);
    (data, file, offs)
}

#[test]
fn the_first_mapping_returns_with_the_whole_record_filled_and_no_fault_after() {
    if !common::lazy_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (data, file, offs) = recorded(t.path());
    let e = engine(t.path(), WorksetMode::Replay, u64::MAX);
    let s = e.open(&file).unwrap();
    let m = s.map(Share::Shared).unwrap();
    // Nothing touched yet: the mapping waited for the replay.
    let st = s.stats();
    assert_eq!(st.workset_replayed, offs.len() as u64, "{st:?}");
    assert_eq!(st.workset_pending, 0, "{st:?}");
    for &p in &offs {
        let a = (p * PAGE) as usize;
        assert!(
            m[a..a + PAGE as usize] == data[a..a + PAGE as usize],
            "page {p}"
        );
    }
    let st = s.stats();
    assert_eq!(st.faults, 0, "a prefetched page faulted: {st:?}");
    assert_eq!(
        st.workset_mapped_ahead,
        offs.len() as u64,
        "every prefetched chunk mapped before its touch: {st:?}"
    );
}

#[test]
fn a_bounded_prefetch_fills_at_least_the_first_recorded_chunks() {
    if !common::lazy_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (data, file, offs) = recorded(t.path());
    let bound = 8;
    let e = engine(t.path(), WorksetMode::Replay, bound * PAGE);
    let s = e.open(&file).unwrap();
    let m = s.map(Share::Shared).unwrap();
    let before = s.stats();
    assert!(
        before.workset_replayed >= bound,
        "the first {bound} recorded chunks are in when the mapping returns: {before:?}"
    );
    // The first recorded pages take no fault: they are mapped already.
    for &p in &offs[..bound as usize] {
        let a = (p * PAGE) as usize;
        assert!(
            m[a..a + PAGE as usize] == data[a..a + PAGE as usize],
            "page {p}"
        );
    }
    assert_eq!(
        s.stats().faults,
        0,
        "a page of the prefetched prefix faulted"
    );
    for &p in &offs {
        let a = (p * PAGE) as usize;
        assert!(
            m[a..a + PAGE as usize] == data[a..a + PAGE as usize],
            "page {p}"
        );
    }
}

#[test]
fn a_first_read_waits_for_the_prefetch_too() {
    if !common::lazy_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (data, file, offs) = recorded(t.path());
    let e = engine(t.path(), WorksetMode::Replay, u64::MAX);
    let s = e.open(&file).unwrap();
    let p = offs[offs.len() / 2];
    let mut buf = vec![0u8; PAGE as usize];
    assert_eq!(s.read_at(&mut buf, p * PAGE).unwrap(), PAGE as usize);
    assert!(buf[..] == data[(p * PAGE) as usize..((p + 1) * PAGE) as usize]);
    let st = s.stats();
    assert_eq!(st.workset_replayed, offs.len() as u64, "{st:?}");
    assert_eq!(st.workset_pending, 0, "{st:?}");
}

#[test]
fn the_prefetch_bound_is_a_size_or_all_and_anything_else_is_refused() {
    let mut c = common::config(Mode::Lazy);
    assert_eq!(c.workset_prefetch, 0, "off by default");
    c.set("workset-prefetch", "all").unwrap();
    assert_eq!(c.workset_prefetch, u64::MAX);
    c.set("--workset-prefetch", "64M").unwrap();
    assert_eq!(c.workset_prefetch, 64 << 20);
    let e = c.set("workset-prefetch", "banana").unwrap_err().to_string();
    assert!(e.contains("banana") && e.contains("all"), "{e}");
}
