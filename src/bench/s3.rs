//! `bench --source s3`: the bench file as an object in a SeaweedFS gateway
//! the bench starts on loopback ([`super::weed`]), reached through a delay
//! line ([`super::proxy`]), read side by side by: an eager shadow (the
//! whole object into a memfd with concurrent ranged GETs), a lazy shadow
//! with an empty disk cache (cold) and one whose cache a previous pass
//! filled (warm), the bench's reader on an `s3fs` mount of the bucket,
//! "download then mmap" (one streaming GET with curl, then a native mmap),
//! and a lazy shadow of the local file the object was uploaded from.

use super::args::{BenchArgs, BenchMode};
use super::fuse::{self, FuseMount};
use super::proxy::DelayProxy;
use super::report::{Sample, Skip};
use super::runners::{Ctx, ReadJob, drop_cache, run_mmap, run_reader, run_shadow_checked};
use super::weed::{self, BUCKET, Gateway, KEY_ID, SECRET};
use super::{interrupt, reader};
use crate::access::{self, Access};
use crate::units::format_size;
use shadowfd::source::object::{CacheConfig, ObjectConfig, ObjectCounters, ObjectSource};
use shadowfd::{Config, Engine, Mode, Share, Source};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The object's key in [`BUCKET`].
const KEY: &str = "bench.bin";

/// The gateway, the proxy, the s3fs mount and how each mode opens the
/// object. Dropped in field order: the mount first, the gateway last.
pub(super) struct S3Bench {
    mount: Option<FuseMount>,
    proxy: DelayProxy,
    gateway: Gateway,
    /// The lazy engine for objects (the object fill unit and readahead
    /// unless --chunk/--readahead or their variables say otherwise).
    lazy: Option<Engine>,
    /// No disk cache (eager), an emptied one (lazy), a filled one (warm).
    eager_cfg: ObjectConfig,
    cold_cfg: ObjectConfig,
    warm_cfg: ObjectConfig,
    cold_dir: PathBuf,
    download_dir: PathBuf,
    /// The counters of the object source opened last.
    last: Mutex<Option<Arc<ObjectCounters>>>,
    /// Per pattern and mode: GETs sent and runs.
    gets: Mutex<GetCounts>,
    latency: Duration,
    pub(super) object_chunk: u64,
    pub(super) object_readahead: u64,
}

/// (pattern, mode) -> (GETs, runs).
type GetCounts = BTreeMap<(String, &'static str), (u64, u64)>;

/// The object's URL.
pub(super) fn url() -> String {
    format!("s3://{BUCKET}/{KEY}")
}

impl S3Bench {
    /// Starts the gateway in `work`, uploads `host_file`, starts the
    /// proxy, makes the engines, mounts s3fs (when its mode is asked for;
    /// skipped with the reason when s3fs or FUSE is missing), and fills
    /// the warm cache with one untimed lazy pass.
    pub(super) fn start(
        a: &BenchArgs,
        work: &Path,
        host_file: &Path,
        base: &Config,
        skipped: &mut Vec<Skip>,
        say: &dyn Fn(String),
    ) -> Result<S3Bench, String> {
        say("starting a SeaweedFS gateway on loopback".into());
        let gateway = Gateway::start(&work.join("weed"))
            .map_err(|e| format!("--source s3: the object store: {e}"))?;
        say(format!("uploading {} to the gateway", format_size(a.size)));
        gateway.put(KEY, host_file)?;
        interrupt::check()?;
        let latency = Duration::from_millis(a.latency_ms());
        let proxy = DelayProxy::start(SocketAddr::from(([127, 0, 0, 1], gateway.s3_port)), latency)
            .map_err(|e| format!("starting the latency proxy: {e}"))?;
        let mut cfg = ObjectConfig::from_env().map_err(|e| e.to_string())?;
        cfg.endpoint = Some(proxy.endpoint());
        cfg.credentials = Some((KEY_ID.into(), SECRET.into()));
        cfg.cache = None;
        let cached = |dir: PathBuf| {
            let mut c = cfg.clone();
            let mut cache = CacheConfig::from_env()
                .ok()
                .flatten()
                .unwrap_or_else(|| CacheConfig {
                    dir: dir.clone(),
                    max_bytes: 0,
                });
            cache.dir = dir;
            // Room for the whole object: nothing is evicted mid-run.
            cache.max_bytes = a.size.saturating_mul(2).max(64 << 20);
            c.cache = Some(cache);
            c
        };
        let cold_dir = work.join("cache-cold");
        let download_dir = work.join("download");
        std::fs::create_dir(&download_dir)
            .map_err(|e| format!("create {}: {e}", download_dir.display()))?;
        let wants = |m: BenchMode| a.modes.contains(&m);
        let (object_chunk, object_readahead) = object_tuning(a, base);
        let lazy = if wants(BenchMode::Lazy) || wants(BenchMode::LazyWarm) {
            let mut c = base.clone();
            c.mode = Mode::Lazy;
            c.workset = shadowfd::WorksetMode::Off;
            c.chunk_size = object_chunk;
            c.readahead = object_readahead;
            match Engine::new(c) {
                Ok(e) => Some(e),
                Err(e @ shadowfd::Error::LazyUnavailable(_)) => {
                    for m in [BenchMode::Lazy, BenchMode::LazyWarm] {
                        if wants(m) && !skipped.iter().any(|s| s.mode == m.name()) {
                            skipped.push(Skip {
                                mode: m.name(),
                                reason: e.to_string(),
                            });
                        }
                    }
                    None
                }
                Err(e) => return Err(e.to_string()),
            }
        } else {
            None
        };
        let mut s = S3Bench {
            mount: None,
            proxy,
            gateway,
            lazy,
            eager_cfg: cfg.clone(),
            cold_cfg: cached(cold_dir.clone()),
            warm_cfg: cached(work.join("cache-warm")),
            cold_dir,
            download_dir,
            last: Mutex::new(None),
            gets: Mutex::new(BTreeMap::new()),
            latency,
            object_chunk,
            object_readahead,
        };
        if wants(BenchMode::S3fs) {
            say("mounting the bucket with s3fs".into());
            match s.mount_s3fs(work, a.size) {
                Ok(m) => s.mount = Some(m),
                Err(reason) => {
                    interrupt::check()?;
                    skipped.push(Skip {
                        mode: BenchMode::S3fs.name(),
                        reason,
                    });
                }
            }
        }
        if wants(BenchMode::LazyWarm) && s.lazy.is_some() {
            say("filling the warm disk cache (one untimed lazy pass over the object)".into());
            s.fill_warm(a.size)?;
        }
        Ok(s)
    }

    /// `s3fs BUCKET MNT -f` through the proxy, path-style, credentials from
    /// a passwd file, read-only; waits until the object shows its size.
    fn mount_s3fs(&self, work: &Path, size: u64) -> Result<FuseMount, String> {
        let s3fs =
            fuse::find_tool("s3fs").ok_or("s3fs not installed (Debian: apt-get install s3fs)")?;
        if let Some(why) = fuse::unavailable() {
            return Err(why);
        }
        let dir = work.join("s3fs");
        let mnt = work.join("s3fs-mnt");
        for d in [&dir, &mnt] {
            std::fs::create_dir(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let pw = dir.join("passwd");
        std::fs::write(&pw, format!("{KEY_ID}:{SECRET}\n"))
            .and_then(|()| std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| format!("writing {}: {e}", pw.display()))?;
        let mut cmd = Command::new(s3fs);
        cmd.arg(BUCKET).arg(&mnt).arg("-f").arg("-o").arg(format!(
            "url={},use_path_request_style,passwd_file={},ro,endpoint={},sigv4",
            self.proxy.endpoint(),
            pw.display(),
            weed::REGION
        ));
        let m = FuseMount::spawn(cmd, "s3fs", &mnt, &dir.join("s3fs.log"))?;
        let f = mnt.join(KEY);
        let t0 = Instant::now();
        loop {
            match std::fs::metadata(&f) {
                Ok(md) if md.len() == size => return Ok(m),
                Ok(md) => {
                    return Err(format!(
                        "{} on the s3fs mount has {} bytes, not {size}",
                        f.display(),
                        md.len()
                    ));
                }
                Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                    return Err(format!("{} on the s3fs mount: {e}", f.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
            interrupt::check()?;
        }
    }

    fn s3fs_file(&self) -> Option<PathBuf> {
        self.mount.as_ref().map(|m| m.mountpoint().join(KEY))
    }

    /// One lazy pass touching every page through the warm cache's source.
    fn fill_warm(&self, size: u64) -> Result<(), String> {
        let engine = self.lazy.as_ref().expect("lazy engine");
        let src = self.open(&self.warm_cfg).map_err(|e| e.to_string())?;
        let shadow = engine.open(src).map_err(|e| e.to_string())?;
        let map = shadow.map(Share::Shared).map_err(|e| e.to_string())?;
        let page = shadowfd::page_size() as u64;
        std::hint::black_box(access::touch(&map, 0..size.div_ceil(page), page));
        Ok(())
    }

    /// A fresh object source with `cfg`, whose counters become `last`.
    fn open(&self, cfg: &ObjectConfig) -> shadowfd::Result<Arc<dyn Source>> {
        let s = ObjectSource::open_with(&url(), cfg.clone())?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.counters());
        Ok(Arc::new(s))
    }

    /// Counts the GETs of the last source opened for `pat` under `mode`.
    fn tally(&self, pat: &Access, mode: BenchMode) {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = last {
            let mut g = self.gets.lock().unwrap_or_else(|e| e.into_inner());
            let e = g.entry((pat.to_string(), mode.name())).or_default();
            e.0 += c.snapshot().requests;
            e.1 += 1;
        }
    }

    /// One timed run of `pages` under `mode`.
    pub(super) fn run_one(
        &self,
        ctx: &Ctx,
        mode: BenchMode,
        pat: &Access,
        seed: u64,
        pages: &[u64],
    ) -> Result<Sample, String> {
        let p = ctx.page;
        let check = Some(ctx.reader.data_seed);
        let object = |cfg: &ObjectConfig, engine: Option<&Engine>| {
            let engine = engine.ok_or("no engine for this mode")?;
            let r = run_shadow_checked(engine, &|| self.open(cfg), pages, p, check);
            self.tally(pat, mode);
            r
        };
        match mode {
            BenchMode::Eager => object(&self.eager_cfg, ctx.eager.as_ref()),
            BenchMode::Lazy => {
                // Cold: the disk cache starts empty (emptied untimed).
                match std::fs::remove_dir_all(&self.cold_dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("emptying {}: {e}", self.cold_dir.display())),
                }
                object(&self.cold_cfg, self.lazy.as_ref())
            }
            BenchMode::LazyWarm => object(&self.warm_cfg, self.lazy.as_ref()),
            BenchMode::LazyLocal => run_shadow_checked(
                ctx.lazy.as_ref().ok_or("no lazy engine")?,
                &|| ctx.data.source(),
                pages,
                p,
                check,
            ),
            BenchMode::Native => run_mmap(&ctx.host_file, pages, p),
            BenchMode::Download => self.run_download(ctx, pages),
            BenchMode::S3fs => {
                let f = self.s3fs_file().ok_or("no s3fs mount")?;
                drop_cache(&f)?;
                let job = ReadJob {
                    size: ctx.size,
                    pat,
                    seed,
                    io: reader::Io::Mmap,
                };
                let backing = f.to_string_lossy().into_owned();
                run_reader(ctx.reader.fuse(&f, &job), Some(&backing), pages)
            }
            m => Err(format!("{} is not a mode of --source s3", m.name())),
        }
    }

    /// One streaming GET (curl, through the proxy) to a local file, then a
    /// native mmap of it: open = the download + open(2).
    fn run_download(&self, ctx: &Ctx, pages: &[u64]) -> Result<Sample, String> {
        let file = self.download_dir.join(KEY);
        let _ = std::fs::remove_file(&file);
        let url = format!("{}/{BUCKET}/{KEY}", self.proxy.endpoint());
        let t0 = Instant::now();
        let out = weed::curl_cmd(3600)
            .arg("-f")
            .arg("-o")
            .arg(&file)
            .arg(&url)
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        let download_us = t0.elapsed().as_secs_f64() * 1e6;
        if !out.status.success() {
            return Err(format!(
                "downloading {url}: curl {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mut s = run_mmap(&file, pages, ctx.page)?;
        s.open_us += download_us;
        let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&file);
        if len != ctx.size {
            return Err(format!("the download has {len} bytes, not {}", ctx.size));
        }
        Ok(s)
    }

    /// Unmounts s3fs (an error if it stays mounted); the proxy and the
    /// gateway stop when `self` drops.
    pub(super) fn finish(mut self) -> Result<Vec<String>, String> {
        if let Some(mut m) = self.mount.take() {
            let mp = m.mountpoint().to_path_buf();
            m.unmount()?;
            if fuse::is_mounted(&mp) {
                return Err(format!("{} is still mounted after unmount", mp.display()));
            }
        }
        let gets = self.gets.lock().unwrap_or_else(|e| e.into_inner());
        let per: Vec<String> = gets
            .iter()
            .map(|((p, m), (n, runs))| format!("{p} {m} {:.1}", *n as f64 / (*runs).max(1) as f64))
            .collect();
        let mut notes = vec![format!(
            "object store: a SeaweedFS gateway (weed mini) on 127.0.0.1:{}, loopback only, \
             telemetry off, started by the bench; every request goes through a proxy that passes \
             each piece {} ms late in each direction (a delay line, not a rate limit: a round \
             trip of {} ms)",
            self.gateway.s3_port,
            self.latency.as_millis(),
            2 * self.latency.as_millis()
        )];
        if !per.is_empty() {
            notes.push(format!(
                "GETs per run (mean over the reps, from the source's counters): {}",
                per.join(", ")
            ));
        }
        Ok(notes)
    }
}

/// The lazy engine's fill unit and readahead for objects: `--chunk` and
/// `--readahead` (or SHADOWFD_CHUNK, SHADOWFD_READAHEAD) when given, else
/// the CLI's object defaults (what `shadowfd map s3://...` uses).
fn object_tuning(a: &BenchArgs, base: &Config) -> (u64, u64) {
    let set = |flag: Option<u64>, var: &str| flag.is_some() || std::env::var_os(var).is_some();
    let chunk = if set(a.tuning.chunk, "SHADOWFD_CHUNK") {
        base.chunk_size
    } else {
        crate::object::DEFAULT_CHUNK
    };
    let readahead = if set(a.tuning.readahead, "SHADOWFD_READAHEAD") {
        base.readahead
    } else {
        crate::object::DEFAULT_READAHEAD
    };
    (chunk, readahead)
}

/// The standing notes of an s3 run.
pub(super) fn notes(a: &BenchArgs, chunk: u64, readahead: u64) -> Vec<String> {
    let mut n = vec![format!(
        "--source s3: the bench file is uploaded once as s3://{BUCKET}/{KEY}; every mode \
         reads it through the proxy except lazy-local and native, which read the local file it \
         was uploaded from (warm in the page cache)"
    )];
    let m = |x: BenchMode| a.modes.contains(&x);
    if m(BenchMode::Eager) {
        n.push(
            "eager: an object source with no disk cache in an eager engine: open fetches the \
             whole object into a sealed memfd with concurrent ranged GETs"
                .into(),
        );
    }
    if m(BenchMode::Lazy) || m(BenchMode::LazyWarm) {
        n.push(format!(
            "lazy (cold): a lazy shadow of the object, fill unit {}, readahead {}, with a disk \
             chunk cache emptied (untimed) before every run; lazy-warm: the same with a disk \
             cache that one untimed lazy pass over the whole object filled before the runs",
            format_size(chunk),
            format_size(readahead)
        ));
    }
    if m(BenchMode::S3fs) {
        n.push(
            "s3fs: the bench's reader program (as in the fuse mode) on an s3fs mount of the \
             bucket (path-style, sigv4, ro, no s3fs disk cache) through the same proxy; the \
             file's kernel page cache is dropped (untimed) before every run"
                .into(),
        );
    }
    if m(BenchMode::Download) {
        n.push(
            "download: open = one streaming GET with curl through the proxy into a local file, \
             then open(2); access = a native mmap and the touching; the file is deleted \
             (untimed) after every run"
                .into(),
        );
    }
    if m(BenchMode::LazyLocal) {
        n.push(
            "lazy-local: a lazy shadow of the local file, tuned as the plain lazy mode (the \
             local floor the warm cache is compared with)"
                .into(),
        );
    }
    n.push(
        "every shadow's touched pages are checked (untimed) against the seeded data after \
         each run"
            .into(),
    );
    n
}
