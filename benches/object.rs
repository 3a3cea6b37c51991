//! An object in S3 (a local SeaweedFS gateway behind a proxy adding a
//! round trip's latency), read five ways side by side in one run:
//! download-then-mmap, an s3fs mount, an eager shadow, a lazy shadow with
//! a cold and with a warm disk cache, and (the floor) a lazy shadow of the
//! downloaded local file.
//!
//! `cargo bench --bench object` (256 MiB, 5 ms each way);
//! SHADOWFD_BENCH_OBJECT_SIZE=1G and SHADOWFD_BENCH_LATENCY_MS=N change
//! them. docs/benchmarks.md has the figures.

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/object/proxy.rs"]
mod proxy;
#[allow(dead_code)]
#[path = "../tests/object/weed.rs"]
mod weed;

use shadowfd::source::object::{CacheConfig, ObjectConfig, ObjectSource};
use shadowfd::{Config, Engine, FileSource, Mode, Share, Source};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn size_from_env() -> usize {
    std::env::var("SHADOWFD_BENCH_OBJECT_SIZE")
        .ok()
        .map(|v| v.parse::<shadowfd::config::Size>().expect("a size").0 as usize)
        .unwrap_or(256 << 20)
}

/// The pages a pattern touches, in order.
fn pages(pattern: &str, npages: usize) -> Vec<usize> {
    match pattern {
        "seq" => (0..npages).collect(),
        _ => {
            // random:0.01: 1 % of the pages, a fixed shuffled sample.
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            let mut v: Vec<usize> = (0..npages).collect();
            for i in (1..npages).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.swap(i, (x % (i as u64 + 1)) as usize);
            }
            v.truncate((npages / 100).max(1));
            v
        }
    }
}

fn touch(map: &[u8], pages: &[usize]) -> u64 {
    let page = shadowfd::page_size();
    let mut sum = 0u64;
    for &p in pages {
        // SAFETY: `p * page` is inside `map`, a live mapping.
        sum += u64::from(unsafe { std::ptr::read_volatile(map.as_ptr().add(p * page)) });
    }
    sum
}

fn engine(mode: Mode) -> Engine {
    let mut c = Config::default();
    c.mode = mode;
    c.max_size = 4 << 30;
    c.chunk_size = 4 << 10;
    c.readahead = 32 << 20;
    Engine::new(c).expect("engine")
}

fn object(w: &weed::Weed, port: u16, cache: Option<&std::path::Path>) -> ObjectSource {
    let mut cfg = ObjectConfig::default();
    cfg.endpoint = Some(format!("http://127.0.0.1:{port}"));
    cfg.credentials = Some((weed::KEY_ID.into(), weed::SECRET.into()));
    cfg.cache = cache.map(|d| CacheConfig {
        dir: d.to_path_buf(),
        max_bytes: 8 << 30,
    });
    let _ = w;
    ObjectSource::open_with(&format!("s3://{}/bench.bin", weed::BUCKET), cfg).expect("open")
}

/// Opens, maps and touches a shadow of `src`; seconds, and the sum read.
fn shadow_run(e: &Engine, src: Arc<dyn Source>, pages: &[usize]) -> (f64, u64) {
    let t = Instant::now();
    let s = e.open(src).expect("open shadow");
    let m = s.map(Share::Shared).expect("map");
    let sum = touch(&m, pages);
    (t.elapsed().as_secs_f64(), sum)
}

fn mmap_run(path: &std::path::Path, pages: &[usize]) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only shared mapping of a file nobody truncates
    // while it is mapped; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` maps `len` readable bytes until the munmap below.
    let map = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    let sum = touch(map, pages);
    // SAFETY: unmaps exactly the mapping made above; `map` is not used after.
    unsafe { libc::munmap(p, len) };
    sum
}

fn drop_page_cache(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: posix_fadvise on an open descriptor; advice only.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
}

/// The s3fs mount of the bucket through the proxy, if s3fs is installed.
struct S3fs {
    dir: tempfile::TempDir,
}

impl S3fs {
    fn mount(port: u16) -> Option<S3fs> {
        let dir = tempfile::tempdir().ok()?;
        let pw = dir.path().join("passwd");
        std::fs::write(&pw, format!("{}:{}\n", weed::KEY_ID, weed::SECRET)).ok()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).ok()?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let st = Command::new("s3fs")
            .arg(weed::BUCKET)
            .arg(&mnt)
            .arg("-o")
            .arg(format!(
                "url=http://127.0.0.1:{port},use_path_request_style,passwd_file={},\
                 nonempty,ro,endpoint=us-east-1,sigv4",
                pw.display()
            ))
            .status()
            .ok()?;
        if !st.success() {
            return None;
        }
        let f = mnt.join("bench.bin");
        let t0 = Instant::now();
        while !f.exists() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        f.exists().then_some(S3fs { dir })
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt/bench.bin")
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount")
            .arg("-u")
            .arg(self.dir.path().join("mnt"))
            .status();
        let _ = Command::new("umount")
            .arg(self.dir.path().join("mnt"))
            .status();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let size = size_from_env();
    let latency = std::env::var("SHADOWFD_BENCH_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5u64);
    let w = weed::Weed::start().expect("SeaweedFS starts");
    let data = common::pattern(size, 99);
    w.put("bench.bin", &data);
    drop(data);
    let p = proxy::Proxy::start(w.s3_port);
    p.set_latency(Duration::from_millis(latency));
    let work = tempfile::tempdir().unwrap();
    let npages = size / shadowfd::page_size();
    println!(
        "object bench: {} MiB, {latency} ms added each way, {}",
        size >> 20,
        chrono_now()
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "pattern", "download+mmap", "s3fs", "eager", "lazy cold", "lazy warm", "local lazy"
    );
    let s3fs = S3fs::mount(p.port);
    for pattern in ["seq", "random:0.01"] {
        let pg = pages(pattern, npages);
        // Download then mmap: one streaming GET to a local file.
        let local = work.path().join("downloaded.bin");
        let t = Instant::now();
        let st = Command::new("curl")
            .args(["-s", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{}:{}", weed::KEY_ID, weed::SECRET))
            .arg("-o")
            .arg(&local)
            .arg(format!(
                "http://127.0.0.1:{}/{}/bench.bin",
                p.port,
                weed::BUCKET
            ))
            .status()
            .unwrap();
        assert!(st.success());
        let want = mmap_run(&local, &pg);
        let download = t.elapsed().as_secs_f64();

        let fuse = s3fs.as_ref().map(|m| {
            let t = Instant::now();
            let sum = mmap_run(&m.file(), &pg);
            assert_eq!(sum, want, "s3fs read other bytes");
            let secs = t.elapsed().as_secs_f64();
            drop_page_cache(&m.file());
            secs
        });

        let eager = {
            let src = object(&w, p.port, None);
            let counters = src.counters();
            let (secs, sum) = shadow_run(&engine(Mode::Eager), Arc::new(src), &pg);
            assert_eq!(sum, want);
            if std::env::var_os("SHADOWFD_BENCH_VERBOSE").is_some() {
                eprintln!("eager: {:?}", counters.snapshot());
            }
            secs
        };
        let lazy = engine(Mode::Lazy);
        let (cold, sum) = shadow_run(&lazy, Arc::new(object(&w, p.port, None)), &pg);
        assert_eq!(sum, want);
        let cache = work
            .path()
            .join(format!("cache-{}", pattern.replace(':', "-")));
        let _ = shadow_run(&lazy, Arc::new(object(&w, p.port, Some(&cache))), &pg);
        let src = object(&w, p.port, Some(&cache));
        let counters = src.counters();
        let (warm, sum) = shadow_run(&lazy, Arc::new(src), &pg);
        assert_eq!(sum, want);
        assert_eq!(counters.snapshot().requests, 0, "the warm run sent GETs");
        // The local file stays in the page cache, as the warm cache's
        // chunk files do.
        let (local_lazy, sum) = shadow_run(&lazy, Arc::new(FileSource::open(&local).unwrap()), &pg);
        assert_eq!(sum, want);
        let ms = |s: f64| format!("{:.1} ms", s * 1e3);
        println!(
            "{:<12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            pattern,
            ms(download),
            fuse.map_or("n/a".into(), ms),
            ms(eager),
            ms(cold),
            ms(warm),
            ms(local_lazy)
        );
        println!(
            "{:<12} ratios: download/lazy-cold {:.1}x, s3fs/lazy-cold {}, warm/local {:.2}x",
            "",
            download / cold,
            fuse.map_or("n/a".into(), |f| format!("{:.1}x", f / cold)),
            warm / local_lazy
        );
        let _ = std::fs::remove_file(&local);
    }
    if s3fs.is_none() {
        println!("(s3fs not installed or its mount failed: apt-get install s3fs)");
    }
}

/// The UTC date and time, from date(1).
fn chrono_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
