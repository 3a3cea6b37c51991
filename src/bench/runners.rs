//! The mode runners: one timed run of one pattern under one mode, as a
//! [`Sample`] (open, access, close, resident bytes, faults).

use super::args::BenchMode;
use super::report::Sample;
use super::{data, filemap, raw, raw_remote, reader};
use crate::Target;
use crate::access::{self, Access};
use shadowfd::{Engine, Share, Source};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `--pin on`: every timed touching thread is kept on the CPU it starts on
/// for its run, as the raw floor's always was (set once, before the runs).
pub(super) static PIN: AtomicBool = AtomicBool::new(true);

/// Pins the calling thread where it is for the guard's life, if `--pin on`.
pub(super) fn pin_here() -> Option<raw::PinHere> {
    PIN.load(Ordering::Relaxed).then(raw::PinHere::new)
}
use std::time::Instant;

/// Where eager and lazy shadows read their bytes from. [`DataSource::source`]
/// is the only place the bench makes a [`Source`], so another backend (such
/// as a file inside a disk image) plugs in here.
pub(super) enum DataSource {
    HostFile(Target),
    /// The same file inside the bench's ext4 image (`Target::image` is set).
    Image(Target),
}

impl DataSource {
    /// A fresh source (opened anew; timed as part of the shadow's open).
    pub(super) fn source(&self) -> shadowfd::Result<Arc<dyn Source>> {
        match self {
            DataSource::HostFile(t) | DataSource::Image(t) => t.source(),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            DataSource::HostFile(_) => "host file, warm in the page cache".into(),
            DataSource::Image(_) => {
                "the same file inside an ext4 image (image warm in the page cache)".into()
            }
        }
    }
}

/// Everything one run needs.
pub(super) struct Ctx {
    pub(super) data: DataSource,
    pub(super) image_data: Option<DataSource>,
    pub(super) host_file: PathBuf,
    pub(super) fuse_file: Option<PathBuf>,
    pub(super) eager: Option<Engine>,
    pub(super) lazy: Option<Engine>,
    /// Lazy engines that record and replay working sets (lazy-replay).
    pub(super) workset: Option<(Engine, Engine)>,
    /// The file's bytes, read before the runs: the memcpy mode's source.
    pub(super) in_memory: Option<Vec<u8>>,
    /// The chunk the raw handler fills per fault (the lazy engine's).
    pub(super) chunk: u64,
    pub(super) size: u64,
    pub(super) page: u64,
    /// How the reader program is started (fuse and run modes).
    pub(super) reader: ReaderCmd,
}

/// What the external reader modes need: this executable (which is the
/// reader, `shadowfd bench-reader`), and for `run` the image, the preload
/// library and the lazy engine's tuning as `shadowfd run` flags.
pub(super) struct ReaderCmd {
    pub(super) exe: PathBuf,
    pub(super) image: PathBuf,
    /// `libshadowfd_preload.so`, when found.
    pub(super) preload: Option<PathBuf>,
    /// The path prefix the reader sees the image under in `run`.
    pub(super) prefix: PathBuf,
    pub(super) tuning: Vec<String>,
    pub(super) data_seed: u64,
}

/// One run of the reader: the pattern, its seed, and mmap or pread.
pub(super) struct ReadJob<'a> {
    pub(super) size: u64,
    pub(super) pat: &'a Access,
    pub(super) seed: u64,
    pub(super) io: reader::Io,
}

impl ReaderCmd {
    /// `shadowfd bench-reader` for `path`.
    pub(super) fn reader_args(&self, path: &Path, j: &ReadJob) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            self.exe.clone().into(),
            "bench-reader".into(),
            "--path".into(),
            path.into(),
        ];
        for (k, x) in [
            ("--size", j.size.to_string()),
            ("--pattern", j.pat.to_string()),
            ("--pattern-seed", j.seed.to_string()),
            ("--data-seed", self.data_seed.to_string()),
            ("--io", j.io.name().to_string()),
        ] {
            v.push(k.into());
            v.push(x.into());
        }
        if PIN.load(Ordering::Relaxed) {
            v.push("--pin".into());
        }
        v
    }

    /// The fuse modes' command: the reader on the mount, no shim.
    pub(super) fn fuse(&self, file: &Path, j: &ReadJob) -> std::process::Command {
        let args = self.reader_args(file, j);
        let mut c = std::process::Command::new(&args[0]);
        c.args(&args[1..]);
        c
    }

    /// The run modes' command: `shadowfd run --image IMAGE --mount PREFIX
    /// [tuning] -- shadowfd bench-reader --path PREFIX/bench.bin ...`.
    pub(super) fn run(&self, j: &ReadJob) -> std::process::Command {
        let mut c = std::process::Command::new(&self.exe);
        c.arg("run")
            .arg("--image")
            .arg(&self.image)
            .arg("--mount")
            .arg(&self.prefix)
            .args(&self.tuning)
            .arg("--")
            .args(self.reader_args(&self.prefix.join("bench.bin"), j));
        if let Some(p) = &self.preload {
            c.env("SHADOWFD_PRELOAD", p);
        }
        c
    }
}

/// Minor + major page faults of the calling thread so far.
pub(super) fn thread_faults() -> u64 {
    // SAFETY: getrusage writes one rusage struct to a live, zeroed local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD is valid on Linux.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    (ru.ru_minflt + ru.ru_majflt) as u64
}

pub(super) fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// Opens a shadow through `engine`, maps it, touches `pages`.
pub(super) fn run_shadow(
    engine: &Engine,
    data: &DataSource,
    pages: &[u64],
    page: u64,
) -> Result<Sample, String> {
    run_shadow_checked(engine, &|| data.source(), pages, page, None)
}

/// [`run_shadow`] of the source `open` makes; with `check` (the data's
/// seed), every touched page is then compared (untimed) with the data.
pub(super) fn run_shadow_checked(
    engine: &Engine,
    open: &dyn Fn() -> shadowfd::Result<Arc<dyn Source>>,
    pages: &[u64],
    page: u64,
    check: Option<u64>,
) -> Result<Sample, String> {
    let _pin = pin_here();
    let f0 = thread_faults();
    let t0 = Instant::now();
    let shadow = open()
        .and_then(|s| engine.open(s))
        .map_err(|e| e.to_string())?;
    let open_us = us(t0);
    let t1 = Instant::now();
    let map = shadow.map(Share::Shared).map_err(|e| e.to_string())?;
    std::hint::black_box(access::touch(&map, pages.iter().copied(), page));
    let access_us = us(t1);
    let page_faults = thread_faults() - f0;
    let faults = shadow.stats().faults;
    let resident_bytes = shadow.resident_bytes().map_err(|e| e.to_string())?;
    if let Some(seed) = check {
        check_pages(&map, pages, page, seed)?;
    }
    let t2 = Instant::now();
    drop(map);
    drop(shadow);
    Ok(Sample::in_process(
        (open_us, access_us, us(t2)),
        resident_bytes,
        (faults, page_faults),
    ))
}

/// Compares every byte of every page in `pages` of `map` with the data
/// written with `seed`.
fn check_pages(map: &[u8], pages: &[u64], page: u64, seed: u64) -> Result<(), String> {
    for &p in pages {
        let start = (p * page) as usize;
        let end = (start + page as usize).min(map.len());
        if let Some(at) = data::first_mismatch(&map[start..end], start as u64, seed) {
            return Err(format!(
                "byte {at} of the shadow is not the data: the mode read the wrong bytes"
            ));
        }
    }
    Ok(())
}

/// Opens `path`, maps it, touches `pages`: the page cache reference.
pub(super) fn run_mmap(path: &Path, pages: &[u64], page: u64) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let _pin = pin_here();
    let f0 = thread_faults();
    let t0 = Instant::now();
    let file = File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len() as usize;
    let open_us = us(t0);
    let t1 = Instant::now();
    let map = filemap::FileMap::new(&file, len).map_err(err)?;
    std::hint::black_box(access::touch(&map, pages.iter().copied(), page));
    let access_us = us(t1);
    let page_faults = thread_faults() - f0;
    let resident_bytes = map.resident_bytes().map_err(err)?;
    let t2 = Instant::now();
    drop(map);
    drop(file);
    Ok(Sample::in_process(
        (open_us, access_us, us(t2)),
        resident_bytes,
        (page_faults, page_faults),
    ))
}

/// The `raw` floor: open = open(2) of the file, memfd, userfaultfd, mmap,
/// UFFDIO_REGISTER and the handler thread; access = touching. Then
/// (untimed) every touched page is compared with the data.
pub(super) fn run_raw(ctx: &Ctx, pages: &[u64]) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("raw handler: {e}");
    let _pin = pin_here();
    let f0 = thread_faults();
    let t0 = Instant::now();
    let region =
        raw::RawRegion::open(&ctx.host_file, ctx.size, ctx.chunk, ctx.page).map_err(err)?;
    let open_us = us(t0);
    let t1 = Instant::now();
    std::hint::black_box(access::touch(&region, pages.iter().copied(), ctx.page));
    let access_us = us(t1);
    let page_faults = thread_faults() - f0;
    let faults = region.faults();
    let resident_bytes = region.resident_bytes().map_err(err)?;
    check_pages(&region, pages, ctx.page, ctx.reader.data_seed)?;
    let t2 = Instant::now();
    region.close().map_err(err)?;
    Ok(Sample::in_process(
        (open_us, access_us, us(t2)),
        resident_bytes,
        (faults, page_faults),
    ))
}

/// The `raw-remote` floor: `raw` with its handler in another process.
/// Untimed: starting the handler process (placed on this thread's CPU,
/// `SCHED_IDLE`), as `run`'s embedded server's start is. open = open(2) of
/// the file + memfd + userfaultfd + mmap + UFFDIO_REGISTER + sending the
/// userfaultfd and the file to the handler; access = touching. Then
/// (untimed) every touched page is compared with the data; close stops the
/// handler, which reports the faults it answered.
pub(super) fn run_raw_remote(ctx: &Ctx, pages: &[u64]) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("raw-remote handler: {e}");
    let _pin = pin_here();
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    let handler = raw_remote::RemoteHandler::start(&ctx.reader.exe, cpu).map_err(err)?;
    let f0 = thread_faults();
    let t0 = Instant::now();
    let region =
        raw_remote::RemoteRegion::open(handler, &ctx.host_file, ctx.size, ctx.chunk, ctx.page)
            .map_err(err)?;
    let open_us = us(t0);
    let t1 = Instant::now();
    std::hint::black_box(access::touch(&region, pages.iter().copied(), ctx.page));
    let access_us = us(t1);
    let page_faults = thread_faults() - f0;
    let resident_bytes = region.resident_bytes().map_err(err)?;
    check_pages(&region, pages, ctx.page, ctx.reader.data_seed)?;
    let t2 = Instant::now();
    let faults = region.close().map_err(err)?;
    Ok(Sample::in_process(
        (open_us, access_us, us(t2)),
        resident_bytes,
        (faults, page_faults),
    ))
}

/// The `memcpy` floor: open = memfd + mmap + memcpy of the whole file from
/// memory; access = touching.
pub(super) fn run_memcpy(ctx: &Ctx, pages: &[u64]) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("memcpy floor: {e}");
    let src = ctx.in_memory.as_deref().expect("file read into memory");
    let _pin = pin_here();
    let f0 = thread_faults();
    let t0 = Instant::now();
    let region = raw::CopyRegion::fill(src, ctx.page).map_err(err)?;
    let open_us = us(t0);
    let t1 = Instant::now();
    std::hint::black_box(access::touch(&region, pages.iter().copied(), ctx.page));
    let access_us = us(t1);
    let page_faults = thread_faults() - f0;
    let resident_bytes = region.resident_bytes().map_err(err)?;
    let t2 = Instant::now();
    drop(region);
    Ok(Sample::in_process(
        (open_us, access_us, us(t2)),
        resident_bytes,
        (page_faults, page_faults),
    ))
}

/// Runs the reader program (`cmd`), which times itself, and checks what it
/// says: its mapping must be backed by `want_backing` (a shadow memfd under
/// the shim, the file itself on the mount), and it checked every touched
/// page against the data.
pub(super) fn run_reader(
    mut cmd: std::process::Command,
    want_backing: Option<&str>,
    pages: &[u64],
) -> Result<Sample, String> {
    cmd.env_remove("LD_PRELOAD")
        .env_remove("SHADOWFD_RUN_SOCKET")
        .env_remove("SHADOWFD_RUN_MOUNT")
        .stdin(std::process::Stdio::null());
    let t0 = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("starting the reader {:?}: {e}", cmd.get_program()))?;
    let process_us = us(t0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "the reader failed ({}): {}",
            out.status,
            stderr.trim()
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let m: reader::Measured = serde_json::from_str(line.trim()).map_err(|e| {
        format!(
            "the reader's output is not its JSON line ({e}): {:?}; stderr: {}",
            line.trim(),
            stderr.trim()
        )
    })?;
    if let Some(want_backing) = want_backing.filter(|w| !m.backing.starts_with(w)) {
        return Err(format!(
            "the reader's mapping is backed by {:?}, not {want_backing}...: it did not read \
             the file the way this mode means",
            m.backing
        ));
    }
    if m.pages_checked != pages.len() as u64 {
        return Err(format!(
            "the reader checked {} pages, the pattern has {}",
            m.pages_checked,
            pages.len()
        ));
    }
    Ok(Sample {
        open_us: m.open_us,
        access_us: m.access_us,
        close_us: m.close_us,
        resident_bytes: m.resident_bytes,
        faults: m.page_faults,
        page_faults: m.page_faults,
        process_us: Some(process_us),
    })
}

pub(super) fn run_one(
    ctx: &Ctx,
    mode: BenchMode,
    pat: &Access,
    seed: u64,
    pages: &[u64],
) -> Result<Sample, String> {
    let p = ctx.page;
    match mode {
        BenchMode::Eager => run_shadow(
            ctx.eager.as_ref().expect("eager engine"),
            &ctx.data,
            pages,
            p,
        ),
        BenchMode::Lazy => run_shadow(ctx.lazy.as_ref().expect("lazy engine"), &ctx.data, pages, p),
        BenchMode::LazyReplay => {
            let (record, replay) = ctx.workset.as_ref().expect("working-set engines");
            // The first run, untimed: it leaves the record on its drop.
            run_shadow(record, &ctx.data, pages, p)?;
            run_shadow(replay, &ctx.data, pages, p)
        }
        BenchMode::EagerImage | BenchMode::LazyImage => {
            let engine = if mode.is_eager() {
                &ctx.eager
            } else {
                &ctx.lazy
            };
            let data = ctx.image_data.as_ref().expect("image built");
            run_shadow(engine.as_ref().expect("engine"), data, pages, p)
        }
        BenchMode::Native => run_mmap(&ctx.host_file, pages, p),
        BenchMode::Raw => run_raw(ctx, pages),
        BenchMode::RawRemote => run_raw_remote(ctx, pages),
        BenchMode::Memcpy => run_memcpy(ctx, pages),
        BenchMode::Fuse | BenchMode::FuseRead | BenchMode::Run | BenchMode::RunRead => {
            let io = if matches!(mode, BenchMode::Fuse | BenchMode::Run) {
                reader::Io::Mmap
            } else {
                reader::Io::Read
            };
            let job = ReadJob {
                size: ctx.size,
                pat,
                seed,
                io,
            };
            // What must back the reader's mapping (read: no mapping).
            let (cmd, backing) = if mode.needs_mount() {
                let f = ctx.fuse_file.as_ref().expect("fuse mount");
                drop_cache(f)?;
                (ctx.reader.fuse(f, &job), f.to_string_lossy().into_owned())
            } else {
                (ctx.reader.run(&job), "/memfd:".to_string())
            };
            let backing = (io == reader::Io::Mmap).then_some(backing.as_str());
            run_reader(cmd, backing, pages)
        }
        BenchMode::LazyWarm | BenchMode::S3fs | BenchMode::Download | BenchMode::LazyLocal => Err(
            format!("{} reads an object: it needs --source s3", mode.name()),
        ),
    }
}

/// Drops the clean page cache pages of `path` (untimed), so that a run
/// through the FUSE mount starts cold like a fresh shadow: the kernel keeps
/// a FUSE file's pages across opens otherwise.
pub(super) fn drop_cache(path: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("dropping the page cache of {}: {e}", path.display());
    let f = File::open(path).map_err(err)?;
    // SAFETY: fadvise on a descriptor we own; it only drops clean cache pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(err(std::io::Error::from_raw_os_error(r)));
    }
    Ok(())
}
