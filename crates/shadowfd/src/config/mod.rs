//! Configuration: modes, limits and tuning, from defaults, the environment
//! (`SHADOWFD_*`) and, in the CLI, flags (which win over the environment).

mod memory;
mod size;

pub(crate) use memory::mem_available;
pub use memory::{DEFAULT_BUDGET_DIVISOR, default_budget, headroom};
pub use size::Size;
pub(crate) use size::{format_size, parse_size, suggest_size};

use crate::error::{Error, Result};
use std::str::FromStr;

/// Default eager size cap: what sandboxes use today.
pub const DEFAULT_MAX_SIZE: u64 = 256 << 20;
/// Default fill chunk: one page. A random fault costs mostly the fault/wake
/// round trip, and a larger chunk pays off only if the neighbouring pages get
/// used; sequential access does not depend on the chunk (it is detected and
/// filled in 1 MiB runs plus a readahead window). Figures:
/// docs/benchmarks.md.
pub const DEFAULT_CHUNK: u64 = 4 << 10;
/// Default upper bound of the sequential readahead window.
pub const DEFAULT_READAHEAD: u64 = 8 << 20;
/// Largest accepted chunk.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Largest accepted readahead window.
pub const MAX_READAHEAD: u64 = 1 << 30;
/// Largest accepted worker count.
pub const MAX_WORKERS: usize = 256;

/// How shadows are populated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Mode {
    /// Lazy where userfaultfd works, eager otherwise.
    Auto,
    /// Filled on first touch through userfaultfd; fails where it is unavailable.
    Lazy,
    /// Copied whole at open time, bounded by the size cap.
    Eager,
}

/// `FromStr` and `Display` for an enum spelled by lowercase names.
macro_rules! named_enum {
    ($t:ident { $($v:ident => $name:literal),+ $(,)? }, $expect:literal) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($name => Ok($t::$v),)+
                    _ => Err($expect.into()),
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $($t::$v => $name,)+
                })
            }
        }
    };
}

named_enum!(Mode { Auto => "auto", Lazy => "lazy", Eager => "eager" }, "expected auto, lazy or eager");

/// What a lazy shadow does when its source changes after open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum StalePolicy {
    /// Keep filling from the source; record the change (staleness API, stats).
    Detect,
    /// Once a change is seen, poison every further fill: torn data is never served.
    Strict,
}

named_enum!(StalePolicy { Detect => "detect", Strict => "strict" }, "expected detect or strict");

/// What lazy shadows do with working-set records (docs/worksets.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum WorksetMode {
    /// Neither record nor replay.
    Off,
    /// Record the chunks each run needs first, replacing the last record.
    Record,
    /// Replay an existing record; never write one.
    Replay,
    /// Record where no record exists; otherwise replay it, and add to it
    /// the chunks the run needed outside it.
    Auto,
}

named_enum!(WorksetMode { Off => "off", Record => "record", Replay => "replay", Auto => "auto" },
    "expected off, record, replay or auto");

impl WorksetMode {
    /// Whether this mode writes records.
    pub fn records(self) -> bool {
        matches!(self, WorksetMode::Record | WorksetMode::Auto)
    }

    /// Whether this mode replays records.
    pub fn replays(self) -> bool {
        matches!(self, WorksetMode::Replay | WorksetMode::Auto)
    }
}

/// Default recording window: the first 30 s after a shadow is opened.
pub const DEFAULT_WORKSET_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);
/// Default cap of one record: 256 MiB of chunks.
pub const DEFAULT_WORKSET_MAX: u64 = 256 << 20;
/// Longest accepted recording window.
pub const MAX_WORKSET_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The default working-set directory: `$XDG_CACHE_HOME/shadowfd/worksets`,
/// else `$HOME/.cache/shadowfd/worksets`; `None` if neither is an absolute
/// path.
pub fn default_workset_dir() -> Option<std::path::PathBuf> {
    let abs = |v: std::ffi::OsString| {
        let p = std::path::PathBuf::from(v);
        p.is_absolute().then_some(p)
    };
    let base = std::env::var_os("XDG_CACHE_HOME")
        .and_then(abs)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(abs)
                .map(|h| h.join(".cache"))
        })?;
    Some(base.join("shadowfd").join("worksets"))
}

/// Parses a duration: a number with an optional unit `ms`, `s` (default),
/// `m` or `h`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        "expected a whole number with an optional unit ms, s, m or h, e.g. 30s".to_string()
    })?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        u => {
            return Err(format!(
                "unknown unit {u:?}: expected ms, s, m or h, e.g. 30s"
            ));
        }
    };
    ms.map(std::time::Duration::from_millis)
        .ok_or_else(|| "too long".to_string())
}

/// Everything a [`crate::Engine`] needs to know. Build it with
/// [`Config::from_env`] (defaults plus `SHADOWFD_*`), adjust fields, and the
/// engine calls [`Config::validate`].
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Config {
    /// `SHADOWFD_MODE`; default `auto`.
    pub mode: Mode,
    /// Eager size cap in bytes (`SHADOWFD_MAX_SIZE`; default 256 MiB).
    pub max_size: u64,
    /// Memory bound (`SHADOWFD_MEMORY_BUDGET`; default a quarter of the
    /// tighter of `MemAvailable` and the memory cgroup's headroom, see
    /// [`default_budget`]):
    /// the eager cap may not exceed it, and lazy shadows of one engine may not
    /// hold more resident bytes than it.
    pub memory_budget: u64,
    /// Lazy fill unit in bytes (`SHADOWFD_CHUNK`; default 4 KiB).
    pub chunk_size: u64,
    /// Fault-service workers (`SHADOWFD_WORKERS`; default: number of CPUs).
    pub workers: usize,
    /// Largest sequential readahead window in bytes (`SHADOWFD_READAHEAD`;
    /// default 8 MiB; 0 turns readahead off).
    pub readahead: u64,
    /// Lazy staleness policy (`SHADOWFD_STALE`; default `detect`).
    pub stale: StalePolicy,
    /// Working-set records (`SHADOWFD_WORKSET`; default `off`, see
    /// docs/worksets.md).
    pub workset: WorksetMode,
    /// Where records are kept (`SHADOWFD_WORKSET_DIR`; default `None`:
    /// [`default_workset_dir`]).
    pub workset_dir: Option<std::path::PathBuf>,
    /// How long after open a shadow records (`SHADOWFD_WORKSET_WINDOW`;
    /// default 30 s).
    pub workset_window: std::time::Duration,
    /// The most bytes of chunks one record holds (`SHADOWFD_WORKSET_MAX`;
    /// default 256 MiB).
    pub workset_max: u64,
    /// Bytes of recorded chunks a replay fills before the shadow's first
    /// mapping (or `populate`/`read_at`) returns (`SHADOWFD_WORKSET_PREFETCH`,
    /// a size or `all`; default 0: the replay races the first access).
    pub workset_prefetch: u64,
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(MAX_WORKERS)
}

impl Default for Config {
    /// Defaults, with no environment applied. The memory budget is a quarter
    /// of the tighter of `MemAvailable` and the memory cgroup's [`headroom`]
    /// at the time of the call.
    fn default() -> Self {
        let memory_budget = default_budget();
        Config {
            mode: Mode::Auto,
            max_size: DEFAULT_MAX_SIZE.min(memory_budget),
            memory_budget,
            chunk_size: DEFAULT_CHUNK,
            workers: default_workers(),
            readahead: DEFAULT_READAHEAD,
            stale: StalePolicy::Detect,
            workset: WorksetMode::Off,
            workset_dir: None,
            workset_window: DEFAULT_WORKSET_WINDOW,
            workset_max: DEFAULT_WORKSET_MAX,
            workset_prefetch: 0,
        }
    }
}

fn env_var(name: &'static str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::Config {
            what: name,
            value: v.to_string_lossy().into_owned(),
            why: "not valid UTF-8".into(),
        }),
    }
}

/// A working-set prefetch bound: a size, or `all` (the whole record).
pub fn parse_prefetch(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        Ok(u64::MAX)
    } else {
        parse_size(s).map_err(|e| format!("{e}, or `all` for the whole record"))
    }
}

fn parse_with<T>(
    what: &'static str,
    value: &str,
    f: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T> {
    f(value).map_err(|why| Error::Config {
        what,
        value: value.to_string(),
        why,
    })
}

impl Config {
    /// Defaults overridden by the `SHADOWFD_*` environment variables. Not yet
    /// validated: call [`Config::validate`] after applying your own overrides.
    pub fn from_env() -> Result<Self> {
        Config::from_env_except(&[])
    }

    /// Like [`Config::from_env`], but leaves the variables named in `skip`
    /// unread: a caller whose own setting wins (a command-line flag) does
    /// not fail on a malformed variable it would override anyway.
    pub fn from_env_except(skip: &[&str]) -> Result<Self> {
        let env_var = |name: &'static str| -> Result<Option<String>> {
            if skip.contains(&name) {
                return Ok(None);
            }
            env_var(name)
        };
        let mut c = Config::default();
        let mut max_size_set = false;
        if let Some(v) = env_var("SHADOWFD_MEMORY_BUDGET")? {
            c.memory_budget = parse_with("SHADOWFD_MEMORY_BUDGET", &v, parse_size)?;
        }
        if let Some(v) = env_var("SHADOWFD_MODE")? {
            c.mode = parse_with("SHADOWFD_MODE", &v, str::parse)?;
        }
        if let Some(v) = env_var("SHADOWFD_MAX_SIZE")? {
            c.max_size = parse_with("SHADOWFD_MAX_SIZE", &v, parse_size)?;
            max_size_set = true;
        }
        if let Some(v) = env_var("SHADOWFD_CHUNK")? {
            c.chunk_size = parse_with("SHADOWFD_CHUNK", &v, parse_size)?;
        }
        if let Some(v) = env_var("SHADOWFD_WORKERS")? {
            c.workers = parse_with("SHADOWFD_WORKERS", &v, |s| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("expected a whole number from 1 to {MAX_WORKERS}"))
            })?;
        }
        if let Some(v) = env_var("SHADOWFD_READAHEAD")? {
            c.readahead = parse_with("SHADOWFD_READAHEAD", &v, parse_size)?;
        }
        if let Some(v) = env_var("SHADOWFD_STALE")? {
            c.stale = parse_with("SHADOWFD_STALE", &v, str::parse)?;
        }
        if let Some(v) = env_var("SHADOWFD_WORKSET")? {
            c.workset = parse_with("SHADOWFD_WORKSET", &v, str::parse)?;
        }
        if let Some(v) = env_var("SHADOWFD_WORKSET_DIR")? {
            c.workset_dir = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = env_var("SHADOWFD_WORKSET_WINDOW")? {
            c.workset_window = parse_with("SHADOWFD_WORKSET_WINDOW", &v, parse_duration)?;
        }
        if let Some(v) = env_var("SHADOWFD_WORKSET_MAX")? {
            c.workset_max = parse_with("SHADOWFD_WORKSET_MAX", &v, parse_size)?;
        }
        if let Some(v) = env_var("SHADOWFD_WORKSET_PREFETCH")? {
            c.workset_prefetch = parse_with("SHADOWFD_WORKSET_PREFETCH", &v, parse_prefetch)?;
        }
        if !max_size_set {
            c.max_size = DEFAULT_MAX_SIZE.min(c.memory_budget);
        }
        Ok(c)
    }

    /// Sets one value from text, by the name of its command-line flag:
    /// `mode`, `max-size`, `memory-budget`, `chunk`, `workers`, `readahead`,
    /// `stale`, `workset`, `workset-dir`, `workset-window`, `workset-max` or
    /// `workset-prefetch` (a leading `--` is accepted). Values are parsed as the CLI
    /// parses them (`512M`, `2G`, `lazy`, ...); ranges are checked by
    /// [`Config::validate`]. As with the CLI, setting `memory-budget` while
    /// `max-size` still has its default lowers the size cap to the new budget
    /// where it is smaller.
    ///
    /// ```
    /// let mut c = shadowfd::Config::default();
    /// c.set("max-size", "1G")?;
    /// c.set("mode", "eager")?;
    /// assert_eq!(c.max_size, 1 << 30);
    /// assert!(c.set("chunk", "12 parsecs").is_err());
    /// # Ok::<(), shadowfd::Error>(())
    /// ```
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let workers = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| {
                format!("expected a whole number of worker threads from 1 to {MAX_WORKERS}, e.g. 4")
            })
        };
        match key.trim().trim_start_matches("--") {
            "mode" => self.mode = parse_with("mode (--mode / SHADOWFD_MODE)", value, str::parse)?,
            "max-size" => {
                self.max_size = parse_with(
                    "size cap (--max-size / SHADOWFD_MAX_SIZE)",
                    value,
                    parse_size,
                )?
            }
            "memory-budget" => {
                let budget = parse_with(
                    "memory budget (--memory-budget / SHADOWFD_MEMORY_BUDGET)",
                    value,
                    parse_size,
                )?;
                if self.max_size == DEFAULT_MAX_SIZE.min(self.memory_budget) {
                    self.max_size = DEFAULT_MAX_SIZE.min(budget);
                }
                self.memory_budget = budget;
            }
            "chunk" => {
                self.chunk_size =
                    parse_with("chunk size (--chunk / SHADOWFD_CHUNK)", value, parse_size)?
            }
            "workers" => {
                self.workers = parse_with(
                    "worker count (--workers / SHADOWFD_WORKERS)",
                    value,
                    workers,
                )?
            }
            "readahead" => {
                self.readahead = parse_with(
                    "readahead (--readahead / SHADOWFD_READAHEAD)",
                    value,
                    parse_size,
                )?
            }
            "stale" => {
                self.stale =
                    parse_with("stale policy (--stale / SHADOWFD_STALE)", value, str::parse)?
            }
            "workset" => {
                self.workset = parse_with(
                    "working-set mode (--workset / SHADOWFD_WORKSET)",
                    value,
                    str::parse,
                )?
            }
            "workset-dir" => self.workset_dir = (!value.is_empty()).then(|| value.into()),
            "workset-window" => {
                self.workset_window = parse_with(
                    "working-set window (--workset-window / SHADOWFD_WORKSET_WINDOW)",
                    value,
                    parse_duration,
                )?
            }
            "workset-prefetch" => {
                self.workset_prefetch = parse_with(
                    "working-set prefetch (--workset-prefetch / SHADOWFD_WORKSET_PREFETCH)",
                    value,
                    parse_prefetch,
                )?
            }
            "workset-max" => {
                self.workset_max = parse_with(
                    "working-set cap (--workset-max / SHADOWFD_WORKSET_MAX)",
                    value,
                    parse_size,
                )?
            }
            _ => {
                return Err(Error::Config {
                    what: "configuration key",
                    value: key.to_string(),
                    why: "expected one of mode, max-size, memory-budget, chunk, workers, \
                          readahead, stale, workset, workset-dir, workset-window, workset-max, \
                          workset-prefetch (the command-line flags' names)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// Checks every value; the error names the value, the limit and the fix.
    pub fn validate(&self) -> Result<()> {
        let page = crate::page_size() as u64;
        let err = |what: &'static str, value: u64, why: String| Error::Config {
            what,
            value: value.to_string(),
            why,
        };
        if let Some(avail) = mem_available() {
            if self.memory_budget > avail {
                return Err(err(
                    "memory budget (--memory-budget / SHADOWFD_MEMORY_BUDGET)",
                    self.memory_budget,
                    format!(
                        "{} is more than this machine's MemAvailable of {} bytes ({}); \
                         set --memory-budget / SHADOWFD_MEMORY_BUDGET lower",
                        format_size(self.memory_budget),
                        avail,
                        format_size(avail)
                    ),
                ));
            }
        }
        if self.memory_budget < page {
            return Err(err(
                "memory budget (--memory-budget / SHADOWFD_MEMORY_BUDGET)",
                self.memory_budget,
                format!(
                    "must be at least one page ({page} bytes); set --memory-budget / \
                     SHADOWFD_MEMORY_BUDGET higher"
                ),
            ));
        }
        if self.max_size > self.memory_budget {
            return Err(err(
                "size cap (--max-size / SHADOWFD_MAX_SIZE)",
                self.max_size,
                format!(
                    "{} is over the memory bound of {} bytes ({}), which is a quarter of \
                     MemAvailable or of the memory cgroup's headroom, whichever is smaller, \
                     unless --memory-budget / SHADOWFD_MEMORY_BUDGET sets it; choose a cap at \
                     or below the bound, or raise the budget",
                    format_size(self.max_size),
                    self.memory_budget,
                    format_size(self.memory_budget)
                ),
            ));
        }
        if self.chunk_size == 0 || self.chunk_size % page != 0 || self.chunk_size > MAX_CHUNK {
            return Err(err(
                "chunk size (--chunk / SHADOWFD_CHUNK)",
                self.chunk_size,
                format!(
                    "must be a non-zero multiple of the page size ({page} bytes) and at most {}",
                    format_size(MAX_CHUNK)
                ),
            ));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(err(
                "worker count (--workers / SHADOWFD_WORKERS)",
                self.workers as u64,
                format!("must be between 1 and {MAX_WORKERS}"),
            ));
        }
        if self.chunk_size > self.memory_budget {
            return Err(err(
                "chunk size (--chunk / SHADOWFD_CHUNK)",
                self.chunk_size,
                format!(
                    "is larger than the memory budget of {} bytes ({}): no chunk could ever be \
                     filled; choose a smaller chunk or raise --memory-budget",
                    self.memory_budget,
                    format_size(self.memory_budget)
                ),
            ));
        }
        if self.readahead > MAX_READAHEAD {
            return Err(err(
                "readahead (--readahead / SHADOWFD_READAHEAD)",
                self.readahead,
                format!(
                    "must be at most {}; readahead never uses more than half of the memory \
                     budget anyway",
                    format_size(MAX_READAHEAD)
                ),
            ));
        }
        if self.workset_window > MAX_WORKSET_WINDOW {
            return Err(Error::Config {
                what: "working-set window (--workset-window / SHADOWFD_WORKSET_WINDOW)",
                value: format!("{} s", self.workset_window.as_secs()),
                why: format!(
                    "must be at most {} s (a day); records are meant for start-up, e.g. 30s",
                    MAX_WORKSET_WINDOW.as_secs()
                ),
            });
        }
        if self.workset.records() && self.workset_max < self.chunk_size {
            return Err(err(
                "working-set cap (--workset-max / SHADOWFD_WORKSET_MAX)",
                self.workset_max,
                format!(
                    "is below one chunk ({} bytes): nothing could be recorded; set it to at \
                     least the chunk size, e.g. 256M, or --workset off",
                    self.chunk_size
                ),
            ));
        }
        if self.workset != WorksetMode::Off
            && self.workset_dir.is_none()
            && default_workset_dir().is_none()
        {
            return Err(Error::Config {
                what: "working-set directory (--workset-dir / SHADOWFD_WORKSET_DIR)",
                value: String::new(),
                why: "neither XDG_CACHE_HOME nor HOME is an absolute path, so there is no \
                      default; set SHADOWFD_WORKSET_DIR, or --workset off"
                    .into(),
            });
        }
        Ok(())
    }

    /// The directory working-set records are kept in.
    pub fn workset_dir(&self) -> Option<std::path::PathBuf> {
        self.workset_dir.clone().or_else(default_workset_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_like_the_cli() {
        let mut c = Config::default();
        c.set("mode", "Lazy").unwrap();
        assert_eq!(c.mode, Mode::Lazy);
        c.set("--max-size", "1M").unwrap();
        assert_eq!(c.max_size, 1 << 20);
        c.set("chunk", "64K").unwrap();
        assert_eq!(c.chunk_size, 64 << 10);
        c.set("workers", "3").unwrap();
        assert_eq!(c.workers, 3);
        c.set("readahead", "0").unwrap();
        assert_eq!(c.readahead, 0);
        c.set("stale", "strict").unwrap();
        assert_eq!(c.stale, StalePolicy::Strict);
        // An explicit cap stays when the budget changes.
        c.set("memory-budget", "512M").unwrap();
        assert_eq!((c.memory_budget, c.max_size), (512 << 20, 1 << 20));
    }

    #[test]
    fn set_budget_lowers_a_default_cap() {
        let mut c = Config {
            memory_budget: 1 << 30,
            max_size: DEFAULT_MAX_SIZE,
            ..Config::default()
        };
        c.set("memory-budget", "64M").unwrap();
        assert_eq!(c.max_size, 64 << 20);
    }

    #[test]
    fn set_errors_name_the_flag_and_the_fix() {
        let mut c = Config::default();
        let e = c.set("chunk", "12 parsecs").unwrap_err().to_string();
        assert!(e.contains("--chunk") && e.contains("unknown unit"), "{e}");
        let e = c.set("workers", "-1").unwrap_err().to_string();
        assert!(e.contains("--workers") && e.contains("whole number"), "{e}");
        let e = c.set("mode", "fast").unwrap_err().to_string();
        assert!(e.contains("auto, lazy or eager"), "{e}");
        let e = c.set("colour", "red").unwrap_err().to_string();
        assert!(e.contains("\"colour\"") && e.contains("max-size"), "{e}");
    }
}
