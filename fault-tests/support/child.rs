//! Consumers in child processes, so that SIGBUS and crashes can be observed.
//!
//! Mappings are `MADV_DONTFORK`, so a plain `fork()` would not share them;
//! instead the test binary re-executes itself, selecting one test
//! (`--exact`) and setting [`ROLE`]. The test sees the variable, plays the
//! child (its own engine, shadow and mapping), writes `@@ key value` report
//! lines to stdout and exits (or dies by a signal). The parent reads the
//! exit status and the reports.

use std::fmt::Display;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Set in a child: which part of the test it plays.
pub const ROLE: &str = "FAULT_CHILD_ROLE";
const PARAM_PREFIX: &str = "FAULT_CHILD_";

/// libtest's name for test `f` in module `module` (from `module_path!()`),
/// which starts with the crate name.
pub fn libtest_name(module: &str, f: &str) -> String {
    let rest = module.split_once("::").map_or("", |(_, r)| r);
    if rest.is_empty() {
        f.to_string()
    } else {
        format!("{rest}::{f}")
    }
}

/// The libtest name of a test function in the calling module.
#[macro_export]
macro_rules! test_name {
    ($f:ident) => {
        $crate::support::child::libtest_name(module_path!(), stringify!($f))
    };
}

/// The role of this process if it was started as a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// A parameter the parent passed to the child.
pub fn param(name: &str) -> String {
    std::env::var(format!("{PARAM_PREFIX}{name}"))
        .unwrap_or_else(|_| panic!("child parameter {name} missing"))
}

/// A parameter the parent may have passed.
pub fn param_opt(name: &str) -> Option<String> {
    std::env::var(format!("{PARAM_PREFIX}{name}")).ok()
}

pub fn param_u64(name: &str) -> u64 {
    param(name)
        .parse()
        .unwrap_or_else(|_| panic!("child parameter {name} is not a number"))
}

/// What a child process did.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Outcome {
    /// The signal that killed the child, if any.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Report lines `@@ key value`, in order.
    pub fn reports(&self) -> Vec<(String, String)> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("@@ "))
            .map(|l| match l.split_once(' ') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect()
    }

    /// Every value reported under `key`.
    pub fn values(&self, key: &str) -> Vec<String> {
        self.reports()
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect()
    }

    /// Every value under `key`, parsed as numbers.
    pub fn numbers(&self, key: &str) -> Vec<u64> {
        self.values(key)
            .iter()
            .map(|v| {
                v.split_whitespace()
                    .next()
                    .and_then(|w| w.parse().ok())
                    .unwrap_or_else(|| panic!("report {key} {v:?} is not a number"))
            })
            .collect()
    }

    pub fn last(&self, key: &str) -> Option<String> {
        self.values(key).pop()
    }

    /// For assertion messages.
    pub fn describe(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        format!(
            "status {:?}{}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.status,
            if self.timed_out { " (TIMED OUT)" } else { "" },
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

/// Runs `cmd` to completion (killing it after `timeout`), capturing output.
pub fn run(mut cmd: Command, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn child process");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break s;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for killed child");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned();
    Outcome {
        status,
        stdout,
        stderr,
        timed_out,
    }
}

/// The command that re-executes this test binary to run test `test` as a
/// child in `role`, with `params` (read back with [`param`]).
pub fn command(test: &str, role: &str, params: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    command_at(&exe, test, role, params)
}

/// [`command`] running `exe`, a copy of this test binary (e.g. one placed
/// where a child of another uid can execute it).
pub fn command_at(
    exe: &std::path::Path,
    test: &str,
    role: &str,
    params: &[(&str, String)],
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args([
        test,
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ])
    .env(ROLE, role);
    for (k, v) in params {
        cmd.env(format!("{PARAM_PREFIX}{k}"), v);
    }
    cmd
}

/// Re-executes this test binary to run test `test` as a child in `role`,
/// with `params` (read back with [`param`]).
pub fn spawn(test: &str, role: &str, params: &[(&str, String)]) -> Outcome {
    spawn_cmd(command(test, role, params), test, role)
}

/// Runs a [`command`] (perhaps changed, e.g. to another uid) like [`spawn`].
pub fn spawn_cmd(cmd: Command, test: &str, role: &str) -> Outcome {
    let o = run(cmd, Duration::from_secs(60));
    assert!(
        !o.timed_out,
        "child {test} [{role}] did not finish in 60 s (deadlock?)\n{}",
        o.describe()
    );
    assert!(
        o.stdout.contains("@@ start"),
        "child {test} [{role}] did not start its role (wrong test name?)\n{}",
        o.describe()
    );
    o
}

// ---- child side ----

/// Writes one report line (flushed at once: the child may die next).
pub fn report(key: &str, value: impl Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@@ {key} {value}");
    let _ = out.flush();
}

/// First thing a child does: no core files, and say it started.
pub fn begin() {
    let lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a live rlimit struct.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &lim);
    }
    report("start", std::process::id());
}

static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);

/// Reports the offset of a SIGBUS inside `map` (`@@ sigbus OFFSET`, or
/// `@@ sigbus-outside ADDR`), then lets the signal kill the process, so the
/// parent sees both where it happened and that it was SIGBUS.
pub fn watch_sigbus(map: &[u8]) {
    BASE.store(map.as_ptr() as usize, Ordering::SeqCst);
    LEN.store(map.len(), Ordering::SeqCst);
    // SAFETY: installs a handler that only uses async-signal-safe calls
    // (write, sigaction) and atomics; the struct is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

fn fmt_dec(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (base, len) = (BASE.load(Ordering::SeqCst), LEN.load(Ordering::SeqCst));
    let mut num = [0u8; 20];
    let parts: [&[u8]; 3] = if addr >= base && addr < base + len {
        [
            b"@@ sigbus ",
            fmt_dec((addr - base) as u64, &mut num),
            b"\n",
        ]
    } else {
        [b"@@ sigbus-outside ", fmt_dec(addr as u64, &mut num), b"\n"]
    };
    // One write(2) for the whole line: lines from threads that take SIGBUS
    // at the same time must not interleave (a pipe write this small is atomic).
    let mut line = [0u8; 64];
    let mut n = 0;
    for p in parts {
        line[n..n + p.len()].copy_from_slice(p);
        n += p.len();
    }
    // SAFETY: write(2) is async-signal-safe; `line[..n]` is a live byte slice.
    unsafe {
        libc::write(1, line.as_ptr().cast(), n);
    }
    // Back to the default action: returning re-executes the access, which
    // faults again and now kills the process with SIGBUS.
    // SAFETY: sigaction is async-signal-safe; the struct is initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Touches page `p` of `map` (first at an inner byte, then all of it) and
/// checks it against content `id`: reports `touch p`, then `good p` or
/// `bad p OFFSET`.
pub fn touch_page(map: &[u8], id: u64, p: u64) {
    let page = shadowfd::page_size() as u64;
    let off = p * page;
    let end = (off + page).min(map.len() as u64);
    report("touch", p);
    let inner = (off + 123).min(end - 1) as usize;
    std::hint::black_box(map[inner]);
    let got = &map[off as usize..end as usize];
    match super::content::first_mismatch(id, off, got) {
        None => report("good", p),
        Some(at) => report("bad", format!("{p} {at}")),
    }
}
