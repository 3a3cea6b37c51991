//! What the report says besides the figures: the targets of
//! docs/benchmarks.md with what a run measured, the standing notes on how
//! it measured, and the machine it ran on.

use super::args::{BenchArgs, BenchMode, SourceKind};
use super::report::{self, Ratio};
use crate::access::Access;
use crate::units::format_size;

/// Bytes of the file that `pages` cover.
pub(super) fn touched_bytes(pages: &[u64], page: u64, size: u64) -> u64 {
    pages
        .iter()
        .map(|&p| size.saturating_sub(p * page).min(page))
        .sum()
}

pub(super) fn machine() -> report::Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    report::Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel,
        mem_total_bytes: crate::units::mem_total(),
        loadavg_at_start: loadavg,
    }
}

/// The targets of docs/benchmarks.md, with what this run measured.
pub(super) fn targets(
    a: &BenchArgs,
    ratios: &[Ratio],
    pooled_open: Option<f64>,
) -> Vec<report::Target> {
    let find = |pat: &Access, name: &str| {
        let p = pat.to_string();
        ratios
            .iter()
            .find(|r| r.pattern == p && r.name == name)
            .map(|r| r.value)
    };
    let t =
        |name: &str, op: &'static str, target: f64, goal: Option<f64>, measured: Option<f64>| {
            report::Target {
                name: name.into(),
                op,
                target,
                goal,
                measured,
                met: measured.map(|m| if op == ">=" { m >= target } else { m <= target }),
                note: None,
            }
        };
    let mut out = Vec::new();
    if a.source == SourceKind::S3 {
        let r01 = Access::Random(0.01);
        out.push(t(
            "random:0.01 total: lazy >= 20x faster than download+mmap",
            ">=",
            20.0,
            None,
            find(&r01, "total_speedup_lazy_vs_download"),
        ));
        out.push(t(
            "random:0.01 total: lazy >= 5x faster than s3fs",
            ">=",
            5.0,
            None,
            find(&r01, "total_speedup_lazy_vs_s3fs"),
        ));
        out.push(t(
            "seq total: lazy no slower than download+mmap",
            ">=",
            1.0,
            None,
            find(&Access::Seq, "total_speedup_lazy_vs_download"),
        ));
        out.push(t(
            "random:0.01 total: lazy-warm <= 2x lazy-local",
            "<=",
            2.0,
            None,
            find(&r01, "total_lazy_warm_over_lazy_local"),
        ));
        for x in &mut out {
            if x.measured.is_none() {
                x.note = Some(
                    "not measured in this run (pattern or mode not selected, or skipped)".into(),
                );
            } else if a.size != 1 << 30 {
                x.note = Some(format!(
                    "measured at {}; the goals are stated at 1 GiB",
                    format_size(a.size)
                ));
            }
        }
        return out;
    }
    let mut open = t(
        "lazy open >= 100x faster than eager (at 256 MiB)",
        ">=",
        100.0,
        None,
        pooled_open,
    );
    if a.size != 256 << 20 {
        open.note = Some(format!(
            "measured at {}; the target is stated at 256 MiB",
            format_size(a.size)
        ));
    }
    out.push(open);
    out.push(t(
        "random:0.01 total >= 10x faster lazy than eager",
        ">=",
        10.0,
        None,
        find(&Access::Random(0.01), "total_lazy_over_eager").map(|x| 1.0 / x),
    ));
    out.push(t(
        "seq total: lazy <= 1.0x eager",
        "<=",
        1.0,
        Some(0.5),
        find(&Access::Seq, "total_lazy_over_eager"),
    ));
    out.push(t(
        "seq total: lazy >= 2x faster than fuse2fs",
        ">=",
        2.0,
        None,
        find(&Access::Seq, "total_speedup_lazy_vs_fuse"),
    ));
    out.push(t(
        "seq total: run >= 3x faster than fuse2fs (same reader)",
        ">=",
        3.0,
        None,
        find(&Access::Seq, "total_speedup_run_vs_fuse"),
    ));
    out.push(t(
        "random:0.01 total: run no slower than fuse2fs",
        ">=",
        1.0,
        None,
        find(&Access::Random(0.01), "total_speedup_run_vs_fuse"),
    ));
    out.push(t(
        "random:0.01 total: lazy-replay <= 1.5x native (page cache)",
        "<=",
        1.5,
        None,
        find(&Access::Random(0.01), "total_lazy_replay_over_native"),
    ));
    out.push(t(
        "random:0.01 total: lazy-replay >= 4x faster than cold lazy",
        ">=",
        4.0,
        None,
        find(&Access::Random(0.01), "total_speedup_lazy_replay_vs_lazy"),
    ));
    let mut fault = t(
        "lazy 4 KiB fault latency <= 1.5x raw UFFDIO_COPY round trip",
        "<=",
        1.5,
        None,
        None,
    );
    fault.note = Some("measured by `cargo bench --bench fault`, not by this command".into());
    out.push(fault);
    for x in &mut out {
        if x.measured.is_none() && x.note.is_none() {
            x.note =
                Some("not measured in this run (pattern or mode not selected, or skipped)".into());
        }
    }
    out
}

pub(super) fn standing_notes(a: &BenchArgs, fuse_used: bool) -> Vec<String> {
    let mut n = vec![
        "the source file is written, fsynced and read once before the first run: it is warm in \
         the host page cache for every mode"
            .to_string(),
        "open = open(2) of the source + shadow creation (eager: the whole copy); access = mmap + \
         touching one byte per selected page; total = open + access; close (unmap + drop) is \
         reported separately in the JSON"
            .to_string(),
        "faults: userfaultfd faults served (lazy, raw, raw-remote; 0 for eager) or, for native, fuse and \
         memcpy, the touching thread's page faults; pgfaults: the touching thread's minor+major page faults \
         (getrusage RUSAGE_THREAD) in every mode"
            .to_string(),
        "resident: the shadow memfd's allocated bytes (eager, lazy, raw, raw-remote, memcpy), or the file's pages present \
         in the page cache by mincore (native: the whole file, shared with every reader; fuse: the \
         FUSE inode's cache)"
            .to_string(),
        if a.pin == super::args::Pin::On {
            "pinning (--pin on): in every mode the timed touching thread (the bench's own, or the \
             reader program's) stays on the CPU it starts on for its run, as the raw floor's \
             always has; --pin off leaves it free to move, as an ordinary program is"
                .to_string()
        } else {
            "no pinning (--pin off): the timed touching threads are free to move, as an ordinary \
             program's are; the raw floor then answers a thread that moved from its old CPU"
                .to_string()
        },
        format!(
            "MB/s = bytes of the touched pages / total time; ratios are medians of per-rep ratios \
             (each rep runs every mode back to back); random pages use seed {} + rep",
            a.seed
        ),
    ];
    if a.modes.contains(&BenchMode::Raw) {
        n.push(
            "raw (floor of the lazy mechanism): open = open(2) of the file + a memfd of its size \
             + userfaultfd + mmap + UFFDIO_REGISTER (MISSING) + one handler thread; each fault is \
             answered by that thread, blocked in read(2), with one pread of the chunk (the lazy \
             chunk size, no readahead) and one UFFDIO_COPY; the handler is pinned to the CPU \
             the touching thread opens on and runs SCHED_IDLE (the placement the engine's readers \
             give; since 2026-11-30); after the clock stops every touched page is compared \
             with the data"
                .into(),
        );
    }
    if a.modes.contains(&BenchMode::RawRemote) {
        n.push(
            "raw-remote (floor of a fault answered from another process): raw's handler, the \
             same code and placement (the touching thread's CPU, SCHED_IDLE), in a separate \
             process (this program again, started and placed before the clock, as run's \
             embedded server is); open = raw's open, with the userfaultfd and the file sent \
             to the handler over a Unix socket instead of a thread spawned; its UFFDIO_COPYs \
             act on the bench's address space from the handler's; every touched page is \
             compared with the data after the clock stops"
                .into(),
        );
    }
    if a.modes.contains(&BenchMode::Memcpy) {
        n.push(
            "memcpy (floor of the copy): open = memfd_create + ftruncate + mmap + one memcpy of \
             the whole file from a copy already in memory (read before the runs, untimed); access \
             = touching the same mapping; every pattern copies the whole file"
                .into(),
        );
    }
    if fuse_used {
        n.push(
            "fuse: fuse2fs -o ro serves an ext4 image (built with mkfs.ext4 -d, warm in the host \
             page cache); the kernel keeps a FUSE file's pages across opens, so the bench drops them \
             (posix_fadvise DONTNEED, untimed) before every fuse run: each run reads through the \
             daemon, as a fresh shadow reads its source"
                .into(),
        );
    }
    if a.modes.iter().any(|m| m.needs_mount() || m.is_run()) {
        n.push(
            "fuse and run are timed by one external reader program (`shadowfd bench-reader`, an \
             ordinary dynamically linked program using libc open/fstat/mmap), started afresh for \
             every run: fuse runs it on the fuse2fs mount (mounted once, before the runs), run \
             under `shadowfd run --image IMAGE --mount PREFIX` (a fresh embedded server per run, \
             its lazy engine tuned as the lazy mode's). open/access/total are the reader's own \
             clock, from before open(2) to its last touch: process start-up, the shim's load, the \
             embedded server's start and the mount are excluded from both; process_us in the \
             JSON is the reader process's wall time including them. After the clock stops the \
             reader checks every byte of every touched page against the data, and the bench \
             checks that its mapping was the mount's file (fuse) or a shadow memfd (run)"
                .into(),
        );
    }
    n
}
