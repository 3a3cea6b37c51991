//! `shadowfd bench --sqlite SIZE`: `sqlite3` queries through `shadowfd run`
//! over a database of about SIZE bytes inside an ext4 image, the first run
//! (recording a working set) against the second (replaying it), side by
//! side in one run. See docs/benchmarks.md, "Working sets".
//!
//! The database is made with the `sqlite3` command-line tool: a table
//! `t(id integer primary key, k integer, v blob)` of 200-byte random blobs
//! with an index on `k`, where `k` is a bijection of `id` (so every key
//! asked for exists). The queries are fixed: [`POINTS`] indexed point
//! queries on `k` in a scattered order, a range scan of 1% of the table by
//! `id` and a count over a range of the index. Every repetition starts
//! with an empty record directory: its first run records under
//! `--workset auto`, its second replays that record (and refines it). The
//! host's `sqlite3` over the host file (page cache warm) is the reference;
//! every run's output must be byte for byte the host's. Two ways of
//! reading, each measured: `PRAGMA mmap_size` over the whole file (the
//! replay maps its pages ahead into the command's mapping) and sqlite3's
//! default `pread` (the shim's read path, a request per read).

use super::data::Workdir;
use super::interrupt;
use super::report::{median, paired};
use crate::CliResult;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Where the run mode mounts the image (must not exist on the host).
const PREFIX: &str = "/shadowfd-bench-sqlite";
/// Indexed point queries per run.
pub(super) const POINTS: u64 = 2000;
/// Bytes of each row's blob.
const BLOB: u64 = 200;
/// Bytes a row takes in the table and the index, about (for the row count).
const ROW_BYTES: u64 = 250;
/// The goal: the second run at least this many times faster.
const GOAL: f64 = 3.0;

/// The key of row `id`: odd multiplier and odd increment modulo 2^31, a
/// bijection, so keys are unique and each one asked for exists.
fn key(id: u64) -> u64 {
    (id.wrapping_mul(1_103_515_245).wrapping_add(12_345)) & 0x7fff_ffff
}

/// The rows of a database of about `size` bytes.
pub(super) fn rows_for(size: u64) -> u64 {
    (size / ROW_BYTES).max(1000)
}

/// The SQL that builds the database of `rows` rows.
fn build_sql(rows: u64) -> String {
    format!(
        "PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; \
         PRAGMA cache_size=-262144; \
         CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v BLOB NOT NULL); \
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {rows}) \
         INSERT INTO t SELECT i, ((i * 1103515245) + 12345) % 2147483648, randomblob({BLOB}) FROM c; \
         CREATE INDEX tk ON t(k);"
    )
}

/// The fixed queries over a database of `rows` rows: point queries on the
/// index in a scattered order, a range scan of 1% of the rows by `id`, and
/// a count over a slice of the index.
pub(super) fn query_sql(rows: u64) -> String {
    let mut s = String::with_capacity(POINTS as usize * 64);
    // A step coprime with most row counts scatters the ids over the table.
    let step = 7_919u64 * 104_729;
    for j in 0..POINTS {
        let id = 1 + (j.wrapping_mul(step) % rows);
        s.push_str(&format!(
            "SELECT id, hex(substr(v, 1, 8)) FROM t WHERE k = {};\n",
            key(id)
        ));
    }
    let from = rows / 3;
    let to = from + rows / 100;
    s.push_str(&format!(
        "SELECT count(*), sum(length(v)), hex(substr(max(v), 1, 8)) FROM t WHERE id BETWEEN {from} AND {to};\n"
    ));
    s.push_str(&format!(
        "SELECT count(*) FROM t WHERE k BETWEEN {} AND {};\n",
        1u64 << 29,
        (1u64 << 29) + (1 << 24)
    ));
    s
}

/// One run, timed: its standard output and wall time (spawn to exit).
struct Timed {
    secs: f64,
    out: Vec<u8>,
}

/// Runs `c` with `stdin` as its standard input; fails unless it exits 0.
fn timed(mut c: Command, stdin: &Path) -> Result<Timed, String> {
    interrupt::check()?;
    let input = std::fs::File::open(stdin).map_err(|e| format!("open {}: {e}", stdin.display()))?;
    let t0 = Instant::now();
    let mut child = c
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {c:?}: {e}"))?;
    let mut err = child.stderr.take().expect("piped");
    let errs = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut out)
        .map_err(|e| format!("reading the output of {c:?}: {e}"))?;
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
    Ok(Timed { secs, out })
}

fn check_output(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "{what}: the output differs from the host sqlite3's at byte {at} ({} bytes against {}): \
         a reader is wrong",
        got.len(),
        want.len()
    ))
}

/// Builds the database (`sqlite3`) and the ext4 image holding it in `dir`;
/// returns the image, the database's size and its rows.
fn build(dir: &Path, size: u64) -> Result<(PathBuf, PathBuf, u64), String> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).map_err(|e| format!("create {}: {e}", src.display()))?;
    let db = src.join("bench.db");
    let rows = rows_for(size);
    let o = Command::new("sqlite3")
        .arg(&db)
        .arg(build_sql(rows))
        .output()
        .map_err(|e| format!("cannot run sqlite3 (apt-get install sqlite3): {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "sqlite3 could not build {}: {}",
            db.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let bytes = std::fs::metadata(&db)
        .map_err(|e| format!("stat {}: {e}", db.display()))?
        .len();
    let image = dir.join("sqlite.ext4");
    let mkfs = super::fuse::find_tool("mkfs.ext4").ok_or("mkfs.ext4 not installed (e2fsprogs)")?;
    // The database, an eighth more for the file system, and 32 MiB.
    let kib = (bytes + bytes / 8 + (32 << 20)) / 1024;
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
        ));
    }
    Ok((image, db, rows))
}

/// The `--sqlite` benchmark: a database of about `size` bytes, `reps`
/// repetitions of (first run, second run), medians and per-repetition
/// ratios on stdout (or JSON).
pub fn run(size: u64, reps: usize, root: &Path, json: bool) -> CliResult {
    if size < (1 << 20) || reps == 0 {
        return Err(format!(
            "--sqlite {size}: the database must be at least 1M (e.g. --sqlite 1G), and --reps at \
             least 1"
        )
        .into());
    }
    if Path::new(PREFIX).exists() {
        return Err(format!(
            "{PREFIX} exists on the host: the runs read there through the shim; remove it"
        )
        .into());
    }
    interrupt::install();
    let work = Workdir::create(root)?;
    let t0 = Instant::now();
    let (image, db, rows) = build(work.path(), size)?;
    let build_s = t0.elapsed().as_secs_f64();
    let db_bytes = std::fs::metadata(&db).map_or(0, |m| m.len());
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let preload = crate::run::preload_lib().map_err(|e| format!("no preload library: {e}"))?;
    let host_cmd = || {
        let mut c = Command::new("sqlite3");
        c.arg("-readonly").arg(&db);
        c
    };
    let mut results = Vec::new();
    for io in [Io::Mmap, Io::Read] {
        let queries = work.path().join(format!("queries-{}.sql", io.name()));
        std::fs::write(&queries, io.sql(rows))
            .map_err(|e| format!("write {}: {e}", queries.display()))?;
        let ws = work.path().join(format!("worksets-{}", io.name()));
        let run_cmd = |workset: &str| {
            let mut c = Command::new(&exe);
            c.arg("run")
                .arg("--image")
                .arg(&image)
                .args(["--mount", PREFIX, "--mode", "lazy", "--workset", workset])
                .arg("--workset-dir")
                .arg(&ws)
                .args(["--", "sqlite3", "-readonly"])
                .arg(format!("{PREFIX}/bench.db"))
                .env("SHADOWFD_PRELOAD", &preload)
                .env_remove("SHADOWFD_WORKSET_WINDOW")
                .env_remove("SHADOWFD_WORKSET_MAX");
            c
        };
        // Untimed: warms the host page cache with the database and the
        // image, and gives the output every run must match.
        let want = timed(host_cmd(), &queries)?.out;
        timed(run_cmd("off"), &queries)?;
        let mut r = Measured {
            io,
            ..Measured::default()
        };
        for _ in 0..reps {
            let _ = std::fs::remove_dir_all(&ws);
            let t = timed(host_cmd(), &queries)?;
            check_output("native", &t.out, &want)?;
            r.native.push(t.secs);
            let t = timed(run_cmd("auto"), &queries)?;
            check_output("first run (record)", &t.out, &want)?;
            r.first.push(t.secs);
            if std::fs::read_dir(&ws).map_or(0, |d| d.count()) == 0 {
                return Err(format!(
                    "the first run stored no working-set record in {}: nothing to replay",
                    ws.display()
                )
                .into());
            }
            let t = timed(run_cmd("auto"), &queries)?;
            check_output("second run (replay)", &t.out, &want)?;
            r.second.push(t.secs);
        }
        results.push(r);
    }
    let date = super::small::today();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    if json {
        let mut per_io = serde_json::Map::new();
        for r in &results {
            per_io.insert(r.io.name().into(), r.json()?);
        }
        let v = serde_json::json!({
            "bench": "sqlite",
            "date": date,
            "loadavg_at_end": load,
            "db_bytes": db_bytes,
            "rows": rows,
            "point_queries": POINTS,
            "build_s": build_s,
            "reps": reps,
            "goal_speedup": GOAL,
            "io": per_io,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "sqlite3 through shadowfd run --image: {POINTS} indexed point queries, a 1% range scan \
         and an index range count over a {db_bytes}-byte database ({rows} rows), {reps} rep(s), \
         median wall time, {date}, load {load}"
    );
    for r in &results {
        r.print()?;
    }
    Ok(())
}

/// How `sqlite3` reads the database.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Io {
    /// `PRAGMA mmap_size` over the whole file: pages are read through a
    /// mapping (faults, mapped ahead by a replay).
    #[default]
    Mmap,
    /// sqlite3's default, `pread` of each page (the shim's read path: one
    /// request to the server per read it does not hold).
    Read,
}

impl Io {
    fn name(self) -> &'static str {
        match self {
            Io::Mmap => "mmap",
            Io::Read => "read",
        }
    }

    fn sql(self, rows: u64) -> String {
        match self {
            // sqlite3's largest mapping by default (SQLITE_MAX_MMAP_SIZE).
            Io::Mmap => format!("PRAGMA mmap_size=2147418112;\n{}", query_sql(rows)),
            Io::Read => query_sql(rows),
        }
    }
}

/// The wall times of one way of reading, per repetition.
#[derive(Default)]
struct Measured {
    io: Io,
    native: Vec<f64>,
    first: Vec<f64>,
    second: Vec<f64>,
}

impl Measured {
    fn json(&self) -> Result<serde_json::Value, String> {
        let speedup = paired(&self.first, &self.second).ok_or("no repetition finished")?;
        let over_native = paired(&self.second, &self.native).ok_or("no repetition finished")?;
        Ok(serde_json::json!({
            "median_s": {
                "native": median(&self.native),
                "first_run": median(&self.first),
                "second_run": median(&self.second),
            },
            "per_rep_s": {"native": self.native, "first_run": self.first, "second_run": self.second},
            "second_run_speedup": {
                "median": speedup.value, "min": speedup.min, "max": speedup.max,
                "per_rep": speedup.per_rep,
            },
            "second_run_over_native": {
                "median": over_native.value, "min": over_native.min, "max": over_native.max,
            },
            "goal_met": speedup.value >= GOAL,
        }))
    }

    fn print(&self) -> Result<(), String> {
        let speedup = paired(&self.first, &self.second).ok_or("no repetition finished")?;
        let over_native = paired(&self.second, &self.native).ok_or("no repetition finished")?;
        let (n, f, s) = (
            median(&self.native),
            median(&self.first),
            median(&self.second),
        );
        println!(
            "  {} (sqlite3 reads by {}):",
            self.io.name(),
            match self.io {
                Io::Mmap => "PRAGMA mmap_size",
                Io::Read => "pread",
            }
        );
        println!("    native (host file, warm)   {n:>9.3} s");
        println!("    run, first (record)        {f:>9.3} s");
        println!("    run, second (replay)       {s:>9.3} s");
        println!(
            "    first/second {:.2}x ({:.2}x..{:.2}x)   goal >= {GOAL}x: {}",
            speedup.value,
            speedup.min,
            speedup.max,
            if speedup.value >= GOAL {
                "met"
            } else {
                "missed"
            }
        );
        println!(
            "    second/native {:.2}x ({:.2}x..{:.2}x)",
            over_native.value, over_native.min, over_native.max
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique() {
        let mut k: Vec<u64> = (1..=100_000).map(key).collect();
        k.sort_unstable();
        k.dedup();
        assert_eq!(k.len(), 100_000);
    }

    #[test]
    fn the_queries_are_fixed_and_ask_for_existing_keys() {
        let q = query_sql(50_000);
        assert_eq!(q, query_sql(50_000));
        assert_eq!(q.lines().count() as u64, POINTS + 2);
        let first = q.lines().next().unwrap();
        // The first query asks for the key of row 1 (j = 0).
        assert!(first.ends_with(&format!("k = {};", key(1))), "{first}");
    }
}
