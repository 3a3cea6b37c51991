//! Scenario 5: a source whose read panics.
//!
//! Promise: the panic is contained. The fault is still answered: the pages
//! the panicking read was for are poisoned (SIGBUS in a mapping, an error
//! from populate naming them) and the fill worker survives, so other pages
//! and other shadows are still served, even by an engine with one worker.

use crate::support::child::{self, param};
use crate::support::*;
use crate::test_name;
use shadowfd::{Config, Engine, Error, Share};

const ID: u64 = 0xB00;
const NPAGES: u64 = 64;
const BAD_PAGE: u64 = 10;

fn size() -> u64 {
    NPAGES * page()
}

fn plan() -> Plan {
    Plan {
        panic: bytes_at(&[BAD_PAGE * page() + 7]),
        ..Plan::default()
    }
}

fn one_worker() -> Config {
    let mut c = lazy_config();
    c.workers = 1;
    c.readahead = 0;
    // Several pages a chunk: the panicking page shares a fill with others.
    c.chunk_size = 32 << 10;
    c
}

#[test]
fn panicking_read_is_poisoned_and_the_worker_survives() {
    bounded("panicking_read_is_poisoned_and_the_worker_survives", || {
        let Some(engine) = lazy_engine("panicking source", one_worker()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let other = write_file(dir.path(), "other", ID + 1, 1 << 20);
        let s = engine.open(Injected::open(&path, plan())).unwrap();
        let map = s.map(Share::Shared).unwrap();
        // A fault on a neighbour in the same chunk: the single worker runs the
        // fill, the source panics inside it, only the panicking page is lost.
        assert_bytes(
            &map[((BAD_PAGE - 1) * page()) as usize..(BAD_PAGE * page()) as usize],
            ID,
            (BAD_PAGE - 1) * page(),
            "the neighbour of the panicking page",
        );
        let bad: Vec<u64> = s.poisoned_pages().iter().map(|(p, _)| *p).collect();
        assert_eq!(bad, vec![BAD_PAGE * page()]);
        // The worker is still there: every other page comes through faults.
        let p0 = (BAD_PAGE * page()) as usize;
        assert_bytes(&map[..p0], ID, 0, "pages before");
        assert_bytes(
            &map[p0 + page() as usize..],
            ID,
            p0 as u64 + page(),
            "pages after",
        );
        // Populate in this thread: the panic is contained here too.
        let err = s.populate(0, size()).unwrap_err();
        assert!(
            matches!(&err, Error::Unfillable { offset, cause, .. }
                if *offset == BAD_PAGE * page() && cause.to_string().contains("panicked")),
            "{err:?}"
        );
        // And another shadow is served by the same single worker.
        let o = engine.open(&other).unwrap();
        let om = o.map(Share::Private).unwrap();
        assert_bytes(&om, ID + 1, 0, "another shadow after the panic");
        assert!(s.stats().last_error.unwrap().contains("panicked"));
    });
}

#[test]
fn panic_in_populate_thread_is_contained() {
    bounded("panic_in_populate_thread_is_contained", || {
        let Some(engine) = lazy_engine("panicking source populate", lazy_config()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let s = engine.open(Injected::open(&path, plan())).unwrap();
        let err = s.populate(BAD_PAGE * page(), 1).unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(s.poisoned_pages().len(), 1);
        s.populate(0, BAD_PAGE * page()).unwrap();
    });
}

fn panic_child() {
    child::begin();
    let engine = Engine::new(one_worker()).unwrap();
    let s = engine
        .open(Injected::open(param("PATH").as_ref(), plan()))
        .unwrap();
    let map = s.map(Share::Shared).unwrap();
    child::watch_sigbus(&map);
    for p in [0, BAD_PAGE + 1, 40, BAD_PAGE] {
        child::touch_page(&map, ID, p);
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn panicking_read_raises_sigbus_in_the_consumer() {
    if child::role().is_some() {
        return panic_child();
    }
    if !lazy_available("panicking source sigbus") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let o = child::spawn(
        &test_name!(panicking_read_raises_sigbus_in_the_consumer),
        "panic",
        &[("PATH", path.display().to_string())],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    assert_eq!(
        o.numbers("good"),
        vec![0, BAD_PAGE + 1, 40],
        "{}",
        o.describe()
    );
    assert_eq!(o.numbers("sigbus")[0] / page(), BAD_PAGE);
    assert!(o.stderr.contains("injected panic"), "{}", o.describe());
}

#[test]
fn panicking_metadata_during_a_fault_fill_is_answered() {
    // The fill path also calls Source::metadata() (the staleness check,
    // after every read under `detect`, before and after under `strict`).
    // A panic there must be contained like one in read_at: the fault is
    // answered (filled or poisoned) and the worker survives.
    bounded("panicking_metadata_during_a_fault_fill_is_answered", || {
        let Some(engine) = lazy_engine("metadata panic", one_worker()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let other = write_file(dir.path(), "other", ID + 1, 1 << 20);
        let src = Injected::clean(&path);
        let s = engine.open(src.clone()).unwrap();
        let map = s.map(Share::Shared).unwrap();
        src.set(|p| p.panic_metadata = true);
        // Touch page 0 from a helper thread, so a hang shows as a timeout.
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let ok = first_mismatch(ID, 0, &map[..page() as usize]).is_none();
            let _ = tx.send(ok);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(ok) => assert!(ok, "page 0 served wrong bytes after a metadata() panic"),
            Err(_) => panic!(
                "BUG: a fault whose fill panicked in Source::metadata() was never answered \
                 (the consumer is still blocked after 20 s)"
            ),
        }
        // The single worker still serves other shadows.
        let o = engine.open(&other).unwrap();
        assert_bytes(&o.map(Share::Private).unwrap(), ID + 1, 0, "another shadow");
    });
}

#[test]
fn panicking_metadata_during_populate_leaves_no_chunk_stuck() {
    bounded(
        "panicking_metadata_during_populate_leaves_no_chunk_stuck",
        || {
            let Some(engine) = lazy_engine("metadata panic populate", one_worker()) else {
                return;
            };
            let dir = tempdir();
            let path = write_file(dir.path(), "src", ID, size());
            let src = Injected::clean(&path);
            let s = std::sync::Arc::new(engine.open(src.clone()).unwrap());
            src.set(|p| p.panic_metadata = true);
            // The panic may reach the populate caller (it is the source's own
            // panic, in the caller's thread)...
            let s2 = s.clone();
            let r = std::thread::spawn(move || s2.populate(0, 1)).join();
            // ...but the chunk must not stay claimed forever: once the source
            // behaves, populating it again finishes.
            src.set(|p| p.panic_metadata = false);
            let s3 = s.clone();
            let (tx, rx) = crossbeam_channel::bounded(1);
            std::thread::spawn(move || {
                let _ = tx.send(s3.populate(0, 1).is_ok() || !s3.poisoned_pages().is_empty());
            });
            match rx.recv_timeout(std::time::Duration::from_secs(20)) {
                Ok(answered) => assert!(answered, "first populate: {r:?}"),
                Err(_) => panic!(
                    "BUG: after Source::metadata() panicked inside populate ({}), the chunk stayed \
                 claimed: a second populate of it blocks forever",
                    if r.is_err() {
                        "the panic reached the caller"
                    } else {
                        "returned"
                    }
                ),
            }
        },
    );
}

#[test]
fn failing_metadata_does_not_stop_detect_fills() {
    bounded("failing_metadata_does_not_stop_detect_fills", || {
        let Some(engine) = lazy_engine("metadata EIO", lazy_config()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, size());
        let src = Injected::clean(&path);
        let s = engine.open(src.clone()).unwrap();
        src.set(|p| p.eio_metadata = true);
        // detect: the fill goes on (the bytes read are the source's); the
        // failed check counts as a change.
        let m = s.map(Share::Shared).unwrap();
        assert_bytes(&m, ID, 0, "detect fills while metadata() fails");
        assert!(s.stats().source_changed);
        assert!(
            s.staleness().is_err(),
            "staleness() hides the metadata error"
        );
    });
}

/// A panic in the fill itself, not in the source (a bug in shadowfd,
/// injected with the test-only `failpoints` feature): before wave 2 it
/// ended the worker in silence and left its chunks claimed, so whoever
/// touched them waited for ever. Now it is contained and counted: the chunk
/// is poisoned (SIGBUS for the faulting consumer, an error for populate),
/// and the one worker goes on serving every other page.
fn fill_panic_child() {
    child::begin();
    // SAFETY: set before any other thread of this child reads the
    // environment (the engine starts below).
    unsafe {
        std::env::set_var(
            "SHADOWFD_FAILPOINT_FILL_PANIC",
            (BAD_PAGE * page()).to_string(),
        )
    };
    let engine = Engine::new(one_worker()).unwrap();
    let s = engine.open(param("PATH")).unwrap();
    let map = s.map(Share::Shared).unwrap();
    child::watch_sigbus(&map);
    let e = s.populate(BAD_PAGE * page(), 1).unwrap_err();
    child::report("populate", &e);
    child::report("worker_panics", s.stats().worker_panics);
    for p in [0, BAD_PAGE + 10, 40, BAD_PAGE] {
        child::touch_page(&map, ID, p);
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn a_panicking_fill_is_contained_and_counted() {
    if child::role().is_some() {
        return fill_panic_child();
    }
    if !lazy_available("panicking fill") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let o = child::spawn(
        &test_name!(a_panicking_fill_is_contained_and_counted),
        "fill-panic",
        &[("PATH", path.display().to_string())],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    let populate = o.last("populate").unwrap_or_default();
    assert!(populate.contains("the fill panicked"), "{}", o.describe());
    assert_eq!(o.numbers("worker_panics"), vec![1], "{}", o.describe());
    // Pages in other chunks were served by the same (only) worker after the
    // panic; the chunk of the bad page raises SIGBUS.
    assert_eq!(
        o.numbers("good"),
        vec![0, BAD_PAGE + 10, 40],
        "{}",
        o.describe()
    );
    assert_eq!(
        o.numbers("sigbus")[0] / page() * page() / (32 << 10),
        BAD_PAGE * page() / (32 << 10)
    );
}
