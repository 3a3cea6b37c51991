//! Scenario 16: another process writes into an eager shadow's memfd while
//! it is being copied (issue 10).
//!
//! The memfd can only be sealed once the copy is done, so during the copy it
//! is writable, and a process allowed into `/proc/PID/fd` can reopen it
//! `O_RDWR`. Promises:
//! - whatever such a process does (writes `PWNED!!!` behind and ahead of the
//!   copy, `fallocate`s it, maps it shared, truncates or grows it, seals it
//!   itself), the result is either the source's exact bytes or a clear
//!   refusal naming the tampering, never wrong bytes;
//! - a reader (a read-only shared mapping from an `O_RDONLY` open) is not
//!   mistaken for a writer;
//! - the CLI makes itself non-dumpable: an attacker of the same (non-root)
//!   uid gets `EACCES` on `/proc/PID/fd/N` while the CLI holds the memfd.
//!
//! The CLI scenarios run a real attacker process (this binary re-executed in
//! a role) against `shadowfd cat --mode eager` of a 300 MiB file. As root the
//! attacker is not stopped by non-dumpability, so those scenarios exercise
//! the verification after sealing; the library scenarios make the same
//! attacks deterministic by running them from inside a source read.

use crate::support::child::{self, param, param_u64};
use crate::support::*;
use crate::test_name;
use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, FcntlArg, SealFlag, fallocate, fcntl};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use shadowfd::{Engine, Error, Share, Source};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ID: u64 = 0xA77;
/// The CLI attack file: a few hundred MiB, so the copy takes long enough
/// for the attacker to get in.
const BIG: u64 = 300 << 20;
/// Attacks per CLI scenario.
const RUNS: usize = 4;
const PWNED: &[u8] = b"PWNED!!!";
/// The uid and gid of the unprivileged scenario (`nobody`).
const NOBODY: u32 = 65534;
/// What every refusal says.
const REFUSED: &str = "was tampered with by another process";

// ---------------------------------------------------------------------------
// Shared helpers.

/// `(fd number, link)` of the first descriptor of `pid` that is a memfd
/// whose name contains `needle`.
fn find_memfd(pid: u32, needle: &str) -> Option<(u32, String)> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for e in rd.flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        if link.starts_with("/memfd:shadowfd:") && link.contains(needle) {
            let n = e.file_name().to_string_lossy().parse().ok()?;
            return Some((n, link));
        }
    }
    None
}

/// The memfd's seals, as a number (0: none yet).
fn seals(f: &File) -> i32 {
    fcntl(f.as_fd(), FcntlArg::F_GET_SEALS).unwrap_or(-1)
}

fn has_write_seal(seals: i32) -> bool {
    seals >= 0 && seals & libc::F_SEAL_WRITE != 0
}

/// A shared read-only mapping, unmapped on drop.
struct SharedMap {
    addr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is only read (volatile byte reads) and unmapped once;
// nothing in it is tied to the thread that made it.
unsafe impl Send for SharedMap {}

impl SharedMap {
    fn new(f: &File, len: u64) -> nix::Result<SharedMap> {
        let len = len as usize;
        let nz = NonZeroUsize::new(len).expect("a non-empty memfd");
        // SAFETY: a fresh mapping placed by the kernel, read-only; it is only
        // touched through `touch` and unmapped in `drop`.
        let addr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                f.as_fd(),
                0,
            )
        }?;
        Ok(SharedMap { addr, len })
    }

    /// Reads one byte of every MiB (faults the pages in, as a reader would).
    fn touch(&self) {
        for off in (0..self.len).step_by(1 << 20) {
            // SAFETY: `off < len`, inside the live read-only mapping.
            let b = unsafe { std::ptr::read_volatile(self.addr.as_ptr().cast::<u8>().add(off)) };
            std::hint::black_box(b);
        }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, unmapped once.
        let _ = unsafe { munmap(self.addr, self.len) };
    }
}

/// The first offset where the file at `got` differs from the one at `want`
/// (including a difference in length).
fn first_difference(got: &Path, want: &Path) -> Option<u64> {
    let (mut a, mut b) = (File::open(got).unwrap(), File::open(want).unwrap());
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = read_fill(&mut a, &mut x);
        let m = read_fill(&mut b, &mut y);
        if let Some(i) = x[..n.min(m)].iter().zip(&y[..m]).position(|(p, q)| p != q) {
            return Some(off + i as u64);
        }
        if n != m {
            return Some(off + n.min(m) as u64);
        }
        if n == 0 {
            return None;
        }
        off += n as u64;
    }
}

fn read_fill(f: &mut File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]).unwrap() {
            0 => break,
            k => done += k,
        }
    }
    done
}

// ---------------------------------------------------------------------------
// The root attacker against the CLI.

/// What one attack on `shadowfd cat` came to.
struct Attack {
    /// The CLI's exit code.
    code: Option<i32>,
    stderr: String,
    /// `None`: the output is exactly the source.
    mismatch: Option<u64>,
    attacker: child::Outcome,
}

impl Attack {
    /// The attacker opened the memfd before it was sealed.
    fn got_in_early(&self) -> bool {
        self.attacker
            .values("opened")
            .first()
            .is_some_and(|s| s.parse::<i32>() == Ok(0))
    }

    fn describe(&self) -> String {
        format!(
            "cli exit {:?}, output mismatch at {:?}\n--- cli stderr ---\n{}\n--- attacker ---\n{}",
            self.code,
            self.mismatch,
            self.stderr.trim_end(),
            self.attacker.describe()
        )
    }

    /// The promise: exact bytes and exit 0, or a non-zero exit that names
    /// the tampering (and no panic).
    fn assert_exact_or_refused(&self, case: &str) {
        match self.code {
            Some(0) => assert_eq!(
                self.mismatch,
                None,
                "{case}: exit 0 with wrong bytes\n{}",
                self.describe()
            ),
            Some(1) => {
                for want in [REFUSED, "refused", "harden_process"] {
                    assert!(
                        self.stderr.contains(want),
                        "{case}: a failure that does not name the tampering ({want:?})\n{}",
                        self.describe()
                    );
                }
                assert!(
                    !self.stderr.contains("panicked"),
                    "{case}\n{}",
                    self.describe()
                );
            }
            _ => panic!("{case}: unexpected exit\n{}", self.describe()),
        }
    }
}

/// Runs `shadowfd cat --mode eager` of `path` while the attacker does `how`.
fn attack(test: &str, how: &str, path: &Path, out: &Path) -> Attack {
    let mut cmd = cli(&[
        "cat",
        "--mode",
        "eager",
        "--max-size",
        "1G",
        path.to_str().unwrap(),
    ]);
    cmd.stdin(Stdio::null())
        .stdout(File::create(out).unwrap())
        .stderr(Stdio::piped());
    let target = cmd.spawn().expect("spawn shadowfd cat");
    let attacker = child::spawn(
        test,
        "attacker",
        &[
            ("PID", target.id().to_string()),
            ("NEEDLE", path.display().to_string()),
            ("HOW", how.to_string()),
            ("SIZE", BIG.to_string()),
        ],
    );
    let o = target.wait_with_output().expect("wait for shadowfd cat");
    Attack {
        code: o.status.code(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        mismatch: first_difference(out, path),
        attacker,
    }
}

/// Whether the memfd is still in the target's descriptor table.
fn target_holds(pid: u32, needle: &str) -> bool {
    find_memfd(pid, needle).is_some()
}

/// The attacker: finds the memfd in `/proc/PID/fd` and attacks it.
/// Reports `opened SEALS` (the seals when it got in), then per attack what
/// happened, then `end`.
fn attacker_child() {
    child::begin();
    let pid = param_u64("PID") as u32;
    let needle = param("NEEDLE");
    let how = param("HOW");
    let size = param_u64("SIZE");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (n, link) = loop {
        if let Some(found) = find_memfd(pid, &needle) {
            break found;
        }
        if Instant::now() > deadline || !Path::new(&format!("/proc/{pid}/fd")).exists() {
            child::report("end", "the memfd was never seen");
            return;
        }
        std::thread::yield_now();
    };
    child::report("link", &link);
    let writable = how != "map-readonly";
    let f = match OpenOptions::new()
        .read(true)
        .write(writable)
        .open(format!("/proc/{pid}/fd/{n}"))
    {
        Ok(f) => f,
        Err(e) => {
            child::report("open-failed", e);
            child::report("end", "could not open");
            return;
        }
    };
    child::report("opened", seals(&f));
    match how.as_str() {
        "write" => {
            // PWNED!!! at 0 (behind the copy at once) and across the file,
            // over and over, until the seal stops it.
            let mut wrote = 0u64;
            let mut k = 0u64;
            let why = loop {
                let spread = (k.wrapping_mul(4_194_301) + 4096) % (size - PWNED.len() as u64);
                let r = f
                    .write_all_at(PWNED, 0)
                    .and_then(|()| f.write_all_at(PWNED, spread));
                match r {
                    Ok(()) => wrote += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => break "sealed".to_string(),
                    Err(e) => break format!("error {e}"),
                }
                k += 1;
                if k % 256 == 0 && (!target_holds(pid, &needle) || Instant::now() > deadline) {
                    break "target let go".to_string();
                }
            };
            child::report("wrote", wrote);
            child::report("stopped", why);
        }
        "fallocate-map" | "map-readonly" => {
            // An unregistered shared read mapping (first: it is what may
            // block the seal), then fallocate over the whole size.
            let map = match SharedMap::new(&f, size) {
                Ok(m) => {
                    child::report("seals-after-map", seals(&f));
                    Some(m)
                }
                Err(e) => {
                    child::report("map-failed", e);
                    None
                }
            };
            if writable {
                match fallocate(f.as_fd(), FallocateFlags::empty(), 0, size as libc::off_t) {
                    Ok(()) => child::report("fallocate", "ok"),
                    Err(e) => child::report("fallocate", e),
                }
            }
            // Hold the mapping, reading through it, until the target drops
            // the memfd (it exits, or refused the copy).
            while target_holds(pid, &needle) && Instant::now() < deadline {
                if let Some(m) = &map {
                    m.touch();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            drop(map);
        }
        other => panic!("unknown attack {other}"),
    }
    child::report("end", "done");
}

fn big_file(dir: &Path) -> PathBuf {
    write_file(dir, "src", ID, BIG)
}

#[test]
fn a_root_attacker_writing_into_the_memfd_gets_refused_or_changes_nothing() {
    if child::role().is_some() {
        return attacker_child();
    }
    let test = test_name!(a_root_attacker_writing_into_the_memfd_gets_refused_or_changes_nothing);
    bounded("root attacker writes", move || {
        let dir = tempdir();
        let path = big_file(dir.path());
        let (mut wrote_early, mut refused) = (0, 0);
        for i in 0..RUNS {
            let a = attack(&test, "write", &path, &dir.path().join(format!("out{i}")));
            let case = format!("write attack {i}");
            a.assert_exact_or_refused(&case);
            let wrote = a.attacker.numbers("wrote").first().copied().unwrap_or(0);
            if a.got_in_early() && wrote > 0 {
                wrote_early += 1;
            }
            if a.code == Some(1) {
                refused += 1;
                assert!(
                    a.stderr.contains("differ from those read from the source"),
                    "{case}: refused for another reason\n{}",
                    a.describe()
                );
            }
            eprintln!(
                "{case}: exit {:?}, attacker wrote PWNED!!! {wrote} times, stopped: {:?}",
                a.code,
                a.attacker.last("stopped")
            );
        }
        // Not vacuous: the attacker did get in and write before the seal.
        assert!(
            wrote_early > 0,
            "in {RUNS} runs the attacker never wrote into the memfd before it was sealed"
        );
        eprintln!("{wrote_early}/{RUNS} runs written into before the seal, {refused} refused");
    });
}

#[test]
fn a_root_attacker_mapping_and_fallocating_the_memfd_gets_refused_or_changes_nothing() {
    if child::role().is_some() {
        return attacker_child();
    }
    let test = test_name!(
        a_root_attacker_mapping_and_fallocating_the_memfd_gets_refused_or_changes_nothing
    );
    bounded("root attacker maps", move || {
        let dir = tempdir();
        let path = big_file(dir.path());
        let mut early = 0;
        for i in 0..RUNS {
            let a = attack(
                &test,
                "fallocate-map",
                &path,
                &dir.path().join(format!("out{i}")),
            );
            let case = format!("fallocate + shared mapping {i}");
            a.assert_exact_or_refused(&case);
            let mapped = a.attacker.values("seals-after-map");
            // Mapped (from an O_RDWR open) before F_SEAL_WRITE and held: the
            // seal cannot be applied, and the CLI must say why.
            if let Some(s) = mapped.first() {
                if !has_write_seal(s.parse().unwrap()) {
                    early += 1;
                    assert_eq!(a.code, Some(1), "{case}\n{}", a.describe());
                    assert!(a.stderr.contains("EBUSY"), "{case}\n{}", a.describe());
                }
            }
            eprintln!(
                "{case}: exit {:?}, seals when mapped {:?}, fallocate {:?}",
                a.code,
                mapped,
                a.attacker.last("fallocate")
            );
        }
        assert!(
            early > 0,
            "in {RUNS} runs the attacker never mapped the memfd before it was sealed"
        );
    });
}

#[test]
fn a_reader_mapping_the_memfd_is_not_taken_for_a_writer() {
    if child::role().is_some() {
        return attacker_child();
    }
    let test = test_name!(a_reader_mapping_the_memfd_is_not_taken_for_a_writer);
    bounded("root reader maps", move || {
        let dir = tempdir();
        let path = big_file(dir.path());
        let mut early = 0;
        for i in 0..RUNS {
            let a = attack(
                &test,
                "map-readonly",
                &path,
                &dir.path().join(format!("out{i}")),
            );
            let case = format!("read-only shared mapping {i}");
            assert_eq!(a.code, Some(0), "{case}\n{}", a.describe());
            assert_eq!(a.mismatch, None, "{case}\n{}", a.describe());
            if a.got_in_early() && !a.attacker.values("seals-after-map").is_empty() {
                early += 1;
            }
        }
        assert!(early > 0, "the reader never got in before the seal");
    });
}

// ---------------------------------------------------------------------------
// The same uid, not root: non-dumpable keeps it out.

/// The unprivileged attacker: tries the target's memfd and `/proc/PID/mem`,
/// and a dumpable control process of the same uid.
fn unprivileged_child() {
    child::begin();
    let pid = param_u64("PID") as i32;
    let n = param_u64("FD");
    let control = param_u64("CONTROL");
    let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or("?");
    child::report("uid", uid.split_whitespace().next().unwrap_or("?"));
    child::report("alive-before", alive());
    let errno = |r: std::io::Result<File>| match r {
        Ok(_) => "opened".to_string(),
        Err(e) => format!("{:?}", Errno::from_raw(e.raw_os_error().unwrap_or(0))),
    };
    let fd_path = format!("/proc/{pid}/fd/{n}");
    let rdwr = OpenOptions::new().read(true).write(true).open(&fd_path);
    child::report("open-rdwr", errno(rdwr));
    child::report("open-rdonly", errno(File::open(&fd_path)));
    child::report("open-mem", errno(File::open(format!("/proc/{pid}/mem"))));
    child::report(
        "list-fds",
        match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(_) => "listed".to_string(),
            Err(e) => format!("{:?}", Errno::from_raw(e.raw_os_error().unwrap_or(0))),
        },
    );
    child::report(
        "control",
        errno(File::open(format!("/proc/{control}/fd/0"))),
    );
    child::report("alive-after", alive());
}

/// A path to `exe` inside `dir` (0755), so another uid can run it: a hard
/// link, or a copy where `dir` is on another filesystem. A fresh copy can
/// fail to run with ETXTBSY while a child forked by another test thread still
/// holds the descriptor it was written through; runs `exe probe` until that
/// is over (the count of writers can only go down), so later runs cannot.
fn runnable_by_all(exe: &Path, dir: &Path, probe: &str) -> PathBuf {
    let to = dir.join(exe.file_name().unwrap());
    if std::fs::hard_link(exe, &to).is_err() {
        std::fs::copy(exe, &to).expect("copy an executable");
    }
    chmod(&to, 0o755);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Command::new(&to).arg(probe).output() {
            Ok(_) => return to,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("running {}: {e}", to.display()),
        }
    }
}

/// Sets the mode of a root-owned path (made readable by `nobody`).
fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_same_uid_attacker_cannot_open_the_memfd_of_the_hardened_cli() {
    if child::role().is_some() {
        return unprivileged_child();
    }
    let test = test_name!(a_same_uid_attacker_cannot_open_the_memfd_of_the_hardened_cli);
    bounded("same-uid attacker", move || {
        let dir = tempdir();
        chmod(dir.path(), 0o755);
        let path = write_file(dir.path(), "src", ID + 1, 64 << 20);
        chmod(&path, 0o644);
        // Copies of the CLI and of this test binary that nobody may run (the
        // build directory may be under a home only root can enter).
        let cli_exe = runnable_by_all(
            env!("CARGO_BIN_EXE_shadowfd").as_ref(),
            dir.path(),
            "--version",
        );
        let test_exe = runnable_by_all(&std::env::current_exe().unwrap(), dir.path(), "--list");

        // A dumpable process of the same uid: the control, which the
        // attacker must be able to get into.
        let mut control = Command::new("sleep")
            .arg("120")
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep as nobody");

        // The target: `cat` as nobody, its stdout a pipe nobody reads yet,
        // so it stays alive (blocked in write) holding its sealed memfd.
        let mut target = Command::new(&cli_exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SHADOWFD_") {
                target.env_remove(k);
            }
        }
        let mut target = target
            .args(["cat", "--mode", "eager", path.to_str().unwrap()])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shadowfd cat as nobody");
        let pid = target.id();
        let needle = path.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (n, link) = loop {
            if let Some(found) = find_memfd(pid, &needle) {
                break found;
            }
            if let Some(st) = target.try_wait().unwrap() {
                panic!("shadowfd cat exited ({st}) before its memfd was seen");
            }
            assert!(Instant::now() < deadline, "no memfd in /proc/{pid}/fd");
            std::thread::yield_now();
        };
        // Non-dumpable: the kernel makes its /proc files root's.
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(format!("/proc/{pid}/fd")).unwrap().uid();
        assert_eq!(owner, 0, "/proc/{pid}/fd of the hardened cat is not root's");

        let mut cmd = child::command_at(
            &test_exe,
            &test,
            "unprivileged",
            &[
                ("PID", pid.to_string()),
                ("FD", n.to_string()),
                ("CONTROL", control.id().to_string()),
            ],
        );
        cmd.uid(NOBODY).gid(NOBODY);
        let o = child::spawn_cmd(cmd, &test, "unprivileged");
        // The target held the memfd all along (root can still look).
        let still = std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
            .map(|l| l.to_string_lossy().into_owned());
        assert_eq!(
            still.as_deref().ok(),
            Some(link.as_str()),
            "the target let go of its memfd during the attempt"
        );

        let want = |k: &str, v: &str| {
            assert_eq!(o.last(k).as_deref(), Some(v), "{k}\n{}", o.describe());
        };
        want("uid", &NOBODY.to_string());
        want("alive-before", "true");
        want("control", "opened");
        want("open-rdwr", "EACCES");
        want("open-rdonly", "EACCES");
        want("open-mem", "EACCES");
        want("list-fds", "EACCES");
        want("alive-after", "true");

        // And cat still delivers the exact bytes.
        let mut out = Vec::new();
        target.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let status = target.wait().unwrap();
        let mut err = String::new();
        target
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "cat as nobody: {status}\n{err}");
        assert_eq!(out.len() as u64, 64 << 20, "cat output length");
        assert_bytes(&out, ID + 1, 0, "cat as nobody");
        let _ = control.kill();
        let _ = control.wait();
    });
}

// ---------------------------------------------------------------------------
// The library, deterministically: the attack runs inside a source read.

/// Size of the library scenarios' file: 4 copy blocks and a bit.
const LIB_SIZE: u64 = (4 << 20) + 100;
const MIB: u64 = 1 << 20;

/// Opens an eager shadow of a fresh file whose source, just before the copy
/// reads offset `at`, finds the memfd being copied in `/proc/self/fd`, opens
/// it read-write and hands it to `attack`.
fn open_attacked(
    name: &str,
    at: u64,
    attack: impl Fn(File) + Send + Sync + 'static,
) -> (shadowfd::Result<shadowfd::Shadow>, tempfile::TempDir) {
    let dir = tempdir();
    let path = write_file(dir.path(), name, ID + 2, LIB_SIZE);
    let needle = Arc::new(std::sync::OnceLock::<String>::new());
    let n2 = needle.clone();
    let hook = Arc::new(move || {
        let me = std::process::id();
        let (n, _) =
            find_memfd(me, n2.get().expect("needle set")).expect("the memfd in /proc/self/fd");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{n}"))
            .expect("reopen the memfd O_RDWR");
        attack(f);
    });
    let src = Injected::open(
        &path,
        Plan {
            hook: Some((at, hook)),
            ..Plan::default()
        },
    );
    needle.set(format!("shadowfd:{}", src.name())).unwrap();
    let engine = Engine::new(eager_config()).unwrap();
    (engine.open(src), dir)
}

fn assert_tampered(r: shadowfd::Result<shadowfd::Shadow>, offset: Option<u64>, says: &str) {
    let err = r.expect_err("a tampered copy was accepted");
    assert!(
        matches!(&err, Error::Tampered { offset: o, .. } if *o == offset),
        "want Tampered at {offset:?}: {err:?}"
    );
    let msg = err.to_string();
    for want in [REFUSED, "refused", "harden_process", "separate uid", says] {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
}

#[test]
fn library_refuses_bytes_written_behind_the_copy() {
    // Block 0 is copied; PWNED!!! lands on it (and ahead, where the copy
    // will overwrite it): the block is named.
    let (r, _d) = open_attacked("behind", 2 * MIB, |f| {
        f.write_all_at(PWNED, 0).unwrap();
        f.write_all_at(PWNED, 3 * MIB + 5).unwrap();
    });
    assert_tampered(r, Some(0), "first in the block at bytes 0..1048576");
    // A write into the middle of an already-copied block.
    let (r, _d) = open_attacked("middle", 3 * MIB, |f| {
        f.write_all_at(PWNED, MIB + 777).unwrap();
    });
    assert_tampered(r, Some(MIB), "1048576..2097152");
}

#[test]
fn library_accepts_bytes_written_ahead_of_the_copy_and_overwritten() {
    // Only bytes the copy writes afterwards: nothing is left of them, the
    // copy is exact and must not be refused.
    let (r, _d) = open_attacked("ahead", MIB, |f| {
        f.write_all_at(PWNED, 2 * MIB).unwrap();
        f.write_all_at(PWNED, LIB_SIZE - 8).unwrap();
    });
    let s = r.expect("an exact copy was refused");
    let map = s.map(Share::Private).unwrap();
    assert_bytes(&map, ID + 2, 0, "copy after writes ahead of it");
}

#[test]
fn library_refuses_a_memfd_mapped_writable_over_the_seal() {
    // A shared mapping from an O_RDWR open, held past the seal: F_SEAL_WRITE
    // fails with EBUSY, which is a refusal, not a panic or a plain error.
    let held: Arc<parking_lot::Mutex<Option<SharedMap>>> = Arc::default();
    let h2 = held.clone();
    let (r, _d) = open_attacked("mapped", MIB, move |f| {
        let m = SharedMap::new(&f, LIB_SIZE).expect("map the memfd");
        *h2.lock() = Some(m);
    });
    assert!(held.lock().is_some(), "the hook did not run");
    assert_tampered(r, None, "EBUSY");
    held.lock().take();
}

#[test]
fn library_refuses_a_memfd_resized_punched_or_sealed_by_someone_else() {
    // Grown: it is longer than what was copied (F_SEAL_GROW came too late).
    let (r, _d) = open_attacked("grown", MIB, |f| f.set_len(LIB_SIZE + 4096).unwrap());
    assert_tampered(r, Some(LIB_SIZE), "bytes long, not the");
    // Shrunk behind the copy: later writes extend it again over a hole of
    // zeros where block 1 was.
    let (r, _d) = open_attacked("shrunk", 2 * MIB, |f| f.set_len(MIB).unwrap());
    assert_tampered(r, Some(MIB), "differ from those read from the source");
    // A hole punched into a copied block reads as zeros.
    let (r, _d) = open_attacked("punched", 2 * MIB, |f| {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(f.as_fd(), mode, 0, 4096).unwrap();
    });
    assert_tampered(r, Some(0), "differ from those read from the source");
    // Write-sealed by the attacker: the copy's next write fails with EPERM.
    let (r, _d) = open_attacked("sealed", MIB, |f| {
        fcntl(f.as_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).unwrap();
    });
    assert_tampered(r, None, "EPERM");
    // F_SEAL_SEAL by the attacker: the copy's own seals cannot be added.
    let (r, _d) = open_attacked("seal-sealed", MIB, |f| {
        fcntl(f.as_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SEAL)).unwrap();
    });
    assert_tampered(r, None, "EPERM");
}

#[test]
fn library_harden_process_makes_this_process_non_dumpable() {
    // In a child (it changes the whole process): dumpable before, not after,
    // and the process still reaches its own /proc/self/fd.
    if child::role().is_some() {
        child::begin();
        child::report("before", nix::sys::prctl::get_dumpable().unwrap());
        shadowfd::harden_process().unwrap();
        child::report("after", nix::sys::prctl::get_dumpable().unwrap());
        let f = File::open("/proc/self/exe").unwrap();
        let own = File::open(format!("/proc/self/fd/{}", f.as_raw_fd()));
        child::report("own-fd", own.is_ok());
        return;
    }
    let o = child::spawn(
        &test_name!(library_harden_process_makes_this_process_non_dumpable),
        "harden",
        &[],
    );
    assert!(o.status.success(), "{}", o.describe());
    assert_eq!(
        o.last("before").as_deref(),
        Some("true"),
        "{}",
        o.describe()
    );
    assert_eq!(
        o.last("after").as_deref(),
        Some("false"),
        "{}",
        o.describe()
    );
    assert_eq!(
        o.last("own-fd").as_deref(),
        Some("true"),
        "{}",
        o.describe()
    );
}
