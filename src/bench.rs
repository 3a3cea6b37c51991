//! `shadowfd bench`: eager and lazy shadows side by side in one run, with a
//! plain `mmap` of the host file (the page cache) and an `mmap` through a
//! `fuse2fs` mount as references. See docs/benchmarks.md.

mod data;
mod filemap;
mod fuse;
mod interrupt;
mod plot;
mod raw;
pub(super) mod reader;
pub(super) mod report;
mod small;

use crate::access::{self, Access};
use crate::units::format_size;
use crate::{CliResult, Target, Tuning, size_arg};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use report::{Cell, Ratio, Report, Sample, Skip};
use shadowfd::{Config, Engine, Mode, Share, Source};
use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How the file is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Eager shadow: copied whole into a memfd at open.
    Eager,
    /// Lazy shadow: filled through userfaultfd on first touch.
    Lazy,
    /// Lazy shadow replaying a working set (docs/worksets.md): an untimed
    /// run of the same pages records it first, then the timed run's open
    /// starts the replay, which races the access.
    LazyReplay,
    /// mmap of the host file itself (page cache; warm).
    Native,
    /// mmap of the file through a read-only fuse2fs mount of an ext4 image,
    /// by the reader program the run mode runs.
    Fuse,
    /// Eager shadow of the same file inside the ext4 image, read in user space.
    EagerImage,
    /// Lazy shadow of the same file inside the ext4 image, read in user space.
    LazyImage,
    /// Floor of the lazy mechanism: a minimal userfaultfd handler (one thread
    /// blocked in read(2) on the toucher's CPU, one pread and one UFFDIO_COPY
    /// per fault).
    Raw,
    /// Floor of the copy: a fresh memfd mapping filled by one memcpy from a
    /// copy of the file already in memory.
    Memcpy,
    /// mmap of the same file inside the ext4 image by an unmodified program
    /// under `shadowfd run --image` (the LD_PRELOAD shim); the same reader
    /// program as the fuse mode.
    Run,
    /// The fuse mode's reader with pread(2) of each touched page (4 KiB)
    /// instead of mmap.
    FuseRead,
    /// The run mode's reader with pread(2) of each touched page (the shim's
    /// read path) instead of mmap.
    RunRead,
}

impl BenchMode {
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Eager => "eager",
            BenchMode::Lazy => "lazy",
            BenchMode::LazyReplay => "lazy-replay",
            BenchMode::Native => "native",
            BenchMode::Fuse => "fuse",
            BenchMode::EagerImage => "eager-image",
            BenchMode::LazyImage => "lazy-image",
            BenchMode::Raw => "raw",
            BenchMode::Memcpy => "memcpy",
            BenchMode::Run => "run",
            BenchMode::FuseRead => "fuse-read",
            BenchMode::RunRead => "run-read",
        }
    }

    fn is_eager(self) -> bool {
        matches!(self, BenchMode::Eager | BenchMode::EagerImage)
    }

    fn is_lazy(self) -> bool {
        matches!(
            self,
            BenchMode::Lazy | BenchMode::LazyImage | BenchMode::LazyReplay
        )
    }

    /// Whether a run holds a memfd of the whole file's size (when filled).
    fn holds_copy(self) -> bool {
        self.is_eager()
            || self.is_lazy()
            || matches!(
                self,
                BenchMode::Raw | BenchMode::Memcpy | BenchMode::Run | BenchMode::RunRead
            )
    }

    fn needs_image(self) -> bool {
        matches!(
            self,
            BenchMode::Fuse
                | BenchMode::EagerImage
                | BenchMode::LazyImage
                | BenchMode::Run
                | BenchMode::FuseRead
                | BenchMode::RunRead
        )
    }

    /// Modes that read through the fuse2fs mount.
    fn needs_mount(self) -> bool {
        matches!(self, BenchMode::Fuse | BenchMode::FuseRead)
    }

    /// Modes that run the reader under `shadowfd run`.
    fn is_run(self) -> bool {
        matches!(self, BenchMode::Run | BenchMode::RunRead)
    }

    /// Whether the mode needs a lazy engine here (run: its embedded server's
    /// engine is a lazy one tuned like the bench's).
    fn needs_lazy(self) -> bool {
        self.is_lazy() || self.is_run()
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Size of the generated file, e.g. 64M, 1G.
    #[arg(long, default_value = "256M", value_parser = size_arg, value_name = "SIZE")]
    size: u64,
    /// Repetitions of every pattern under every mode.
    #[arg(long, default_value_t = 5, value_name = "N")]
    reps: usize,
    /// Access patterns, comma-separated: seq, random:FRACTION, first,
    /// strided[:STRIDE], none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "seq,random:0.01,first,strided",
        value_name = "PATTERNS"
    )]
    patterns: Vec<Access>,
    /// Modes, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "eager,lazy,raw,memcpy,native,fuse,run",
        value_name = "MODES"
    )]
    modes: Vec<BenchMode>,
    /// Also shadow the file from inside an ext4 image that the bench builds,
    /// read in user space (adds the eager-image and lazy-image modes).
    #[arg(long)]
    image: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also draw the results as an SVG chart into this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Seed of the data and of the random pattern (rep r uses SEED + r).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the work directory (data, image, mount point) goes
    /// [default: the temp directory].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Instead of the page patterns: many small files. Archives a directory
    /// of N small files with `tar -cf - .` natively, through a fuse2fs
    /// mount of an ext4 image of it, and through `shadowfd run --image`
    /// (each --reps times).
    #[arg(long, value_name = "N")]
    small_files: Option<usize>,
    /// Engine tuning (the memory budget must hold the eager copy).
    #[command(flatten)]
    tuning: Tuning,
}

impl BenchArgs {
    /// Whether `--json` was given: failures are then reported in JSON too.
    pub fn json(&self) -> bool {
        self.json
    }
}

/// Where eager and lazy shadows read their bytes from. [`DataSource::source`]
/// is the only place the bench makes a [`Source`], so another backend (such
/// as a file inside a disk image) plugs in here.
enum DataSource {
    HostFile(Target),
    /// The same file inside the bench's ext4 image (`Target::image` is set).
    Image(Target),
}

impl DataSource {
    /// A fresh source (opened anew; timed as part of the shadow's open).
    fn source(&self) -> shadowfd::Result<Arc<dyn Source>> {
        match self {
            DataSource::HostFile(t) | DataSource::Image(t) => t.source(),
        }
    }

    fn describe(&self) -> String {
        match self {
            DataSource::HostFile(_) => "host file, warm in the page cache".into(),
            DataSource::Image(_) => {
                "the same file inside an ext4 image (image warm in the page cache)".into()
            }
        }
    }
}

/// Everything one run needs.
struct Ctx {
    data: DataSource,
    image_data: Option<DataSource>,
    host_file: PathBuf,
    fuse_file: Option<PathBuf>,
    eager: Option<Engine>,
    lazy: Option<Engine>,
    /// Lazy engines that record and replay working sets (lazy-replay).
    workset: Option<(Engine, Engine)>,
    /// The file's bytes, read before the runs: the memcpy mode's source.
    in_memory: Option<Vec<u8>>,
    /// The chunk the raw handler fills per fault (the lazy engine's).
    chunk: u64,
    size: u64,
    page: u64,
    /// How the reader program is started (fuse and run modes).
    reader: ReaderCmd,
}

/// What the external reader modes need: this executable (which is the
/// reader, `shadowfd bench-reader`), and for `run` the image, the preload
/// library and the lazy engine's tuning as `shadowfd run` flags.
struct ReaderCmd {
    exe: PathBuf,
    image: PathBuf,
    /// `libshadowfd_preload.so`, when found.
    preload: Option<PathBuf>,
    /// The path prefix the reader sees the image under in `run`.
    prefix: PathBuf,
    tuning: Vec<String>,
    data_seed: u64,
}

/// One run of the reader: the pattern, its seed, and mmap or pread.
struct ReadJob<'a> {
    size: u64,
    pat: &'a Access,
    seed: u64,
    io: reader::Io,
}

impl ReaderCmd {
    /// `shadowfd bench-reader` for `path`.
    fn reader_args(&self, path: &Path, j: &ReadJob) -> Vec<std::ffi::OsString> {
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
        v
    }

    /// The fuse modes' command: the reader on the mount, no shim.
    fn fuse(&self, file: &Path, j: &ReadJob) -> std::process::Command {
        let args = self.reader_args(file, j);
        let mut c = std::process::Command::new(&args[0]);
        c.args(&args[1..]);
        c
    }

    /// The run modes' command: `shadowfd run --image IMAGE --mount PREFIX
    /// [tuning] -- shadowfd bench-reader --path PREFIX/bench.bin ...`.
    fn run(&self, j: &ReadJob) -> std::process::Command {
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
fn thread_faults() -> u64 {
    // SAFETY: getrusage writes one rusage struct to a live, zeroed local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD is valid on Linux.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    (ru.ru_minflt + ru.ru_majflt) as u64
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// Opens a shadow through `engine`, maps it, touches `pages`.
fn run_shadow(
    engine: &Engine,
    data: &DataSource,
    pages: &[u64],
    page: u64,
) -> Result<Sample, String> {
    let f0 = thread_faults();
    let t0 = Instant::now();
    let shadow = data
        .source()
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
    let t2 = Instant::now();
    drop(map);
    drop(shadow);
    Ok(Sample {
        open_us,
        access_us,
        close_us: us(t2),
        resident_bytes,
        faults,
        page_faults,
        process_us: None,
    })
}

/// Opens `path`, maps it, touches `pages`: the page cache reference.
fn run_mmap(path: &Path, pages: &[u64], page: u64) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
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
    Ok(Sample {
        open_us,
        access_us,
        close_us: us(t2),
        resident_bytes,
        faults: page_faults,
        page_faults,
        process_us: None,
    })
}

/// The `raw` floor: open = open(2) of the file + memfd + userfaultfd + mmap
/// + UFFDIO_REGISTER + handler thread; access = touching.
fn run_raw(ctx: &Ctx, pages: &[u64]) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("raw handler: {e}");
    let _pin = raw::PinHere::new();
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
    let t2 = Instant::now();
    region.close().map_err(err)?;
    Ok(Sample {
        open_us,
        access_us,
        close_us: us(t2),
        resident_bytes,
        faults,
        page_faults,
        process_us: None,
    })
}

/// The `memcpy` floor: open = memfd + mmap + memcpy of the whole file from
/// memory; access = touching.
fn run_memcpy(ctx: &Ctx, pages: &[u64]) -> Result<Sample, String> {
    let err = |e: std::io::Error| format!("memcpy floor: {e}");
    let src = ctx.in_memory.as_deref().expect("file read into memory");
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
    Ok(Sample {
        open_us,
        access_us,
        close_us: us(t2),
        resident_bytes,
        faults: page_faults,
        page_faults,
        process_us: None,
    })
}

/// Runs the reader program (`cmd`), which times itself, and checks what it
/// says: its mapping must be backed by `want_backing` (a shadow memfd under
/// the shim, the file itself on the mount), and it checked every touched
/// page against the data.
fn run_reader(
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

fn run_one(
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
    }
}

/// Drops the clean page cache pages of `path` (untimed), so that a run
/// through the FUSE mount starts cold like a fresh shadow: the kernel keeps
/// a FUSE file's pages across opens otherwise.
fn drop_cache(path: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("dropping the page cache of {}: {e}", path.display());
    let f = File::open(path).map_err(err)?;
    // SAFETY: fadvise on a descriptor we own; it only drops clean cache pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(err(std::io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// Bytes of the file that `pages` cover.
fn touched_bytes(pages: &[u64], page: u64, size: u64) -> u64 {
    pages
        .iter()
        .map(|&p| size.saturating_sub(p * page).min(page))
        .sum()
}

fn machine() -> report::Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    report::Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel,
        mem_total_bytes: crate::units::mem_total(),
        loadavg_at_start: loadavg,
    }
}

/// The engines' configuration: defaults, `SHADOWFD_*`, then the flags.
fn base_config(a: &BenchArgs) -> Result<Config, String> {
    a.tuning.config().map_err(|e| e.to_string())
}

fn check_args(a: &BenchArgs) -> Result<(), String> {
    if a.reps == 0 {
        return Err("--reps 0: at least one repetition is needed; use --reps 5 or more".into());
    }
    if a.size == 0 {
        return Err("--size 0: the file must hold at least one byte; try --size 256M".into());
    }
    if a.patterns.is_empty() || a.modes.is_empty() {
        return Err("--patterns and --modes need at least one entry each".into());
    }
    let mut seen = Vec::new();
    for m in &a.modes {
        if seen.contains(m) {
            return Err(format!("--modes lists {} twice", m.name()));
        }
        seen.push(*m);
    }
    if let Some(p) = &a.plot {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        if parent.is_some_and(|d| !d.is_dir()) {
            return Err(format!(
                "--plot {}: the directory {} does not exist",
                p.display(),
                parent.map(|d| d.display().to_string()).unwrap_or_default()
            ));
        }
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            return Err(format!(
                "--plot {}: the chart is SVG; give a file name ending in .svg",
                p.display()
            ));
        }
    }
    Ok(())
}

fn progress(quiet: bool, total: u64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

pub fn run(mut a: BenchArgs) -> CliResult {
    if let Some(n) = a.small_files {
        let root = a.dir.clone().unwrap_or_else(std::env::temp_dir);
        return small::run(n, a.reps, &root, None, a.json);
    }
    if a.image {
        for m in [BenchMode::EagerImage, BenchMode::LazyImage] {
            if !a.modes.contains(&m) {
                a.modes.push(m);
            }
        }
    }
    check_args(&a)?;
    interrupt::install();
    let quiet = a.json || !std::io::stderr().is_terminal();
    // Absolute and free of symlinks: the mount table names mounts that way,
    // and cleanup compares against it.
    let root = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = std::fs::canonicalize(&root)
        .map_err(|e| format!("--dir {}: {e}; give an existing directory", root.display()))?;
    let page = shadowfd::page_size() as u64;
    let pb = progress(quiet, (a.reps * a.patterns.len() * a.modes.len()) as u64);

    let mut notes = fuse::clean_stale(&root);
    let mut skipped: Vec<Skip> = Vec::new();

    // Engines first: a configuration error is reported before any work.
    let base = base_config(&a)?;
    // Eager copies the whole file, and a full lazy scan fills all of it: both
    // must fit in the memory budget, or the run would end in SIGBUS.
    if a.modes.iter().any(|m| m.holds_copy()) && a.size > base.memory_budget {
        return Err(format!(
            "--size {} is more than the memory budget of {}: eager and lazy shadows (and the \
             raw and memcpy floors) of the whole file must fit; choose a smaller --size or \
             raise --memory-budget",
            format_size(a.size),
            format_size(base.memory_budget)
        )
        .into());
    }
    let eager = if a.modes.iter().any(|m| m.is_eager()) {
        let mut c = base.clone();
        c.mode = Mode::Eager;
        c.max_size = a.size;
        Some(Engine::new(c)?)
    } else {
        None
    };
    let lazy = if a.modes.iter().any(|m| m.needs_lazy()) {
        let mut c = base.clone();
        c.mode = Mode::Lazy;
        c.workset = shadowfd::WorksetMode::Off;
        match Engine::new(c) {
            Ok(e) => Some(e),
            Err(e @ shadowfd::Error::LazyUnavailable(_)) => {
                for m in a.modes.iter().filter(|m| m.needs_lazy()) {
                    skipped.push(Skip {
                        mode: m.name(),
                        reason: e.to_string(),
                    });
                }
                None
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };

    if a.modes.contains(&BenchMode::Raw) {
        if let Some(reason) = raw::unavailable() {
            skipped.push(Skip {
                mode: "raw",
                reason,
            });
        }
    }

    let prefix = PathBuf::from(format!("/shadowfd-bench-run-{}", std::process::id()));
    let preload = if a.modes.iter().any(|m| m.is_run()) {
        let why = match crate::run::preload_lib() {
            Ok(p) if !prefix.exists() => Ok(p),
            Ok(_) => Err(format!(
                "{} exists on the host: the run modes read there through the shim and need a \
                 path that nothing else serves",
                prefix.display()
            )),
            Err(reason) => Err(format!("no preload library: {reason}")),
        };
        match why {
            Ok(p) => Some(p),
            Err(reason) => {
                for m in a.modes.iter().filter(|m| m.is_run()) {
                    if !skipped.iter().any(|s| s.mode == m.name()) {
                        skipped.push(Skip {
                            mode: m.name(),
                            reason: reason.clone(),
                        });
                    }
                }
                None
            }
        }
    } else {
        None
    };

    let work = data::Workdir::create(&root)?;
    let data_dir = work.path().join("data");
    std::fs::create_dir(&data_dir)?;
    let host_file = data_dir.join("bench.bin");
    pb.set_message(format!("writing {} of random data", format_size(a.size)));
    data::write_random(&host_file, a.size, a.seed)
        .map_err(|e| format!("writing {}: {e}", host_file.display()))?;
    interrupt::check()?;

    let image = work.path().join("image.ext4");
    let mut image_built = false;
    if a.modes.iter().any(|m| m.needs_image()) {
        pb.set_message("building the ext4 image");
        match fuse::build_image(&data_dir, &image, a.size) {
            Ok(()) => image_built = true,
            Err(reason) => {
                interrupt::check()?;
                notes.push(format!("image modes skipped: {reason}"));
                for m in a.modes.iter().filter(|m| m.needs_image()) {
                    if skipped.iter().any(|s| s.mode == m.name()) {
                        continue;
                    }
                    skipped.push(Skip {
                        mode: m.name(),
                        reason: reason.clone(),
                    });
                }
            }
        }
    }
    let mut mount = None;
    if a.modes.iter().any(|m| m.needs_mount()) && image_built {
        pb.set_message("mounting the ext4 image with fuse2fs");
        match fuse_setup(work.path(), &image, a.size) {
            Ok(m) => mount = Some(m),
            Err(reason) => {
                interrupt::check()?;
                notes.push(format!("fuse skipped: {reason}"));
                for m in a.modes.iter().filter(|m| m.needs_mount()) {
                    skipped.push(Skip {
                        mode: m.name(),
                        reason: reason.clone(),
                    });
                }
            }
        }
    }
    data::warm(&host_file)?;
    if image_built {
        data::warm(&image)?;
    }
    interrupt::check()?;
    let in_memory = if a.modes.contains(&BenchMode::Memcpy) {
        pb.set_message("reading the file into memory for the memcpy floor");
        Some(
            std::fs::read(&host_file)
                .map_err(|e| format!("reading {}: {e}", host_file.display()))?,
        )
    } else {
        None
    };

    // lazy-replay: its records go to the work directory, never the user's.
    let workset = match &lazy {
        Some(_) if a.modes.contains(&BenchMode::LazyReplay) => {
            let engine = |m| {
                let mut c = base.clone();
                c.mode = Mode::Lazy;
                c.workset = m;
                c.workset_dir = Some(work.path().join("worksets"));
                Engine::new(c)
            };
            Some((
                engine(shadowfd::WorksetMode::Record)?,
                engine(shadowfd::WorksetMode::Replay)?,
            ))
        }
        _ => None,
    };
    let ctx = Ctx {
        data: DataSource::HostFile(Target::file(host_file.clone())),
        image_data: image_built.then(|| {
            DataSource::Image(Target {
                image: Some(image.clone()),
                ..Target::file(PathBuf::from("/bench.bin"))
            })
        }),
        host_file,
        fuse_file: mount.as_ref().map(|m| m.mountpoint().join("bench.bin")),
        eager,
        lazy,
        workset,
        in_memory,
        chunk: base.chunk_size,
        size: a.size,
        page,
        reader: ReaderCmd {
            exe: std::env::current_exe()
                .map_err(|e| format!("finding this executable (the reader): {e}"))?,
            image: image.clone(),
            preload,
            prefix,
            tuning: vec![
                "--mode".into(),
                "lazy".into(),
                "--chunk".into(),
                base.chunk_size.to_string(),
                "--readahead".into(),
                base.readahead.to_string(),
                "--workers".into(),
                base.workers.to_string(),
                "--memory-budget".into(),
                base.memory_budget.to_string(),
            ],
            data_seed: a.seed,
        },
    };
    let data_desc = ctx.data.describe();
    let runnable = |m: BenchMode| !skipped.iter().any(|s| s.mode == m.name());

    // samples[pattern][mode][rep]
    let mut samples = vec![vec![Vec::<Sample>::new(); a.modes.len()]; a.patterns.len()];
    let mut touched = vec![(0u64, 0u64); a.patterns.len()];
    let n = a.modes.len();
    for rep in 0..a.reps {
        for (pi, pat) in a.patterns.iter().enumerate() {
            // Listed up front, so that the timed access does not include
            // choosing the pages; --size is bounded by the memory budget,
            // and the list is 8 bytes per touched page.
            let pages: Vec<u64> = pat
                .pages(a.size, page, a.seed.wrapping_add(rep as u64))
                .collect();
            touched[pi] = (pages.len() as u64, touched_bytes(&pages, page, a.size));
            for k in 0..n {
                let mi = (k + rep) % n;
                let mode = a.modes[mi];
                pb.set_message(format!("rep {}/{} {pat} {}", rep + 1, a.reps, mode.name()));
                if runnable(mode) {
                    interrupt::check()?;
                    let seed = a.seed.wrapping_add(rep as u64);
                    let s = run_one(&ctx, mode, pat, seed, &pages)
                        .map_err(|e| format!("{pat} under {}: {e}", mode.name()))?;
                    samples[pi][mi].push(s);
                }
                pb.inc(1);
            }
        }
    }
    pb.set_message("cleaning up");
    drop(ctx);
    if let Some(mut m) = mount.take() {
        let mp = m.mountpoint().to_path_buf();
        m.unmount()?;
        if fuse::is_mounted(&mp) {
            return Err(format!("{} is still mounted after unmount", mp.display()).into());
        }
    }
    drop(work);
    pb.finish_and_clear();

    let pattern_names: Vec<String> = a.patterns.iter().map(|p| p.to_string()).collect();
    let mut rows = Vec::new();
    for (pi, name) in pattern_names.iter().enumerate() {
        for (mi, m) in a.modes.iter().enumerate() {
            let cell = Cell {
                pattern: name,
                mode: m.name(),
                pages_touched: touched[pi].0,
                touched_bytes: touched[pi].1,
                samples: &samples[pi][mi],
            };
            rows.extend(report::row(&cell));
        }
    }
    let get = |pi: usize, m: BenchMode, f: fn(&Sample) -> f64| -> Option<Vec<f64>> {
        let mi = a.modes.iter().position(|&x| x == m)?;
        let s = &samples[pi][mi];
        (!s.is_empty()).then(|| s.iter().map(f).collect())
    };
    let open = |s: &Sample| s.open_us;
    let total = |s: &Sample| s.total_us();
    let mut ratios = Vec::new();
    let mut push = |pi: usize, name: &'static str, num: Option<Vec<f64>>, den: Option<Vec<f64>>| {
        if let (Some(n), Some(d)) = (num, den) {
            if let Some(p) = report::paired(&n, &d) {
                ratios.push(Ratio {
                    pattern: pattern_names[pi].clone(),
                    name,
                    value: p.value,
                    min: p.min,
                    max: p.max,
                    reps_disagree: p.disagree(),
                    per_rep: p.per_rep,
                });
            }
        }
    };
    use BenchMode::*;
    // (name, numerator, denominator): each ratio is num/den per repetition.
    type Term = (BenchMode, fn(&Sample) -> f64);
    let wanted: [(&'static str, Term, Term); 12] = [
        (
            "total_lazy_replay_over_native",
            (LazyReplay, total),
            (Native, total),
        ),
        (
            "total_speedup_lazy_replay_vs_lazy",
            (Lazy, total),
            (LazyReplay, total),
        ),
        ("open_speedup_lazy_vs_eager", (Eager, open), (Lazy, open)),
        ("total_lazy_over_eager", (Lazy, total), (Eager, total)),
        ("total_speedup_lazy_vs_fuse", (Fuse, total), (Lazy, total)),
        (
            "total_lazy_image_over_lazy",
            (LazyImage, total),
            (Lazy, total),
        ),
        ("total_lazy_over_native", (Lazy, total), (Native, total)),
        ("total_lazy_over_raw", (Lazy, total), (Raw, total)),
        ("total_lazy_over_memcpy", (Lazy, total), (Memcpy, total)),
        ("total_speedup_run_vs_fuse", (Fuse, total), (Run, total)),
        (
            "total_run_over_lazy_image",
            (Run, total),
            (LazyImage, total),
        ),
        (
            "total_speedup_run_read_vs_fuse_read",
            (FuseRead, total),
            (RunRead, total),
        ),
    ];
    for pi in 0..a.patterns.len() {
        for (name, (nm, nf), (dm, df)) in wanted {
            push(pi, name, get(pi, nm, nf), get(pi, dm, df));
        }
    }
    // Open does not depend on the pattern: pool every pattern's pairs.
    let pooled_open = {
        let (mut n, mut d) = (Vec::new(), Vec::new());
        for pi in 0..a.patterns.len() {
            if let (Some(e), Some(l)) = (get(pi, Eager, open), get(pi, Lazy, open)) {
                n.extend(e);
                d.extend(l);
            }
        }
        report::paired(&n, &d).map(|x| x.value)
    };
    let targets = targets(&a, &ratios, pooled_open);

    notes.extend(standing_notes(&a, mount_was_used(&skipped, &a.modes)));
    let r = Report {
        rows,
        ratios,
        targets,
        skipped,
        machine: machine(),
        config: report::RunConfig {
            size: a.size,
            reps: a.reps,
            seed: a.seed,
            patterns: pattern_names,
            modes: a.modes.iter().map(|m| m.name()).collect(),
            data: data_desc,
            chunk_size: base.chunk_size,
            readahead: base.readahead,
            workers: base.workers,
            page_size: page,
        },
        notes,
    };
    if let Some(p) = &a.plot {
        plot::draw(&r, p).map_err(|e| format!("--plot {}: {e}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        report::print_human(&r);
        if let Some(p) = &a.plot {
            println!();
            println!("chart written to {}", p.display());
        }
    }
    Ok(())
}

fn mount_was_used(skipped: &[Skip], modes: &[BenchMode]) -> bool {
    modes
        .iter()
        .any(|m| m.needs_mount() && !skipped.iter().any(|s| s.mode == m.name()))
}

/// Makes the mount point and mounts the image there.
fn fuse_setup(work: &Path, image: &Path, size: u64) -> Result<fuse::FuseMount, String> {
    if let Some(why) = fuse::unavailable() {
        return Err(why);
    }
    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt).map_err(|e| format!("create {}: {e}", mnt.display()))?;
    let m = fuse::FuseMount::mount(image, &mnt, &work.join("fuse2fs.log"))?;
    let f = m.mountpoint().join("bench.bin");
    let len = std::fs::metadata(&f)
        .map_err(|e| format!("{} on the mount: {e}", f.display()))?
        .len();
    if len != size {
        return Err(format!(
            "{} on the mount has {len} bytes, not {size}",
            f.display()
        ));
    }
    Ok(m)
}

/// The targets of docs/benchmarks.md, with what this run measured.
fn targets(a: &BenchArgs, ratios: &[Ratio], pooled_open: Option<f64>) -> Vec<report::Target> {
    let find = |pat: &Access, name: &str| {
        let p = pat.to_string();
        ratios
            .iter()
            .find(|r| r.pattern == p && r.name == name)
            .map(|r| r.value)
    };
    let t =
        |name: &str, op: &'static str, target: f64, goal: Option<f64>, measured: Option<f64>| {
            report::Target {
                name: name.into(),
                op,
                target,
                goal,
                measured,
                met: measured.map(|m| if op == ">=" { m >= target } else { m <= target }),
                note: None,
            }
        };
    let mut out = Vec::new();
    let mut open = t(
        "lazy open >= 100x faster than eager (at 256 MiB)",
        ">=",
        100.0,
        None,
        pooled_open,
    );
    if a.size != 256 << 20 {
        open.note = Some(format!(
            "measured at {}; the target is stated at 256 MiB",
            format_size(a.size)
        ));
    }
    out.push(open);
    out.push(t(
        "random:0.01 total >= 10x faster lazy than eager",
        ">=",
        10.0,
        None,
        find(&Access::Random(0.01), "total_lazy_over_eager").map(|x| 1.0 / x),
    ));
    out.push(t(
        "seq total: lazy <= 1.0x eager",
        "<=",
        1.0,
        Some(0.5),
        find(&Access::Seq, "total_lazy_over_eager"),
    ));
    out.push(t(
        "seq total: lazy >= 2x faster than fuse2fs",
        ">=",
        2.0,
        None,
        find(&Access::Seq, "total_speedup_lazy_vs_fuse"),
    ));
    out.push(t(
        "seq total: run >= 3x faster than fuse2fs (same reader)",
        ">=",
        3.0,
        None,
        find(&Access::Seq, "total_speedup_run_vs_fuse"),
    ));
    out.push(t(
        "random:0.01 total: run no slower than fuse2fs",
        ">=",
        1.0,
        None,
        find(&Access::Random(0.01), "total_speedup_run_vs_fuse"),
    ));
    out.push(t(
        "random:0.01 total: lazy-replay <= 1.5x native (page cache)",
        "<=",
        1.5,
        None,
        find(&Access::Random(0.01), "total_lazy_replay_over_native"),
    ));
    out.push(t(
        "random:0.01 total: lazy-replay >= 4x faster than cold lazy",
        ">=",
        4.0,
        None,
        find(&Access::Random(0.01), "total_speedup_lazy_replay_vs_lazy"),
    ));
    let mut fault = t(
        "lazy 4 KiB fault latency <= 1.5x raw UFFDIO_COPY round trip",
        "<=",
        1.5,
        None,
        None,
    );
    fault.note = Some("measured by `cargo bench --bench fault`, not by this command".into());
    out.push(fault);
    for x in &mut out {
        if x.measured.is_none() && x.note.is_none() {
            x.note =
                Some("not measured in this run (pattern or mode not selected, or skipped)".into());
        }
    }
    out
}

fn standing_notes(a: &BenchArgs, fuse_used: bool) -> Vec<String> {
    let mut n = vec![
        "the source file is written, fsynced and read once before the first run: it is warm in \
         the host page cache for every mode"
            .to_string(),
        "open = open(2) of the source + shadow creation (eager: the whole copy); access = mmap + \
         touching one byte per selected page; total = open + access; close (unmap + drop) is \
         reported separately in the JSON"
            .to_string(),
        "faults: userfaultfd faults served (lazy, raw; 0 for eager) or, for native, fuse and \
         memcpy, the touching thread's page faults; pgfaults: the touching thread's minor+major page faults \
         (getrusage RUSAGE_THREAD) in every mode"
            .to_string(),
        "resident: the shadow memfd's allocated bytes (eager, lazy, raw, memcpy), or the file's pages present \
         in the page cache by mincore (native: the whole file, shared with every reader; fuse: the \
         FUSE inode's cache)"
            .to_string(),
        format!(
            "MB/s = bytes of the touched pages / total time; ratios are medians of per-rep ratios \
             (each rep runs every mode back to back); random pages use seed {} + rep",
            a.seed
        ),
    ];
    if a.modes.contains(&BenchMode::Raw) {
        n.push(
            "raw (floor of the lazy mechanism): open = open(2) of the file + a memfd of its size \
             + userfaultfd + mmap + UFFDIO_REGISTER (MISSING) + one handler thread; each fault is \
             answered by that thread, blocked in read(2), with one pread of the chunk (the lazy \
             chunk size, no readahead) and one UFFDIO_COPY; the thread and the touching thread \
             are pinned to one CPU for the run and the handler runs SCHED_IDLE (the placement the \
             engine's readers give; since 2026-11-30)"
                .into(),
        );
    }
    if a.modes.contains(&BenchMode::Memcpy) {
        n.push(
            "memcpy (floor of the copy): open = memfd_create + ftruncate + mmap + one memcpy of \
             the whole file from a copy already in memory (read before the runs, untimed); access \
             = touching the same mapping; every pattern copies the whole file"
                .into(),
        );
    }
    if fuse_used {
        n.push(
            "fuse: fuse2fs -o ro serves an ext4 image (built with mkfs.ext4 -d, warm in the host \
             page cache); the kernel keeps a FUSE file's pages across opens, so the bench drops them \
             (posix_fadvise DONTNEED, untimed) before every fuse run: each run reads through the \
             daemon, as a fresh shadow reads its source"
                .into(),
        );
    }
    if a.modes.iter().any(|m| m.needs_mount() || m.is_run()) {
        n.push(
            "fuse and run are timed by one external reader program (`shadowfd bench-reader`, an \
             ordinary dynamically linked program using libc open/fstat/mmap), started afresh for \
             every run: fuse runs it on the fuse2fs mount (mounted once, before the runs), run \
             under `shadowfd run --image IMAGE --mount PREFIX` (a fresh embedded server per run, \
             its lazy engine tuned as the lazy mode's). open/access/total are the reader's own \
             clock, from before open(2) to its last touch: process start-up, the shim's load, the \
             embedded server's start and the mount are excluded from both; process_us in the \
             JSON is the reader process's wall time including them. After the clock stops the \
             reader checks every byte of every touched page against the data, and the bench \
             checks that its mapping was the mount's file (fuse) or a shadow memfd (run)"
                .into(),
        );
    }
    n
}
