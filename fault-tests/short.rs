//! Scenario 2: short reads, a source that ends early, a file truncated after
//! open.
//!
//! Promise: short reads are completed (they are legal), an early end of data
//! is never papered over with zeros: the missing pages are poisoned (SIGBUS
//! for mappings, an error from populate), the error is recorded in
//! `stats.errors` and `last_error`, and an eager open fails with it.

use crate::support::child::{self, param, param_u64};
use crate::support::*;
use crate::test_name;
use shadowfd::source::FileKind;
use shadowfd::{Engine, Error, Shadow, Share, Staleness, Stats};
use std::path::Path;

const ID: u64 = 0x5407;
const NPAGES: u64 = 64;

fn size() -> u64 {
    NPAGES * page()
}

/// Where the truncation tests cut the source: 10 bytes into page 20.
fn cut_at() -> u64 {
    20 * page() + 10
}

/// Truncates (or extends) the file at `path` to `len` bytes.
fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap()
}

/// After the source of `s` was cut at [`cut_at`]: populating the whole
/// file fails at page 20, exactly pages 20.. are poisoned, the pages
/// before read back intact (`what` names them) and the error is recorded.
/// Returns the stats for further checks.
fn assert_poisoned_from_the_cut(s: &Shadow, what: &str) -> Stats {
    let err = s.populate(0, size()).unwrap_err();
    assert!(
        matches!(err, Error::Unfillable { offset, .. } if offset == 20 * page()),
        "{err:?}"
    );
    let bad: Vec<u64> = s.poisoned_pages().iter().map(|(p, _)| p / page()).collect();
    assert_eq!(bad, (20..NPAGES).collect::<Vec<_>>());
    let mut head = vec![0u8; (20 * page()) as usize];
    assert_eq!(s.read_at(&mut head, 0).unwrap(), head.len());
    assert_bytes(&head, ID, 0, what);
    let st = s.stats();
    assert!(st.errors >= 1 && st.source_changed, "{st:?}");
    st
}

/// Runs `test` as a child in `role` on a fresh source that the child cuts
/// at [`cut_at`]: it reads pages 0 and 19 and dies of SIGBUS at page 20.
fn assert_child_sigbus_at_the_cut(test: &str, role: &str) {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let o = child::spawn(
        test,
        role,
        &[
            ("PATH", path.display().to_string()),
            ("CUT", cut_at().to_string()),
        ],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    assert_eq!(o.numbers("good"), vec![0, 19], "{}", o.describe());
    assert_eq!(
        o.numbers("sigbus")
            .iter()
            .map(|a| a / page())
            .collect::<Vec<_>>(),
        vec![20]
    );
}

#[test]
fn short_reads_are_completed_not_zero_filled() {
    bounded("short_reads_are_completed_not_zero_filled", || {
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size() - 77);
        let plan = Plan {
            max_read: Some(777), // never a page, never aligned
            ..Plan::default()
        };
        // Eager.
        let eager = Engine::new(eager_config()).unwrap();
        let s = eager.open(Injected::open(&path, plan.clone())).unwrap();
        assert_shadow_is(&s, ID, "eager shadow over short reads");
        // Lazy, through populate, read_at and a mapping.
        let Some(engine) = lazy_engine("short reads", lazy_config()) else {
            return;
        };
        let src = Injected::open(&path, plan.clone());
        let s = engine.open(src.clone()).unwrap();
        let map = s.map(Share::Private).unwrap();
        assert_bytes(&map, ID, 0, "lazy mapping over short reads");
        assert_shadow_is(&s, ID, "lazy shadow over short reads");
        let st = s.stats();
        assert_eq!((st.errors, st.poisoned_pages), (0, 0), "{st:?}");
        assert!(
            src.log()
                .iter()
                .all(|r| r.result.as_ref().is_ok_and(|&n| n <= r.len.min(777)))
        );
        assert!(src.calls() as u64 >= s.size() / 777);
    });
}

#[test]
fn interrupted_reads_are_retried() {
    bounded("interrupted_reads_are_retried", || {
        let Some(engine) = lazy_engine("EINTR", lazy_config()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let mut plan = Plan::default();
        plan.interrupt.insert(0, 3);
        plan.interrupt.insert(5 * page(), 2);
        let src = Injected::open(&path, plan);
        let s = engine.open(src.clone()).unwrap();
        s.populate(0, page()).unwrap();
        let map = s.map(Share::Shared).unwrap();
        assert_bytes(&map, ID, 0, "after EINTR");
        assert_eq!(s.stats().errors, 0);
        let eintr = src
            .log()
            .iter()
            .filter(|r| r.result.as_ref().is_err_and(|e| e.contains("Interrupted")))
            .count();
        assert_eq!(eintr, 3, "EINTR at offset 0 injected 3 times");
    });
}

/// The source claims more bytes than it has: reads end at `eof`.
fn eof_at() -> u64 {
    40 * page() + 100
}

fn early_eof_plan() -> Plan {
    Plan {
        eof_at: Some(eof_at()),
        ..Plan::default()
    }
}

#[test]
fn early_end_of_data_is_poisoned_and_recorded() {
    bounded("early_end_of_data_is_poisoned_and_recorded", || {
        let Some(engine) = lazy_engine("early EOF", lazy_config()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let s = engine
            .open(Injected::open(&path, early_eof_plan()))
            .unwrap();
        let err = s.populate(0, size()).unwrap_err();
        assert!(
            matches!(err, Error::Unfillable { offset, .. } if offset == 40 * page()),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("ended before offset"), "{msg}");
        assert!(msg.contains(&eof_at().to_string()), "{msg}"); // where the data ended
        // Exactly the pages from the one holding the end of data onwards; the
        // partial page 40 is refused too (its tail would have been zeros).
        let bad: Vec<u64> = s.poisoned_pages().iter().map(|(p, _)| p / page()).collect();
        assert_eq!(bad, (40..NPAGES).collect::<Vec<_>>());
        let mut head = vec![0u8; (40 * page()) as usize];
        assert_eq!(s.read_at(&mut head, 0).unwrap(), head.len());
        assert_bytes(&head, ID, 0, "pages before the end of data");
        let st = s.stats();
        assert!(st.errors >= 1, "{st:?}");
        assert_eq!(st.poisoned_pages, NPAGES - 40, "{st:?}");
        assert!(st.last_error.unwrap().contains("ended before offset"));
    });
}

#[test]
fn eager_open_fails_on_early_end_of_data() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let engine = Engine::new(eager_config()).unwrap();
    let err = engine
        .open(Injected::open(&path, early_eof_plan()))
        .unwrap_err();
    assert!(
        matches!(err, Error::SourceShort { at, size: sz, .. } if at == eof_at() && sz == size()),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("no zeros are served"), "{msg}");
    // A source whose metadata claims more than the file holds: the same.
    let lying = Injected::open(
        &path,
        Plan {
            report_size: Some(size() + 5000),
            ..Plan::default()
        },
    );
    let err = engine.open(lying).unwrap_err();
    assert!(
        matches!(err, Error::SourceShort { at, .. } if at == size()),
        "{err:?}"
    );
}

#[test]
fn eager_open_fails_when_truncated_during_the_copy() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 3 << 20);
    let p2 = path.clone();
    let cut = (1 << 20) + 12345;
    let plan = Plan {
        // Before the second 1 MiB copy read, the file is cut.
        hook: Some((1 << 20, std::sync::Arc::new(move || set_len(&p2, cut)))),
        ..Plan::default()
    };
    let engine = Engine::new(eager_config()).unwrap();
    let err = engine.open(Injected::open(&path, plan)).unwrap_err();
    assert!(
        matches!(err, Error::SourceShort { at, .. } if at == cut),
        "{err:?}"
    );
}

#[test]
fn lazy_file_truncated_after_open() {
    bounded("lazy_file_truncated_after_open", || {
        let Some(engine) = lazy_engine("truncated", lazy_config()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let src = Injected::clean(&path);
        let s = engine.open(src).unwrap();
        s.populate(0, 4 * page()).unwrap(); // chunk 0 is in before the cut
        set_len(&path, cut_at());
        match s.staleness().unwrap() {
            Staleness::Changed(f) => assert!(f.contains(&shadowfd::shadow::Field::Size), "{f:?}"),
            other => panic!("staleness after truncation: {other:?}"),
        }
        assert_poisoned_from_the_cut(&s, "pages before the cut");
        assert_eq!(s.meta().kind, FileKind::Regular);
    });
}

fn truncated_child() {
    child::begin();
    let engine = Engine::new(lazy_config()).unwrap();
    let path = param("PATH");
    let s = engine.open(Injected::clean(path.as_ref())).unwrap();
    let map = s.map(Share::Shared).unwrap();
    child::watch_sigbus(&map);
    set_len(Path::new(&path), param_u64("CUT"));
    for p in [0, 19, 20] {
        child::touch_page(&map, ID, p);
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn truncated_source_raises_sigbus_not_zeros() {
    if child::role().is_some() {
        return truncated_child();
    }
    if !lazy_available("truncated sigbus") {
        return;
    }
    assert_child_sigbus_at_the_cut(
        &test_name!(truncated_source_raises_sigbus_not_zeros),
        "truncated",
    );
}

/// A host file opened by path is offered to fills as a read-only mapping
/// (`Source::mapped`), which `UFFDIO_COPY` reads in the kernel. Truncated
/// under that mapping, the copy fails (`EFAULT`) where the engine itself
/// would take a `SIGBUS`: the fill falls back to `read_at`, and exactly the
/// pages past the cut are poisoned, the partial page at the cut included.
#[test]
fn mapped_source_truncated_mid_run_poisons_from_the_cut() {
    bounded(
        "mapped_source_truncated_mid_run_poisons_from_the_cut",
        || {
            let Some(engine) = lazy_engine("mapped truncated", lazy_config()) else {
                return;
            };
            let dir = tempdir();
            let path = write_file(dir.path(), "src", ID, size());
            let src = shadowfd::FileSource::open(&path).unwrap();
            assert!(
                shadowfd::Source::mapped(&src).is_some_and(|m| m.len() == size()),
                "a host file is offered mapped"
            );
            let s = engine.open(src).unwrap();
            s.populate(0, 4 * page()).unwrap();
            set_len(&path, cut_at());
            // One run over the whole file, copied from the mapping until the cut.
            let st =
                assert_poisoned_from_the_cut(&s, "pages before the cut, copied from the mapping");
            assert_eq!(st.bytes_filled, 20 * page(), "{st:?}");
        },
    );
}

fn mapped_truncated_child() {
    child::begin();
    let mut cfg = lazy_config();
    cfg.chunk_size = 16 * page();
    cfg.readahead = 0;
    let engine = Engine::new(cfg).unwrap();
    let path = param("PATH");
    let s = engine.open(&path).unwrap();
    // Private: faults are filled through the alias, from the file's mapping.
    let map = s.map(Share::Private).unwrap();
    child::watch_sigbus(&map);
    child::touch_page(&map, ID, 0); // chunk 0, before the cut
    set_len(Path::new(&path), param_u64("CUT"));
    // Chunk 1 (pages 16..32) is cut at page 20: 16..20 are good.
    for p in [19, 20] {
        child::touch_page(&map, ID, p);
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn mapped_source_truncated_mid_chunk_raises_sigbus_at_the_cut() {
    if child::role().is_some() {
        return mapped_truncated_child();
    }
    if !lazy_available("mapped truncated sigbus") {
        return;
    }
    assert_child_sigbus_at_the_cut(
        &test_name!(mapped_source_truncated_mid_chunk_raises_sigbus_at_the_cut),
        "mapped-truncated",
    );
}
