//! The FUSE reference: an ext4 image holding the bench file (`mkfs.ext4 -d`),
//! mounted read-only by `fuse2fs` in the work directory. The mount is a guard:
//! dropping it (normal exit, error, panic, or the unwind after Ctrl-C)
//! unmounts and reaps the daemon. The daemon runs in its own process group
//! (a terminal Ctrl-C reaches only `shadowfd`, which then cleans up) and gets
//! SIGTERM if `shadowfd` dies without cleaning up (`PR_SET_PDEATHSIG`), which
//! makes it unmount itself.

#[cfg(test)]
use super::data::PREFIX;
use super::data::{owner_pid, pid_alive};
use super::interrupt;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Looks `tool` up in `PATH` and the sbin directories (`mkfs.ext4` lives in
/// `/usr/sbin`, which a non-root `PATH` may lack).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Why the FUSE reference cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if find_tool("fuse2fs").is_none() {
        return Some("fuse2fs not installed (apt-get install fuse2fs)".into());
    }
    if find_tool("mkfs.ext4").is_none() {
        return Some("mkfs.ext4 not installed (apt-get install e2fsprogs)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist (no FUSE in this kernel or container)".into());
    }
    None
}

/// Builds an ext4 image at `image` holding the files of `dir`, big enough
/// for `payload` bytes of them.
pub fn build_image(dir: &Path, image: &Path, payload: u64) -> Result<(), String> {
    let mkfs = find_tool("mkfs.ext4").ok_or("mkfs.ext4 not installed")?;
    // Data plus 10% and 32 MiB for metadata; no journal (read-only use).
    let kib = (payload + payload / 10 + (32 << 20)) / 1024;
    let out = Command::new(&mkfs)
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-L",
            "shadowfd-bench",
            "-d",
        ])
        .arg(dir)
        .arg(image)
        .arg(format!("{kib}k"))
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", mkfs.display()))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 -d {} {} failed ({}): {}",
            dir.display(),
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    File::open(image)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("sync {}: {e}", image.display()))
}

/// One line of `/proc/self/mountinfo`: (mount point, filesystem type).
fn mounts() -> Vec<(PathBuf, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|&x| x == "-")?;
            Some((
                PathBuf::from(unescape(f.get(4)?)),
                f.get(dash + 1)?.to_string(),
            ))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|(m, _)| m == path)
}

/// FUSE mounts left under `root` by bench runs whose process is gone.
fn stale_mounts(root: &Path) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(m, fs)| fs.starts_with("fuse") && stale_dir_of(root, m).is_some())
        .map(|(m, _)| m)
        .collect()
}

/// The work directory under `root` that `path` lies in, if it is one of ours
/// and its process is gone.
fn stale_dir_of(root: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(root).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let pid = owner_pid(first)?;
    (!pid_alive(pid)).then(|| root.join(first))
}

/// Unmounts what earlier bench runs that died (SIGKILL, crash) left under
/// `root`, and removes their work directories. Returns what it did, for the
/// report's notes.
pub fn clean_stale(root: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    for m in stale_mounts(root) {
        let r = umount(&m).or_else(|_| detach(&m));
        notes.push(match r {
            Ok(()) => format!(
                "unmounted a FUSE mount left by an earlier run: {}",
                m.display()
            ),
            Err(e) => format!("could not unmount leftover {}: {e}", m.display()),
        });
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            if pid_alive(pid) || is_mounted_below(&e.path()) {
                continue;
            }
            if std::fs::remove_dir_all(e.path()).is_ok() {
                notes.push(format!(
                    "removed a work directory left by an earlier run: {}",
                    e.path().display()
                ));
            }
        }
    }
    notes
}

fn is_mounted_below(dir: &Path) -> bool {
    mounts().iter().any(|(m, _)| m.starts_with(dir))
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} contains a NUL", p.display()))
}

fn umount(p: &Path) -> Result<(), String> {
    let c = cpath(p)?;
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper of libfuse does it for the owner.
        for tool in ["fusermount3", "fusermount"] {
            if let Some(t) = find_tool(tool) {
                let ok = Command::new(t)
                    .arg("-u")
                    .arg(p)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return Ok(());
                }
            }
        }
    }
    Err(format!("umount {}: {e}", p.display()))
}

fn detach(p: &Path) -> Result<(), String> {
    let c = cpath(p)?;
    // SAFETY: as in `umount`.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "umount -l {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// A running `fuse2fs -f IMAGE MOUNTPOINT -o ro`; unmounted on drop.
pub struct FuseMount {
    mountpoint: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl FuseMount {
    /// Mounts `image` read-only at `mountpoint` (an existing empty
    /// directory) and waits until the mount is live. The daemon's messages
    /// go to `log`.
    pub fn mount(image: &Path, mountpoint: &Path, log: &Path) -> Result<FuseMount, String> {
        let fuse2fs = find_tool("fuse2fs").ok_or("fuse2fs not installed")?;
        let mut cmd = Command::new(&fuse2fs);
        cmd.arg("-f").arg(image).arg(mountpoint).args(["-o", "ro"]);
        FuseMount::spawn(cmd, "fuse2fs", mountpoint, log)
    }

    /// Runs `cmd`, a FUSE daemon in the foreground (`what` names it) that
    /// mounts `mountpoint`, with its messages in `log`; waits (at most 10 s)
    /// until the mount is live. The daemon gets SIGTERM if the bench dies.
    pub fn spawn(
        mut cmd: Command,
        what: &str,
        mountpoint: &Path,
        log: &Path,
    ) -> Result<FuseMount, String> {
        let logf = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {what} ({:?}): {e}", cmd.get_program()))?;
        let mut m = FuseMount {
            mountpoint: mountpoint.to_path_buf(),
            child: Some(child),
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if is_mounted(mountpoint) {
                return Ok(m);
            }
            let exited = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                m.child = None;
                return Err(format!(
                    "{what} exited ({status}) before mounting: {}",
                    m.log_text()
                ));
            }
            // On Ctrl-C, `m` unmounts and reaps on drop.
            interrupt::check()?;
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "{what} did not mount {} within 10 s: {}",
                    mountpoint.display(),
                    m.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn log_text(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let t = t.trim();
        if t.is_empty() {
            "(no output)".into()
        } else {
            t.replace('\n', "; ")
        }
    }

    /// Unmounts and reaps the daemon. Idempotent; [`Drop`] calls it too.
    /// Errors if the mount is still there afterwards.
    pub fn unmount(&mut self) -> Result<(), String> {
        let mut err = None;
        if is_mounted(&self.mountpoint) {
            // Busy right after the last close is possible: retry, then detach.
            let mut r = umount(&self.mountpoint);
            for _ in 0..20 {
                if r.is_ok() || !is_mounted(&self.mountpoint) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
                r = umount(&self.mountpoint);
            }
            if let Err(e) = r {
                if is_mounted(&self.mountpoint) {
                    err = detach(&self.mountpoint).err().or(Some(e));
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let t0 = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if t0.elapsed() < Duration::from_secs(5) => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        if is_mounted(&self.mountpoint) {
            return Err(format!(
                "{} is still mounted{}; unmount it with `umount -l {}`",
                self.mountpoint.display(),
                err.map(|e| format!(" ({e})")).unwrap_or_default(),
                self.mountpoint.display()
            ));
        }
        Ok(())
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("shadowfd: warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape(r"/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape(r"/tmp/x\04"), r"/tmp/x\04");
    }

    #[test]
    fn root_is_mounted_and_a_fresh_dir_is_not() {
        assert!(is_mounted(Path::new("/proc")) || is_mounted(Path::new("/")));
        let d = std::env::temp_dir().join(format!("shadowfd-bench-test-{}", std::process::id()));
        assert!(!is_mounted(&d));
    }

    #[test]
    fn stale_dirs_are_only_those_of_dead_runs() {
        let root = Path::new("/tmp");
        let mine = root.join(format!("{PREFIX}{}-0/mnt", std::process::id()));
        assert_eq!(stale_dir_of(root, &mine), None);
        // PID numbers above pid_max (4194304 at most) never exist.
        let dead = root.join(format!("{PREFIX}99999999-3/mnt"));
        assert_eq!(
            stale_dir_of(root, &dead),
            Some(root.join(format!("{PREFIX}99999999-3")))
        );
        assert_eq!(stale_dir_of(root, Path::new("/var/x")), None);
    }
}
