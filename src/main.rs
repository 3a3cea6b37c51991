//! The `shadowfd` command-line tool: argument parsing, shared options, error reporting.

mod access;
mod bench;
mod cat;
mod client;
mod map;
mod object;
mod probe;
mod run;
mod serve;
mod sigbus;
mod status;
mod units;
mod workset;

use clap::{Args, Parser, Subcommand};
use shadowfd::source::ImageSource;
use shadowfd::source::object::ObjectUrl;
use shadowfd::{Config, Engine, FileSource, Mode, Shadow, Source, StalePolicy, WorksetMode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use units::parse_size;

/// Lazy, sealed, host-mmappable shadows of files.
#[derive(Parser)]
#[command(name = "shadowfd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Say whether userfaultfd can be used here, how, and which mode `auto` picks.
    Probe(probe::ProbeArgs),
    /// Write a file's bytes to stdout, read through a mapping of its shadow.
    Cat(cat::CatArgs),
    /// Shadow a file, map it, touch it, and report what happened.
    Map(map::MapArgs),
    /// Eager vs lazy side by side, with the page cache and FUSE as references.
    Bench(bench::BenchArgs),
    /// Serve shadows of the files beneath a directory (or in an image) to many client processes.
    Serve(serve::ServeArgs),
    /// Cat or map a file served by `shadowfd serve`.
    Client(client::ClientArgs),
    /// What a running `shadowfd serve` is doing: clients, shadows, memory, fill times.
    Status(status::StatusArgs),
    /// Run a command that sees the served files under a path prefix (LD_PRELOAD shim; docs/run.md).
    Run(run::RunArgs),
    /// The working-set records kept for replay: list, show, rm (docs/worksets.md).
    Workset(workset::WorksetArgs),
    /// The program `bench` times in its fuse and run modes (internal).
    #[command(hide = true)]
    BenchReader(bench::reader::ReaderArgs),
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// `--workset-prefetch SIZE|all`.
fn prefetch_arg(s: &str) -> Result<u64, String> {
    shadowfd::config::parse_prefetch(s)
}

/// `--workers N`: a whole number, with the accepted range in the error
/// (the range itself is checked with the rest of the configuration).
fn workers_arg(s: &str) -> Result<usize, String> {
    s.trim().parse::<usize>().map_err(|_| {
        format!(
            "expected a whole number of worker threads from 1 to {}, e.g. --workers 4",
            shadowfd::config::MAX_WORKERS
        )
    })
}

/// Options shared by every command that opens a shadow. Flags win over the
/// `SHADOWFD_*` environment variables, which win over the defaults.
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// auto | lazy | eager  [env: SHADOWFD_MODE] [default: auto]
    #[arg(long, value_name = "MODE")]
    pub mode: Option<Mode>,
    /// Eager size cap, e.g. 512M, 2G, 1GiB  [env: SHADOWFD_MAX_SIZE] [default: 256M]
    #[arg(long, value_name = "SIZE", value_parser = size_arg, allow_negative_numbers = true)]
    pub max_size: Option<u64>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Memory and lazy-engine tuning, shared by `Common` and `bench`.
#[derive(Args, Debug, Clone, Default)]
pub struct Tuning {
    /// Memory bound for the eager cap and lazy resident bytes
    /// [env: SHADOWFD_MEMORY_BUDGET] [default: 1/4 of MemAvailable or the memory cgroup's headroom, whichever is smaller]
    #[arg(long, value_name = "SIZE", value_parser = size_arg, allow_negative_numbers = true)]
    pub memory_budget: Option<u64>,
    /// Lazy fill unit, a multiple of the page size  [env: SHADOWFD_CHUNK] [default: 4K]
    #[arg(long, value_name = "SIZE", value_parser = size_arg, allow_negative_numbers = true)]
    pub chunk: Option<u64>,
    /// Fault-service worker threads  [env: SHADOWFD_WORKERS] [default: CPUs]
    #[arg(long, value_name = "N", value_parser = workers_arg, allow_negative_numbers = true)]
    pub workers: Option<usize>,
    /// Largest sequential readahead window, 0 for none  [env: SHADOWFD_READAHEAD] [default: 8M]
    #[arg(long, value_name = "SIZE", value_parser = size_arg, allow_negative_numbers = true)]
    pub readahead: Option<u64>,
    /// detect | strict: what lazy fills do once the source changed  [env: SHADOWFD_STALE]
    #[arg(long, value_name = "POLICY")]
    pub stale: Option<StalePolicy>,
    /// off | record | replay | auto: record what a run needs first and
    /// replay it ahead of the next run (docs/worksets.md)  [env: SHADOWFD_WORKSET] [default: off]
    #[arg(long, value_name = "MODE")]
    pub workset: Option<WorksetMode>,
    /// Where working-set records are kept  [env: SHADOWFD_WORKSET_DIR]
    /// [default: $XDG_CACHE_HOME/shadowfd/worksets]
    #[arg(long, value_name = "DIR")]
    pub workset_dir: Option<PathBuf>,
    /// How long after open a shadow records, e.g. 30s, 2m  [env: SHADOWFD_WORKSET_WINDOW] [default: 30s]
    #[arg(long, value_name = "TIME")]
    pub workset_window: Option<String>,
    /// The most bytes of chunks one record holds  [env: SHADOWFD_WORKSET_MAX] [default: 256M]
    #[arg(long, value_name = "SIZE", value_parser = size_arg, allow_negative_numbers = true)]
    pub workset_max: Option<u64>,
    /// Bytes of recorded chunks a replay fills before the first mapping
    /// returns, or `all`  [env: SHADOWFD_WORKSET_PREFETCH] [default: 0]
    #[arg(long, value_name = "SIZE|all", value_parser = prefetch_arg)]
    pub workset_prefetch: Option<u64>,
}

impl Tuning {
    /// Defaults, then the environment, then these flags (not yet validated).
    pub fn config(&self) -> shadowfd::Result<Config> {
        self.config_except(Vec::new())
    }

    /// Like [`Tuning::config`], leaving `skip` and the variables of the flags
    /// given unread: a flag wins, so its variable is not even parsed.
    fn config_except(&self, mut skip: Vec<&'static str>) -> shadowfd::Result<Config> {
        for (given, var) in [
            (self.memory_budget.is_some(), "SHADOWFD_MEMORY_BUDGET"),
            (self.chunk.is_some(), "SHADOWFD_CHUNK"),
            (self.workers.is_some(), "SHADOWFD_WORKERS"),
            (self.readahead.is_some(), "SHADOWFD_READAHEAD"),
            (self.stale.is_some(), "SHADOWFD_STALE"),
            (self.workset.is_some(), "SHADOWFD_WORKSET"),
            (self.workset_dir.is_some(), "SHADOWFD_WORKSET_DIR"),
            (self.workset_window.is_some(), "SHADOWFD_WORKSET_WINDOW"),
            (self.workset_max.is_some(), "SHADOWFD_WORKSET_MAX"),
            (self.workset_prefetch.is_some(), "SHADOWFD_WORKSET_PREFETCH"),
        ] {
            if given {
                skip.push(var);
            }
        }
        let mut c = Config::from_env_except(&skip)?;
        if let Some(b) = self.memory_budget {
            c.memory_budget = b;
            if std::env::var_os("SHADOWFD_MAX_SIZE").is_none() {
                c.max_size = shadowfd::config::DEFAULT_MAX_SIZE.min(b);
            }
        }
        if let Some(v) = self.chunk {
            c.chunk_size = v;
        }
        if let Some(v) = self.workers {
            c.workers = v;
        }
        if let Some(v) = self.readahead {
            c.readahead = v;
        }
        if let Some(v) = self.stale {
            c.stale = v;
        }
        if let Some(v) = self.workset {
            c.workset = v;
        }
        if let Some(v) = &self.workset_dir {
            c.workset_dir = Some(v.clone());
        }
        if let Some(v) = &self.workset_window {
            c.set("workset-window", v)?;
        }
        if let Some(v) = self.workset_max {
            c.workset_max = v;
        }
        if let Some(v) = self.workset_prefetch {
            c.workset_prefetch = v;
        }
        Ok(c)
    }
}

impl Common {
    /// The configuration: defaults, then environment, then flags.
    pub fn config(&self) -> shadowfd::Result<Config> {
        let mut skip = Vec::new();
        if self.mode.is_some() {
            skip.push("SHADOWFD_MODE");
        }
        if self.max_size.is_some() {
            skip.push("SHADOWFD_MAX_SIZE");
        }
        let mut c = self.tuning.config_except(skip)?;
        if let Some(m) = self.mode {
            c.mode = m;
        }
        if let Some(v) = self.max_size {
            c.max_size = v;
        }
        Ok(c)
    }

    pub fn engine(&self) -> shadowfd::Result<Engine> {
        Engine::new(self.config()?)
    }

    /// The engine for `target`: an object source gets a larger fill unit
    /// and readahead unless a flag or variable sets them.
    pub fn engine_for(&self, target: &Target) -> shadowfd::Result<Engine> {
        let mut c = self.config()?;
        if target.is_object() {
            object::tune(&mut c, self);
        }
        Engine::new(c)
    }
}

/// Where the bytes come from: a host path, a path inside an ext2/3/4
/// image, or an object (`s3://BUCKET/KEY`).
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The file to shadow (with --image: its path inside the image), or
    /// s3://BUCKET/KEY (docs/object-store.md).
    pub path: PathBuf,
    /// Read PATH from inside this ext2/ext3/ext4 image file, in user space.
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub object: object::ObjectOpts,
}

impl Target {
    /// A host path (no image).
    pub fn file(path: PathBuf) -> Target {
        Target {
            path,
            image: None,
            object: Default::default(),
        }
    }

    /// Whether the target is an object URL.
    pub fn is_object(&self) -> bool {
        self.image.is_none() && self.path.to_str().is_some_and(ObjectUrl::is_url)
    }

    /// A fresh source for the target (each call opens it anew).
    pub fn source(&self) -> shadowfd::Result<Arc<dyn Source>> {
        if self.is_object() {
            return self.object.open(&self.path.to_string_lossy(), true);
        }
        self.source_uncached()
    }

    /// A fresh source that reads the store itself, never the disk cache
    /// (what `--verify` compares with).
    pub fn source_uncached(&self) -> shadowfd::Result<Arc<dyn Source>> {
        if self.is_object() {
            return self.object.open(&self.path.to_string_lossy(), false);
        }
        if let Some(img) = &self.image {
            let src = ImageSource::open(img, &self.path).map_err(|e| shadowfd::Error::Open {
                path: e.location().into(),
                source: std::io::Error::new(e.kind(), e.reason()),
            })?;
            return Ok(Arc::new(src));
        }
        let src = FileSource::open(&self.path).map_err(|e| shadowfd::Error::Open {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(Arc::new(src))
    }

    /// Opens the shadow; a long eager copy shows a progress bar on stderr
    /// when stderr is a terminal.
    pub fn open(&self, engine: &Engine) -> shadowfd::Result<Shadow> {
        use std::io::IsTerminal;
        let source = self.source()?;
        if !std::io::stderr().is_terminal() || engine.mode() != Mode::Eager {
            return engine.open(source);
        }
        let bar = indicatif::ProgressBar::hidden();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "copying {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(source.name());
        let started = std::time::Instant::now();
        let progress = |done, total| {
            // Only copies that take a while get a bar.
            if bar.is_hidden() && started.elapsed() > std::time::Duration::from_millis(500) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            bar.set_length(total);
            bar.set_position(done);
        };
        let r = engine.open_options().progress(&progress).open(source);
        bar.finish_and_clear();
        r
    }
}

/// A failure to report: message to stderr, exit code 1.
pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Prints `{"error": MESSAGE}` on stdout: how a command run with `--json`
/// fails (besides the usual line on stderr and the exit status).
fn print_json_error(msg: &str) {
    println!("{}", serde_json::json!({ "error": msg.trim_end() }));
}

/// The typed code of a server's refusal (`E_LIMIT`, ...) or of a broken
/// connection (`closed`, `timed_out`), for `--json` output.
fn error_code(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let e = e.downcast_ref::<shadowfd::Error>()?;
    if let Some(c) = e.refusal_code() {
        return Some(shadowfd::remote::wire::code_name(c));
    }
    match e.connection()? {
        shadowfd::Connection::TimedOut => Some("timed_out"),
        _ => Some("closed"),
    }
}

/// Before a command opens files: no other process of this uid may reach into
/// this one through /proc (and so write into an eager shadow's memfd while it
/// is copied). See `shadowfd::harden_process`.
fn harden() -> CliResult {
    shadowfd::harden_process()?;
    Ok(())
}

fn main() -> ExitCode {
    // Dropped on every way out of main: first the fetched blocks of
    // s3:// objects are written to their disk cache (bounded).
    let _writes = object::FinishCacheWrites;
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            // A usage error under --json still answers in JSON.
            let wants_json = std::env::args().skip(1).any(|a| a == "--json");
            if wants_json && !matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                print_json_error(first.strip_prefix("error: ").unwrap_or(first));
            }
            e.exit()
        }
    };
    let json = match &cli.cmd {
        Cmd::Map(a) => a.json(),
        Cmd::Probe(a) => a.json(),
        Cmd::Bench(a) => a.json(),
        Cmd::Cat(_) | Cmd::Serve(_) | Cmd::Run(_) | Cmd::BenchReader(_) => false,
        Cmd::Workset(a) => a.json(),
        Cmd::Client(a) => a.json(),
        Cmd::Status(a) => a.json(),
    };
    let r = match cli.cmd {
        Cmd::Probe(a) => probe::run(a),
        Cmd::Cat(a) => harden().and_then(|()| cat::run(a)),
        Cmd::Map(a) => harden().and_then(|()| map::run(a)),
        Cmd::Bench(a) => harden().and_then(|()| bench::run(a)),
        Cmd::Serve(a) => harden().and_then(|()| serve::run(a)),
        Cmd::Client(a) => harden().and_then(|()| client::run(a)),
        Cmd::Status(a) => status::run(a),
        Cmd::Workset(a) => workset::run(a),
        // An ordinary program: no hardening, nothing shadowfd-specific.
        Cmd::BenchReader(a) => bench::reader::run(a),
        // The command's own exit status, once it ran.
        Cmd::Run(a) => match harden().and_then(|()| run::run(a)) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shadowfd: error: {e}");
            if json && e.downcast_ref::<map::ReportedInJson>().is_none() {
                match error_code(e.as_ref()) {
                    Some(code) => println!(
                        "{}",
                        serde_json::json!({ "error": e.to_string().trim_end(), "code": code })
                    ),
                    None => print_json_error(&e.to_string()),
                }
            }
            ExitCode::FAILURE
        }
    }
}
