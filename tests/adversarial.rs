//! Issue 12, "Hardening from an adversarial run": each failure found there,
//! reproduced with real files, processes and filesystems, and the promise
//! that replaced it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// What a finished `shadowfd` run left behind.
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    /// The child's peak resident set (its own `ru_maxrss`), in bytes.
    max_rss: u64,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    #[track_caller]
    fn fails_with(&self, needles: &[&str]) {
        assert_eq!(
            (self.code, self.signal),
            (Some(1), None),
            "expected exit 1; stderr: {}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "{n:?} missing from stderr: {}",
                self.stderr
            );
        }
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }

    #[track_caller]
    fn succeeds(&self) {
        assert_eq!(
            (self.code, self.signal),
            (Some(0), None),
            "stderr: {}",
            self.stderr
        );
    }
}

fn cli(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shadowfd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHADOWFD_") {
            c.env_remove(k);
        }
    }
    c.args(args);
    c
}

/// Runs `c` to completion with output in files, and reaps it with `wait4`
/// so that its own peak RSS is known (not that of other tests' children).
/// A run that outlives `limit_s` is killed and fails the test.
fn run(mut c: Command, limit_s: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let err = std::fs::File::create(dir.path().join("err")).unwrap();
    // Reaped below with wait4, which std's Child cannot do.
    #[allow(clippy::zombie_processes)]
    let child = c
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if t.elapsed().as_secs() >= limit_s {
                    // SAFETY: `pid` is our unreaped child (reaped only below,
                    // after `done` is set), so the number cannot be reused.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            false
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `ru` are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let killed = watchdog.join().unwrap();
    let st = std::process::ExitStatus::from_raw(status);
    let stderr = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(
        !killed,
        "still running after {limit_s} s (a hang); stderr: {stderr}"
    );
    Run {
        code: st.code(),
        signal: st.signal(),
        stdout: std::fs::read(dir.path().join("out")).unwrap(),
        stderr,
        max_rss: ru.ru_maxrss as u64 * 1024,
    }
}

/// A sparse file of `size` bytes (nothing allocated).
fn sparse(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

const TIB15: u64 = 15 << 40;

// ---- 1. Patterns stream ----------------------------------------------------

/// `seq`, `strided:4K` and `random:0.5` over a 15 TiB sparse file used to
/// abort building a 32 GB page list before touching anything. Now they
/// stream: touching runs until the 8 MiB budget is used up, and the run ends
/// with the budget's SIGBUS explained (exit 1), in a few MiB of memory.
#[test]
fn patterns_over_a_15_tib_file_stream_in_bounded_memory() {
    if !common::lazy_available() {
        eprintln!("SKIPPED patterns_over_a_15_tib_file...: needs lazy shadows");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = sparse(dir.path(), "huge", TIB15);
    let p = f.to_str().unwrap();
    for access in ["seq", "strided:4K", "random:0.5"] {
        let r = run(
            cli(&[
                "map",
                "--mode",
                "lazy",
                "--memory-budget",
                "8M",
                "--access",
                access,
                p,
            ]),
            120,
        );
        assert!(
            !r.stderr.contains("memory allocation"),
            "{access}: {}",
            r.stderr
        );
        r.fails_with(&["could not be filled at offset", "memory budget"]);
        assert!(
            r.max_rss < 64 << 20,
            "{access}: peak RSS {} bytes with an 8 MiB budget",
            r.max_rss
        );
    }
}

/// Sparse patterns over 15 TiB finish, and the process's peak memory is
/// bounded by the pages they touch (plus a fixed allowance for the program).
#[test]
fn sparse_patterns_over_15_tib_finish_with_memory_bounded_by_pages_touched() {
    if !common::lazy_available() {
        eprintln!("SKIPPED sparse_patterns_over_15_tib...: needs lazy shadows");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = sparse(dir.path(), "huge", TIB15);
    let p = f.to_str().unwrap();
    for (access, pages) in [("random:0.000001", 4027u64), ("strided:1G", 15 << 10)] {
        let r = run(
            cli(&["map", "--mode", "lazy", "--json", "--access", access, p]),
            120,
        );
        r.succeeds();
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["pages_touched"], pages, "{access}: {v}");
        assert_eq!(v["size"], TIB15);
        let name = access.split(':').next().unwrap();
        assert!(v["access"].as_str().unwrap().starts_with(name), "{v}");
        let filled = v["resident_bytes"].as_u64().unwrap();
        assert_eq!(filled, pages * 4096, "{access}: {v}");
        // A touched page counts in RSS up to three times (the consumer's
        // mapping, the engine's fill mapping of the memfd, and the page of
        // the chunk-state table that records it when touches are sparse);
        // one more page each for slack, plus the program itself.
        let bound = 4 * pages * 4096 + (32 << 20);
        eprintln!(
            "{access}: {pages} pages touched, {filled} bytes resident, peak RSS {} bytes",
            r.max_rss
        );
        assert!(
            r.max_rss <= bound,
            "{access}: peak RSS {} over {bound}",
            r.max_rss
        );
    }
}

// ---- 2. An image that is a FIFO --------------------------------------------

/// `--image FIFO` used to block for ever in open(2), waiting for a writer.
/// It is refused by its type now, without reading, whatever the command.
#[test]
fn an_image_that_is_a_fifo_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("image.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let img = fifo.to_str().unwrap();
    for cmd in ["cat", "map"] {
        for mode in ["eager", "lazy"] {
            let r = run(cli(&[cmd, "--mode", mode, "--image", img, "/f"]), 30);
            r.fails_with(&[img, "not a regular file or block device (a FIFO)"]);
            assert!(r.stdout.is_empty());
        }
    }
    // A directory is refused the same way, naming what it is.
    let r = run(
        cli(&["cat", "--image", dir.path().to_str().unwrap(), "/f"]),
        30,
    );
    r.fails_with(&["not a regular file or block device (a directory)"]);
}

// ---- 4. Files whose size lies ------------------------------------------------

/// `cat /proc/meminfo` used to print nothing and exit 0 (procfs says the
/// file has 0 bytes); a sysfs attribute (4096 bytes said, a few there) failed
/// lazily with a generic message. Both are refused at open now, in every
/// mode, naming the filesystem and the fix; never an empty success.
#[test]
fn files_on_pseudo_filesystems_are_refused_never_shadowed_empty() {
    let sysfs = [
        "/sys/kernel/uevent_seqnum",
        "/sys/power/state",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ]
    .into_iter()
    .find(|p| std::fs::File::open(p).is_ok())
    .expect("no readable sysfs attribute: is /sys mounted?");
    for (path, fs) in [
        ("/proc/meminfo", "procfs"),
        ("/proc/self/status", "procfs"),
        (sysfs, "sysfs"),
    ] {
        for mode in ["eager", "lazy", "auto"] {
            for cmd in ["cat", "map"] {
                let r = run(cli(&[cmd, "--mode", mode, path]), 30);
                r.fails_with(&[path, fs, "pseudo filesystem", "Copy the contents"]);
                assert!(r.stdout.is_empty(), "{cmd} {path}: {}", r.out());
            }
        }
        let e = shadowfd::FileSource::open(path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
    }
}

/// A socket used to be reported as "No such device or address".
#[test]
fn a_socket_is_refused_as_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let p = sock.to_str().unwrap();
    for cmd in ["cat", "map"] {
        let r = run(cli(&[cmd, p]), 30);
        r.fails_with(&[p, "not a regular file (a socket)"]);
    }
}

// ---- 5. Output on SIGBUS ----------------------------------------------------

/// The offset named in the CLI's SIGBUS message.
fn named_offset(stderr: &str) -> u64 {
    let rest = stderr
        .split("could not be filled at offset ")
        .nth(1)
        .unwrap_or_else(|| panic!("no offset named: {stderr}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// With a memory budget smaller than the file, a lazy `cat` hits a page
/// that cannot be filled. It used to lose what sat in stdout's buffer
/// (8,388,516 bytes out, offset 8,388,608 named); the output now ends
/// exactly at the named offset, and holds the file's bytes up to it.
#[test]
fn cat_output_ends_exactly_at_the_offset_named_on_sigbus() {
    if !common::lazy_available() {
        eprintln!("SKIPPED cat_output_ends_exactly...: needs lazy shadows");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = common::pattern(24 << 20, 5);
    let f = common::file_with(dir.path(), "data", &data);
    let p = f.to_str().unwrap();
    for (budget, chunk) in [("8M", "4K"), ("5M", "64K"), ("3000K", "4K")] {
        let args = [
            "cat",
            "--mode",
            "lazy",
            "--memory-budget",
            budget,
            "--chunk",
            chunk,
            p,
        ];
        // stdout a file (through `run`) and a pipe (through `output`).
        let r = run(cli(&args), 60);
        let off = named_offset(&r.stderr) as usize;
        assert!(off > 0 && off < data.len(), "{budget}: offset {off}");
        assert_eq!(r.stdout.len(), off, "{budget}/{chunk}: stdout length");
        assert!(r.stdout == data[..off], "{budget}/{chunk}: bytes differ");
        r.fails_with(&["could not be filled at offset", "--memory-budget"]);
        let o = cli(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(o.stdout.len() as u64, named_offset(&err), "pipe: {err}");
        assert!(o.stdout == data[..o.stdout.len()]);
    }
}

/// A SIGBUS that is not a fault in the shadow mapping (here one sent with
/// kill(2) while `cat` waits on a full pipe) used to be reported as an
/// error with exit 1; it now gets the default action: death by SIGBUS.
#[test]
fn a_sigbus_outside_the_mapping_gets_the_default_action() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let f = common::file_with(dir.path(), "data", &common::pattern(4 << 20, 6));
    let mut c = cli(&["cat", "--mode", "eager", f.to_str().unwrap()]);
    // SAFETY: setrlimit is async-signal-safe; no core file for the SIGBUS.
    unsafe {
        c.pre_exec(|| {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            Ok(())
        });
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A first byte out means the handler is installed (before any write);
    // the pipe then fills and `cat` blocks in write(2), holding the mapping.
    let mut stdout = child.stdout.take().unwrap();
    let mut one = [0u8; 1];
    stdout.read_exact(&mut one).unwrap();
    // SAFETY: our own live child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGBUS) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        (status.code(), status.signal()),
        (None, Some(libc::SIGBUS)),
        "stderr: {err}"
    );
    assert!(err.is_empty(), "{err}");
}

// ---- 6. CLI errors ------------------------------------------------------------

/// Parses stdout as exactly one JSON object carrying an `error` string.
#[track_caller]
fn json_error(stdout: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    });
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {v}"))
        .to_string()
}

/// `map --json` used to print nothing on stdout when it failed. Every
/// failure now prints one JSON object with an `error` field, and exits
/// non-zero: a bad path, a directory, an over-cap eager file, a usage error
/// and a SIGBUS in the mapping.
#[test]
fn map_json_failures_print_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::file_with(dir.path(), "f", &common::pattern(3 << 20, 8));
    let p = f.to_str().unwrap();
    let missing = dir.path().join("missing");
    let m = missing.to_str().unwrap();
    let d = dir.path().to_str().unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["map", "--json", m], 1, "No such file"),
        (vec!["map", "--json", d], 1, "not a regular file"),
        (
            vec!["map", "--json", "--mode", "eager", "--max-size", "1M", p],
            1,
            "over the eager size cap",
        ),
        (vec!["map", "--json", "--workers", "-1", p], 2, "--workers"),
        (vec!["map", "--json", "--access", "walk", p], 2, "walk"),
    ];
    for (args, code, needle) in cases {
        let r = run(cli(&args), 30);
        assert_eq!(r.code, Some(code), "{args:?}: {}", r.stderr);
        let e = json_error(&r.stdout);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    if common::lazy_available() {
        let r = run(
            cli(&[
                "map",
                "--json",
                "--mode",
                "lazy",
                "--memory-budget",
                "1M",
                p,
            ]),
            30,
        );
        r.fails_with(&["could not be filled at offset"]);
        let e = json_error(&r.stdout);
        assert!(e.contains("could not be filled at offset"), "{e}");
        assert!(e.contains("--memory-budget"), "{e}");
    }
}

/// An invalid `SHADOWFD_MODE=banana` used to abort even with `--mode eager`:
/// a flag wins, so its variable is not read at all; without the flag the
/// variable is refused, named.
#[test]
fn flags_win_over_malformed_environment_variables() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::file_with(dir.path(), "f", &common::pattern(10_000, 9));
    let p = f.to_str().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("SHADOWFD_MODE", &["--mode", "eager"]),
        ("SHADOWFD_MAX_SIZE", &["--max-size", "1M"]),
        ("SHADOWFD_MEMORY_BUDGET", &["--memory-budget", "64M"]),
        ("SHADOWFD_CHUNK", &["--chunk", "4K"]),
        ("SHADOWFD_WORKERS", &["--workers", "2"]),
        ("SHADOWFD_READAHEAD", &["--readahead", "1M"]),
        ("SHADOWFD_STALE", &["--stale", "detect"]),
    ];
    for (var, flag) in cases {
        let mut args = vec!["cat", "--mode", "eager"];
        if *var == "SHADOWFD_MODE" {
            args.truncate(1);
        }
        args.extend_from_slice(flag);
        args.push(p);
        let mut c = cli(&args);
        c.env(var, "banana");
        let r = run(c, 30);
        r.succeeds();
        assert_eq!(r.stdout.len(), 10_000, "{var}");
        // Without the flag the variable is read, and refused by name.
        let mut c = cli(&["cat", "--mode", "eager", p]);
        if *var == "SHADOWFD_MODE" {
            c = cli(&["cat", p]);
        }
        c.env(var, "banana");
        run(c, 30).fails_with(&[var, "banana"]);
    }
}

/// `--workers -1` used to say "invalid digit found in string": the
/// accepted range is named now, for every out-of-range value.
#[test]
fn worker_counts_out_of_range_name_the_range() {
    for bad in ["-1", "0", "257", "banana", "1.5"] {
        let r = run(cli(&["cat", "--workers", bad, "/dev/null"]), 30);
        // A malformed number is a usage error (2); 0 and 257 parse and are
        // refused with the rest of the configuration (1).
        let code = if bad == "0" || bad == "257" { 1 } else { 2 };
        assert_eq!(r.code, Some(code), "{bad}: {}", r.stderr);
        for want in ["--workers", bad, "1", "256"] {
            assert!(r.stderr.contains(want), "{bad}: {want:?}: {}", r.stderr);
        }
        assert!(!r.stderr.contains("invalid digit"), "{}", r.stderr);
    }
}

/// Budget errors name `--memory-budget`, whichever way they arise.
#[test]
fn budget_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::file_with(dir.path(), "f", &common::pattern(10_000, 10));
    let p = f.to_str().unwrap();
    for budget in ["1K", "100T"] {
        let r = run(cli(&["cat", "--memory-budget", budget, p]), 30);
        r.fails_with(&["--memory-budget", "SHADOWFD_MEMORY_BUDGET"]);
    }
    let r = run(
        cli(&[
            "cat",
            "--mode",
            "eager",
            "--max-size",
            "8M",
            "--memory-budget",
            "4M",
            p,
        ]),
        30,
    );
    r.fails_with(&["--memory-budget", "8388608"]);
}

/// Where lazy shadows work, the over-cap error suggests one (the seccomp
/// scenario in fault-tests/restricted.rs checks that it does not where they
/// cannot be made).
#[test]
fn the_over_cap_error_suggests_lazy_where_lazy_works() {
    if !common::lazy_available() {
        eprintln!("SKIPPED the_over_cap_error_suggests_lazy...: needs lazy shadows");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = common::file_with(dir.path(), "f", &common::pattern(2 << 20, 11));
    let r = run(
        cli(&[
            "cat",
            "--mode",
            "eager",
            "--max-size",
            "1M",
            f.to_str().unwrap(),
        ]),
        30,
    );
    r.fails_with(&["--max-size", "--mode lazy"]);
    assert!(!r.stderr.contains("not possible"), "{}", r.stderr);
}

// ---- 7. The default budget follows the memory cgroup ---------------------

/// A memory cgroup (v2 or the v1 memory controller) made for one child
/// process under the test's own; removed on drop.
struct Cgroup {
    dir: std::path::PathBuf,
    procs: std::path::PathBuf,
}

impl Cgroup {
    /// A child cgroup of ours limited to `limit` bytes, if this system
    /// lets us make one.
    fn create(limit: u64) -> Result<Cgroup, String> {
        let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("shadowfd-test-{}", std::process::id());
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
            let Some(path) = path else { continue };
            let (root, limit_file) = if ctrls.split(',').any(|c| c == "memory") {
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            } else if ctrls.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                ("/sys/fs/cgroup", "memory.max")
            } else {
                continue;
            };
            let dir = Path::new(root)
                .join(path.trim_start_matches('/'))
                .join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cg = Cgroup {
                procs: dir.join("cgroup.procs"),
                dir: dir.clone(),
            };
            if std::fs::write(dir.join(limit_file), limit.to_string()).is_ok() {
                return Ok(cg);
            }
        }
        Err(format!(
            "no writable memory cgroup for this process ({text:?})"
        ))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The default budget used to be half of MemAvailable whatever the memory
/// cgroup allowed: under a 512 MiB limit on a machine with gigabytes free,
/// a 300 MiB eager cap was accepted and a fill could take the cgroup to its
/// OOM killer. The default is now a quarter of the tighter of the two, so
/// the same cap is refused, naming a bound of at most 128 MiB.
#[test]
fn the_default_budget_follows_the_memory_cgroup() {
    use std::os::unix::process::CommandExt;
    let cg = match Cgroup::create(512 << 20) {
        Ok(cg) => cg,
        Err(why) => {
            eprintln!("SKIPPED the_default_budget_follows_the_memory_cgroup: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let f = common::file_with(dir.path(), "f", &common::pattern(100_000, 12));
    let mut c = cli(&[
        "cat",
        "--mode",
        "eager",
        "--max-size",
        "300M",
        f.to_str().unwrap(),
    ]);
    let procs = std::ffi::CString::new(cg.procs.to_str().unwrap()).unwrap();
    // SAFETY: only async-signal-safe calls (open, write, close) between fork
    // and exec: the child moves itself into the cgroup.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let r = run(c, 30);
    r.fails_with(&["300 MiB", "memory bound of", "cgroup", "--memory-budget"]);
    let bound: u64 = r
        .stderr
        .split("memory bound of ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no bound named: {}", r.stderr));
    eprintln!("budget under a 512 MiB cgroup: {bound} bytes");
    assert!(bound <= 128 << 20, "bound {bound}");
    assert!(
        bound > 64 << 20,
        "bound {bound}: the cgroup is nearly empty"
    );
    // An explicit budget under the limit still works in it.
    drop(r);
}
