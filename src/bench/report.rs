//! Turning samples into the report: medians and spread per pattern × mode,
//! ratios (paired per repetition), the targets, the table and the JSON.

use crate::units::format_size;
use serde::Serialize;

/// One run of one pattern under one mode.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub open_us: f64,
    pub access_us: f64,
    pub close_us: f64,
    pub resident_bytes: u64,
    /// Userfaultfd faults served (eager/lazy from `Shadow::stats`, raw by its
    /// handler), or the page faults of the touching thread (native, fuse,
    /// memcpy).
    pub faults: u64,
    /// Minor + major page faults of the touching thread (`getrusage`).
    pub page_faults: u64,
    /// For the external reader (fuse, run): the reader process's wall time
    /// from spawn to exit, start-up included; not in the total.
    pub process_us: Option<f64>,
}

impl Sample {
    /// A run timed in this process: (open, access, close) µs, the bytes
    /// resident, and (faults as [`Sample::faults`] counts them, page
    /// faults).
    pub fn in_process(us: (f64, f64, f64), resident_bytes: u64, faults: (u64, u64)) -> Sample {
        Sample {
            open_us: us.0,
            access_us: us.1,
            close_us: us.2,
            resident_bytes,
            faults: faults.0,
            page_faults: faults.1,
            process_us: None,
        }
    }
}

impl Sample {
    pub fn total_us(&self) -> f64 {
        self.open_us + self.access_us
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct MinMax {
    pub min: f64,
    pub max: f64,
}

/// Every repetition's figures, in order (a row's medians and spread come
/// from these).
#[derive(Debug, Clone, Serialize)]
pub struct PerRep {
    pub open_us: Vec<f64>,
    pub access_us: Vec<f64>,
    pub total_us: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub open_us: MinMax,
    pub access_us: MinMax,
    pub total_us: MinMax,
}

/// Medians over the repetitions of one pattern under one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub pattern: String,
    pub mode: &'static str,
    pub reps: usize,
    pub open_us: f64,
    pub access_us: f64,
    pub total_us: f64,
    /// Unmap and close (drop of the mapping and shadow); not in `total_us`.
    pub close_us: f64,
    pub resident_bytes: u64,
    pub faults: u64,
    pub page_faults: u64,
    pub pages_touched: u64,
    pub touched_bytes: u64,
    /// `touched_bytes / total_us`, in MB/s (10^6 bytes per second).
    pub throughput_mb_s: f64,
    pub spread: Spread,
    pub per_rep: PerRep,
    /// External reader modes (fuse, run): median wall time of the reader
    /// process, from spawn to exit (start-up, and for run the embedded
    /// server, included); not part of `total_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_us: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub pattern: String,
    /// `open_speedup_lazy_vs_eager` (eager open / lazy open),
    /// `total_lazy_over_eager`, `total_speedup_lazy_vs_eager` (eager total /
    /// lazy total), `total_speedup_lazy_vs_fuse` (fuse total /
    /// lazy total), `total_lazy_image_over_lazy`, `total_lazy_over_native`,
    /// `total_lazy_over_raw` (the minimal userfaultfd handler),
    /// `total_raw_remote_over_raw` (that handler in another process against
    /// in the bench's), `total_run_over_raw_remote` (the reader under `run`
    /// against the cross-process floor),
    /// `total_lazy_over_memcpy` (the copy floor), `total_speedup_run_vs_fuse`
    /// (fuse total / run total, the same reader program),
    /// `total_run_over_lazy` and `total_run_read_over_lazy` (the reader
    /// under `run`, mapping or reading, against the in-process lazy shadow),
    /// `total_run_over_lazy_image` or `total_speedup_run_read_vs_fuse_read`
    /// (the same with `pread` instead of `mmap`).
    pub name: &'static str,
    /// Median of the per-repetition ratios.
    pub value: f64,
    pub min: f64,
    pub max: f64,
    /// Every repetition's ratio, in order.
    pub per_rep: Vec<f64>,
    /// The repetitions disagree by more than [`DISAGREE`] (largest over
    /// smallest): a noisy machine, not a conclusion.
    pub reps_disagree: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// `>=` or `<=`.
    pub op: &'static str,
    pub target: f64,
    pub goal: Option<f64>,
    pub measured: Option<f64>,
    pub met: Option<bool>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub mode: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub mem_total_bytes: Option<u64>,
    pub loadavg_at_start: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub size: u64,
    pub reps: usize,
    pub seed: u64,
    pub patterns: Vec<String>,
    pub modes: Vec<&'static str>,
    pub data: String,
    pub chunk_size: u64,
    pub readahead: u64,
    pub workers: usize,
    pub page_size: u64,
    /// `--pin on`: the timed touching threads stayed on their CPU.
    pub pinned: bool,
    /// With --source s3: the lazy engine of the object modes (lazy,
    /// lazy-warm): its fill unit and readahead (the rest as above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_lazy: Option<ObjectLazy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectLazy {
    pub chunk_size: u64,
    pub readahead: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
    pub skipped: Vec<Skip>,
    pub machine: Machine,
    pub config: RunConfig,
    pub notes: Vec<String>,
    /// What a reader must know before drawing a conclusion: the ratios
    /// whose repetitions disagree (a noisy machine).
    pub warnings: Vec<String>,
}

/// Median (mean of the middle two for an even count). `v` must be non-empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn median_u64(v: &[u64]) -> u64 {
    median(&v.iter().map(|&x| x as f64).collect::<Vec<_>>()).round() as u64
}

fn minmax(v: &[f64]) -> MinMax {
    MinMax {
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// The samples of one pattern under one mode, indexed by repetition.
pub struct Cell<'a> {
    pub pattern: &'a str,
    pub mode: &'static str,
    pub pages_touched: u64,
    pub touched_bytes: u64,
    pub samples: &'a [Sample],
}

pub fn row(c: &Cell) -> Option<Row> {
    if c.samples.is_empty() {
        return None;
    }
    let f = |g: fn(&Sample) -> f64| c.samples.iter().map(g).collect::<Vec<f64>>();
    let (open, access, total, close) = (
        f(|s| s.open_us),
        f(|s| s.access_us),
        f(|s| s.total_us()),
        f(|s| s.close_us),
    );
    let u = |g: fn(&Sample) -> u64| median_u64(&c.samples.iter().map(g).collect::<Vec<u64>>());
    let total_us = median(&total);
    Some(Row {
        pattern: c.pattern.to_string(),
        mode: c.mode,
        reps: c.samples.len(),
        open_us: median(&open),
        access_us: median(&access),
        total_us,
        close_us: median(&close),
        resident_bytes: u(|s| s.resident_bytes),
        faults: u(|s| s.faults),
        page_faults: u(|s| s.page_faults),
        pages_touched: c.pages_touched,
        touched_bytes: c.touched_bytes,
        throughput_mb_s: if total_us > 0.0 {
            c.touched_bytes as f64 / total_us
        } else {
            0.0
        },
        spread: Spread {
            open_us: minmax(&open),
            access_us: minmax(&access),
            total_us: minmax(&total),
        },
        per_rep: PerRep {
            open_us: open,
            access_us: access,
            total_us: total,
        },
        process_us: {
            let p: Vec<f64> = c.samples.iter().filter_map(|s| s.process_us).collect();
            (!p.is_empty()).then(|| median(&p))
        },
    })
}

/// Median, min and max of `num[r] / den[r]` over the repetitions both have.
pub fn paired(num: &[f64], den: &[f64]) -> Option<Paired> {
    let r: Vec<f64> = num
        .iter()
        .zip(den)
        .filter(|&(_, &d)| d > 0.0)
        .map(|(n, d)| n / d)
        .collect();
    if r.is_empty() {
        return None;
    }
    let mm = minmax(&r);
    Some(Paired {
        value: median(&r),
        min: mm.min,
        max: mm.max,
        per_rep: r,
    })
}

/// Repetitions whose ratios differ by more than this factor (largest over
/// smallest) disagree: the report warns that the machine was noisy.
pub const DISAGREE: f64 = 1.5;

/// A ratio paired per repetition: its median, extremes and every value.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    pub value: f64,
    pub min: f64,
    pub max: f64,
    /// In repetition order.
    pub per_rep: Vec<f64>,
}

impl Paired {
    /// Whether the repetitions disagree by more than [`DISAGREE`].
    pub fn disagree(&self) -> bool {
        self.min > 0.0 && self.max / self.min > DISAGREE
    }
}

/// The warning for ratios whose repetitions disagree by more than
/// [`DISAGREE`], if any: the machine was noisy (`loadavg` at the start).
pub fn spread_warnings(ratios: &[Ratio], loadavg: &str) -> Vec<String> {
    let noisy: Vec<String> = ratios
        .iter()
        .filter(|x| x.reps_disagree)
        .map(|x| format!("{} {}", x.pattern, x.name))
        .collect();
    if noisy.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "the repetitions disagree by more than {DISAGREE}x (marked !) on {}: the machine was \
         noisy (load average at the start: {loadavg}); rerun on a quiet machine, or with more \
         --reps, before drawing a conclusion from those ratios",
        noisy.join(", ")
    )]
}

/// Microseconds for people: µs below 1 ms, ms below 1 s, else s.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// A ratio for people: `1157×`, `7.3×`, `0.62×`, `2.3e-3×`.
pub fn fmt_ratio(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}×")
    } else if x >= 10.0 {
        format!("{x:.1}×")
    } else if x >= 0.01 {
        format!("{x:.2}×")
    } else {
        format!("{x:.1e}×")
    }
}

fn fmt_bytes(b: u64) -> String {
    if b == 0 { "0".into() } else { format_size(b) }
}

/// The human report: a table, the ratios, the targets and the notes.
pub fn print_human(r: &Report) {
    let c = &r.config;
    println!(
        "shadowfd bench: {} of seeded random bytes ({}), {} reps, modes interleaved (order rotated per rep)",
        format_size(c.size),
        c.data,
        c.reps
    );
    let m = &r.machine;
    println!(
        "machine: {} CPUs, {}, Linux {}, load average at start {}",
        m.nproc, m.cpu, m.kernel, m.loadavg_at_start
    );
    println!(
        "lazy: chunk {}, readahead {}, {} workers; touching threads {}",
        format_size(c.chunk_size),
        fmt_bytes(c.readahead),
        c.workers,
        if c.pinned {
            "pinned to their CPU (--pin on)"
        } else {
            "free to move (--pin off)"
        }
    );
    if let Some(o) = &c.object_lazy {
        println!(
            "lazy on the object (lazy, lazy-warm): chunk {}, readahead {}",
            format_size(o.chunk_size),
            fmt_bytes(o.readahead)
        );
    }
    println!();
    println!(
        "{:<14} {:<11} {:>10} {:>10} {:>10} {:>21} {:>10} {:>7} {:>8} {:>9}",
        "pattern",
        "mode",
        "open",
        "access",
        "total",
        "total min..max",
        "resident",
        "faults",
        "pgfaults",
        "MB/s"
    );
    let mut last = "";
    for row in &r.rows {
        if !last.is_empty() && row.pattern != last {
            println!();
        }
        last = &row.pattern;
        let s = &row.spread.total_us;
        println!(
            "{:<14} {:<11} {:>10} {:>10} {:>10} {:>21} {:>10} {:>7} {:>8} {:>9.0}",
            row.pattern,
            row.mode,
            fmt_us(row.open_us),
            fmt_us(row.access_us),
            fmt_us(row.total_us),
            format!("{}..{}", fmt_us(s.min), fmt_us(s.max)),
            fmt_bytes(row.resident_bytes),
            row.faults,
            row.page_faults,
            row.throughput_mb_s
        );
    }
    for s in &r.skipped {
        println!("{:<14} {:<11} skipped: {}", "(all)", s.mode, s.reason);
    }
    let procs: Vec<String> = r
        .rows
        .iter()
        .filter_map(|row| {
            row.process_us
                .map(|p| format!("{} {} {}", row.pattern, row.mode, fmt_us(p)))
        })
        .collect();
    if !procs.is_empty() {
        println!();
        println!(
            "reader process wall time, start-up included (not in total): {}",
            procs.join(", ")
        );
    }
    if !r.ratios.is_empty() {
        println!();
        println!("ratios (median of the per-rep ratios, min..max):");
        for x in &r.ratios {
            let what = match x.name {
                "open_speedup_lazy_vs_eager" => "open, eager/lazy (lazy speedup)",
                "total_lazy_over_eager" => "total, lazy/eager",
                "total_speedup_lazy_vs_eager" => "total, eager/lazy (lazy speedup)",
                "total_speedup_lazy_vs_fuse" => "total, fuse/lazy (lazy speedup)",
                "total_lazy_over_native" => "total, lazy/native",
                "total_lazy_image_over_lazy" => "total, lazy-image/lazy",
                "total_lazy_over_raw" => "total, lazy/raw (uffd floor)",
                "total_raw_remote_over_raw" => "total, raw-remote/raw (cross-process)",
                "total_run_over_raw_remote" => "total, run/raw-remote (remote floor)",
                "total_lazy_over_memcpy" => "total, lazy/memcpy (copy floor)",
                "total_speedup_run_vs_fuse" => "total, fuse/run (run speedup)",
                "total_run_over_lazy" => "total, run/lazy (shim + server)",
                "total_run_read_over_lazy" => "total, run-read/lazy",
                "total_run_over_lazy_image" => "total, run/lazy-image",
                "total_speedup_run_read_vs_fuse_read" => "total, fuse-read/run-read",
                "total_speedup_lazy_vs_download" => "total, download/lazy (lazy speedup)",
                "total_speedup_lazy_vs_s3fs" => "total, s3fs/lazy (lazy speedup)",
                "total_speedup_lazy_warm_vs_download" => "total, download/lazy-warm",
                "total_lazy_warm_over_lazy_local" => "total, lazy-warm/lazy-local",
                "total_eager_over_download" => "total, eager/download",
                n => n,
            };
            let reps: Vec<String> = x.per_rep.iter().map(|&v| fmt_ratio(v)).collect();
            println!(
                "  {:<14} {:<37} {:>8}  ({}..{})  reps {}{}",
                x.pattern,
                what,
                fmt_ratio(x.value),
                fmt_ratio(x.min),
                fmt_ratio(x.max),
                reps.join(" "),
                if x.reps_disagree { "  !" } else { "" }
            );
        }
    }
    for w in &r.warnings {
        println!();
        println!("warning: {w}");
    }
    if !r.targets.is_empty() {
        println!();
        println!("targets:");
        for t in &r.targets {
            let status = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let measured = t.measured.map(fmt_ratio).unwrap_or_else(|| "-".into());
            let goal = t
                .goal
                .map(|g| format!(", goal {}", fmt_ratio(g)))
                .unwrap_or_default();
            println!(
                "  [{status:<6}] {:<52} {:>8}  (target {} {}{goal})",
                t.name,
                measured,
                t.op,
                fmt_ratio(t.target)
            );
            if let Some(n) = &t.note {
                println!("           {n}");
            }
        }
    }
    if !r.notes.is_empty() {
        println!();
        println!("notes:");
        for n in &r.notes {
            println!("  - {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(open: f64, access: f64) -> Sample {
        Sample {
            open_us: open,
            access_us: access,
            close_us: 1.0,
            resident_bytes: 4096,
            faults: 3,
            page_faults: 5,
            process_us: None,
        }
    }

    #[test]
    fn medians_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let samples = [s(10.0, 90.0), s(30.0, 70.0), s(20.0, 200.0)];
        let r = row(&Cell {
            pattern: "seq",
            mode: "lazy",
            pages_touched: 1,
            touched_bytes: 1000,
            samples: &samples,
        })
        .unwrap();
        assert_eq!(r.open_us, 20.0);
        assert_eq!(r.total_us, 100.0);
        assert_eq!(r.spread.total_us.min, 100.0);
        assert_eq!(r.spread.total_us.max, 220.0);
        assert_eq!(r.throughput_mb_s, 10.0);
        assert_eq!(r.reps, 3);
        assert_eq!(r.per_rep.total_us, vec![100.0, 100.0, 220.0]);
        assert_eq!(r.per_rep.open_us, vec![10.0, 30.0, 20.0]);
    }

    #[test]
    fn ratios_are_paired_per_rep() {
        // Rep 1 is slow for both modes: pairing cancels it out.
        let p = paired(&[100.0, 1000.0, 110.0], &[10.0, 100.0, 10.0]).unwrap();
        assert_eq!(p.value, 10.0);
        assert_eq!(p.min, 10.0);
        assert_eq!(p.max, 11.0);
        assert_eq!(p.per_rep, vec![10.0, 10.0, 11.0]);
        assert!(!p.disagree());
        assert!(paired(&[1.0], &[0.0]).is_none());
    }

    #[test]
    fn repetitions_that_differ_by_more_than_half_disagree() {
        let p = paired(&[10.0, 16.0], &[10.0, 10.0]).unwrap();
        assert_eq!(p.per_rep, vec![1.0, 1.6]);
        assert!(p.disagree());
        let q = paired(&[10.0, 14.0], &[10.0, 10.0]).unwrap();
        assert!(!q.disagree());
        let ratio = |name, p: &Paired| Ratio {
            pattern: "seq".into(),
            name,
            value: p.value,
            min: p.min,
            max: p.max,
            per_rep: p.per_rep.clone(),
            reps_disagree: p.disagree(),
        };
        let calm = [ratio("total_lazy_over_eager", &q)];
        assert!(spread_warnings(&calm, "0.1").is_empty());
        let noisy = [calm[0].clone(), ratio("total_lazy_over_raw", &p)];
        let w = spread_warnings(&noisy, "3.5 2.0 1.0");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("seq total_lazy_over_raw"), "{}", w[0]);
        assert!(!w[0].contains("total_lazy_over_eager"), "{}", w[0]);
        assert!(
            w[0].contains("1.5x") && w[0].contains("3.5 2.0 1.0"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn times_format_by_magnitude() {
        assert_eq!(fmt_us(12.34), "12.3 µs");
        assert_eq!(fmt_us(12_340.0), "12.3 ms");
        assert_eq!(fmt_us(1_234_000.0), "1.23 s");
        assert_eq!(fmt_ratio(1234.4), "1234×");
        assert_eq!(fmt_ratio(0.5), "0.50×");
        assert_eq!(fmt_ratio(0.0022), "2.2e-3×");
    }
}
