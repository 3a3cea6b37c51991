//! Tools for the attack scenarios (`attack_lazy.rs`): processes that abuse a
//! lazy shadow's memfd from outside the engine, and the means to watch them.
//!
//! - Large contents fast: [`fill_fast`] gives exactly the bytes of
//!   [`super::content::byte_at`], a word at a time, so 256 MiB files are
//!   written and checked in a fraction of a second; [`Check`] verifies a
//!   stream against them and counts zero and wrong bytes.
//! - Finding a shadow from outside: [`memfds_of`] lists the memfds a process
//!   holds (`/proc/PID/fd`, then `/proc/PID/map_files` for ones it only
//!   maps); [`memfd_maps`] lists its memfd mappings from `/proc/PID/maps`.
//! - The attacker programs, run in a separate process: [`attack`].
//! - Processes watched while they run: [`Proc`] (reports read as they come,
//!   every wait bounded, killed when dropped), [`role_command`] to re-execute
//!   this test binary in a role, [`pass_fd`] to hand it a descriptor, and
//!   [`cpu_time`] of any process.

use super::child::{self, Outcome};
use super::content::{byte_at, mix};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---- contents ----

/// The 8 bytes of content word `w` (bytes `8w..8w+8`) as a little-endian
/// u64, for `key = id * K` as in [`byte_at`].
fn content_word(key: u64, w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let h = mix(key ^ w);
    if h.wrapping_sub(ONES) & !h & HIGHS == 0 {
        return h; // no zero byte
    }
    let mut b = h.to_le_bytes();
    for x in &mut b {
        if *x == 0 {
            *x = 0x5A;
        }
    }
    u64::from_le_bytes(b)
}

/// The bytes of content `id` at `off`, as [`super::content::fill`] gives
/// them, computed one 8-byte word at a time (fast enough in debug builds
/// for files of hundreds of MiB).
pub fn fill_fast(id: u64, off: u64, buf: &mut [u8]) {
    let mut i = 0usize;
    while i < buf.len() && (off + i as u64) % 8 != 0 {
        buf[i] = byte_at(id, off + i as u64);
        i += 1;
    }
    let key = id.wrapping_mul(0xA24B_AED4_963E_E407);
    let first_word = (off + i as u64) >> 3;
    let mut words = buf[i..].chunks_exact_mut(8);
    let mut w = first_word;
    for out in &mut words {
        out.copy_from_slice(&content_word(key, w).to_le_bytes());
        w += 1;
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&content_word(key, w).to_le_bytes()[..n]);
}

/// Writes `size` bytes of content `id` to `dir/name` (no zero byte in it).
pub fn write_content(dir: &Path, name: &str, id: u64, size: u64) -> PathBuf {
    // The fast generator must be the suite's content, aligned or not.
    for (off, len) in [(0u64, 4099usize), (12_345, 777)] {
        let mut v = vec![0u8; len];
        fill_fast(id, off, &mut v);
        assert_eq!(v, super::content::bytes(id, off, len), "fill_fast is wrong");
    }
    let path = dir.join(name);
    let mut f = File::create(&path).expect("create test file");
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill_fast(id, off, &mut buf[..n]);
        f.write_all(&buf[..n]).expect("write test file");
        off += n as u64;
    }
    path
}

/// Checks bytes, fed in order from offset `start`, against content `id` of
/// a file of `size` bytes (bytes at or past `size`, in a mapping's last
/// page, must be zero).
pub struct Check {
    id: u64,
    size: u64,
    start: u64,
    pub pos: u64,
    /// Zero bytes where the file has data (the file has no zero byte).
    pub zeros: u64,
    /// Bytes that differ from the file (zeros included).
    pub wrong: u64,
    pub first_wrong: Option<u64>,
    want: Vec<u8>,
}

impl Check {
    pub fn new(id: u64, size: u64, start: u64) -> Check {
        Check {
            id,
            size,
            start,
            pos: start,
            zeros: 0,
            wrong: 0,
            first_wrong: None,
            want: Vec::new(),
        }
    }

    pub fn feed(&mut self, got: &[u8]) {
        self.want.resize(got.len(), 0);
        let data = got.len().min(self.size.saturating_sub(self.pos) as usize);
        fill_fast(self.id, self.pos, &mut self.want[..data]);
        self.want[data..].fill(0);
        if got != &self.want[..] {
            for (i, (&g, &w)) in got.iter().zip(&self.want).enumerate() {
                if g != w {
                    let at = self.pos + i as u64;
                    self.wrong += 1;
                    self.zeros += u64::from(g == 0);
                    self.first_wrong.get_or_insert(at);
                }
            }
        }
        self.pos += got.len() as u64;
    }

    /// Bytes checked.
    pub fn checked(&self) -> u64 {
        self.pos - self.start
    }

    /// `N bytes: Z zero bytes, W wrong bytes (first at X)`.
    pub fn summary(&self) -> String {
        let first = self
            .first_wrong
            .map_or(String::new(), |a| format!(" (first at offset {a})"));
        format!(
            "{} bytes: {} zero bytes, {} wrong bytes{first}",
            self.checked(),
            self.zeros,
            self.wrong
        )
    }
}

// ---- finding a shadow from outside ----

/// A memfd a process holds: a path that opens it anew, and what it is
/// called (`/memfd:NAME (deleted)`).
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub link: String,
}

/// Every memfd process `pid` holds: its descriptors whose link starts with
/// `/memfd:`, then memfds it only maps (`/proc/PID/map_files`, which needs
/// CAP_SYS_ADMIN), each memfd once.
pub fn memfds_of(pid: u32) -> Vec<Found> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for dir in ["fd", "map_files"] {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/{dir}")) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let Ok(link) = std::fs::read_link(&path) else {
                continue;
            };
            let link = link.to_string_lossy().into_owned();
            if !link.starts_with("/memfd:") {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if seen.insert((meta.dev(), meta.ino())) {
                out.push(Found { path, link });
            }
        }
    }
    out
}

/// Waits until the memory the memfds of process `pid` hold (their
/// `st_blocks`) has not changed for `quiet`, so that no fill is in flight;
/// false if that did not happen within `timeout`.
pub fn wait_memfds_quiet(pid: u32, quiet: Duration, timeout: Duration) -> bool {
    let blocks = || -> u64 {
        memfds_of(pid)
            .iter()
            .filter_map(|f| std::fs::metadata(&f.path).ok())
            .map(|m| m.blocks())
            .sum()
    };
    let deadline = Instant::now() + timeout;
    let mut last = blocks();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = blocks();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
    }
    false
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone)]
pub struct MapRange {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// Offset in the file.
    pub offset: u64,
}

/// The mappings of memfds (`/memfd:...`) in process `pid`.
pub fn memfd_maps(pid: u32) -> Vec<MapRange> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(_ino)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.collect::<Vec<_>>().join(" ");
        if !path.starts_with("/memfd:") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).expect("hex in /proc/PID/maps");
        out.push(MapRange {
            start: hex(a),
            end: hex(b),
            perms: perms.to_string(),
            offset: hex(off),
        });
    }
    out
}

/// CPU time (user + system, all threads) process `pid` has used.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": field 3 (state) onwards; utime and stime are
    // fields 14 and 15.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64(ticks as f64 / hz))
}

/// `EPERM`-style name of an errno (the number for others).
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EFAULT => "EFAULT",
        libc::EIO => "EIO",
        libc::EBUSY => "EBUSY",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENODEV => "ENODEV",
        libc::ESRCH => "ESRCH",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn last_errno() -> String {
    errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

// ---- the attacker programs ----

/// What an attacker does to every memfd it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Reopen `O_RDWR`, `fallocate(fd, 0, 0, size)`.
    Fallocate,
    /// Reopen read-only, map `PROT_READ` `MAP_SHARED` (unregistered) and
    /// read a byte of every page.
    MapTouch,
    /// Reopen `O_RDWR`, then try `pwrite`, a writable `MAP_SHARED` mapping
    /// (writing a byte through it if allowed) and `FALLOC_FL_PUNCH_HOLE`.
    Writes,
}

impl Attack {
    pub fn name(self) -> &'static str {
        match self {
            Attack::Fallocate => "fallocate",
            Attack::MapTouch => "map-touch",
            Attack::Writes => "writes",
        }
    }

    pub fn parse(s: &str) -> Attack {
        match s {
            "fallocate" => Attack::Fallocate,
            "map-touch" => Attack::MapTouch,
            "writes" => Attack::Writes,
            _ => panic!("unknown attack {s:?}"),
        }
    }
}

fn open(path: &Path, write: bool) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| errno_name(e.raw_os_error().unwrap_or(0)))
}

/// Reports `@@ KEY ok` or `@@ KEY refused ERRNO` for a libc result.
fn outcome(key: &str, r: libc::c_long) -> bool {
    if r < 0 {
        child::report(key, format!("refused {}", last_errno()));
        false
    } else {
        child::report(key, "ok");
        true
    }
}

/// Does `how` to the memfd at `path` (size from `fstat`), reporting each
/// step as `@@ KEY ok` / `@@ KEY refused ERRNO`: `open-rdwr`/`open-rdonly`,
/// then `fallocate`; `mmap-read`, `touched PAGES`, `zero-pages-seen N`;
/// `pwrite`, `mmap-write` (`wrote-through-mmap OFFSET` if allowed),
/// `punch-hole`.
pub fn attack_memfd(path: &Path, how: Attack) {
    let write = how != Attack::MapTouch;
    let key = if write { "open-rdwr" } else { "open-rdonly" };
    let f = match open(path, write) {
        Ok(f) => {
            child::report(key, "ok");
            f
        }
        Err(e) => return child::report(key, format!("refused {e}")),
    };
    let fd = f.as_raw_fd();
    let size = f.metadata().expect("fstat memfd").len();
    child::report("size", size);
    let page = super::page();
    match how {
        Attack::Fallocate => {
            // SAFETY: fallocate on a descriptor we own; no memory involved.
            let r = unsafe { libc::fallocate(fd, 0, 0, size as libc::off_t) };
            outcome("fallocate", r.into());
        }
        Attack::MapTouch => {
            let len = size.div_ceil(page) * page;
            // SAFETY: a fresh read-only shared mapping chosen by the kernel;
            // read below within `len` bytes, then unmapped.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return child::report("mmap-read", format!("refused {}", last_errno()));
            }
            child::report("mmap-read", "ok");
            let mut zero_pages = 0u64;
            let mut touched = 0u64;
            let mut off = 0;
            while off < size {
                // SAFETY: `off < size <= len`: inside the mapping made above.
                let b = unsafe { std::ptr::read_volatile((p as *const u8).add(off as usize)) };
                zero_pages += u64::from(b == 0);
                touched += 1;
                off += page;
            }
            // SAFETY: exactly the mapping made above; nothing refers to it now.
            unsafe { libc::munmap(p, len as usize) };
            child::report("touched", touched);
            child::report("zero-pages-seen", zero_pages);
        }
        Attack::Writes => {
            let mid = size / 2 / page * page;
            let zeros = vec![0u8; page as usize];
            // SAFETY: pwrite reads `page` bytes from a live buffer.
            let r =
                unsafe { libc::pwrite(fd, zeros.as_ptr().cast(), zeros.len(), mid as libc::off_t) };
            outcome("pwrite", r as libc::c_long);
            let len = size.div_ceil(page) * page;
            // SAFETY: asks for a fresh writable shared mapping chosen by the
            // kernel; written only within it and unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                child::report("mmap-write", format!("refused {}", last_errno()));
            } else {
                child::report("mmap-write", "ok");
                let at = (mid + page).min(len - 1);
                // SAFETY: `at < len`: inside the writable mapping made above.
                unsafe { std::ptr::write_volatile((p as *mut u8).add(at as usize), 0) };
                child::report("wrote-through-mmap", at);
                // SAFETY: exactly the mapping made above.
                unsafe { libc::munmap(p, len as usize) };
            }
            // SAFETY: fallocate on a descriptor we own; no memory involved.
            let r = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    size as libc::off_t,
                )
            };
            outcome("punch-hole", r.into());
        }
    }
}

/// The attacker process: finds every memfd of process `pid` and attacks
/// each (`@@ memfd PATH LINK` first, then [`attack_memfd`]'s reports).
/// Reports `@@ memfds 0` if it found none.
pub fn attack(pid: u32, how: Attack) {
    let found = memfds_of(pid);
    child::report("memfds", found.len());
    for f in found {
        child::report("memfd", format!("{} {}", f.path.display(), f.link));
        attack_memfd(&f.path, how);
    }
    child::report("attacked", how.name());
}

// ---- processes ----

/// Like [`child::param`]'s names: the variable a parameter travels in.
const PARAM_PREFIX: &str = "FAULT_CHILD_";

/// This test binary re-executed to run test `test` in `role` (see
/// [`child`]), with `params` for [`child::param`].
pub fn role_command(test: &str, role: &str, params: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        test,
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ])
    .env(child::ROLE, role);
    for (k, v) in params {
        cmd.env(format!("{PARAM_PREFIX}{k}"), v);
    }
    cmd
}

/// Lets `cmd`'s process inherit `fd` under the same number (the caller
/// closes its own copy once the process is spawned).
pub fn pass_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the hook runs in the forked child before exec and only clears
    // FD_CLOEXEC on one descriptor, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A process watched while it runs: stdout (unless taken) and stderr are
/// collected by threads, reports can be awaited with a bound, stdin is a
/// pipe (closed by [`Proc::finish`]), and it is killed if still running
/// when dropped.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<parking_lot::Mutex<Vec<u8>>>,
    stderr: Arc<parking_lot::Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
}

fn collect(
    mut r: impl Read + Send + 'static,
    into: Arc<parking_lot::Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into.lock().extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl Proc {
    /// Spawns `cmd`. With `keep_stdout` the caller takes stdout with
    /// [`Proc::take_stdout`]; otherwise it is collected.
    pub fn spawn(what: &str, mut cmd: Command, keep_stdout: bool) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdout = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stderr = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut threads = vec![collect(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
        )];
        if !keep_stdout {
            threads.push(collect(
                child.stdout.take().expect("piped stdout"),
                stdout.clone(),
            ));
        }
        Proc {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            threads,
        }
    }

    pub fn take_stdout(&mut self) -> ChildStdout {
        self.child
            .stdout
            .take()
            .expect("stdout kept for the caller")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Every value reported so far under `key` (`@@ KEY value`).
    pub fn values(&self, key: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.stdout.lock()).into_owned();
        text.lines()
            .filter_map(|l| l.strip_prefix("@@ "))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ').unwrap_or((l, ""));
                (k == key).then(|| v.to_string())
            })
            .collect()
    }

    /// The value of the first `@@ KEY value` report, waiting at most
    /// `timeout` (`None` on timeout or if the process exits without it).
    pub fn wait_report(&mut self, key: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = !self.is_running();
            if let Some(v) = self.values(key).into_iter().next() {
                return Some(v);
            }
            if exited || Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes stdin, waits at most `timeout` for the exit (then kills), and
    /// returns what it did.
    pub fn finish(&mut self, timeout: Duration) -> Outcome {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for child") {
                break s;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().expect("wait for killed child");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Outcome {
            status,
            stdout: String::from_utf8_lossy(&self.stdout.lock()).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr.lock()).into_owned(),
            timed_out,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
