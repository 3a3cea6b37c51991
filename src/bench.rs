//! `shadowfd bench`: eager and lazy shadows side by side in one run, with a
//! plain `mmap` of the host file (the page cache) and an `mmap` through a
//! `fuse2fs` mount as references. See docs/benchmarks.md.
//!
//! - `args.rs`: the modes and flags, and their checks.
//! - `pages.rs`: the page-pattern driver (data, engines, the runs, the report).
//! - `runners.rs`: one timed run of one pattern under one mode.
//! - `notes.rs`: the targets, the standing notes and the machine.
//! - `report.rs`, `plot.rs`: medians, ratios, the table, the JSON, the chart.
//! - `data.rs`, `filemap.rs`, `fuse.rs`, `raw.rs`, `raw_remote.rs`,
//!   `reader.rs`: the data, the references and the floors; `small.rs`: `--small-files`;
//!   `clients.rs`: `--clients`.

mod args;
mod clients;
mod data;
mod filemap;
mod fuse;
mod interrupt;
mod notes;
mod pages;
mod plot;
mod proxy;
mod raw;
mod raw_remote;
pub(super) mod reader;
pub(super) mod report;
mod runners;
mod s3;
mod small;
mod sqlite;
mod weed;
mod weed_mini;

pub use args::BenchArgs;

/// `shadowfd bench`: `--sqlite` ([`sqlite::run`]), else the page patterns
/// or `--small-files` ([`pages::run`]).
pub fn run(a: BenchArgs) -> crate::CliResult {
    match a.sqlite {
        Some(size) => {
            let root = a.dir.clone().unwrap_or_else(std::env::temp_dir);
            sqlite::run(size, a.reps, &root, a.json)
        }
        None => pages::run(a),
    }
}
