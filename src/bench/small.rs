//! `shadowfd bench --small-files N`: many small files, side by side in
//! one run. A directory of N small files (1 to 4 KiB, no zero byte) is
//! archived with `tar -cf - .` into a pipe this process drains and counts:
//! natively (the host directory), through a `fuse2fs` mount of an ext4
//! image of it, and through `shadowfd run --image` of the same image. Every
//! reader's archive must be the same size. See docs/benchmarks.md.

use super::data::Workdir;
use super::fuse;
use super::interrupt;
use super::report::median;
use crate::CliResult;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Where the run mode mounts the image (must not exist on the host).
const PREFIX: &str = "/shadowfd-bench-small";

/// One reader, timed.
struct Timed {
    secs: f64,
    bytes: u64,
}

/// Runs `c` (whose standard output is a tar archive), drains its output and
/// times it from spawn to exit.
fn time_tar(mut c: Command) -> Result<Timed, String> {
    interrupt::check()?;
    let t0 = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {c:?}: {e}"))?;
    // Drained on its own thread: a reader that fails on many files fills
    // the pipe and would block on it while this one waits for stdout.
    let mut err = child.stderr.take().expect("piped");
    let errs = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the archive of {c:?}: {e}")),
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {c:?}: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let stderr = errs.join().unwrap_or_default();
    if !status.success() {
        let text = String::from_utf8_lossy(&stderr);
        let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join("\n");
        return Err(format!("{c:?} failed ({status}); its last lines:\n{tail}"));
    }
    Ok(Timed { secs, bytes })
}

fn tar_in(dir: &Path) -> Command {
    let mut c = Command::new("tar");
    c.arg("-C").arg(dir).args(["-cf", "-", "."]);
    c
}

/// Writes `n` files of 1 to 4 KiB into `dir` (no zero byte).
fn make_files(dir: &Path, n: usize, seed: u64) -> Result<u64, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut total = 0u64;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1024 + (x % 3072) as usize;
        let body: Vec<u8> = (0..len)
            .map(|k| 1 + ((x >> (k % 56)) as u8 ^ k as u8) % 255)
            .collect();
        let p = dir.join(format!("f{i:06}.txt"));
        std::fs::write(&p, &body).map_err(|e| format!("write {}: {e}", p.display()))?;
        total += len as u64;
    }
    Ok(total)
}

/// The small-files benchmark: `files` files, `reps` repetitions of each
/// reader (interleaved), medians and ratios on stdout (or JSON).
pub fn run(
    files: usize,
    reps: usize,
    root: &Path,
    preload: Option<PathBuf>,
    json: bool,
) -> CliResult {
    if files == 0 || reps == 0 {
        return Err(
            "--small-files and --reps need at least 1 each (e.g. --small-files 20000 --reps 3)"
                .into(),
        );
    }
    if Path::new(PREFIX).exists() {
        return Err(format!(
            "{PREFIX} exists on the host: the run mode reads there through the shim; remove it"
        )
        .into());
    }
    interrupt::install();
    let work = Workdir::create(root)?;
    let src = work.path().join("files");
    let payload = make_files(&src.join("d"), files, 1)?;
    let image = work.path().join("small.ext4");
    let mkfs = fuse::find_tool("mkfs.ext4").ok_or("mkfs.ext4 not installed (e2fsprogs)")?;
    // Data, 4 KiB per inode and block, plus 32 MiB; no journal.
    let kib = (payload + files as u64 * 8192 + (32 << 20)) / 1024;
    let o = Command::new(&mkfs)
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(&src)
        .arg(&image)
        .arg(format!("{kib}k"))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", mkfs.display()))?;
    if !o.status.success() {
        return Err(format!(
            "mkfs.ext4 -d failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )
        .into());
    }
    let mut notes = Vec::new();
    let mount = match fuse::unavailable() {
        Some(why) => {
            notes.push(format!("fuse skipped: {why}"));
            None
        }
        None => {
            let mnt = work.path().join("mnt");
            std::fs::create_dir(&mnt).map_err(|e| format!("create {}: {e}", mnt.display()))?;
            Some(fuse::FuseMount::mount(
                &image,
                &mnt,
                &work.path().join("fuse2fs.log"),
            )?)
        }
    };
    let preload = match preload {
        Some(p) => Some(p),
        None => Some(crate::run::preload_lib().map_err(|e| format!("no preload library: {e}"))?),
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let run_cmd = || {
        let mut c = Command::new(&exe);
        c.arg("run").arg("--image").arg(&image).args([
            "--mount", PREFIX, "--", "tar", "-C", PREFIX, "-cf", "-", ".",
        ]);
        if let Some(p) = &preload {
            c.env("SHADOWFD_PRELOAD", p);
        }
        c
    };
    let mut native = Vec::new();
    let mut fuse_t = Vec::new();
    let mut run_t = Vec::new();
    let mut sizes = Vec::new();
    for _ in 0..reps {
        let t = time_tar(tar_in(&src))?;
        sizes.push(("native", t.bytes));
        native.push(t.secs);
        if let Some(m) = &mount {
            let t = time_tar(tar_in(m.mountpoint()))?;
            sizes.push(("fuse", t.bytes));
            fuse_t.push(t.secs);
        }
        let t = time_tar(run_cmd())?;
        sizes.push(("run", t.bytes));
        run_t.push(t.secs);
    }
    // tar pads to 10 KiB records; ext4 adds lost+found (an empty
    // directory: one 512-byte header), so allow a record's difference.
    let want = sizes[0].1;
    if let Some((who, got)) = sizes.iter().find(|(_, b)| b.abs_diff(want) > 10240) {
        return Err(
            format!("{who}'s archive has {got} bytes, native's {want}: a reader is wrong").into(),
        );
    }
    let (n, f, r) = (
        median(&native),
        (!fuse_t.is_empty()).then(|| median(&fuse_t)),
        median(&run_t),
    );
    let date = today();
    if json {
        let v = serde_json::json!({
            "bench": "small-files",
            "date": date,
            "files": files,
            "payload_bytes": payload,
            "reps": reps,
            "median_s": {"native": n, "fuse": f, "run": r},
            "run_over_native": r / n,
            "fuse_over_run": f.map(|f| f / r),
            "notes": notes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "small files: tar -cf - . of {files} files ({payload} bytes) in one directory, {reps} rep(s), median wall time, {date}"
    );
    println!("  native  {n:>10.3} s");
    if let Some(f) = f {
        println!("  fuse    {f:>10.3} s   (fuse2fs mount of the ext4 image)");
    }
    println!("  run     {r:>10.3} s   (shadowfd run --image)");
    println!("  run/native {:.1}x", r / n);
    if let Some(f) = f {
        println!("  fuse/run   {:.2}x (above 1: run is faster)", f / r);
    }
    for note in notes {
        println!("  note: {note}");
    }
    Ok(())
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub(super) fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's
    // published algorithm.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
