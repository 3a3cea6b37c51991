//! `shadowfd bench`'s arguments: the modes, the flags, and their checks.

use crate::access::Access;
use crate::{Tuning, size_arg};
use clap::{Args, ValueEnum};
use shadowfd::Config;
use std::path::PathBuf;

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
    /// Floor of a fault answered from another process: the raw mode's
    /// handler (the same code, CPU and SCHED_IDLE) in a separate process
    /// holding the userfaultfd, as a server answers a client.
    RawRemote,
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
    /// With --source s3: a lazy shadow of the object whose disk chunk cache
    /// a previous (untimed) pass over the whole object filled.
    LazyWarm,
    /// With --source s3: the fuse mode's reader on an s3fs mount of the
    /// bucket, through the same latency.
    S3fs,
    /// With --source s3: one streaming GET of the object to a local file
    /// (curl), then a native mmap of it: what a user does today.
    Download,
    /// With --source s3: a lazy shadow of the local file (the host file
    /// the object was uploaded from), tuned as the plain lazy mode.
    LazyLocal,
}

/// Where the bench file is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The host file (and, for the image modes, an ext4 image of it).
    File,
    /// An object in a SeaweedFS S3 gateway the bench starts on loopback,
    /// behind a proxy that adds --latency-ms each way (needs `weed`; the
    /// s3fs mode needs `s3fs`).
    S3,
}

/// The default --modes for each source.
const FILE_MODES: [BenchMode; 7] = [
    BenchMode::Eager,
    BenchMode::Lazy,
    BenchMode::Raw,
    BenchMode::Memcpy,
    BenchMode::Native,
    BenchMode::Fuse,
    BenchMode::Run,
];
const S3_MODES: [BenchMode; 6] = [
    BenchMode::Eager,
    BenchMode::Lazy,
    BenchMode::LazyWarm,
    BenchMode::S3fs,
    BenchMode::Download,
    BenchMode::LazyLocal,
];

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
            BenchMode::RawRemote => "raw-remote",
            BenchMode::Memcpy => "memcpy",
            BenchMode::Run => "run",
            BenchMode::FuseRead => "fuse-read",
            BenchMode::RunRead => "run-read",
            BenchMode::LazyWarm => "lazy-warm",
            BenchMode::S3fs => "s3fs",
            BenchMode::Download => "download",
            BenchMode::LazyLocal => "lazy-local",
        }
    }

    pub(super) fn is_eager(self) -> bool {
        matches!(self, BenchMode::Eager | BenchMode::EagerImage)
    }

    pub(super) fn is_lazy(self) -> bool {
        matches!(
            self,
            BenchMode::Lazy
                | BenchMode::LazyImage
                | BenchMode::LazyReplay
                | BenchMode::LazyWarm
                | BenchMode::LazyLocal
        )
    }

    /// Whether a run holds a memfd of the whole file's size (when filled).
    pub(super) fn holds_copy(self) -> bool {
        self.is_eager()
            || self.is_lazy()
            || matches!(
                self,
                BenchMode::Raw
                    | BenchMode::RawRemote
                    | BenchMode::Memcpy
                    | BenchMode::Run
                    | BenchMode::RunRead
            )
    }

    pub(super) fn needs_image(self) -> bool {
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
    pub(super) fn needs_mount(self) -> bool {
        matches!(self, BenchMode::Fuse | BenchMode::FuseRead)
    }

    /// Modes that run the reader under `shadowfd run`.
    pub(super) fn is_run(self) -> bool {
        matches!(self, BenchMode::Run | BenchMode::RunRead)
    }

    /// Whether the mode needs a lazy engine here (run: its embedded server's
    /// engine is a lazy one tuned like the bench's).
    pub(super) fn needs_lazy(self) -> bool {
        self.is_lazy() || self.is_run()
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Size of the generated file, e.g. 64M, 1G.
    #[arg(long, default_value = "256M", value_parser = size_arg, value_name = "SIZE")]
    pub(super) size: u64,
    /// Repetitions of every pattern under every mode.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub(super) reps: usize,
    /// Access patterns, comma-separated: seq, random:FRACTION, first,
    /// strided[:STRIDE], none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "seq,random:0.01,first,strided",
        value_name = "PATTERNS"
    )]
    pub(super) patterns: Vec<Access>,
    /// Modes, comma-separated [default: eager,lazy,raw,memcpy,native,fuse,run;
    /// with --source s3: eager,lazy,lazy-warm,s3fs,download,lazy-local].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "MODES")]
    pub(super) modes: Vec<BenchMode>,
    /// Where the bench file is read from: the host file, or an object in an
    /// S3 gateway the bench starts (docs/benchmarks.md, "Object store").
    #[arg(long, value_enum, default_value = "file", value_name = "SOURCE")]
    pub(super) source: SourceKind,
    /// With --source s3: the delay the proxy adds each way, in milliseconds
    /// (a round trip is twice this) [default: 5].
    #[arg(long, value_name = "MS")]
    pub(super) latency_ms: Option<u64>,
    /// Also shadow the file from inside an ext4 image that the bench builds,
    /// read in user space (adds the eager-image and lazy-image modes).
    #[arg(long)]
    pub(super) image: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(super) json: bool,
    /// Also draw the results as an SVG chart into this file.
    #[arg(long, value_name = "FILE.svg")]
    pub(super) plot: Option<PathBuf>,
    /// Seed of the data and of the random pattern (rep r uses SEED + r).
    #[arg(long, default_value_t = 1)]
    pub(super) seed: u64,
    /// Where the work directory (data, image, mount point) goes
    /// [default: the temp directory].
    #[arg(long, value_name = "DIR")]
    pub(super) dir: Option<PathBuf>,
    /// Instead of the page patterns: many small files. Archives a directory
    /// of N small files with `tar -cf - .` natively, through a fuse2fs
    /// mount of an ext4 image of it, and through `shadowfd run --image`
    /// (each --reps times).
    #[arg(long, value_name = "N")]
    pub(super) small_files: Option<usize>,
    /// Instead of the page patterns: N client processes of one server
    /// (`shadowfd client map`) fault the same lazy shadow at the random
    /// patterns (default random:0.01), against N threads of one process on
    /// an in-process shadow; reports each side's aggregate pages per second.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(super) clients: Option<u16>,
    /// Instead of the page patterns: `sqlite3` through `shadowfd run
    /// --image` over a database of about SIZE bytes (e.g. 1G) in an ext4
    /// image, the first run (recording a working set) against the second
    /// (replaying it), --reps times (docs/benchmarks.md, "Working sets").
    #[arg(long, value_name = "SIZE", value_parser = size_arg, conflicts_with = "small_files")]
    pub(super) sqlite: Option<u64>,
    /// Keep each timed touching thread (the bench's own in the in-process
    /// modes, the reader program's in fuse and run) on the CPU it starts
    /// on, for the run: `on` compares every mode as the raw floor is run
    /// (docs/benchmarks.md, "Pinning"); `off` leaves them free to move, as
    /// an ordinary program is.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub(super) pin: Pin,
    /// Internal: run as the raw-remote mode's handler process on this CPU
    /// (the bench starts it with its socket as stdin).
    #[arg(long, hide = true, value_name = "CPU")]
    pub(super) raw_remote_handler: Option<libc::c_int>,
    /// Engine tuning (the memory budget must hold the eager copy).
    #[command(flatten)]
    pub(super) tuning: Tuning,
}

/// Whether the bench pins its touching threads (`--pin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    On,
    Off,
}

/// The proxy's delay each way unless --latency-ms says otherwise.
pub(super) const DEFAULT_LATENCY_MS: u64 = 5;

impl BenchArgs {
    /// The delay each way of the object store's proxy (--source s3).
    pub(super) fn latency_ms(&self) -> u64 {
        self.latency_ms.unwrap_or(DEFAULT_LATENCY_MS)
    }

    /// Whether `--json` was given: failures are then reported in JSON too.
    pub fn json(&self) -> bool {
        self.json
    }
}

/// The engines' configuration: defaults, `SHADOWFD_*`, then the flags.
pub(super) fn base_config(a: &BenchArgs) -> Result<Config, String> {
    a.tuning.config().map_err(|e| e.to_string())
}

/// Fills in the default --modes of the source when none were given.
pub(super) fn default_modes(a: &mut BenchArgs) {
    if a.modes.is_empty() {
        a.modes = match a.source {
            SourceKind::File => FILE_MODES.to_vec(),
            SourceKind::S3 => S3_MODES.to_vec(),
        };
    }
}

/// Refuses modes the source does not have.
fn check_source(a: &BenchArgs) -> Result<(), String> {
    let list = |ms: &[BenchMode]| ms.iter().map(|m| m.name()).collect::<Vec<_>>().join(",");
    let s3_only = [
        BenchMode::LazyWarm,
        BenchMode::S3fs,
        BenchMode::Download,
        BenchMode::LazyLocal,
    ];
    match a.source {
        SourceKind::File => {
            if let Some(ms) = a.latency_ms {
                return Err(format!(
                    "--latency-ms {ms}: the delay is that of the object store's proxy; add \
                     --source s3, or drop --latency-ms"
                ));
            }
            if let Some(m) = a.modes.iter().find(|m| s3_only.contains(m)) {
                return Err(format!(
                    "--modes {}: that mode reads an object; add --source s3, or choose from {}",
                    m.name(),
                    list(&FILE_MODES)
                ));
            }
        }
        SourceKind::S3 => {
            if a.image {
                return Err(
                    "--image reads the file from an ext4 image, not an object: drop --image \
                     with --source s3"
                        .into(),
                );
            }
            let ok = |m: &BenchMode| S3_MODES.contains(m) || *m == BenchMode::Native;
            if let Some(m) = a.modes.iter().find(|m| !ok(m)) {
                return Err(format!(
                    "--modes {} is not a mode of --source s3; choose from {},native",
                    m.name(),
                    list(&S3_MODES)
                ));
            }
            if let Some(ms) = a.latency_ms.filter(|&ms| ms > 1000) {
                return Err(format!(
                    "--latency-ms {ms}: the delay each way must be 0 to 1000 ms; try 5"
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn check_args(a: &BenchArgs) -> Result<(), String> {
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
    check_source(a)?;
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
