//! Working-set records through the CLI (docs/worksets.md): a damaged record
//! is ignored with a warning, never a crash, and processes that store the
//! record of one source at once leave one whole record.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shadowfd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shadowfd"));
    // Nothing from the caller's environment decides these runs.
    for v in [
        "SHADOWFD_WORKSET",
        "SHADOWFD_WORKSET_DIR",
        "SHADOWFD_WORKSET_WINDOW",
        "SHADOWFD_WORKSET_MAX",
        "SHADOWFD_MODE",
    ] {
        c.env_remove(v);
    }
    c
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what}: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn cat(file: &Path, dir: &Path, mode: &str) -> Output {
    shadowfd()
        .args([
            "cat",
            "--mode",
            "lazy",
            "--readahead",
            "0",
            "--workset",
            mode,
        ])
        .arg("--workset-dir")
        .arg(dir)
        .arg(file)
        .output()
        .unwrap()
}

fn records(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// A source file of `len` patterned bytes (`seed`) in a fresh directory,
/// its bytes, and the record directory beside it: (directory, bytes,
/// file, records). `None` where lazy shadows are unavailable.
fn source(len: usize, seed: u64) -> Option<(tempfile::TempDir, Vec<u8>, PathBuf, PathBuf)> {
    if !common::lazy_available() {
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    let data = common::pattern(len, seed);
    let file = common::file_with(t.path(), "src", &data);
    let dir = t.path().join("ws");
    Some((t, data, file, dir))
}

#[test]
fn a_damaged_record_is_ignored_with_a_warning() {
    let Some((_t, data, file, dir)) = source(3 << 20, 24) else {
        return;
    };
    let o = ok(cat(&file, &dir, "record"), "record");
    assert!(o.stdout == data, "cat's output differs from the file");
    let rec = records(&dir);
    assert_eq!(rec.len(), 1, "{rec:?}");
    let good = std::fs::read(&rec[0]).unwrap();
    let damaged: [(&str, Vec<u8>); 3] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped", {
            let mut b = good.clone();
            b[40] ^= 1;
            b
        }),
        ("empty", Vec::new()),
    ];
    for (how, bytes) in damaged {
        std::fs::write(&rec[0], &bytes).unwrap();
        let o = ok(cat(&file, &dir, "replay"), how);
        assert!(
            o.stdout == data,
            "{how}: cat's output differs from the file"
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("shadowfd: working set:") && err.contains("damaged"),
            "{how}: no warning: {err}"
        );
        let o = ok(
            shadowfd()
                .args(["workset", "list", "--dir"])
                .arg(&dir)
                .output()
                .unwrap(),
            "list",
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("damaged"),
            "{how}"
        );
    }
    // `auto` replaces the damaged record with a good one.
    let o = ok(cat(&file, &dir, "auto"), "auto over a damaged record");
    assert!(o.stdout == data);
    let o = ok(
        shadowfd()
            .args(["workset", "show", "--json", "--dir"])
            .arg(&dir)
            .arg(&file)
            .output()
            .unwrap(),
        "show",
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["chunks"],
        (data.len() / shadowfd::page_size()) as u64,
        "{v}"
    );
    ok(
        shadowfd()
            .args(["workset", "rm", "--all", "--dir"])
            .arg(&dir)
            .output()
            .unwrap(),
        "rm",
    );
    assert!(records(&dir).is_empty());
}

#[test]
fn processes_recording_one_source_at_once_leave_one_whole_record() {
    let Some((_t, _data, file, dir)) = source(8 << 20, 25) else {
        return;
    };
    for round in 0..3 {
        // Four processes at once, each touching another seeded 5% of the
        // pages.
        let kids: Vec<_> = (0..4)
            .map(|i| {
                shadowfd()
                    .args(["map", "--mode", "lazy", "--readahead", "0", "--json"])
                    .args(["--access", "random:0.05", "--seed"])
                    .arg((round * 10 + i).to_string())
                    .args(["--workset", "record", "--workset-dir"])
                    .arg(&dir)
                    .arg(&file)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut stored = Vec::new();
        for k in kids {
            let o = ok(k.wait_with_output().unwrap(), "map");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            stored.push(v["workset"]["recorded"].as_u64().unwrap());
            assert!(v["workset"]["stored"].is_string(), "{v}");
        }
        let rec = records(&dir);
        assert_eq!(rec.len(), 1, "round {round}: {rec:?}");
        let o = ok(
            shadowfd()
                .args(["workset", "show", "--json", "--chunks", "--dir"])
                .arg(&dir)
                .arg(&file)
                .output()
                .unwrap(),
            "show",
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let n = v["chunks"].as_u64().unwrap();
        assert!(
            stored.contains(&n),
            "round {round}: {n} not one of {stored:?}"
        );
        assert_eq!(v["order"].as_array().unwrap().len() as u64, n);
    }
}
