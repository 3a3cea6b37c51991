//! Full-scan throughput of a lazy shadow for each chunk size (open + map +
//! touching every page), with the eager copy of the same file as reference.

mod common;

use common::{KIB, MIB, data_file, engine, quick};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use shadowfd::{Engine, Mode, Share};
use std::path::Path;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * MIB;

/// Opens, maps and touches one byte of every page; the drop is not timed.
fn scan(engine: &Engine, path: &Path, page: usize) -> Duration {
    let t = Instant::now();
    let shadow = engine.open(path).expect("open");
    let map = shadow.map(Share::Shared).expect("map");
    let mut sum = 0u64;
    for i in (0..map.len()).step_by(page) {
        sum = sum.wrapping_add(map[i] as u64);
    }
    std::hint::black_box(sum);
    let d = t.elapsed();
    assert_eq!(shadow.resident_bytes().expect("resident"), SIZE);
    d
}

fn full_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = data_file(dir.path(), "scan", SIZE);
    let page = shadowfd::page_size();
    let mut g = c.benchmark_group("scan_64M");
    g.throughput(Throughput::Bytes(SIZE));
    g.sampling_mode(SamplingMode::Flat);
    for chunk in [4 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 256 * KIB, MIB] {
        let e = engine(Mode::Lazy, chunk, 8 * MIB, 0);
        let label = format!("{}K", chunk / KIB);
        g.bench_function(BenchmarkId::new("lazy_chunk", label), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| scan(&e, &path, page)).sum())
        });
    }
    let e = engine(Mode::Eager, 32 * KIB, 0, SIZE);
    g.bench_function("eager", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| scan(&e, &path, page)).sum())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = quick();
    targets = full_scan
}
criterion_main!(benches);
