//! `serve --root s3://BUCKET/PREFIX/` and `run --root s3://…`: the objects
//! under a prefix as a read-only tree for unmodified programs (sha256sum,
//! numpy, sqlite3 with mmap, ls), byte-exact against the uploaded data;
//! a second server's run served from the disk cache with zero GETs
//! (counted by `status`); an overwritten object served as a new shadow;
//! listings of many pages whole and without repeats.

use super::common::{self, OutputWithin, python_with_numpy};
use super::weed::Weed;
use super::{cli, setup, url};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);
const MOUNT: &str = "/data";

/// `shadowfd ARGS` under the preload library, against the gateway, the
/// disk cache in `cache`.
fn shadowfd(w: &Weed, cache: &Path, args: &[&str]) -> Output {
    let mut c = cli(w, w.s3_port, cache, args);
    c.env("SHADOWFD_PRELOAD", common::preload())
        .env_remove("SHADOWFD_MODE");
    let o = c.output_within(LIMIT);
    eprintln!(
        "{args:?}: {}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `shadowfd run --root s3://BUCKET/PREFIX --mount /data -- CMD`.
fn run_over(w: &Weed, cache: &Path, prefix: &str, cmd: &[&str]) -> Output {
    let root = url(prefix);
    let mut args = vec!["run", "--root", root.as_str(), "--mount", MOUNT, "--"];
    args.extend_from_slice(cmd);
    shadowfd(w, cache, &args)
}

fn ok_text(o: Output) -> String {
    String::from_utf8(common::stdout_ok(o)).expect("UTF-8 output")
}

/// The same command on the host files: what the shadows must answer.
fn host(cmd: &[&str]) -> String {
    let o = Command::new(cmd[0]).args(&cmd[1..]).output_within(LIMIT);
    ok_text(o)
}

/// A local directory with a raw file, a `.npy` array and an SQLite
/// database, uploaded under `prefix`.
struct Dataset {
    dir: tempfile::TempDir,
}

impl Dataset {
    fn upload(w: &Weed, prefix: &str) -> Dataset {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        std::fs::write(p("raw.bin"), common::pattern(5_000_003, 41)).unwrap();
        std::fs::create_dir(p("arrays")).unwrap();
        let py = python_with_numpy();
        host(&[
            py,
            "-c",
            &format!(
                "import numpy; numpy.save('{}', (numpy.arange(3_000_000, dtype=numpy.int64) * 7919) % 1000003)",
                p("arrays/a.npy")
            ),
        ]);
        host(&[
            "sqlite3",
            &p("t.db"),
            "create table t(x integer, y text); \
             with recursive c(i) as (select 1 union all select i + 1 from c where i < 100000) \
             insert into t select i, hex(randomblob(24)) from c; create index ty on t(y);",
        ]);
        for f in ["raw.bin", "arrays/a.npy", "t.db"] {
            w.put_file(&format!("{prefix}{f}"), Path::new(&p(f)));
        }
        Dataset { dir }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
}

fn shadow(rel: &str) -> String {
    format!("{MOUNT}/{rel}")
}

/// `sha256sum`, `numpy.load(mmap_mode="r")`, `sqlite3` with `PRAGMA
/// mmap_size` and `ls` under `run --root s3://…/`: the answers the host
/// files give.
#[test]
fn run_over_a_prefix_serves_sha256sum_numpy_and_sqlite_byte_exact() {
    let Some(w) = setup() else { return };
    let d = Dataset::upload(w, "srv-run/");
    let cache = tempfile::tempdir().unwrap();
    let files = ["raw.bin", "arrays/a.npy", "t.db"];

    let local: Vec<String> = files.iter().map(|f| d.path(f)).collect();
    let mut cmd = vec!["sha256sum"];
    cmd.extend(local.iter().map(String::as_str));
    let want = host(&cmd);
    let shadows: Vec<String> = files.iter().map(|f| shadow(f)).collect();
    let mut cmd = vec!["sha256sum"];
    cmd.extend(shadows.iter().map(String::as_str));
    let got = ok_text(run_over(w, cache.path(), "srv-run/", &cmd));
    let sums = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(sums(&got), sums(&want), "sha256sum of the served objects");

    let py = python_with_numpy();
    let script = |p: &str| {
        format!(
            "import numpy\na = numpy.load('{p}', mmap_mode='r')\n\
             print(type(a).__name__, a.shape, a.dtype, int(a.sum()), int(a[1234567]), int(a[-1]))"
        )
    };
    let want = host(&[py, "-c", &script(&d.path("arrays/a.npy"))]);
    let got = ok_text(run_over(
        w,
        cache.path(),
        "srv-run/",
        &[py, "-c", &script(&shadow("arrays/a.npy"))],
    ));
    assert!(want.starts_with("memmap"), "{want}");
    assert_eq!(got, want, "numpy.load(mmap_mode='r')");

    let query = "select count(*), sum(x), min(y), max(y) from t; \
                 select x from t where y = (select y from t where x = 54321);";
    let want = host(&["sqlite3", &d.path("t.db"), query]);
    let got = ok_text(run_over(
        w,
        cache.path(),
        "srv-run/",
        &[
            "sqlite3",
            &shadow("t.db"),
            &format!("PRAGMA mmap_size=268435456; {query}"),
        ],
    ));
    assert_eq!(got, format!("268435456\n{want}"), "sqlite3 with mmap");
    assert!(want.contains("54321"), "{want}");

    let got = ok_text(run_over(
        w,
        cache.path(),
        "srv-run/",
        &["ls", "-1", MOUNT, &shadow("arrays")],
    ));
    assert_eq!(
        got,
        format!("{MOUNT}:\narrays\nraw.bin\nt.db\n\n{MOUNT}/arrays:\na.npy\n"),
        "ls of the prefix"
    );
    let o = run_over(
        w,
        cache.path(),
        "srv-run/",
        &["cat", &shadow("nothing.bin")],
    );
    assert!(!o.status.success(), "a missing object is an error");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A `shadowfd serve` on a socket of its own, stopped when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(w: &Weed, cache: &Path, prefix: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let root = url(prefix);
        let child = cli(
            w,
            w.s3_port,
            cache,
            &["serve", "--socket", sock.to_str().unwrap(), "--root", &root],
        )
        .env_remove("SHADOWFD_MODE")
        .stderr(std::process::Stdio::from(
            std::fs::File::create(dir.path().join("log")).unwrap(),
        ))
        .spawn()
        .expect("shadowfd serve starts");
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the server did not listen within 30 s: {}",
                std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            sock,
            _dir: dir,
        }
    }

    fn run(&self, w: &Weed, cache: &Path, cmd: &[&str]) -> Output {
        let mut args = vec![
            "run",
            "--socket",
            self.sock.to_str().unwrap(),
            "--mount",
            MOUNT,
            "--",
        ];
        args.extend_from_slice(cmd);
        shadowfd(w, cache, &args)
    }

    /// `status --json`: the shadows with an `object` part, by name.
    fn object_shadows(&self, w: &Weed, cache: &Path) -> Vec<Value> {
        let o = shadowfd(
            w,
            cache,
            &["status", "--json", "--socket", self.sock.to_str().unwrap()],
        );
        let v: Value = serde_json::from_slice(&common::stdout_ok(o)).expect("status JSON");
        assert_eq!(v["tree"], "object", "{v}");
        v["shadows"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn counter(s: &Value, k: &str) -> u64 {
    s["object"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no object.{k} in {s}"))
}

/// A second server over the same disk cache serves the same reads with
/// zero GETs: `status` counts the first run's requests and misses, the
/// second's hits only; a third, after one chunk file is tampered with,
/// refuses it and fetches that block alone. All byte-exact.
#[test]
fn a_second_server_serves_from_the_cache_with_zero_gets() {
    let Some(w) = setup() else { return };
    let data = common::pattern(9 << 20, 42);
    w.put("srv-cache/big.bin", &data);
    let want = sha256(&data);
    let cache = tempfile::tempdir().unwrap();
    let sum = |s: &Server| {
        let t = ok_text(s.run(w, cache.path(), &["sha256sum", &shadow("big.bin")]));
        t.split_whitespace().next().unwrap_or("").to_string()
    };

    let s = Server::start(w, cache.path(), "srv-cache/");
    assert_eq!(sum(&s), want, "first run");
    let shadows = s.object_shadows(w, cache.path());
    assert_eq!(shadows.len(), 1, "{shadows:?}");
    let first = &shadows[0];
    assert!(counter(first, "requests") > 0, "{first}");
    assert_eq!(
        counter(first, "bytes_fetched"),
        data.len() as u64,
        "{first}"
    );
    assert!(counter(first, "cache_misses") > 0, "{first}");
    assert!(
        first["object"]["fetch_p50_us"].as_f64().is_some(),
        "{first}"
    );
    assert!(
        first["object"]["fetch_p99_us"].as_f64().is_some(),
        "{first}"
    );
    drop(s);

    let s = Server::start(w, cache.path(), "srv-cache/");
    assert_eq!(sum(&s), want, "second run");
    let second = &s.object_shadows(w, cache.path())[0];
    assert_eq!(
        counter(second, "requests"),
        0,
        "a warm cache sends no GET: {second}"
    );
    assert_eq!(counter(second, "bytes_fetched"), 0, "{second}");
    assert_eq!(counter(second, "cache_misses"), 0, "{second}");
    assert!(
        counter(second, "cache_hits") >= (9 << 20) / (256 << 10),
        "{second}"
    );
    // The human form names the counters too.
    let o = shadowfd(
        w,
        cache.path(),
        &["status", "--socket", s.sock.to_str().unwrap()],
    );
    let text = ok_text(o);
    assert!(text.contains("fetched") && text.contains("cache"), "{text}");
    drop(s);

    // One chunk file tampered with: refused on reading back and fetched
    // again (one block), never served.
    let mut files = super::walk(&cache.path().join("shadowfd"));
    files.sort();
    let f = &files[files.len() / 2];
    let mut b = std::fs::read(f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(f, &b).unwrap();
    let s = Server::start(w, cache.path(), "srv-cache/");
    assert_eq!(sum(&s), want, "third run, one chunk tampered with");
    let third = &s.object_shadows(w, cache.path())[0];
    assert_eq!(counter(third, "cache_rejected"), 1, "{third}");
    assert_eq!(
        counter(third, "bytes_fetched"),
        256 << 10,
        "one block again: {third}"
    );
}

/// An object overwritten between two runs of one server is a new shadow:
/// the second run reads the new bytes, whole and only them.
#[test]
fn an_overwritten_object_is_served_as_a_new_shadow() {
    let Some(w) = setup() else { return };
    let old = common::pattern(3 << 20, 51);
    let new = common::pattern(3 << 20, 52);
    w.put("srv-over/f.bin", &old);
    let cache = tempfile::tempdir().unwrap();
    let s = Server::start(w, cache.path(), "srv-over/");
    let cat = |s: &Server| common::stdout_ok(s.run(w, cache.path(), &["cat", &shadow("f.bin")]));
    assert!(cat(&s) == old, "the first version");
    w.put("srv-over/f.bin", &new);
    assert!(
        cat(&s) == new,
        "the second version, never the first's pages"
    );
    let shadows = s.object_shadows(w, cache.path());
    assert_eq!(shadows.len(), 2, "two versions, two shadows: {shadows:?}");
}

fn sha256(data: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), data).unwrap();
    let t = host(&["sha256sum", f.path().to_str().unwrap()]);
    t.split_whitespace().next().unwrap_or("").to_string()
}

/// A directory of more entries than one LIST page holds (names of 200
/// bytes: about 300 fill a 64 KiB page), files and subdirectories mixed:
/// `ls` lists each once, none missing; and the library's pages, two items
/// at a time, add up to the whole listing.
#[test]
fn a_directory_of_many_pages_is_listed_whole_and_once() {
    use shadowfd::source::object::ObjectTree;
    let Some(w) = setup() else { return };
    let mut names: Vec<String> = (0..420)
        .map(|i| format!("{i:04}-{}", "n".repeat(195)))
        .collect();
    let tiny = b"x".to_vec();
    let keys: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if i % 7 == 0 {
                format!("srv-many/d/{n}/inner.bin")
            } else {
                format!("srv-many/d/{n}")
            }
        })
        .collect();
    std::thread::scope(|sc| {
        for part in keys.chunks(keys.len().div_ceil(8)) {
            let tiny = &tiny;
            sc.spawn(move || {
                for k in part {
                    w.put(k, tiny);
                }
            });
        }
    });
    names.sort();
    let cache = tempfile::tempdir().unwrap();
    let got = ok_text(run_over(
        w,
        cache.path(),
        "srv-many/",
        &["ls", "-1", &shadow("d")],
    ));
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got.len(), names.len(), "ls lists each entry once");
    assert!(got == names, "ls lists every entry");

    let t = ObjectTree::open(&url("srv-many/"), super::library_config(w.s3_port)).unwrap();
    let whole: Vec<String> = t
        .list("d")
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..=names.len() {
        let p = t.list_page("d", after.as_deref(), 2).unwrap().unwrap();
        if let Some((k, _)) = p.entries.last() {
            after = Some(k.clone());
        }
        paged.extend(p.entries.into_iter().map(|(_, e)| e.name));
        if !p.more {
            break;
        }
        assert!(paged.len() <= names.len(), "pages repeat entries");
    }
    assert!(paged.len() >= names.len(), "the pages never ended");
    paged.sort();
    assert_eq!(paged, whole, "pages of two add up to the listing");
    assert!(t.list_page("nothing-here", None, 2).unwrap().is_none());
}
