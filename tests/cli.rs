//! The `shadowfd` binary: output, JSON, exit codes and error messages.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

fn shadowfd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shadowfd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHADOWFD_") {
            c.env_remove(k);
        }
    }
    c.args(args).envs(env.iter().copied()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A sparse file of `size` bytes with a non-zero marker block every MiB.
fn sparse_marked(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let block = pattern(4096, 42);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(4096) as usize;
        f.write_all_at(&block[..n], at).unwrap();
        at += 1 << 20;
    }
    p
}

fn assert_fails_with(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from stderr: {err}");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
}

#[test]
fn the_eager_cap_is_explained_and_can_be_raised_by_flag_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    let big = sparse_marked(dir.path(), "big", 300 << 20);
    let p = big.to_str().unwrap();
    let data = std::fs::read(&big).unwrap();

    let o = shadowfd(&["map", "--mode", "eager", p], &[]);
    assert_fails_with(
        &o,
        1,
        &[
            "314572800 bytes",
            "268435456 bytes",
            "--max-size",
            "SHADOWFD_MAX_SIZE",
        ],
    );

    let o = shadowfd(&["cat", "--mode", "eager", "--max-size", "512M", p], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout == data,
        "cat --max-size 512M differs from the file"
    );

    let o = shadowfd(
        &["cat", "--mode", "eager", p],
        &[("SHADOWFD_MAX_SIZE", "512M")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout == data,
        "cat with SHADOWFD_MAX_SIZE=512M differs from the file"
    );

    // The flag wins over the environment, both ways.
    let o = shadowfd(
        &[
            "map",
            "--mode",
            "eager",
            "--max-size",
            "512M",
            "--access",
            "first",
            p,
        ],
        &[("SHADOWFD_MAX_SIZE", "1M")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = shadowfd(
        &["map", "--mode", "eager", "--max-size", "1M", p],
        &[("SHADOWFD_MAX_SIZE", "512M")],
    );
    assert_fails_with(&o, 1, &["1048576 bytes"]);
}

#[test]
fn malformed_and_impossible_sizes_are_refused_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_with(dir.path(), "f", &pattern(100, 1));
    let p = f.to_str().unwrap();
    let o = shadowfd(&["cat", "--max-size", "banana", p], &[]);
    assert_fails_with(&o, 2, &["banana", "--max-size"]);
    let o = shadowfd(&["cat", p], &[("SHADOWFD_MAX_SIZE", "banana")]);
    assert_fails_with(&o, 1, &["banana", "SHADOWFD_MAX_SIZE"]);
    let o = shadowfd(&["cat", "--mode", "eager", "--max-size", "100T", p], &[]);
    assert_fails_with(&o, 1, &["109951162777600", "100 TiB", "memory bound"]);
    let o = shadowfd(&["cat", "--memory-budget", "100T", p], &[]);
    assert_fails_with(&o, 1, &["109951162777600", "MemAvailable"]);
    let o = shadowfd(&["cat", "--chunk", "1000", p], &[]);
    assert_fails_with(&o, 1, &["1000", "multiple of the page size"]);
    let o = shadowfd(&["cat", "--workers", "0", p], &[]);
    assert_fails_with(&o, 1, &["worker count", "\"0\""]);
    let o = shadowfd(&["cat", "--mode", "sideways", p], &[]);
    assert_fails_with(&o, 2, &["sideways"]);
    let o = shadowfd(&["map", "--access", "random:7", p], &[]);
    assert_fails_with(&o, 2, &["random:7"]);
}

#[test]
fn missing_paths_directories_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file");
    let o = shadowfd(&["cat", missing.to_str().unwrap()], &[]);
    assert_fails_with(&o, 1, &["no-such-file", "No such file"]);
    let o = shadowfd(&["map", dir.path().to_str().unwrap()], &[]);
    assert_fails_with(&o, 1, &["not a regular file", "directory"]);
    let empty = file_with(dir.path(), "empty", b"");
    for mode in ["eager", "lazy", "auto"] {
        let o = shadowfd(&["cat", "--mode", mode, empty.to_str().unwrap()], &[]);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
        let o = shadowfd(
            &[
                "map",
                "--json",
                "--verify",
                "--mode",
                mode,
                empty.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["size"], 0);
        assert_eq!(v["verified"], true);
    }
}

#[test]
fn probe_reports_in_json() {
    let o = shadowfd(&["probe", "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in [
        "access",
        "features",
        "feature_names",
        "attempts",
        "lazy_usable",
        "reason",
        "auto_mode",
    ] {
        assert!(v.get(k).is_some(), "probe --json lacks {k}: {v}");
    }
    let usable = v["lazy_usable"].as_bool().unwrap();
    assert_eq!(v["auto_mode"], if usable { "lazy" } else { "eager" });
    if usable {
        assert!(v["reason"].is_null());
        let names: Vec<&str> = v["feature_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"MISSING_SHMEM") && names.contains(&"POISON"),
            "{names:?}"
        );
    } else {
        assert!(v["reason"].as_str().unwrap().contains("eager"));
    }
    // The text leads with the verdict, naming the way it opens userfaultfd.
    let o = shadowfd(&["probe"], &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    let first = text.lines().next().unwrap_or("");
    if usable {
        let way = match v["access"].as_str().unwrap() {
            "syscall" => "userfaultfd(2)",
            "devnode" => "/dev/userfaultfd",
            "syscall_user_mode_only" => "userfaultfd(2) with UFFD_USER_MODE_ONLY",
            other => panic!("unknown access {other}"),
        };
        assert_eq!(
            first,
            format!("lazy shadows: usable, through {way}"),
            "{text}"
        );
    } else {
        assert_eq!(first, "lazy shadows: not usable", "{text}");
    }
    assert!(
        text.contains(&format!(
            "auto mode would choose: {}",
            v["auto_mode"].as_str().unwrap()
        )),
        "{text}"
    );
}

#[test]
fn map_json_has_the_promised_keys_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_with(dir.path(), "f", &pattern((2 << 20) + 77, 2));
    let p = f.to_str().unwrap();
    let modes: &[&str] = if lazy_available() {
        &["eager", "lazy"]
    } else {
        &["eager"]
    };
    for mode in modes {
        let o = shadowfd(&["map", "--json", "--mode", mode, p], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for k in [
            "mode",
            "size",
            "open_us",
            "access_us",
            "faults",
            "bytes_filled",
            "resident_bytes",
            "verified",
        ] {
            assert!(v.get(k).is_some(), "map --json lacks {k}: {v}");
        }
        assert_eq!(v["mode"], *mode);
        assert!(v["verified"].is_null());
        assert_eq!(v["size"], (2 << 20) + 77);
        assert!(v["resident_bytes"].as_u64().unwrap() >= (2 << 20) + 77);
        let o = shadowfd(
            &[
                "map", "--json", "--verify", "--share", "private", "--mode", mode, p,
            ],
            &[],
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["verified"], true);
        let o = shadowfd(&["map", "--mode", mode, "--verify", p], &[]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("every touched byte equals the source"),
            "{out}"
        );
    }
}

#[test]
fn a_big_file_is_shadowed_lazily_in_auto_mode_and_random_touches_fill_little() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 512 << 20;
    let f = dir.path().join("big");
    {
        let file = std::fs::File::create(&f).unwrap();
        let block = pattern(8 << 20, 3);
        let mut at = 0;
        while at < size {
            file.write_all_at(&block, at).unwrap();
            at += block.len() as u64;
        }
    }
    let p = f.to_str().unwrap();
    let o = shadowfd(
        &["map", "--access", "random:0.01", "--verify", "--json", p],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "lazy", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    let filled = v["bytes_filled"].as_u64().unwrap();
    assert!(
        filled > 0 && filled < size / 5,
        "random:0.01 filled {filled} of {size}"
    );
    assert_eq!(v["resident_bytes"].as_u64().unwrap(), filled);

    let o = shadowfd(&["cat", "--mode", "lazy", p], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout == std::fs::read(&f).unwrap(),
        "cat --mode lazy differs"
    );
}
