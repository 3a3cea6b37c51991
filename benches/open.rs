//! Open latency against file size: an eager open copies the file, so it grows
//! with the size; a lazy open reads nothing, so it should not.

mod common;

use common::{MIB, data_file, engine, quick};
use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use shadowfd::Mode;

fn open_latency(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes = [MIB, 16 * MIB, 64 * MIB, 256 * MIB];
    let files: Vec<_> = sizes
        .iter()
        .map(|&s| (s, data_file(dir.path(), &format!("f{}", s / MIB), s)))
        .collect();
    let eager = engine(Mode::Eager, 32 << 10, 8 * MIB, 256 * MIB);
    let lazy = engine(Mode::Lazy, 32 << 10, 8 * MIB, 0);
    let mut g = c.benchmark_group("open");
    // Eager opens of 256 MiB take a tenth of a second or more: one
    // iteration per sample keeps the group short.
    g.sampling_mode(SamplingMode::Flat);
    for (size, path) in &files {
        let label = format!("{}M", size / MIB);
        g.bench_with_input(BenchmarkId::new("eager", &label), path, |b, p| {
            b.iter_with_large_drop(|| eager.open(p).expect("eager open"))
        });
        g.bench_with_input(BenchmarkId::new("lazy", &label), path, |b, p| {
            b.iter_with_large_drop(|| lazy.open(p).expect("lazy open"))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = quick();
    targets = open_latency
}
criterion_main!(benches);
