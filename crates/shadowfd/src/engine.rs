//! The engine: validated configuration, the mode decision, and (in lazy
//! mode) the fault service that every lazy shadow of this engine shares.

use crate::config::{Config, Mode};
use crate::config::{format_size, suggest_size};
use crate::error::{Error, Result};
use crate::fault::Service;
use crate::shadow::lazy::{LazyShadow, User};
use crate::shadow::{EagerShadow, Kind, Shadow};
use crate::source::{FileKind, FileSource, Source, SourceMeta};
use crate::stats::Stats;
use crate::sys::{Probe, Uffd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Opens shadows. Cheap to keep around; share it with `&`.
///
/// Dropping the engine does not stop its fault service while shadows or
/// mappings it made are alive: they hold the service, so their unfilled pages
/// keep being served and never turn into zeros. The service stops when the
/// last of them is dropped.
pub struct Engine {
    config: Config,
    mode: Mode,
    probe: Option<Probe>,
    service: Option<Arc<Service>>,
}

impl Engine {
    /// Validates `config` and resolves the mode: `Lazy` needs a usable
    /// userfaultfd (else an error saying why and what to change), `Auto`
    /// uses it where it can and falls back to `Eager`.
    pub fn new(config: Config) -> Result<Engine> {
        config.validate()?;
        let (mode, probe, service) = match config.mode {
            Mode::Eager => (Mode::Eager, None, None),
            Mode::Lazy | Mode::Auto => match Uffd::open() {
                Ok((uffd, p)) => (Mode::Lazy, Some(p), Some(Service::start(uffd, &config)?)),
                Err(p) if config.mode == Mode::Lazy => {
                    return Err(Error::LazyUnavailable(describe_failure(&p)));
                }
                Err(p) => (Mode::Eager, Some(p), None),
            },
        };
        Ok(Engine {
            config,
            mode,
            probe,
            service,
        })
    }

    /// The mode shadows of this engine get (`Lazy` or `Eager`).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The fault service of its lazy shadows (none in eager mode).
    pub(crate) fn service(&self) -> Option<&Arc<Service>> {
        self.service.as_ref()
    }

    /// What the userfaultfd probe found (not run in eager mode).
    pub fn probe(&self) -> Option<&Probe> {
        self.probe.as_ref()
    }

    /// Whether a lazy shadow could be made in this process: this engine's
    /// probe, or in eager mode one probe per process. For the over-cap
    /// error, which suggests `--mode lazy` only where it would work.
    fn lazy_possible(&self) -> bool {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        match &self.probe {
            Some(p) => p.lazy_usable,
            None => *USABLE.get_or_init(|| crate::sys::probe().lazy_usable),
        }
    }

    /// Shadows `source`: any [`Source`] (an `Arc<dyn Source>` too), or a
    /// host path, opened as a [`FileSource`] (symlinks followed).
    /// Non-regular sources are refused. Eager shadows over the size cap are
    /// refused with the way to raise it. Shorthand for
    /// `self.open_options().open(source)`.
    pub fn open(&self, source: impl IntoSource) -> Result<Shadow> {
        self.open_options().open(source)
    }

    /// Options for [`Engine::open`]: progress reporting.
    pub fn open_options(&self) -> OpenOptions<'_> {
        OpenOptions {
            engine: self,
            progress: None,
        }
    }

    fn open_source(&self, source: Arc<dyn Source>, progress: &dyn Fn(u64, u64)) -> Result<Shadow> {
        let t0 = Instant::now();
        let name = source.name();
        let mut meta = source.metadata().map_err(|e| Error::Open {
            path: name.clone().into(),
            source: e,
        })?;
        if meta.kind != FileKind::Regular {
            return Err(Error::NotRegular {
                what: name,
                kind: meta.kind,
            });
        }
        let kind = match &self.service {
            Some(service) => Kind::Lazy(User::new(LazyShadow::open(
                service.clone(),
                source,
                meta,
                &self.config,
            )?)),
            None => {
                let cap = self.config.max_size;
                let check = |m: &SourceMeta| {
                    if m.size > cap {
                        return Err(Error::TooLarge {
                            what: name.clone(),
                            size: m.size,
                            size_h: format_size(m.size),
                            cap,
                            cap_h: format_size(cap),
                            suggest: suggest_size(m.size),
                            lazy_possible: self.lazy_possible(),
                        });
                    }
                    Ok(())
                };
                let memfd = crate::eager::snapshot(&*source, &mut meta, check, progress)?;
                Kind::Eager(EagerShadow {
                    name,
                    source,
                    meta,
                    memfd,
                })
            }
        };
        Ok(Shadow {
            kind,
            open_time: t0.elapsed(),
        })
    }

    /// Bytes the engine's lazy shadows hold now, all together (0 in eager
    /// mode): the running count its memory budget is checked against, read
    /// in O(1).
    pub fn resident_bytes(&self) -> u64 {
        self.service
            .as_ref()
            .map_or(0, |s| s.core.resident.load(Ordering::Relaxed))
    }

    /// Counters over every lazy shadow of this engine (zeros in eager mode).
    pub fn stats(&self) -> Stats {
        match &self.service {
            Some(s) => s
                .core
                .counters
                .snapshot(s.core.resident.load(Ordering::Relaxed)),
            None => Stats::default(),
        }
    }
}

/// Options for opening a shadow; from [`Engine::open_options`].
#[must_use]
pub struct OpenOptions<'a> {
    engine: &'a Engine,
    progress: Option<&'a dyn Fn(u64, u64)>,
}

impl<'a> OpenOptions<'a> {
    /// Calls `progress(bytes_done, total)` as an eager copy goes on (every
    /// MiB), for people waiting on a big file. A lazy open reads nothing
    /// and never calls it.
    pub fn progress(mut self, progress: &'a dyn Fn(u64, u64)) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Opens `source` (see [`Engine::open`]).
    pub fn open(self, source: impl IntoSource) -> Result<Shadow> {
        let source = source.into_source()?;
        self.engine
            .open_source(source, self.progress.unwrap_or(&|_, _| {}))
    }
}

/// What [`Engine::open`] accepts: any [`Source`], or a host path.
pub trait IntoSource {
    /// The source, opened.
    fn into_source(self) -> Result<Arc<dyn Source>>;
}

impl<S: Source + 'static> IntoSource for S {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        Ok(Arc::new(self))
    }
}

fn open_file(path: &Path) -> Result<Arc<dyn Source>> {
    let src = FileSource::open(path).map_err(|e| Error::Open {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(Arc::new(src))
}

impl IntoSource for &Path {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        open_file(self)
    }
}

impl IntoSource for &std::path::PathBuf {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        open_file(self)
    }
}

impl IntoSource for std::path::PathBuf {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        open_file(&self)
    }
}

impl IntoSource for &str {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        open_file(Path::new(self))
    }
}

impl IntoSource for String {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        open_file(Path::new(&self))
    }
}

impl IntoSource for &String {
    fn into_source(self) -> Result<Arc<dyn Source>> {
        open_file(Path::new(self))
    }
}

fn describe_failure(p: &Probe) -> String {
    let mut s = p
        .reason
        .clone()
        .unwrap_or_else(|| "userfaultfd is unusable".into());
    let tried: Vec<String> = p
        .attempts
        .iter()
        .filter_map(|a| a.error.as_ref().map(|e| format!("{:?}: {e}", a.method)))
        .collect();
    if !tried.is_empty() {
        s.push_str(&format!(" [tried: {}]", tried.join("; ")));
    }
    s.push_str(". Use --mode eager or --mode auto to run without it.");
    s
}
