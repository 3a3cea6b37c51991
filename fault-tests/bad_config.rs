//! Scenario 12: bad configuration values, through the library and the CLI.
//!
//! Promise: every bad value is refused before anything runs, with a message
//! that names the value (and the option or variable it came from) and says
//! what is allowed; the CLI exits non-zero; nothing panics.

use crate::support::*;
use shadowfd::config::Size;

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<Size>().map(|s| s.0)
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
use shadowfd::{Config, Engine, Error, Mode};

fn refused(cfg: Config, wants: &[&str]) {
    let what = format!("{cfg:?}");
    let e = cfg.validate().expect_err(&what);
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    let msg = e.to_string();
    for w in wants {
        assert!(msg.contains(w), "{msg:?} lacks {w:?}");
    }
    // The engine refuses the same configuration (it validates first).
    let e2 = Engine::new(cfg)
        .err()
        .expect("engine accepted a bad config");
    assert!(matches!(e2, Error::Config { .. }), "{e2:?}");
    for w in wants {
        assert!(e2.to_string().contains(w), "{e2} lacks {w:?}");
    }
}

fn base() -> Config {
    {
        let mut c = Config::default();
        c.mode = Mode::Eager; // so that refusals never depend on userfaultfd
        c
    }
}

#[test]
fn library_refuses_bad_values_naming_them() {
    let pg = page().to_string();
    refused(
        {
            let mut c = base();
            c.workers = 0;
            c
        },
        &[
            "worker count",
            "--workers",
            "SHADOWFD_WORKERS",
            "\"0\"",
            "between 1 and 256",
        ],
    );
    refused(
        {
            let mut c = base();
            c.workers = 100_000;
            c
        },
        &["worker count", "\"100000\"", "between 1 and 256"],
    );
    refused(
        {
            let mut c = base();
            c.chunk_size = 1000;
            c
        },
        &[
            "chunk size",
            "--chunk",
            "\"1000\"",
            "multiple of the page size",
            &pg,
        ],
    );
    refused(
        {
            let mut c = base();
            c.chunk_size = 0;
            c
        },
        &["chunk size", "\"0\"", "non-zero"],
    );
    refused(
        {
            let mut c = base();
            c.chunk_size = 128 << 20;
            c
        },
        &["chunk size", &(128u64 << 20).to_string(), "at most 64 MiB"],
    );
    let b = base();
    refused(
        {
            let mut c = b.clone();
            c.max_size = b.memory_budget + page();
            c
        },
        &[
            "size cap",
            "--max-size",
            &(b.memory_budget + page()).to_string(),
            "memory bound",
        ],
    );
    if let Some(avail) = mem_available() {
        let too_much = avail * 2;
        refused(
            {
                let mut c = base();
                c.memory_budget = too_much;
                c.max_size = 1 << 20;
                c
            },
            &[
                "memory budget",
                &too_much.to_string(),
                "MemAvailable",
                "--memory-budget",
            ],
        );
    }
    refused(
        {
            let mut c = base();
            c.memory_budget = 100;
            c.max_size = 0;
            c
        },
        &["memory budget", "\"100\"", "at least one page"],
    );
    refused(
        {
            let mut c = base();
            c.readahead = 2 << 30;
            c
        },
        &[
            "readahead",
            "--readahead",
            &(2u64 << 30).to_string(),
            "at most 1 GiB",
        ],
    );
    refused(
        {
            let mut c = base();
            c.memory_budget = 4 << 20;
            c.max_size = 1 << 20;
            c.chunk_size = 8 << 20;
            c
        },
        &[
            "chunk size",
            &(8u64 << 20).to_string(),
            "larger than the memory budget",
        ],
    );
    // The good neighbours of those values are accepted.
    {
        let mut c = base();
        c.workers = 1;
        c.chunk_size = page();
        c
    }
    .validate()
    .unwrap();
    {
        let mut c = base();
        c.memory_budget = 4 << 20;
        c.max_size = 4 << 20;
        c.readahead = 0;
        c
    }
    .validate()
    .unwrap();
}

#[test]
fn size_parser_names_what_is_wrong() {
    for (bad, want) in [
        ("banana", "not a size"),
        ("", "empty size"),
        ("12Q", "unknown unit \"q\""),
        ("1.2.3M", "not a number"),
        ("-5", "not a size"),
        ("99999999999999999999", "too large"),
        ("20000000T", "too large"),
    ] {
        let e = parse_size(bad).expect_err(bad);
        assert!(e.contains(want), "{bad:?}: {e:?} lacks {want:?}");
    }
}

/// Runs the CLI with `args` (and `env`), expecting a refusal whose message
/// contains every one of `wants`.
fn cli_refuses(args: &[&str], env: &[(&str, &str)], wants: &[&str]) {
    let mut c = cli(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run(c);
    let case = format!("shadowfd {} (env {env:?})", args.join(" "));
    let code = o.status.code();
    assert!(
        matches!(code, Some(c) if c != 0),
        "{case}: exit {:?}, expected a non-zero exit code\n{}",
        o.status,
        o.describe()
    );
    assert!(
        !o.stderr.contains("panicked"),
        "{case}: panic\n{}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "{case}: wrote to stdout\n{}", o.stdout);
    for w in wants {
        assert!(
            o.stderr.contains(w),
            "{case}: message lacks {w:?}\n{}",
            o.stderr
        );
    }
}

#[test]
fn cli_refuses_bad_values_naming_them() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", 0xCF6, 1 << 20);
    let p = path.to_str().unwrap();
    for cmd in ["cat", "map"] {
        cli_refuses(
            &[cmd, "--max-size", "banana", p],
            &[],
            &["banana", "--max-size", "not a size"],
        );
        cli_refuses(
            &[cmd, "--chunk", "1000", p],
            &[],
            &["\"1000\"", "--chunk", "multiple of the page size"],
        );
        cli_refuses(
            &[cmd, "--workers", "0", p],
            &[],
            &["\"0\"", "--workers", "between 1 and 256"],
        );
    }
    // (`--workers -1` is taken by clap for an unknown flag `-1`: refused and
    // named, but without the option's name.)
    cli_refuses(&["cat", "--workers", "-1", p], &[], &["'-1'"]);
    cli_refuses(&["cat", "--workers=-1", p], &[], &["-1", "--workers"]);
    cli_refuses(
        &["cat", "--workers", "lots", p],
        &[],
        &["lots", "--workers"],
    );
    cli_refuses(&["cat", "--chunk", "0", p], &[], &["\"0\"", "--chunk"]);
    cli_refuses(
        &["cat", "--mode", "sometimes", p],
        &[],
        &["sometimes", "auto, lazy or eager"],
    );
    cli_refuses(
        &["cat", "--stale", "never", p],
        &[],
        &["never", "detect or strict"],
    );
    cli_refuses(
        &["cat", "--memory-budget", "1.2.3G", p],
        &[],
        &["1.2.3G", "not a number"],
    );
    cli_refuses(
        &["cat", "--memory-budget", "100T", p],
        &[],
        &["MemAvailable", "--memory-budget"],
    );
    cli_refuses(
        &["cat", "--memory-budget", "64M", "--max-size", "128M", p],
        &[],
        &["size cap", &(128u64 << 20).to_string(), "memory bound"],
    );
    cli_refuses(
        &["cat", "--readahead", "2G", p],
        &[],
        &[
            "readahead",
            "--readahead",
            "\"2147483648\"",
            "at most 1 GiB",
        ],
    );
    cli_refuses(
        &["map", "--access", "random:2", p],
        &[],
        &["random:2", "(0, 1]"],
    );
    // From the environment: the variable is named.
    cli_refuses(
        &["cat", p],
        &[("SHADOWFD_MAX_SIZE", "banana")],
        &["SHADOWFD_MAX_SIZE", "\"banana\""],
    );
    cli_refuses(
        &["cat", p],
        &[("SHADOWFD_CHUNK", "1000")],
        &["\"1000\"", "SHADOWFD_CHUNK"],
    );
    cli_refuses(
        &["cat", p],
        &[("SHADOWFD_WORKERS", "0")],
        &["\"0\"", "SHADOWFD_WORKERS"],
    );
    cli_refuses(
        &["cat", p],
        &[("SHADOWFD_WORKERS", "two")],
        &["SHADOWFD_WORKERS", "\"two\""],
    );
    cli_refuses(
        &["cat", p],
        &[("SHADOWFD_MODE", "fast")],
        &["SHADOWFD_MODE", "\"fast\""],
    );
    cli_refuses(
        &["cat", p],
        &[("SHADOWFD_MEMORY_BUDGET", "lots")],
        &["SHADOWFD_MEMORY_BUDGET", "\"lots\""],
    );
    // Over the eager cap: the size, the cap and the flag to raise it.
    cli_refuses(
        &["cat", "--mode", "eager", "--max-size", "64K", p],
        &[],
        &[
            "1048576 bytes (1 MiB)",
            "65536 bytes (64 KiB)",
            "--max-size 1M",
            "--mode lazy",
        ],
    );
    // Targets that cannot be shadowed.
    cli_refuses(
        &["cat", "/nonexistent/file"],
        &[],
        &["/nonexistent/file", "No such file"],
    );
    cli_refuses(
        &["cat", dir.path().to_str().unwrap()],
        &[],
        &["not a regular file", "directory"],
    );
}

#[test]
fn a_fifo_target_is_refused_not_waited_on() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let o = child::run(
        cli(&["cat", fifo.to_str().unwrap()]),
        std::time::Duration::from_secs(10),
    );
    assert!(
        !o.timed_out,
        "`shadowfd cat FIFO` still waits after 10 s (killed)\n{}",
        o.describe()
    );
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert!(o.stderr.contains("not a regular file"), "{}", o.stderr);
}

#[test]
fn a_chunk_larger_than_the_budget_is_refused() {
    let cfg = {
        let mut c = base();
        c.memory_budget = 16 << 10;
        c.max_size = 16 << 10;
        c.readahead = 0;
        c.chunk_size = 32 << 10;
        c
    };
    let e = cfg
        .validate()
        .expect_err("a 32 KiB chunk under a 16 KiB budget was accepted");
    let msg = e.to_string();
    assert!(msg.contains("chunk") && msg.contains("budget"), "{msg}");
}

#[test]
fn a_small_budget_alone_is_accepted() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", 0xCF7, 100_000);
    for (args, env) in [
        (vec!["cat", "--memory-budget", "4M"], None),
        (vec!["cat"], Some(("SHADOWFD_MEMORY_BUDGET", "4M"))),
    ] {
        let mut c = cli(&args);
        c.arg(&path);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.output().expect("run cat");
        assert!(
            out.status.success(),
            "{args:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, std::fs::read(&path).unwrap());
    }
}
