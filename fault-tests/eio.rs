//! Scenario 1: the source fails with EIO at one offset.
//!
//! Promise: exactly the page holding the bad byte is poisoned. A mapping
//! raises SIGBUS there and nowhere else, every other byte is served exactly,
//! `populate`/`read_at` name the page, `poisoned_pages()` lists exactly it,
//! and the engine keeps serving this and other shadows.

use crate::support::child::{self, param, param_u64};
use crate::support::*;
use crate::test_name;
use shadowfd::{Engine, Error, Share};

const ID: u64 = 0xE10;
const NPAGES: u64 = 64;
const BAD_PAGE: u64 = 37;

fn size() -> u64 {
    NPAGES * page() - 100 // a partial last page too
}

fn bad_byte() -> u64 {
    BAD_PAGE * page() + 1000
}

fn eio_plan() -> Plan {
    Plan {
        eio: bytes_at(&[bad_byte()]),
        ..Plan::default()
    }
}

#[test]
fn populate_names_the_bad_page_and_nothing_else_is_lost() {
    bounded(
        "populate_names_the_bad_page_and_nothing_else_is_lost",
        || {
            let Some(engine) = lazy_engine("eio", lazy_config()) else {
                return;
            };
            let dir = tempdir();
            let path = write_file(dir.path(), "src", ID, size());
            let clean = write_file(dir.path(), "other", ID + 1, 3 << 20);
            let src = Injected::open(&path, eio_plan());
            let shadow = engine.open(src.clone()).unwrap();
            let (p0, p1) = (BAD_PAGE * page(), (BAD_PAGE + 1) * page());

            // The bad page alone: an error that names its byte range and the cause.
            let err = shadow.populate(bad_byte(), 1).unwrap_err();
            assert!(
                matches!(err, Error::Unfillable { offset, end, .. } if offset == p0 && end == p1),
                "{err:?}"
            );
            let msg = err.to_string();
            for want in [
                &format!("{p0}..{p1}"),
                "Input/output error",
                "SIGBUS",
                &src.path().display().to_string(),
            ] {
                assert!(msg.contains(want), "{msg:?} lacks {want:?}");
            }

            // Everything: the same page, and only it, is reported.
            let err = shadow.populate(0, size()).unwrap_err();
            assert!(
                matches!(err, Error::Unfillable { offset, .. } if offset == p0),
                "{err:?}"
            );
            let bad = shadow.poisoned_pages();
            assert_eq!(
                bad.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
                vec![p0],
                "{bad:?}"
            );
            assert!(
                matches!(
                    bad[0].1,
                    shadowfd::Cause::SourceRead {
                        errno: Some(libc::EIO),
                        ..
                    }
                ),
                "{bad:?}"
            );
            assert!(
                bad[0].1.to_string().contains("Input/output error"),
                "{bad:?}"
            );

            // Every other byte is exact, through read_at and through a mapping.
            let mut before = vec![0u8; p0 as usize];
            assert_eq!(shadow.read_at(&mut before, 0).unwrap(), p0 as usize);
            assert_bytes(&before, ID, 0, "bytes before the bad page");
            let mut after = vec![0u8; (size() - p1) as usize];
            assert_eq!(shadow.read_at(&mut after, p1).unwrap(), after.len());
            assert_bytes(&after, ID, p1, "bytes after the bad page");
            let mut across = vec![0u8; 3 * page() as usize];
            assert!(shadow.read_at(&mut across, p0 - page()).is_err());
            for share in [Share::Shared, Share::Private] {
                let map = shadow.map(share).unwrap();
                assert_bytes(&map[..p0 as usize], ID, 0, "mapping before the bad page");
                assert_bytes(&map[p1 as usize..], ID, p1, "mapping after the bad page");
            }

            // Recorded for people and counters.
            let st = shadow.stats();
            assert_eq!(st.poisoned_pages, 1, "{st:?}");
            assert!(st.errors >= 1, "{st:?}");
            let last = st.last_error.expect("last_error set");
            assert!(last.contains(&p0.to_string()), "{last}");
            assert!(!shadow.is_materialized());
            assert!(
                shadow.fd().is_err(),
                "an incomplete lazy shadow handed out its fd"
            );

            // The engine keeps serving: another shadow, read whole through a mapping.
            let other = engine.open(&clean).unwrap();
            let m = other.map(Share::Shared).unwrap();
            assert_bytes(&m, ID + 1, 0, "another shadow of the same engine");
            assert_eq!(other.stats().errors, 0);
            assert_eq!(engine.stats().poisoned_pages, 1);
        },
    );
}

#[test]
fn eager_open_fails_naming_the_offset() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let engine = Engine::new(eager_config()).unwrap();
    // A disk with a bad sector: reads return the bytes before it, then EIO.
    let plan = Plan {
        eio_partial: true,
        ..eio_plan()
    };
    let err = engine.open(Injected::open(&path, plan)).unwrap_err();
    assert!(
        matches!(err, Error::SourceRead { offset, .. } if offset == bad_byte()),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("Input/output error"), "{msg}");
    assert!(msg.contains(&format!("offset {}", bad_byte())), "{msg}");
    // A source that fails a whole read: the error names where that read began.
    let err = engine.open(Injected::open(&path, eio_plan())).unwrap_err();
    assert!(
        matches!(err, Error::SourceRead { offset: 0, .. }),
        "{err:?}"
    );
}

fn eio_child() {
    child::begin();
    let cfg = {
        let mut c = lazy_config();
        c.readahead = param_u64("READAHEAD");
        c
    };
    let engine = Engine::new(cfg).unwrap();
    let plan = Plan {
        eio_partial: param("PARTIAL") == "1",
        ..eio_plan()
    };
    let src = Injected::open(param("PATH").as_ref(), plan);
    let shadow = engine.open(src).unwrap();
    let share = match param("SHARE").as_str() {
        "shared" => Share::Shared,
        _ => Share::Private,
    };
    let map = shadow.map(share).unwrap();
    child::watch_sigbus(&map);
    let mut order: Vec<u64> = (0..NPAGES).filter(|&p| p != BAD_PAGE).collect();
    match param("ORDER").as_str() {
        "others-first" => order.push(BAD_PAGE),
        _ => order.insert(0, BAD_PAGE),
    }
    for p in order {
        child::touch_page(&map, ID, p);
    }
    child::report("end", "no SIGBUS");
}

#[test]
fn sigbus_at_exactly_the_bad_page() {
    if child::role().is_some() {
        return eio_child();
    }
    if !lazy_available("eio sigbus") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    for (share, order, readahead, partial) in [
        ("shared", "others-first", 8 << 20, 0),
        ("private", "others-first", 0, 1),
        ("shared", "bad-first", 0, 0),
        ("private", "bad-first", 8 << 20, 1),
    ] {
        let o = child::spawn(
            &test_name!(sigbus_at_exactly_the_bad_page),
            "eio",
            &[
                ("PATH", path.display().to_string()),
                ("SHARE", share.into()),
                ("ORDER", order.into()),
                ("READAHEAD", readahead.to_string()),
                ("PARTIAL", partial.to_string()),
            ],
        );
        let case = format!("{share} mapping, {order}, readahead {readahead}, partial {partial}");
        assert_eq!(
            o.signal(),
            Some(libc::SIGBUS),
            "{case}: not killed by SIGBUS\n{}",
            o.describe()
        );
        let at = o.numbers("sigbus");
        assert_eq!(at.len(), 1, "{case}\n{}", o.describe());
        assert_eq!(
            at[0] / page(),
            BAD_PAGE,
            "{case}: SIGBUS at offset {}",
            at[0]
        );
        assert!(o.values("bad").is_empty(), "{case}\n{}", o.describe());
        assert_eq!(o.numbers("touch").last(), Some(&BAD_PAGE), "{case}");
        let good = o.numbers("good");
        let want: Vec<u64> = if order == "others-first" {
            (0..NPAGES).filter(|&p| p != BAD_PAGE).collect()
        } else {
            Vec::new()
        };
        assert_eq!(good, want, "{case}\n{}", o.describe());
    }
}

fn later_mapping_child() {
    child::begin();
    let engine = Engine::new(lazy_config()).unwrap();
    let src = Injected::open(param("PATH").as_ref(), eio_plan());
    let shadow = engine.open(src).unwrap();
    // The page is found bad by populate, before any mapping exists...
    let e = shadow.populate(0, size()).unwrap_err();
    child::report("populate", e.to_string().replace('\n', " "));
    // ...and a mapping made afterwards still raises SIGBUS there.
    let map = shadow.map(Share::Shared).unwrap();
    child::watch_sigbus(&map);
    child::touch_page(&map, ID, BAD_PAGE - 1);
    child::touch_page(&map, ID, BAD_PAGE);
    child::report("end", "no SIGBUS");
}

#[test]
fn a_mapping_made_after_the_failure_also_gets_sigbus() {
    if child::role().is_some() {
        return later_mapping_child();
    }
    if !lazy_available("eio later mapping") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, size());
    let o = child::spawn(
        &test_name!(a_mapping_made_after_the_failure_also_gets_sigbus),
        "later",
        &[("PATH", path.display().to_string())],
    );
    assert_eq!(o.signal(), Some(libc::SIGBUS), "{}", o.describe());
    assert_eq!(o.numbers("good"), vec![BAD_PAGE - 1], "{}", o.describe());
    assert_eq!(o.numbers("sigbus").len(), 1, "{}", o.describe());
    assert_eq!(o.numbers("sigbus")[0] / page(), BAD_PAGE);
    let p = o.last("populate").unwrap();
    assert!(p.contains(&(BAD_PAGE * page()).to_string()), "{p}");
}
