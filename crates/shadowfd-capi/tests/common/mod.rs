//! Helpers for the C ABI tests: the built library, a C compiler, files.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The directory holding libshadowfd.so and libshadowfd.a for the profile
/// these tests were built with, built now if needed.
///
/// `cargo test` does not build a cdylib-only package's library for its
/// integration tests, so this runs `cargo build -p shadowfd-capi` with the
/// same profile and target directory (found from this test's own path,
/// `<target>/<profile>/deps/<test>`): a no-op when it is up to date, as it
/// is after `cargo build`, and a build of this one crate on a fresh clone.
pub fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let profile_dir = profile_dir();
        cargo_build(&["-p", "shadowfd-capi"]);
        for lib in ["libshadowfd.so", "libshadowfd.a"] {
            assert!(
                profile_dir.join(lib).is_file(),
                "{lib} missing in {}",
                profile_dir.display()
            );
        }
        profile_dir
    })
}

/// The `shadowfd` command-line tool (for `shadowfd serve`) of the same
/// profile and target directory, built now by `cargo build -p
/// shadowfd-cli --bin shadowfd` if it is missing.
pub fn cli_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = profile_dir().join("shadowfd");
        if !bin.is_file() {
            cargo_build(&["-p", "shadowfd-cli", "--bin", "shadowfd"]);
        }
        assert!(bin.is_file(), "{} missing after the build", bin.display());
        bin
    })
}

/// The `shadowfd run` shim (`libshadowfd_preload.so`) of the same profile,
/// built now if needed.
pub fn preload_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        cargo_build(&["-p", "shadowfd-preload"]);
        let lib = profile_dir().join("libshadowfd_preload.so");
        assert!(lib.is_file(), "{} missing after the build", lib.display());
        lib
    })
}

/// `<target>/<profile>`, found from this test's own path
/// (`<target>/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable under <target>/<profile>/deps")
        .to_path_buf()
}

/// `cargo build ARGS` with this test's profile and target directory.
fn cargo_build(args: &[&str]) {
    let profile_dir = profile_dir();
    let target = profile_dir.parent().unwrap().to_path_buf();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "--quiet"])
        .args(args)
        .args(["--profile", &profile])
        .arg("--manifest-path")
        .arg(root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} build: {e}"));
    assert!(
        out.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The C compiler: `$CC` or `cc`.
pub fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Compiles C `sources` into `out` against include/shadowfd.h and the
/// shared library (rpath set), with warnings as errors.
pub fn compile_c(sources: &[PathBuf], out: &Path, extra: &[&str]) {
    let lib = lib_dir();
    let mut cmd = Command::new(cc());
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-pthread"])
        .arg("-I")
        .arg(root().join("include"))
        .args(sources)
        .arg("-o")
        .arg(out)
        .args(extra)
        .arg("-L")
        .arg(lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lshadowfd");
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", cc()));
    assert!(
        o.status.success(),
        "compiling {sources:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `exe` with `args`; panics with its output unless it exits 0.
pub fn run_ok(exe: &Path, args: &[&str]) -> Output {
    let o = Command::new(exe)
        .args(args)
        .env_remove("SHADOWFD_MODE")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let text = format!(
        "{} {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        exe.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    eprintln!("{text}");
    o
}

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

/// The modes to test: lazy where this kernel has it (CI requires it with
/// SHADOWFD_REQUIRE_LAZY=1), and eager.
pub fn modes() -> Vec<&'static str> {
    let p = sfd::probe();
    if p.lazy_usable {
        return vec!["lazy", "eager"];
    }
    assert!(
        std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_none_or(|v| v != "1"),
        "SHADOWFD_REQUIRE_LAZY=1 and lazy shadows are unavailable: {:?}",
        p.reason
    );
    eprintln!(
        "NOTE: lazy shadows unavailable here ({}); testing eager only",
        p.reason.as_deref().unwrap_or_default()
    );
    vec!["eager"]
}

/// How long a server may take to listen, or to exit when killed.
const BOUND: Duration = Duration::from_secs(30);

/// `shadowfd serve`, SIGKILLed (and reaped, bounded) when dropped.
pub struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// `shadowfd serve --socket SOCK --root ROOT EXTRA…`, its output in
    /// files next to the socket; returns once it listens.
    pub fn start(root: &Path, sock: &Path, extra: &[&str]) -> Server {
        let log = sock.with_extension("log");
        let child = Command::new(cli_bin())
            .arg("serve")
            .arg("--socket")
            .arg(sock)
            .arg("--root")
            .arg(root)
            .args(extra)
            .env_remove("SHADOWFD_MODE")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(sock.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", cli_bin().display()));
        let mut s = Server { child, log };
        let t = Instant::now();
        while UnixStream::connect(sock).is_err() {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!(
                    "shadowfd serve exited before listening: {st}\n{}",
                    s.output()
                );
            }
            assert!(
                t.elapsed() < BOUND,
                "shadowfd serve did not listen within {BOUND:?}\n{}",
                s.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn output(&self) -> String {
        let err = self.log.with_extension("err");
        format!(
            "server stdout:\n{}\nserver stderr:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let t = Instant::now();
        while t.elapsed() < BOUND {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "shadowfd serve {} did not exit within {BOUND:?}",
            self.child.id()
        );
    }
}
