//! `shadowfd workset list|show|rm`: the working-set records kept for replay
//! (docs/worksets.md).

use crate::CliResult;
use crate::units::format_size;
use clap::{Args, Subcommand};
use shadowfd::workset::{Record, RecordError, list, record_path};
use shadowfd::{FileSource, Source};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct WorksetArgs {
    #[command(subcommand)]
    cmd: WorksetCmd,
    /// The record directory  [env: SHADOWFD_WORKSET_DIR] [default: $XDG_CACHE_HOME/shadowfd/worksets]
    #[arg(long, value_name = "DIR", global = true)]
    dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum WorksetCmd {
    /// Every record: source, chunks, bytes, age.
    List,
    /// One record, by its name (as `list` prints it) or by the file it is of.
    Show {
        /// A record name (the hash `list` prints) or a host file's path.
        record: String,
        /// Print every recorded chunk, in order.
        #[arg(long)]
        chunks: bool,
    },
    /// Remove records: by name, by the file they are of, or all of them.
    Rm {
        /// Record names or host file paths.
        records: Vec<String>,
        /// Remove every record in the directory.
        #[arg(long, conflicts_with = "records")]
        all: bool,
    },
}

impl WorksetArgs {
    pub fn json(&self) -> bool {
        self.json
    }
}

fn dir(a: &WorksetArgs) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Some(d) = &a.dir {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("SHADOWFD_WORKSET_DIR").filter(|d| !d.is_empty()) {
        return Ok(d.into());
    }
    shadowfd::workset::default_dir().ok_or_else(|| {
        "no record directory: neither XDG_CACHE_HOME nor HOME is set; pass --dir or set \
         SHADOWFD_WORKSET_DIR"
            .into()
    })
}

/// The record file `what` names: a record name (with or without `.ws`)
/// in `dir`, or the record of the host file at that path.
fn resolve(dir: &Path, what: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let name = what.strip_suffix(".ws").unwrap_or(what);
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) && !Path::new(what).exists()
    {
        return Ok(dir.join(format!("{name}.ws")));
    }
    let src = FileSource::open(Path::new(what))
        .map_err(|e| format!("{what}: not a record name (16 hex digits), nor a file: {e}"))?;
    let id = src
        .identity()
        .ok_or_else(|| format!("{what}: its identity cannot be read"))?;
    Ok(record_path(dir, &id.which))
}

fn age(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created);
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

fn name_of(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn json_of(p: &Path, r: &Result<Record, RecordError>) -> serde_json::Value {
    match r {
        Ok(r) => serde_json::json!({
            "name": name_of(p),
            "path": p,
            "source": r.key.which,
            "version": r.key.version,
            "chunk": r.chunk,
            "size": r.size,
            "chunks": r.chunks.len(),
            "bytes": r.chunks.len() as u64 * r.chunk,
            "created": r.created,
        }),
        Err(e) => serde_json::json!({ "name": name_of(p), "path": p, "error": e.to_string() }),
    }
}

pub fn run(a: WorksetArgs) -> CliResult {
    let dir = dir(&a)?;
    match &a.cmd {
        WorksetCmd::List => {
            let all = list(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if a.json {
                let v: Vec<_> = all.iter().map(|(p, r)| json_of(p, r)).collect();
                println!("{}", serde_json::json!({ "dir": dir, "records": v }));
                return Ok(());
            }
            if all.is_empty() {
                println!("no records in {}", dir.display());
            }
            for (p, r) in &all {
                match r {
                    Ok(r) => println!(
                        "{}  {:>8} chunks  {:>9}  {:>8} old  {}",
                        name_of(p),
                        r.chunks.len(),
                        format_size(r.chunks.len() as u64 * r.chunk),
                        age(r.created),
                        r.key.which
                    ),
                    Err(e) => println!("{}  damaged: {e}", name_of(p)),
                }
            }
        }
        WorksetCmd::Show { record, chunks } => {
            let p = resolve(&dir, record)?;
            let r = Record::read(&p)?;
            if a.json {
                let mut v = json_of(&p, &Ok(r.clone()));
                if *chunks {
                    v["order"] = serde_json::json!(r.chunks);
                    v["ages"] = serde_json::json!(r.ages);
                }
                println!("{v}");
                return Ok(());
            }
            println!("record   {}", p.display());
            println!("source   {}", r.key.which);
            println!("version  {}", r.key.version);
            println!(
                "chunks   {} of {} ({} of {})",
                r.chunks.len(),
                format_size(r.chunk),
                format_size(r.chunks.len() as u64 * r.chunk),
                format_size(r.size)
            );
            println!("age      {}", age(r.created));
            let mut by_age = [0usize; shadowfd::workset::KEEP_RUNS as usize];
            for &x in &r.ages {
                by_age[usize::from(x).min(by_age.len() - 1)] += 1;
            }
            println!(
                "runs     {} chunks touched by the latest run; untouched for 1, 2, 3 runs: {}, {}, {}",
                by_age[0], by_age[1], by_age[2], by_age[3]
            );
            if *chunks {
                for (c, x) in r.chunks.iter().zip(&r.ages) {
                    println!("{c} (age {x})");
                }
            }
        }
        WorksetCmd::Rm { records, all } => {
            let paths: Vec<PathBuf> = if *all {
                list(&dir)
                    .map_err(|e| format!("{}: {e}", dir.display()))?
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect()
            } else {
                if records.is_empty() {
                    return Err("name the records to remove, or pass --all".into());
                }
                records
                    .iter()
                    .map(|w| resolve(&dir, w))
                    .collect::<Result<_, _>>()?
            };
            for p in paths {
                std::fs::remove_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                if !a.json {
                    println!("removed {}", p.display());
                }
            }
        }
    }
    Ok(())
}
