//! Scenario 3: the source's contents change after open.
//!
//! Promise: `StalePolicy::Detect` keeps filling from the source and reports
//! the change (`staleness()`, `stats.source_changed`); `Strict` refuses every
//! fill once the change is seen, including a fill the change tore mid-read
//! (those pages are poisoned: populate errors, SIGBUS for mappings), while
//! pages filled before the change keep their old bytes; an eager snapshot
//! keeps the old bytes and reports itself stale; an eager copy torn by a
//! change is retried, so it is never a mix.

use crate::support::child::{self, param};
use crate::support::content::rewrite;
use crate::support::*;
use crate::test_name;
use shadowfd::shadow::Field;
use shadowfd::{Config, Engine, Error, Share, StalePolicy, Staleness};
use std::sync::Arc;

const OLD: u64 = 0x01D;
const NEW: u64 = 0x2E3;
const NPAGES: u64 = 64;
const CHUNK: u64 = 32 << 10;

fn size() -> u64 {
    NPAGES * page()
}

fn cfg(stale: StalePolicy) -> Config {
    {
        let mut c = lazy_config();
        c.stale = stale;
        c.chunk_size = CHUNK;
        c.readahead = 0;
        c
    }
}

fn assert_changed(s: &shadowfd::Shadow) {
    match s.staleness().unwrap() {
        Staleness::Changed(f) => assert!(f.contains(&Field::Mtime), "{f:?}"),
        other => panic!("staleness after a rewrite: {other:?}"),
    }
}

#[test]
fn detect_reports_the_change_and_keeps_filling() {
    bounded("detect_reports_the_change_and_keeps_filling", || {
        let Some(engine) = lazy_engine("stale detect", cfg(StalePolicy::Detect)) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", OLD, size());
        let s = engine.open(&path).unwrap();
        s.populate(0, CHUNK).unwrap();
        assert_eq!(s.staleness().unwrap(), Staleness::Unchanged);
        assert!(!s.stats().source_changed);
        rewrite(&path, NEW, 0, size() as usize);
        assert_changed(&s);
        // Chunk 3 is filled from the source as it is now, and the change is seen.
        s.populate(3 * CHUNK, CHUNK).unwrap();
        let st = s.stats();
        assert!(st.source_changed, "{st:?}");
        assert_eq!((st.errors, st.poisoned_pages), (0, 0), "{st:?}");
        let map = s.map(Share::Shared).unwrap();
        assert_bytes(&map[..CHUNK as usize], OLD, 0, "filled before the change");
        assert_bytes(
            &map[3 * CHUNK as usize..4 * CHUNK as usize],
            NEW,
            3 * CHUNK,
            "filled after the change (detect keeps filling)",
        );
    });
}

#[test]
fn strict_refuses_fills_after_the_change() {
    bounded("strict_refuses_fills_after_the_change", || {
        let Some(engine) = lazy_engine("stale strict", cfg(StalePolicy::Strict)) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", OLD, size());
        let src = Injected::clean(&path);
        let s = engine.open(src.clone()).unwrap();
        s.populate(0, CHUNK).unwrap();
        rewrite(&path, NEW, 0, size() as usize);
        let calls = src.calls();
        let err = s.populate(3 * CHUNK, 1).unwrap_err();
        assert!(
            matches!(&err, Error::Unfillable { offset, cause, .. }
                if *offset == 3 * CHUNK && cause.to_string().contains("changed since open")),
            "{err:?}"
        );
        assert_eq!(src.calls(), calls, "strict read the changed source anyway");
        let bad: Vec<u64> = s.poisoned_pages().iter().map(|(p, _)| *p).collect();
        let want: Vec<u64> = (3 * CHUNK..4 * CHUNK).step_by(page() as usize).collect();
        assert_eq!(bad, want);
        let st = s.stats();
        assert!(st.source_changed && st.errors >= 1, "{st:?}");
        assert!(st.last_error.unwrap().contains("stale policy strict"));
        assert_changed(&s);
        // What was filled before the change stays, with the old bytes.
        let mut head = vec![0u8; CHUNK as usize];
        s.read_at(&mut head, 0).unwrap();
        assert_bytes(&head, OLD, 0, "filled before the change");
    });
}

#[test]
fn strict_refuses_a_fill_torn_by_a_change_mid_read() {
    bounded("strict_refuses_a_fill_torn_by_a_change_mid_read", || {
        let Some(engine) = lazy_engine("stale torn", cfg(StalePolicy::Strict)) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", OLD, size());
        let p2 = path.clone();
        // The file is rewritten inside the read of chunk 5, after the policy's
        // check at the start of the fill: the bytes read are new, the fill torn.
        let plan = Plan {
            hook: Some((
                5 * CHUNK,
                Arc::new(move || rewrite(&p2, NEW, 0, size() as usize)),
            )),
            ..Plan::default()
        };
        let s = engine.open(Injected::open(&path, plan)).unwrap();
        s.populate(0, CHUNK).unwrap();
        let err = s.populate(5 * CHUNK, CHUNK).unwrap_err();
        assert!(
            matches!(&err, Error::Unfillable { offset, cause, .. }
                if *offset == 5 * CHUNK && cause.to_string().contains("during the fill")),
            "{err:?}"
        );
        assert_eq!(s.poisoned_pages().len() as u64, CHUNK / page());
        assert!(s.stats().source_changed);
    });
}

fn strict_child() {
    child::begin();
    let engine = Engine::new(cfg(StalePolicy::Strict)).unwrap();
    let path = param("PATH");
    let s = engine.open(&path).unwrap();
    let map = s.map(Share::Private).unwrap();
    child::watch_sigbus(&map);
    child::touch_page(&map, OLD, 0);
    rewrite(path.as_ref(), NEW, 0, size() as usize);
    child::touch_page(&map, OLD, 1); // same chunk: filled before the change
    child::touch_page(&map, OLD, 3 * CHUNK / page());
    child::report("end", "no SIGBUS");
}

#[test]
fn strict_mapping_gets_sigbus_after_the_change() {
    if child::role().is_some() {
        return strict_child();
    }
    if !lazy_available("stale strict sigbus") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", OLD, size());
    let o = child::spawn(
        &test_name!(strict_mapping_gets_sigbus_after_the_change),
        "strict",
        &[("PATH", path.display().to_string())],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    assert_eq!(o.numbers("good"), vec![0, 1], "{}", o.describe());
    assert_eq!(o.numbers("sigbus")[0] / page(), 3 * CHUNK / page());
}

#[test]
fn eager_snapshot_keeps_the_old_bytes_and_reports_stale() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", OLD, size());
    let engine = Engine::new(eager_config()).unwrap();
    let s = engine.open(&path).unwrap();
    assert_eq!(s.staleness().unwrap(), Staleness::Unchanged);
    rewrite(&path, NEW, 0, size() as usize);
    assert_changed(&s);
    let map = s.map(Share::Shared).unwrap();
    assert_bytes(&map, OLD, 0, "eager snapshot after the source changed");
    assert_shadow_is(&s, OLD, "eager read_at after the source changed");
    std::fs::remove_file(&path).unwrap();
    assert_eq!(s.staleness().unwrap(), Staleness::Gone);
    assert_bytes(&map, OLD, 0, "eager snapshot after the source was deleted");
}

#[test]
fn eager_copy_torn_by_a_change_is_retried() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", OLD, 3 << 20);
    let p2 = path.clone();
    // Rewritten once, during the second 1 MiB read of the first copy.
    let plan = Plan {
        hook: Some((1 << 20, Arc::new(move || rewrite(&p2, NEW, 0, 3 << 20)))),
        ..Plan::default()
    };
    let src = Injected::open(&path, plan);
    let engine = Engine::new(eager_config()).unwrap();
    let s = engine.open(src.clone()).unwrap();
    assert_shadow_is(&s, NEW, "eager copy after a torn first attempt");
    assert_eq!(s.staleness().unwrap(), Staleness::Unchanged);
    // Two copies: the torn one (3 reads), then a clean one (3 reads).
    let offsets: Vec<u64> = src.log().iter().map(|r| r.offset >> 20).collect();
    assert_eq!(offsets, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn eager_copy_of_a_source_that_never_settles_fails() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", OLD, 1 << 20);
    let src = Injected::clean(&path);
    // Every copy attempt reads the file once; each read changes it.
    struct Churn(Arc<Injected>);
    impl shadowfd::Source for Churn {
        fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
            let n = self.0.read_at(buf, off)?;
            rewrite(self.0.path(), OLD, 0, 1);
            Ok(n)
        }
        fn metadata(&self) -> std::io::Result<shadowfd::SourceMeta> {
            self.0.metadata()
        }
        fn name(&self) -> String {
            self.0.name()
        }
    }
    let engine = Engine::new(eager_config()).unwrap();
    let err = engine.open(Churn(src)).unwrap_err();
    assert!(
        matches!(err, Error::SourceChanged { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("retry when it is no longer being written")
    );
}

#[test]
fn lazy_source_deleted_after_open() {
    bounded("lazy_source_deleted_after_open", || {
        let dir = tempdir();
        let path = write_file(dir.path(), "src", OLD, size());
        for policy in [StalePolicy::Detect, StalePolicy::Strict] {
            let Some(engine) = lazy_engine("stale gone", cfg(policy)) else {
                return;
            };
            let copy = dir.path().join(format!("{policy:?}"));
            std::fs::copy(&path, &copy).unwrap();
            let s = engine.open(&copy).unwrap();
            std::fs::remove_file(&copy).unwrap();
            assert_eq!(s.staleness().unwrap(), Staleness::Gone);
            let r = s.populate(0, size());
            match policy {
                // The open descriptor still reads the old bytes: served exactly.
                StalePolicy::Detect => {
                    r.unwrap();
                    assert_shadow_is(&s, OLD, "detect after the source was deleted");
                }
                StalePolicy::Strict => {
                    let e = r.unwrap_err();
                    assert!(e.to_string().contains("changed since open"), "{e}");
                    assert_eq!(s.poisoned_pages().len() as u64, NPAGES);
                }
                p => unreachable!("no such policy in this test: {p:?}"),
            }
            assert!(s.stats().source_changed);
        }
    });
}

#[test]
fn eager_copy_retry_respects_the_size_cap() {
    let dir = tempdir();
    let small = 512 << 10;
    let grown = 8 << 20;
    let path = write_file(dir.path(), "src", OLD, small);
    let p2 = path.clone();
    // During the first copy the file grows far past the cap.
    let plan = Plan {
        hook: Some((
            0,
            Arc::new(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
                f.set_len(grown).unwrap();
                rewrite(&p2, NEW, 0, grown as usize);
            }),
        )),
        ..Plan::default()
    };
    let cfg = {
        let mut c = eager_config();
        c.max_size = 1 << 20;
        c
    };
    let engine = Engine::new(cfg).unwrap();
    match engine.open(Injected::open(&path, plan)) {
        Err(Error::TooLarge { size, cap, .. }) => {
            assert_eq!((size, cap), (grown, 1 << 20));
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(s) => panic!(
            "the eager shadow holds {} bytes ({} resident), over the 1 MiB cap",
            s.size(),
            s.resident_bytes().unwrap()
        ),
    }
}

#[test]
fn a_change_seen_while_filling_is_remembered() {
    bounded("a_change_seen_while_filling_is_remembered", || {
        let Some(engine) = lazy_engine("stale remembered", cfg(StalePolicy::Detect)) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", OLD, size());
        let src = Injected::clean(&path);
        let s = engine.open(src.clone()).unwrap();
        // The source briefly reports another size while a chunk is filled...
        src.set(|p| p.report_size = Some(size() + 1));
        s.populate(0, 1).unwrap();
        // ...then looks as it did at open: the change is still reported.
        src.set(|p| p.report_size = None);
        assert_eq!(s.staleness().unwrap(), Staleness::Changed(Vec::new()));
        assert!(s.stats().source_changed);
    });
}
