//! Scenario 6 (in-process variant): handles dropped while a fault is in
//! flight.
//!
//! Promise: a consumer thread blocked in a fault keeps being served when
//! other code drops the mapping's shadow and the engine handle: its fault
//! completes with the right bytes, the service keeps serving other shadows,
//! and the service stops (its threads exit) once the last handle is gone.
//!
//! The cross-process variant (a consumer process killed with faults in
//! flight) waits for the cross-process consumer API; see the README.

use crate::support::child;
use crate::support::*;
use crate::test_name;
use shadowfd::{Engine, Share};
use std::time::Duration;

const ID: u64 = 0x1F1;
const CHUNK: u64 = 32 << 10;

#[test]
fn fault_completes_after_its_shadow_and_engine_are_dropped() {
    let cfg = {
        let mut c = lazy_config();
        c.chunk_size = CHUNK;
        c.readahead = 0;
        c.workers = 2;
        c
    };
    let Some(engine) = lazy_engine("in-flight drop", cfg) else {
        return;
    };
    let dir = tempdir();
    let size = 1 << 20;
    let path = write_file(dir.path(), "src", ID, size);
    let other_path = write_file(dir.path(), "other", ID + 1, size);
    let gate = Gate::new();
    let held = 3 * CHUNK;
    let src = Injected::open(
        &path,
        Plan {
            gate: Some((held..held + CHUNK, gate.clone())),
            ..Plan::default()
        },
    );
    let shadow = engine.open(src.clone()).unwrap();
    let other = engine.open(&other_path).unwrap();
    let map = shadow.map(Share::Shared).unwrap();

    // The consumer owns the mapping and blocks in a fault on the held chunk.
    let consumer = std::thread::spawn(move || {
        let r = &map[held as usize..(held + CHUNK) as usize];
        assert_bytes(r, ID, held, "the chunk faulted before the drops");
        assert_bytes(&map, ID, 0, "the whole mapping after the drops");
        map // dropped by the caller: the last handle of this shadow
    });
    assert!(
        gate.wait_arrivals(1, Duration::from_secs(20)),
        "the consumer's fault never reached the source"
    );
    // Other code drops the shadow and the engine while the fault is in flight.
    drop(shadow);
    drop(engine);
    // The service still serves another shadow (one worker is held).
    let other = with_timeout(60, "another shadow while a fault is held", move || {
        let m = other.map(Share::Private).unwrap();
        assert_bytes(&m, ID + 1, 0, "another shadow after the engine was dropped");
        drop(m);
        other
    });
    assert!(
        !consumer.is_finished(),
        "the held fault returned before its read"
    );
    gate.open();
    let map = with_timeout(60, "the held fault after the gate opened", move || {
        consumer.join().unwrap()
    });
    // Dropping the last handles stops the service without hanging.
    with_timeout(60, "dropping the last mapping and shadow", move || {
        drop(map);
        drop(other);
    });
    assert!(src.reread_pages().is_empty());
}

/// Waits (up to 20 s) until the number of service threads satisfies `ok`.
fn settle(ok: impl Fn(usize) -> bool) {
    let t0 = std::time::Instant::now();
    while !ok(service_threads().len()) && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn threads_child() {
    child::begin();
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 1 << 20);
    child::report("before", service_threads().len());
    let engine = Engine::new({
        let mut c = lazy_config();
        c.workers = 3;
        c
    })
    .unwrap();
    let s = engine.open(&path).unwrap();
    let m = s.map(Share::Shared).unwrap();
    // A new thread names itself once it runs: wait for the names to appear.
    settle(|n| n >= 3);
    // The workers; a fork watcher may run beside them (fault::forkwatch).
    let workers = |v: Vec<String>| v.iter().filter(|n| n.starts_with("shadowfd-fault")).count();
    child::report("running", workers(service_threads()));
    drop(engine);
    drop(s);
    assert_bytes(&m, ID, 0, "mapping alone");
    child::report("mapping-only", workers(service_threads()));
    drop(m);
    // The last handle may be released on a service thread, which then exits
    // on its own: wait for the count to settle.
    settle(|n| n == 0);
    child::report("after", service_threads().len());
}

#[test]
fn the_service_stops_when_the_last_handle_goes() {
    if child::role().is_some() {
        return threads_child();
    }
    if !lazy_available("service threads") {
        return;
    }
    let o = child::spawn(
        &test_name!(the_service_stops_when_the_last_handle_goes),
        "threads",
        &[],
    );
    assert!(o.status.success(), "{}", o.describe());
    assert_eq!(o.numbers("before"), vec![0]);
    assert_eq!(
        o.numbers("running"),
        vec![3],
        "3 workers, each reading the uffd"
    );
    assert_eq!(
        o.numbers("mapping-only"),
        vec![3],
        "a mapping keeps the service"
    );
    assert_eq!(o.numbers("after"), vec![0], "service threads left behind");
}
