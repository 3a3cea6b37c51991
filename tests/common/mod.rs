//! Helpers shared by the integration tests: real files with known contents.
#![allow(dead_code)]

use shadowfd::{Config, Engine, Mode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Deterministic bytes with no zero byte, so a page read as zeros never
/// passes for data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 255) as u8 + 1
        })
        .collect()
}

/// Writes `data` to a new file `name` in `dir`.
pub fn file_with(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    p
}

/// A configuration for tests: `mode`, defaults otherwise, no environment.
pub fn config(mode: Mode) -> Config {
    {
        let mut c = Config::default();
        c.mode = mode;
        c
    }
}

pub fn engine(mode: Mode) -> Engine {
    Engine::new(config(mode)).expect("engine")
}

/// Whether this kernel lets us use lazy shadows; tests that need them skip
/// (with a message) where it does not.
pub fn lazy_available() -> bool {
    let p = shadowfd::probe();
    if !p.lazy_usable {
        eprintln!(
            "SKIP: lazy shadows unavailable on this kernel: {}",
            p.reason.as_deref().unwrap_or_default()
        );
        // CI sets this: there, a kernel without lazy shadows is a failure,
        // not a reason to skip.
        assert!(
            std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_none_or(|v| v != "1"),
            "SHADOWFD_REQUIRE_LAZY=1 and lazy shadows are unavailable: {:?}",
            p.reason
        );
    }
    p.lazy_usable
}

/// First differing offset of two slices, for assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Builds libshadowfd_preload.so next to the shadowfd binary (same profile
/// and target directory) and returns its path: `cargo test` builds the
/// binary but not the cdylib of another package. Built once per test
/// process; a no-op when it is up to date.
pub fn preload() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_shadowfd"))
            .parent()
            .unwrap()
            .to_path_buf();
        let target = bin_dir.parent().unwrap().to_path_buf();
        let profile = match bin_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev".to_string(),
            other => other.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "--quiet", "-p", "shadowfd-preload", "--profile"])
            .arg(&profile)
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .output()
            .unwrap_or_else(|e| panic!("running {cargo:?} build: {e}"));
        assert!(
            out.status.success(),
            "cargo build -p shadowfd-preload failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = bin_dir.join("libshadowfd_preload.so");
        assert!(lib.is_file(), "{} missing", lib.display());
        lib
    })
}

/// `shadowfd run SERVE… --mount MOUNT -- ARGS…` with the workspace's shim
/// (`SHADOWFD_MODE` unset), within `limit`; its status and stderr logged.
pub fn run_under(
    mount: &str,
    serve: &[&str],
    args: &[&str],
    limit: std::time::Duration,
) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_shadowfd"))
        .arg("run")
        .args(serve)
        .args(["--mount", mount, "--"])
        .args(args)
        .env("SHADOWFD_PRELOAD", preload())
        .env_remove("SHADOWFD_MODE")
        .output_within(limit);
    eprintln!(
        "run {args:?}: {}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The stdout of a command that must have succeeded.
pub fn stdout_ok(o: std::process::Output) -> Vec<u8> {
    assert!(
        o.status.success(),
        "failed: {}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// [`Command::output`] with a deadline, so that a hung program fails its
/// test instead of hanging the suite.
pub trait OutputWithin {
    /// Runs the command in a process group of its own (stdin from
    /// `/dev/null`, stdout and stderr captured); past `limit`, kills the
    /// whole group and panics naming the command.
    fn output_within(&mut self, limit: std::time::Duration) -> std::process::Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: std::time::Duration) -> std::process::Output {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        use std::process::Stdio;
        let mut child = self
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {self:?}: {e}"));
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > limit {
                let pid = child.id() as libc::pid_t;
                // SAFETY: signals the process group this command leads.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                let _ = child.wait();
                let stderr = err.join().unwrap_or_default();
                panic!(
                    "{self:?} did not finish within {limit:?}; killed. stderr:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        // Whatever the group left running holds the pipes: end it too.
        // SAFETY: signals the (now empty or orphaned) process group.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        std::process::Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }
}

/// A python3 that can import numpy (`python3` on PATH, else
/// `/usr/bin/python3`). Panics, naming the package, when there is none: the
/// tests that call it need numpy, and scripts/test installs it.
pub fn python_with_numpy() -> &'static str {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = std::process::Command::new(p)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return p;
        }
    }
    panic!(
        "neither python3 on PATH nor /usr/bin/python3 can import numpy; \
         install it (apt-get install python3-numpy) to run the numpy tests"
    );
}

/// `mkfs.ext4 -q -F -d SRC IMG SIZE`: an ext4 image of the host directory
/// `src`; panics with mkfs's message if it fails.
pub fn mkfs_d(src: &std::path::Path, img: &std::path::Path, size: &str) {
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(src)
        .arg(img)
        .arg(size)
        .output_within(std::time::Duration::from_secs(120));
    assert!(
        o.status.success(),
        "mkfs.ext4 -d {} failed: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `count` distinct pages of `n`, in a seeded order.
pub fn pages(n: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while out.len() < count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = x % n;
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}
