//! Working sets through `shadowfd run` (docs/worksets.md): a run shorter
//! than the recording window stores its record when it exits, and the
//! next run replays it, mapped ahead into the command's own range; and
//! `shadowfd bench --sqlite` runs end to end on a small database, every
//! run's output byte for byte the host sqlite3's.

mod common;

use std::path::Path;
use std::process::Command;

fn records(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// A python3 that maps a served file and prints a digest of 40 scattered
/// pages, run twice under `--workset auto` over an ext4 image: the first
/// run stores a record at exit (well inside the 30 s window), the second
/// replays it (the trace at exit says so), and both print the host file's
/// digest.
#[test]
fn a_run_stores_its_record_at_exit_and_the_next_run_replays_it() {
    if !common::lazy_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data = common::pattern(8 << 20, 31);
    common::file_with(&src, "data.bin", &data);
    let img = d.path().join("fs.img");
    common::mkfs_d(&src, &img, "32M");
    let ws = d.path().join("ws");
    let script = |path: &str| {
        format!(
            "import mmap, hashlib\n\
             f = open('{path}', 'rb')\n\
             m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n\
             h = hashlib.sha256()\n\
             for i in range(40):\n\
             \x20   p = (i * 977 + 13) % (len(m) // 4096)\n\
             \x20   h.update(m[p * 4096:(p + 1) * 4096])\n\
             print(h.hexdigest())\n"
        )
    };
    let host = Command::new("python3")
        .args(["-c", &script(src.join("data.bin").to_str().unwrap())])
        .output()
        .unwrap();
    assert!(host.status.success());
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_shadowfd"))
            .arg("run")
            .arg("--image")
            .arg(&img)
            .args(["--mount", "/wsrun", "--mode", "lazy", "--readahead", "0"])
            .args(["--workset", "auto", "--workset-dir"])
            .arg(&ws)
            .args(["--", "python3", "-c", &script("/wsrun/data.bin")])
            .env("SHADOWFD_PRELOAD", common::preload())
            .env("SHADOWFD_WORKSET_TRACE", "1")
            .env_remove("SHADOWFD_WORKSET_WINDOW")
            .output()
            .unwrap()
    };
    let first = run();
    let err1 = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success(), "{err1}");
    assert_eq!(first.stdout, host.stdout, "first run: {err1}");
    assert_eq!(records(&ws), 1, "no record stored at exit: {err1}");
    assert!(err1.contains("plan 0 chunks"), "{err1}");
    let second = run();
    let err2 = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(second.status.success(), "{err2}");
    assert_eq!(second.stdout, host.stdout, "second run: {err2}");
    let line = err2
        .lines()
        .find(|l| l.contains("data.bin at exit"))
        .unwrap_or_else(|| panic!("no trace: {err2}"));
    assert!(!line.contains("plan 0 chunks"), "not replayed: {line}");
    assert!(!line.contains("replayed 0,"), "nothing replayed: {line}");
}

/// `shadowfd bench --sqlite 4M --reps 1 --json`: builds the database and
/// the image, and every run's output equals the host sqlite3's (the bench
/// fails otherwise); the JSON names both ways of reading.
#[test]
fn the_sqlite_bench_runs_on_a_small_database() {
    if !common::lazy_available() {
        return;
    }
    let have = Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "sqlite3 is needed for this test: apt-get install sqlite3"
    );
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_shadowfd"))
        .args(["bench", "--sqlite", "4M", "--reps", "1", "--json", "--dir"])
        .arg(d.path())
        .env("SHADOWFD_PRELOAD", common::preload())
        .env_remove("SHADOWFD_WORKSET")
        .env_remove("SHADOWFD_WORKSET_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bench"], "sqlite");
    assert!(v["db_bytes"].as_u64().unwrap() > 2 << 20, "{v}");
    for io in ["mmap", "read"] {
        let m = &v["io"][io];
        for k in ["native", "first_run", "second_run"] {
            assert!(m["median_s"][k].as_f64().unwrap() > 0.0, "{io} {k}: {v}");
        }
        assert!(m["second_run_speedup"]["median"].as_f64().unwrap() > 0.0);
    }
    // The work directory is gone.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}
