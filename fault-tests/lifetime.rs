//! Scenario 7: the engine or the shadow dropped while mappings are live.
//!
//! Promise (the documented rule): shadows and mappings keep the fault
//! service alive and the userfaultfd outlives every registered range, so
//! unfilled pages of a live mapping are still filled from the source (no
//! zeros: the content has no zero byte) and a bad page still raises SIGBUS.

use crate::support::child::{self, param};
use crate::support::*;
use crate::test_name;
use shadowfd::{Config, Engine, Share};

const ID: u64 = 0x11FE;

fn cfg() -> Config {
    {
        let mut c = lazy_config();
        c.readahead = 0; // nothing is filled ahead: every page below is a real fault
        c
    }
}

#[test]
fn mappings_outlive_the_engine_and_the_shadow() {
    let Some(engine) = lazy_engine("lifetime", cfg()) else {
        return;
    };
    let dir = tempdir();
    let size = (3 << 20) + 5;
    let path = write_file(dir.path(), "src", ID, size);
    let src = Injected::clean(&path);
    let shadow = engine.open(src.clone()).unwrap();
    let shared = shadow.map(Share::Shared).unwrap();
    let private = shadow.map(Share::Private).unwrap();
    assert_eq!(src.calls(), 0, "something was read before any touch");
    drop(shadow);
    drop(engine);
    // Half through one mapping, all through the other: both kinds of pages
    // (filled by the other mapping's fault, or never filled) are right. A
    // dead service would leave the touch hanging: bounded.
    with_timeout(60, "touching mappings after the drops", move || {
        let half = size as usize / 2;
        assert_bytes(&private[..half], ID, 0, "private mapping, engine dropped");
        assert_bytes(&shared, ID, 0, "shared mapping, engine dropped");
        assert_bytes(&private, ID, 0, "private mapping, engine dropped");
    });
    assert!(src.reread_pages().is_empty());
    assert_eq!(src.delivered().len() as u64, size.div_ceil(page()));
}

#[test]
fn shadow_outlives_the_engine() {
    let Some(engine) = lazy_engine("lifetime shadow", cfg()) else {
        return;
    };
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 1 << 20);
    let shadow = engine.open(&path).unwrap();
    drop(engine);
    with_timeout(
        60,
        "using the shadow after the engine was dropped",
        move || {
            let m = shadow.map(Share::Shared).unwrap();
            assert_bytes(&m[..4096], ID, 0, "first page");
            shadow.populate(0, 1 << 19).unwrap();
            assert_shadow_is(&shadow, ID, "read_at after the engine was dropped");
            assert_bytes(&m, ID, 0, "mapping after the engine was dropped");
            shadow.materialize().unwrap();
            assert!(shadow.is_materialized());
        },
    );
}

fn dropped_child() {
    child::begin();
    let engine = Engine::new(cfg()).unwrap();
    let bad = 5 * page() + 9;
    let src = Injected::open(
        param("PATH").as_ref(),
        Plan {
            eio: bytes_at(&[bad]),
            ..Plan::default()
        },
    );
    let shadow = engine.open(src).unwrap();
    let map = shadow.map(Share::Private).unwrap();
    drop(shadow);
    drop(engine);
    child::watch_sigbus(&map);
    child::touch_page(&map, ID, 100);
    child::touch_page(&map, ID, 4);
    child::touch_page(&map, ID, 5);
    child::report("end", "no SIGBUS");
}

#[test]
fn bad_page_still_raises_sigbus_after_the_drops() {
    if child::role().is_some() {
        return dropped_child();
    }
    if !lazy_available("lifetime sigbus") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 1 << 20);
    let o = child::spawn(
        &test_name!(bad_page_still_raises_sigbus_after_the_drops),
        "dropped",
        &[("PATH", path.display().to_string())],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    assert_eq!(o.numbers("good"), vec![100, 4], "{}", o.describe());
    assert_eq!(o.numbers("sigbus")[0] / page(), 5);
}
