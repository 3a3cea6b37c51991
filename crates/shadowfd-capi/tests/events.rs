//! A lazy mapping stays byte-exact whatever the program does with it
//! (issue: never zeros after `mremap`, `fork` or `MADV_*`):
//! tests/c/events_test.c, one real process per scenario, moves, grows,
//! forks (`fork`, raw `SYS_fork`, a child's child, `vfork` + exec), discards
//! and cuts its mapping and compares every page with the source. Through
//! the C ABI's own engine (`shadowfd_map`), through a client of a real
//! `shadowfd serve`, and as a plain `open` + `mmap` under `shadowfd run`,
//! shared and private, each scenario on a file of its own so that every page
//! it checks starts unfilled.

mod common;

use common::{Server, cli_bin, compile_c, pattern, preload_lib, root, run_ok};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A file that ends mid-page, 300 pages and a bit.
const SIZE: usize = 300 * 4096 + 1234;

const SCENARIOS: &[&str] = &[
    "move",
    "grow",
    "grow-in-place",
    "grow-past-eof",
    "dontunmap",
    "fork",
    "rawfork",
    "fork-again",
    "vfork",
    "dontneed",
    "munmap",
];

fn exe() -> &'static Path {
    static EXE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &EXE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("events_test");
        let src = root().join("crates/shadowfd-capi/tests/c/events_test.c");
        compile_c(&[src], &exe, &[]);
        (dir, exe)
    })
    .1
}

/// A served tree with a file of its own for each scenario and share, in a
/// temporary directory (returned too, to keep it).
fn scenario_tree() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("root");
    std::fs::create_dir(&tree).unwrap();
    for (i, sc) in SCENARIOS.iter().enumerate() {
        for share in ["shared", "private"] {
            let data = pattern(SIZE, i as u64 + 1);
            std::fs::write(tree.join(format!("{sc}-{share}.bin")), data).unwrap();
        }
    }
    (dir, tree)
}

/// `shadowfd run EXTRA… --root TREE --mount /evt --`, the program to come.
fn under_run(tree: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(cli_bin());
    c.arg("run")
        .args(extra)
        .arg("--root")
        .arg(tree)
        .args(["--mount", "/evt", "--"])
        .env("SHADOWFD_PRELOAD", preload_lib())
        .env_remove("SHADOWFD_MODE");
    c
}

fn lazy_required() {
    let p = sfd::probe();
    assert!(
        p.lazy_usable,
        "lazy shadows are unavailable here ({:?}): these tests are about them",
        p.reason
    );
}

#[test]
fn c_abi_mappings_stay_exact_through_mremap_fork_and_madvise() {
    lazy_required();
    let dir = tempfile::tempdir().unwrap();
    // shadowfd_map (Shadow::map), at a fixed address (map_fixed), and the
    // caller's own mapping registered (Shadow::register).
    for kind in ["capi", "capi-fixed", "capi-reg"] {
        for (i, sc) in SCENARIOS.iter().enumerate() {
            for share in ["shared", "private"] {
                let f = dir.path().join(format!("{kind}-{sc}-{share}.bin"));
                std::fs::write(&f, pattern(SIZE, i as u64 + 1)).unwrap();
                let f = f.to_str().unwrap();
                run_ok(exe(), &[kind, share, sc, f, f]);
            }
        }
    }
}

#[test]
fn client_mappings_stay_exact_through_mremap_fork_and_madvise() {
    lazy_required();
    let (dir, tree) = scenario_tree();
    let sock = dir.path().join("s.sock");
    let server = Server::start(&tree, &sock, &["--mode", "lazy", "--readahead", "0"]);
    for sc in SCENARIOS {
        for share in ["shared", "private"] {
            let name = format!("{sc}-{share}.bin");
            let target = format!("{}:/{name}", sock.display());
            let reference = tree.join(&name);
            let r = std::panic::catch_unwind(|| {
                run_ok(
                    exe(),
                    &["client", share, sc, &target, reference.to_str().unwrap()],
                )
            });
            if let Err(e) = r {
                eprintln!("{}", server.output());
                std::panic::resume_unwind(e);
            }
        }
    }
}

#[test]
fn run_mappings_stay_exact_through_mremap_fork_and_madvise() {
    lazy_required();
    let (_dir, tree) = scenario_tree();
    for sc in SCENARIOS {
        for share in ["shared", "private"] {
            let name = format!("{sc}-{share}.bin");
            let reference = tree.join(&name);
            let o = under_run(&tree, &[])
                .arg(exe())
                .args(["plain", share, sc, &format!("/evt/{name}")])
                .arg(&reference)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "run {sc} {share}: {}\nstdout:\n{}\nstderr:\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// Eight threads move, fork, discard and cut fresh mappings of fresh
/// shadows (each first touch a fill) for `SHADOWFD_STRESS_SECS` (30 by
/// default): not one wrong byte, and no descriptor left behind (forked
/// children's userfaultfds are let go once they exit).
#[test]
fn eight_threads_remapping_forking_and_unmapping_stay_exact() {
    lazy_required();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("stress.bin");
    std::fs::write(&f, pattern(64 * 4096 + 99, 42)).unwrap();
    let f = f.to_str().unwrap();
    let secs = std::env::var("SHADOWFD_STRESS_SECS").unwrap_or_else(|_| "30".into());
    run_ok(exe(), &["capi", "shared", &format!("stress{secs}"), f, f]);
    run_ok(
        exe(),
        &[
            "capi",
            "private",
            &format!("stress{}", secs.parse::<u32>().unwrap_or(30) / 3),
            f,
            f,
        ],
    );
}

/// The same stress through a client of a real `shadowfd serve`: 8 threads
/// over 128 copies of a 32-page file, under a memory budget that keeps the
/// server evicting idle shadows, so that nearly every map is of a fresh
/// lazy shadow (a whole one is served sealed). A raw fork's child has no
/// client mapping (SIGSEGV, docs/remote.md), never wrong bytes.
#[test]
fn a_client_of_the_server_stays_exact_under_the_same_stress() {
    lazy_required();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("root");
    std::fs::create_dir(&tree).unwrap();
    let data = pattern(32 * 4096 + 99, 43);
    for i in 0..128 {
        std::fs::write(tree.join(format!("s.bin.{i}")), &data).unwrap();
    }
    let reference = dir.path().join("s.bin");
    std::fs::write(&reference, &data).unwrap();
    let sock = dir.path().join("s.sock");
    let server = Server::start(&tree, &sock, &["--mode", "lazy", "--memory-budget", "8M"]);
    let secs = std::env::var("SHADOWFD_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(30)
        / 3;
    let target = format!("{}:/s.bin", sock.display());
    let r = std::panic::catch_unwind(|| {
        run_ok(
            exe(),
            &[
                "client",
                "shared",
                &format!("stress{secs}x128"),
                &target,
                reference.to_str().unwrap(),
            ],
        )
    });
    let log = server.output();
    if let Err(e) = r {
        eprintln!("{log}");
        std::panic::resume_unwind(e);
    }
    // Lazy mappings, not only sealed copies of whole shadows.
    let lazy = log.matches("lazily at").count();
    let sealed = log.matches("as a sealed descriptor").count();
    assert!(
        lazy > 1000 && lazy > sealed,
        "the stress mapped {lazy} lazy and {sealed} sealed ranges: it is about lazy ones"
    );
}

/// Python's `mmap.resize` (an `mremap`) where it applies to a served file:
/// it does not. Python refuses to resize a read-only or copy-on-write map
/// (`TypeError`), and a served file opens only for reading, so under
/// `shadowfd run` the map stays as it was: every byte exact, before and
/// after the refused resize. A copy-on-write map (`ACCESS_COPY`, a private
/// writable `mmap` of a read-only descriptor) works as natively.
#[test]
fn python_mmap_resize_of_a_served_file_is_refused_by_python_and_the_map_stays_exact() {
    lazy_required();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("root");
    std::fs::create_dir(&tree).unwrap();
    let data = pattern(SIZE, 77);
    std::fs::write(tree.join("py.bin"), &data).unwrap();
    let reference = dir.path().join("py.bin");
    std::fs::write(&reference, &data).unwrap();
    let script = r#"
import mmap, sys
ref = open(sys.argv[2], "rb").read()
f = open(sys.argv[1], "rb")
for access in (mmap.ACCESS_READ, mmap.ACCESS_COPY):
    m = mmap.mmap(f.fileno(), 0, access=access)
    assert m[:4096] == ref[:4096], "first page"
    try:
        m.resize(2 * len(ref))
        print("resized", access)
    except TypeError as e:
        print("refused", access, e)
    assert len(m) == len(ref), len(m)
    assert m[:] == ref, "bytes after the resize"
    if access == mmap.ACCESS_COPY:
        # Copy-on-write, as natively: this map only.
        m[0] = (ref[0] + 1) % 256
        assert m[0] != ref[0]
        again = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert again[:] == ref, "another map after a private write"
        again.close()
    m.close()
# Writable: the served file does not open for writing at all.
try:
    open(sys.argv[1], "r+b")
    print("opened for writing")
except OSError as e:
    print("no write open:", e.errno)
print("exact")
"#;
    let o = under_run(&tree, &[])
        .args(["python3", "-c", script, "/evt/py.bin"])
        .arg(&reference)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}\n{out}\n{err}", o.status);
    assert_eq!(out.matches("refused").count(), 2, "{out}\n{err}");
    assert!(!out.contains("resized"), "{out}");
    assert!(out.contains("no write open"), "{out}");
    assert!(out.trim_end().ends_with("exact"), "{out}\n{err}");
}

/// The same stress on plain `open` + `mmap` + `mremap` + `munmap` under
/// `shadowfd run` (the shim follows a served mapping the program moves:
/// its record goes with it), shared and private, over 128 copies of a
/// 32-page file in lazy mode under an 8 MiB budget (the server evicts idle
/// shadows, so most maps are of fresh lazy shadows: 13,000 operations in
/// 8 s against 30,000 when whole files are served sealed, 2026-12-07).
#[test]
fn run_mappings_stay_exact_under_the_same_stress() {
    lazy_required();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("root");
    std::fs::create_dir(&tree).unwrap();
    let data = pattern(32 * 4096 + 99, 44);
    for i in 0..128 {
        std::fs::write(tree.join(format!("s.bin.{i}")), &data).unwrap();
    }
    let reference = dir.path().join("s.bin");
    std::fs::write(&reference, &data).unwrap();
    let secs = std::env::var("SHADOWFD_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(30)
        / 6;
    for share in ["shared", "private"] {
        let o = under_run(&tree, &["--mode", "lazy", "--memory-budget", "8M"])
            .arg(exe())
            .args(["plain", share, &format!("stress{secs}x128"), "/evt/s.bin"])
            .arg(&reference)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "run stress {share}: {}\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A forked child whose parent (the engine's process) exits while the
/// child still maps a lazy shadow: the parent's exit handler settles the
/// child's inherited ranges before their userfaultfd closes with it, so
/// the child reads the page its parent filled exactly and gets SIGBUS on
/// the others, never zeros. (A parent killed outright cannot: docs.)
/// Needs `EVENT_FORK`, which the kernel gives to `CAP_SYS_PTRACE` only.
#[test]
fn a_child_outliving_its_engine_reads_exact_bytes_or_sigbus_never_zeros() {
    lazy_required();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: EVENT_FORK needs CAP_SYS_PTRACE (not root here)");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: EVENT_FORK must be there"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for share in ["shared", "private"] {
        let f = dir.path().join(format!("orphan-{share}.bin"));
        std::fs::write(&f, pattern(SIZE, 91)).unwrap();
        let f = f.to_str().unwrap();
        run_ok(exe(), &["capi", share, "orphan", f, f]);
        let out = std::path::PathBuf::from(format!("{f}.orphan"));
        let t = std::time::Instant::now();
        let text = loop {
            match std::fs::read_to_string(&out) {
                Ok(s) if s.ends_with('\n') => break s,
                _ => {}
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "{share}: the orphaned child never reported"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let field = |name: &str| -> u64 {
            let words: Vec<&str> = text.split_whitespace().collect();
            let i = words.iter().position(|w| *w == name).unwrap();
            words[i + 1].parse().unwrap()
        };
        assert_eq!(field("parent-gone"), 1, "{share}: {text}");
        assert_eq!(field("wrong"), 0, "{share}: zeros or wrong bytes: {text}");
        assert!(field("exact") >= 1, "{share}: {text}");
        assert!(
            field("sigbus") >= 1,
            "{share}: nothing unfilled was left: {text}"
        );
    }
}
