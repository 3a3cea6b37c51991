//! Object sources (`s3://`) against a real SeaweedFS gateway, with a fault
//! proxy in between where a test needs one. Every check is byte-exact
//! against the uploaded data. `cargo test --release --test object`.

#[path = "../common/mod.rs"]
mod common;
mod proxy;
mod serve;
mod served_faults;
mod weed;

use proxy::{Mode, Proxy};
use serde_json::Value;
use shadowfd::source::object::{CacheConfig, ObjectConfig, ObjectSource};
use shadowfd::{Source, StalePolicy};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use weed::{BUCKET, Weed};

/// The object size the scans use: big enough for many blocks, readahead
/// and concurrency; small enough to keep the suite fast.
const SIZE: usize = 64 << 20;

/// What the tests need: the shared gateway and lazy shadows. `None`: skip
/// (only where neither is required).
fn setup() -> Option<&'static Weed> {
    if !common::lazy_available() {
        return None;
    }
    weed::shared()
}

/// A `shadowfd` child reaching the store at `port`, its cache in `cache`.
fn cli(w: &Weed, port: u16, cache: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shadowfd"));
    c.args(args)
        .env_remove("SHADOWFD_CACHE_SIZE")
        .env("XDG_CACHE_HOME", cache)
        .stdin(Stdio::null());
    for (k, v) in w.env(port) {
        c.env(k, v);
    }
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("shadowfd runs")
}

fn json_of(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn obj(v: &Value, k: &str) -> u64 {
    v["object"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no object.{k} in {v}"))
}

/// `shadowfd map URL --verify --json EXTRA…` against the gateway: the
/// report, once it says every touched byte equals the object.
fn map_verified(w: &Weed, cache: &std::path::Path, key: &str, extra: &[&str]) -> Value {
    let u = url(key);
    let mut args = vec!["map", u.as_str(), "--verify", "--json"];
    args.extend_from_slice(extra);
    let o = run(cli(w, w.s3_port, cache, &args));
    let v = json_of(&o);
    assert!(o.status.success(), "{args:?}: {v}");
    assert_eq!(v["verified"], true, "{args:?}: {v}");
    v
}

/// The library's settings for the store (or a proxy) at `port`, the
/// credentials in code, no readahead.
fn library_config(port: u16) -> ObjectConfig {
    let mut cfg = ObjectConfig::default();
    cfg.endpoint = Some(format!("http://127.0.0.1:{port}"));
    cfg.credentials = Some((weed::KEY_ID.into(), weed::SECRET.into()));
    cfg.readahead = 0;
    cfg
}

fn url(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

/// Asserts `out` is a prefix of `data` (never bytes of another version).
fn assert_prefix(out: &[u8], data: &[u8], what: &str) {
    assert!(
        out.len() <= data.len(),
        "{what}: more bytes than the object"
    );
    if let Some(i) = common::first_diff(out, &data[..out.len()]) {
        panic!("{what}: byte {i} differs from the object it was opened as");
    }
}

#[test]
fn cat_is_byte_exact_and_a_second_run_comes_from_the_cache() {
    let Some(w) = setup() else { return };
    let data = common::pattern(SIZE, 11);
    w.put("cat/a.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    let o = run(cli(w, w.s3_port, cache.path(), &["cat", &url("cat/a.bin")]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "cat output differs from the object");

    // Every block is cached now: a lazy random map fetches nothing.
    let v = map_verified(
        w,
        cache.path(),
        "cat/a.bin",
        &["--mode", "lazy", "--access", "random:0.01"],
    );
    assert_eq!(obj(&v, "requests"), 0, "a warm cache sends no GET: {v}");
    assert!(obj(&v, "cache_hits") > 0, "{v}");
    assert_eq!(obj(&v, "cache_misses"), 0, "{v}");
}

/// `cat` twice back to back, the second started the moment the first
/// exits, in several fresh cache directories: the second run sends no GET
/// (counted by a proxy both go through, since the cache is keyed by the
/// endpoint). Every block the first run fetched was in its cache before
/// it exited: nothing is left to writers that the exit cuts short. Half
/// the rounds read nothing ahead, so that the last block arrives just
/// before the exit (before the fix, such a round lost it almost always).
#[test]
fn a_cat_right_after_a_cat_sends_no_get() {
    let Some(w) = setup() else { return };
    let data = common::pattern(SIZE, 15);
    w.put("cat/twice.bin", &data);
    let p = Proxy::start(w.s3_port);
    let u = url("cat/twice.bin");
    for round in 0..6 {
        let cache = tempfile::tempdir().unwrap();
        let mut first = cli(w, p.port, cache.path(), &["cat", &u]);
        if round % 2 == 1 {
            first
                .args(["--readahead", "0"])
                .env("SHADOWFD_OBJECT_READAHEAD", "0");
        }
        let o = run(first);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout == data, "round {round}: the first cat's bytes");
        let before = p.gets();
        assert!(before > 0, "round {round}: the first cat fetched nothing");
        let o = run(cli(w, p.port, cache.path(), &["cat", &u]));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout == data, "round {round}: the second cat's bytes");
        assert_eq!(
            p.gets() - before,
            0,
            "round {round}: the second cat sent GETs: blocks the first fetched \
             were missing from the cache ({} chunk files of {})",
            chunk_files(cache.path()).len(),
            SIZE / (256 << 10)
        );
    }
}

/// The chunk files under the cache directory `cache` (no temporary
/// files), sorted; fails on a temporary file, which a finished run never
/// leaves.
fn chunk_files(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = walk(&cache.join("shadowfd"));
    files.sort();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            name.len() == 10 && name.bytes().all(|b| b.is_ascii_digit()),
            "not a chunk file: {f:?} (a write cut short by the exit?)"
        );
    }
    files
}

/// Sizes that end mid-block and mid-page, one byte, and an empty object:
/// byte-exact in both modes, cold and from the cache.
#[test]
fn odd_sizes_are_byte_exact() {
    let Some(w) = setup() else { return };
    let cache = tempfile::tempdir().unwrap();
    for (i, size) in [(1 << 20) + 1234, 4097, 1, 0].into_iter().enumerate() {
        let key = format!("odd/o{i}.bin");
        let data = common::pattern(size, 80 + i as u64);
        w.put(&key, &data);
        for mode in ["lazy", "eager"] {
            for _ in 0..2 {
                let o = run(cli(
                    w,
                    w.s3_port,
                    cache.path(),
                    &["cat", &url(&key), "--mode", mode],
                ));
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(o.status.success(), "{size} {mode}: {err}");
                assert!(o.stdout == data, "{size} {mode}: other bytes");
            }
        }
    }
}

/// A key with a space, a plus and non-ASCII letters is read as written.
#[test]
fn keys_with_spaces_and_unicode_are_read_as_written() {
    let Some(w) = setup() else { return };
    let data = common::pattern(300_000, 90);
    // curl wants the key percent-encoded; the s3:// URL takes it as is.
    w.put("names/a%20b%2Bc-%C3%A9t%C3%A9.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    let o = run(cli(
        w,
        w.s3_port,
        cache.path(),
        &["cat", &url("names/a b+c-été.bin")],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(o.stdout == data);
}

/// Several processes fill one cache directory at once: each output is
/// byte-exact, and a run after them is served from the cache alone.
#[test]
fn processes_sharing_the_cache_all_read_the_right_bytes() {
    let Some(w) = setup() else { return };
    let data = common::pattern(16 << 20, 14);
    w.put("shared/s.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    let kids: Vec<_> = (0..3)
        .map(|_| {
            let mut c = cli(w, w.s3_port, cache.path(), &["cat", &url("shared/s.bin")]);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for k in kids {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout == data, "a concurrent cat read other bytes");
    }
    let v = map_verified(w, cache.path(), "shared/s.bin", &["--access", "seq"]);
    assert_eq!(obj(&v, "requests"), 0, "{v}");
    assert_eq!(obj(&v, "cache_rejected"), 0, "{v}");
}

#[test]
fn lazy_map_seq_and_random_are_byte_exact() {
    let Some(w) = setup() else { return };
    let data = common::pattern(SIZE, 12);
    w.put("map/b.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    for access in ["seq", "random:0.01"] {
        let v = map_verified(
            w,
            cache.path(),
            "map/b.bin",
            &["--mode", "lazy", "--no-cache", "--access", access],
        );
        assert_eq!(v["mode"], "lazy");
        assert!(obj(&v, "requests") > 0, "{v}");
        let fetched = obj(&v, "bytes_fetched");
        if access == "seq" {
            // Each byte once, give or take a block read ahead and dropped
            // from memory before it was used.
            assert!(
                (SIZE as u64..=SIZE as u64 * 11 / 10).contains(&fetched),
                "seq fetches each byte about once: {v}"
            );
            // Adjacent blocks (256 KiB) are merged into larger GETs, and a
            // stream is read ahead a whole request (4 MiB) at a time once
            // its window is wide enough: 23-26 GETs for these 64 MiB
            // (2026-12-07), where topping the window up a read (1 MiB) at
            // a time took 39-41.
            let blocks = SIZE as u64 / (256 << 10);
            assert!(obj(&v, "requests") <= blocks / 8, "{v}");
        } else {
            assert!(
                fetched < SIZE as u64 * 3 / 4,
                "random:0.01 fetches a part of the object, not all of it: {v}"
            );
        }
        assert!(v["object"]["fetch_p50_us"].as_f64().is_some(), "{v}");
    }
    // An eager copy (concurrent GETs) is byte-exact too.
    let v = map_verified(
        w,
        cache.path(),
        "map/b.bin",
        &["--mode", "eager", "--max-size", "1G", "--no-cache"],
    );
    assert_eq!(obj(&v, "bytes_fetched"), SIZE as u64, "{v}");
    assert!(obj(&v, "requests") <= SIZE as u64 / (256 << 10) / 2, "{v}");
}

/// Every page of every cached block tampered with (one byte each, counted
/// from the file's end, where a block's bytes are), one file truncated: a
/// lazy scan serves none of them and fetches every block again. Nothing
/// here depends on timing: the first `cat` has every block (32) in the
/// cache when it exits, so each is tampered with before the scan.
#[test]
fn a_corrupted_cache_chunk_is_refetched_never_served() {
    let Some(w) = setup() else { return };
    let data = common::pattern(8 << 20, 13);
    let blocks = data.len() / (256 << 10);
    w.put("corrupt/c.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    let args = ["cat", &url("corrupt/c.bin")];
    // Nothing read ahead: the last block arrives just before the exit.
    let mut first = cli(w, w.s3_port, cache.path(), &args);
    first
        .args(["--readahead", "0"])
        .env("SHADOWFD_OBJECT_READAHEAD", "0");
    let o = run(first);
    assert!(o.status.success() && o.stdout == data);
    let files = chunk_files(cache.path());
    assert_eq!(files.len(), blocks, "every block cached: {files:?}");
    for f in &files {
        let mut b = std::fs::read(f).unwrap();
        let n = b.len();
        for k in 0..(256 << 10) / 4096 {
            b[n - 1 - 100 - k * 4096] ^= 0x40;
        }
        std::fs::write(f, &b).unwrap();
    }
    let t = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    t.set_len(100).unwrap();
    let v = map_verified(
        w,
        cache.path(),
        "corrupt/c.bin",
        &["--mode", "lazy", "--access", "seq"],
    );
    assert_eq!(obj(&v, "cache_hits"), 0, "no tampered chunk is served: {v}");
    assert_eq!(obj(&v, "cache_rejected"), blocks as u64, "{v}");
    assert_eq!(obj(&v, "bytes_fetched"), data.len() as u64, "{v}");
    // And the refetched chunks are good again, all of them in the cache
    // when the scan exited: a run after it sends no GET.
    assert_eq!(chunk_files(cache.path()).len(), blocks);
    let v = map_verified(
        w,
        cache.path(),
        "corrupt/c.bin",
        &["--mode", "lazy", "--access", "seq"],
    );
    assert_eq!(obj(&v, "requests"), 0, "{v}");
    assert_eq!(obj(&v, "cache_rejected"), 0, "{v}");
    let o = run(cli(w, w.s3_port, cache.path(), &args));
    assert!(o.status.success() && o.stdout == data);
}

/// One byte of one cached block tampered with: reads that cover it refuse
/// the file and fetch that block alone again; the rest is served from the
/// cache (each page checked as it is read), and every byte is right, for a
/// sequential and a random reader.
#[test]
fn a_tampered_page_costs_one_block_and_serves_nothing_wrong() {
    let Some(w) = setup() else { return };
    let data = common::pattern(8 << 20, 17);
    w.put("corrupt/p.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    let args = ["cat", &url("corrupt/p.bin")];
    let o = run(cli(w, w.s3_port, cache.path(), &args));
    assert!(o.status.success() && o.stdout == data);
    let files = chunk_files(cache.path());
    assert_eq!(files.len(), 32, "chunk files: {files:?}");
    for access in ["seq", "random:1"] {
        let f = &files[5];
        let mut b = std::fs::read(f).unwrap();
        let n = b.len();
        // A byte in the block's ninth page (of 64).
        b[n - (256 << 10) + 8 * 4096 + 77] ^= 0x01;
        std::fs::write(f, &b).unwrap();
        let v = map_verified(
            w,
            cache.path(),
            "corrupt/p.bin",
            &["--mode", "lazy", "--access", access],
        );
        assert_eq!(obj(&v, "cache_rejected"), 1, "{access}: {v}");
        assert_eq!(
            obj(&v, "bytes_fetched"),
            256 << 10,
            "{access}: one block: {v}"
        );
        assert_eq!(obj(&v, "requests"), 1, "{access}: {v}");
        assert!(obj(&v, "cache_hits") >= 31, "{access}: {v}");
        assert_eq!(
            std::fs::read(f).unwrap(),
            {
                let mut good = b.clone();
                good[n - (256 << 10) + 8 * 4096 + 77] ^= 0x01;
                good
            },
            "{access}: the block's file is whole again"
        );
    }
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Starts `cat` of `key` through `proxy`, slow enough to be caught mid-scan;
/// returns the child once it has written `min` bytes... the reader thread
/// collects stdout.
struct Scan {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Scan {
    fn start(w: &Weed, port: u16, key: &str, env: &[(&str, &str)]) -> Scan {
        let cache = std::env::temp_dir();
        let mut c = cli(
            w,
            port,
            &cache,
            &[
                "cat",
                &url(key),
                "--mode",
                "lazy",
                "--no-cache",
                "--readahead",
                "1M",
            ],
        );
        c.env("SHADOWFD_OBJECT_READAHEAD", "1M")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let o2 = out.clone();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => o2.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Scan {
            child,
            out,
            reader: Some(reader),
        }
    }

    /// Waits until at least `n` bytes were written (at most 60 s).
    fn wait_for(&self, n: usize) {
        let t0 = Instant::now();
        while self.out.lock().unwrap().len() < n {
            assert!(t0.elapsed() < Duration::from_secs(60), "the scan stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the exit (at most `limit`); the status, stdout, stderr
    /// and how long it took from now.
    fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<u8>, String, Duration) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                panic!("cat did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = t0.elapsed();
        self.reader.take().unwrap().join().unwrap();
        let mut err = String::new();
        use std::io::Read;
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let out = std::mem::take(&mut *self.out.lock().unwrap());
        (status, out, err, took)
    }
}

#[test]
fn an_object_overwritten_mid_scan_is_never_mixed() {
    let Some(w) = setup() else { return };
    let a = common::pattern(SIZE, 21);
    let b = common::pattern(SIZE, 22);
    w.put("over/o.bin", &a);
    let p = Proxy::start(w.s3_port);
    p.set_latency(Duration::from_millis(15));
    let scan = Scan::start(w, p.port, "over/o.bin", &[]);
    scan.wait_for(2 << 20);
    w.put("over/o.bin", &b);
    let (status, out, err, _) = scan.finish(Duration::from_secs(120));
    assert_prefix(&out, &a, "overwritten mid-scan");
    if status.success() {
        assert_eq!(out.len(), a.len(), "success means the whole old version");
    } else {
        assert!(
            err.contains("changed") || err.contains("SIGBUS") || err.contains("412"),
            "the failure says why: {err}"
        );
    }
    assert!(!status.success() || out == a);
}

#[test]
fn a_killed_gateway_gives_sigbus_within_the_bound_and_cat_fails() {
    if !common::lazy_available() {
        return;
    }
    let w = match Weed::start() {
        Ok(w) => w,
        Err(e) if weed::required() => panic!("SeaweedFS is required here (CI) but {e}"),
        Err(e) => return eprintln!("SKIP: {e}"),
    };
    let data = common::pattern(SIZE, 31);
    w.put("kill/k.bin", &data);
    let p = Proxy::start(w.s3_port);
    p.set_latency(Duration::from_millis(15));
    let scan = Scan::start(
        &w,
        p.port,
        "kill/k.bin",
        &[
            ("SHADOWFD_OBJECT_DEADLINE", "1"),
            ("SHADOWFD_OBJECT_RETRIES", "1"),
        ],
    );
    scan.wait_for(2 << 20);
    w.kill();
    // The documented bound: deadline x attempts + backoff + 2 s, plus the
    // time for cat to report.
    let (status, out, err, took) = scan.finish(Duration::from_secs(30));
    assert!(!status.success(), "cat must fail once the gateway is gone");
    assert!(out.len() < data.len());
    assert_prefix(&out, &data, "killed gateway");
    assert!(err.contains("SIGBUS"), "{err}");
    assert!(err.contains("s3://"), "the cause names the object: {err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_stalled_connection_gives_sigbus_within_the_deadline() {
    let Some(w) = setup() else { return };
    let data = common::pattern(8 << 20, 41);
    w.put("stall/s.bin", &data);
    let p = Proxy::start(w.s3_port);
    p.set(Mode::StallAfter(100_000));
    let t0 = Instant::now();
    let scan = Scan::start(
        w,
        p.port,
        "stall/s.bin",
        &[
            ("SHADOWFD_OBJECT_DEADLINE", "1"),
            ("SHADOWFD_OBJECT_RETRIES", "1"),
        ],
    );
    let (status, out, err, _) = scan.finish(Duration::from_secs(30));
    let took = t0.elapsed();
    assert!(!status.success(), "a stalled store fails the read");
    assert_prefix(&out, &data, "stalled");
    assert!(err.contains("SIGBUS") && err.contains("deadline"), "{err}");
    // 2 attempts of 1 s, 100 ms backoff, plus start-up.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

/// The library, through a proxy that answers 503 to the next connections:
/// retried transparently, counted.
#[test]
fn five_xx_then_success_is_retried_transparently() {
    let Some(w) = setup() else { return };
    let data = common::pattern(4 << 20, 51);
    w.put("retry/r.bin", &data);
    let p = Proxy::start(w.s3_port);
    let cfg = library_config(p.port);
    let src = ObjectSource::open_with(&url("retry/r.bin"), cfg).unwrap();
    p.fail_next(2);
    let mut buf = vec![0u8; data.len()];
    let mut done = 0;
    while done < buf.len() {
        done += src.read_at(&mut buf[done..], done as u64).unwrap();
    }
    assert!(buf == data);
    let s = src.stats();
    assert!(s.retries >= 2, "{s:?}");
    assert_eq!(s.failures, 0, "{s:?}");
    assert_eq!(s.bytes_fetched, data.len() as u64, "{s:?}");
}

/// A library user's source with a disk cache, dropped the moment its last
/// read returns, several times: the drop waits for the cache writes, so a
/// source opened right after reads every block from the cache, no GET.
#[test]
fn dropping_a_source_waits_for_its_cache_writes() {
    let Some(w) = setup() else { return };
    let data = common::pattern(16 << 20, 53);
    w.put("drop/d.bin", &data);
    for round in 0..4 {
        let cache = tempfile::tempdir().unwrap();
        let mut cfg = library_config(w.s3_port);
        // Every other round reads nothing ahead: the last block arrives
        // just before the drop.
        cfg.readahead = if round % 2 == 0 { 8 << 20 } else { 0 };
        cfg.cache = Some(CacheConfig {
            dir: cache.path().join("shadowfd"),
            max_bytes: 1 << 30,
        });
        let mut buf = vec![0u8; data.len()];
        for cold in [true, false] {
            let src = ObjectSource::open_with(&url("drop/d.bin"), cfg.clone()).unwrap();
            buf.fill(0);
            let mut done = 0;
            while done < buf.len() {
                let n = (buf.len() - done).min(1 << 20);
                done += src.read_at(&mut buf[done..done + n], done as u64).unwrap();
            }
            assert!(buf == data, "round {round}, cold {cold}");
            let counters = src.counters();
            drop(src);
            let s = counters.snapshot();
            if cold {
                assert!(s.requests > 0, "round {round}: {s:?}");
                // Every block written by the time the drop returned.
                assert_eq!(s.cache_writes, 64, "round {round}: {s:?}");
                assert_eq!(s.cache_writes_abandoned, 0, "round {round}: {s:?}");
                assert_eq!(s.cache_write_errors, 0, "round {round}: {s:?}");
            } else {
                assert_eq!(
                    s.requests, 0,
                    "round {round}: a block was not cached: {s:?}"
                );
                assert_eq!(s.cache_misses, 0, "round {round}: {s:?}");
            }
        }
    }
}

/// Answers cut mid-body: retried, then an error once the retries are
/// spent (never a short block), and reads work again once the store does.
#[test]
fn a_body_cut_mid_way_is_retried_then_fails_then_recovers() {
    let Some(w) = setup() else { return };
    let data = common::pattern(1 << 20, 52);
    w.put("cut/c.bin", &data);
    let p = Proxy::start(w.s3_port);
    let mut cfg = library_config(p.port);
    cfg.retries = 2;
    cfg.deadline = Duration::from_secs(1);
    let src = ObjectSource::open_with(&url("cut/c.bin"), cfg).unwrap();
    p.set(Mode::CutAfter(100_000));
    let mut buf = vec![0u8; 256 << 10];
    let e = src.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("3 attempts") && e.contains("s3://"), "{e}");
    assert!(
        buf.iter().all(|&b| b == 0),
        "nothing of a cut body is served"
    );
    let s = src.stats();
    assert_eq!((s.retries, s.failures), (2, 1), "{s:?}");
    assert!(s.last_error.is_some_and(|l| l.contains("bytes 0..262144")));
    // The store is back: after the cool-down (the deadline), reads work.
    p.set(Mode::Pass);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(src.read_at(&mut buf, 0).unwrap(), buf.len());
    assert!(buf[..] == data[..buf.len()]);
}

/// The library under `--stale strict` and `detect`: a lazy shadow of an
/// object overwritten after open keeps the bytes it filled, refuses the
/// rest (the store answers 412 to the pinned ETag), never serves the new
/// version, and `staleness` says the identity changed.
#[test]
fn an_overwritten_object_is_stale_for_both_policies() {
    let Some(w) = setup() else { return };
    for (i, policy) in [StalePolicy::Strict, StalePolicy::Detect]
        .into_iter()
        .enumerate()
    {
        let key = format!("stale/s{i}.bin");
        let old = common::pattern(4 << 20, 61 + i as u64);
        let new = common::pattern(4 << 20, 71 + i as u64);
        w.put(&key, &old);
        let cfg = library_config(w.s3_port);
        let src = ObjectSource::open_with(&url(&key), cfg).unwrap();
        let mut c = common::config(shadowfd::Mode::Lazy);
        c.chunk_size = 64 << 10;
        c.readahead = 0;
        c.stale = policy;
        let engine = shadowfd::Engine::new(c).unwrap();
        let shadow = engine.open(src).unwrap();
        shadow.populate(0, 256 << 10).unwrap();
        w.put(&key, &new);
        let err = shadow.populate(2 << 20, 64 << 10).unwrap_err().to_string();
        assert!(err.contains("changed"), "{policy:?}: {err}");
        let mut buf = vec![0u8; 256 << 10];
        assert_eq!(shadow.read_at(&mut buf, 0).unwrap(), buf.len());
        assert!(
            buf[..] == old[..buf.len()],
            "{policy:?}: the filled part stays the old version"
        );
        // Anything not filled before the overwrite is refused, never new.
        let mut tail = vec![0u8; 64 << 10];
        assert!(shadow.read_at(&mut tail, 3 << 20).is_err(), "{policy:?}");
        std::thread::sleep(Duration::from_millis(1100));
        let st = shadow.staleness().unwrap();
        assert!(!st.is_unchanged(), "{policy:?}: {st:?}");
        assert!(shadow.stats().source_changed, "{policy:?}");
    }
}

#[test]
fn wrong_credentials_and_missing_bucket_or_key_are_clear_errors() {
    let Some(w) = setup() else { return };
    w.put("errs/e.bin", b"hello");
    let cache = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 4] = [
        (
            "s3://shadowfd-test/errs/e.bin",
            &[("AWS_SECRET_ACCESS_KEY", "wrong")],
            &[
                "access denied",
                "AWS_SECRET_ACCESS_KEY",
                "s3://shadowfd-test/errs/e.bin",
            ],
        ),
        (
            "s3://no-such-bucket/errs/e.bin",
            &[],
            &[
                "no bucket",
                "no-such-bucket",
                "s3://no-such-bucket/errs/e.bin",
            ],
        ),
        (
            "s3://shadowfd-test/errs/missing.bin",
            &[],
            &["no object", "errs/missing.bin", "Check the key"],
        ),
        ("s3://X/errs", &[], &["bucket name", "s3://BUCKET/KEY"]),
    ];
    for (u, env, want) in cases {
        let mut c = cli(w, w.s3_port, cache.path(), &["cat", u]);
        for (k, v) in env {
            c.env(k, v);
        }
        let t0 = Instant::now();
        let o = run(c);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{u}");
        assert!(o.stdout.is_empty(), "{u}");
        for s in want {
            assert!(err.contains(s), "{u}: {s:?} missing from: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    // No credentials at all: refused before any request (never the cloud
    // metadata service).
    let mut c = cli(w, w.s3_port, cache.path(), &["cat", &url("errs/e.bin")]);
    c.env_remove("AWS_ACCESS_KEY_ID");
    let o = run(c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no credentials"),
        "{err}"
    );
}

/// The objects under a prefix as a tree (what `serve --root s3://…/`
/// serves): directories from the store's common prefixes, files from its
/// objects, sizes as uploaded, each file byte-exact through an
/// `ObjectSource` that shares the tree's client; a missing path is `None`,
/// a path with `..` is refused, and a missing bucket fails at open.
#[test]
fn a_prefix_lists_stats_and_opens_as_a_tree() {
    use shadowfd::source::object::ObjectTree;
    let Some(w) = setup() else { return };
    let top = common::pattern(5_000, 101);
    let deep = common::pattern(300_000, 102);
    let odd = common::pattern(4_097, 103);
    w.put("tree/top.bin", &top);
    w.put("tree/sub/deep.bin", &deep);
    w.put("tree/sub/more/x%20y.bin", &odd);
    w.put("treeish/not-inside.bin", &top);
    let t = ObjectTree::open(&url("tree/"), library_config(w.s3_port)).expect("open the tree");
    let names = |rel: &str| -> Vec<(String, bool, u64)> {
        t.list(rel)
            .unwrap()
            .unwrap_or_else(|| panic!("{rel:?} is not a directory"))
            .into_iter()
            .map(|e| (e.name, e.dir, e.size))
            .collect()
    };
    assert_eq!(
        names(""),
        vec![("sub".into(), true, 0), ("top.bin".into(), false, 5_000)]
    );
    assert_eq!(
        names("sub"),
        vec![
            ("deep.bin".into(), false, 300_000),
            ("more".into(), true, 0)
        ]
    );
    assert_eq!(names("sub/more/"), vec![("x y.bin".into(), false, 4_097)]);
    assert!(t.list("nothing").unwrap().is_none());
    let s = t.stat("sub/deep.bin").unwrap().unwrap();
    assert!(!s.dir && s.size == 300_000 && s.mtime.0 > 0, "{s:?}");
    assert!(t.stat("sub/more").unwrap().unwrap().dir);
    assert!(t.stat("").unwrap().unwrap().dir);
    assert!(t.stat("sub/missing.bin").unwrap().is_none());
    assert!(t.stat("not-inside.bin").unwrap().is_none());
    for (rel, data) in [
        ("top.bin", &top),
        ("sub/deep.bin", &deep),
        ("sub/more/x y.bin", &odd),
    ] {
        let src = t.open_file(rel).expect(rel);
        let mut got = vec![0u8; data.len() + 10];
        let mut at = 0;
        while at < got.len() {
            let n = src.read_at(&mut got[at..], at as u64).unwrap();
            if n == 0 {
                break;
            }
            at += n;
        }
        assert_eq!(at, data.len(), "{rel}: size");
        assert!(&got[..at] == data.as_slice(), "{rel}: bytes differ");
    }
    for bad in [
        "../treeish/not-inside.bin",
        "sub/../top.bin",
        "sub//deep.bin",
    ] {
        let e = t.stat(bad).expect_err(bad).to_string();
        assert!(e.contains("component"), "{bad}: {e}");
    }
    let e = ObjectTree::open("s3://no-such-bucket-here/x/", library_config(w.s3_port))
        .expect_err("a missing bucket")
        .to_string();
    assert!(e.contains("no-such-bucket-here"), "{e}");
}
