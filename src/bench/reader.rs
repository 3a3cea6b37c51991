//! The bench's external reader (`shadowfd bench-reader`, hidden): an
//! ordinary dynamically linked program that knows nothing of shadowfd. It
//! opens a path with libc `open`, `fstat`s it, `mmap`s it read-only and
//! touches one byte of each page in the bench's pattern order, timing
//! itself; then (untimed) it checks every byte of every touched page
//! against the bench's seeded data and prints one JSON line.
//!
//! The `fuse` mode runs it on the fuse2fs mount and the `run` mode under
//! `shadowfd run --image` (where the LD_PRELOAD shim serves its `open`,
//! `fstat` and `mmap`), so both are measured by the same code in the same
//! kind of process.

use super::data;
use super::filemap::FileMap;
use crate::access::{self, Access};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct ReaderArgs {
    /// The file to read.
    #[arg(long)]
    path: PathBuf,
    /// Its expected size in bytes.
    #[arg(long)]
    size: u64,
    /// The access pattern (as `bench --patterns`).
    #[arg(long)]
    pattern: Access,
    /// Seed of the random pattern.
    #[arg(long)]
    pattern_seed: u64,
    /// Seed the data was written with (`data::write_random`).
    #[arg(long)]
    data_seed: u64,
    /// How the pages are reached: `mmap` the file and touch one byte per
    /// page, or `pread` each page (4 KiB) into a buffer.
    #[arg(long, default_value = "mmap")]
    io: Io,
    /// Keep the touching thread on the CPU it starts on (`bench --pin on`).
    #[arg(long)]
    pin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Io {
    Mmap,
    Read,
}

impl Io {
    pub fn name(self) -> &'static str {
        match self {
            Io::Mmap => "mmap",
            Io::Read => "read",
        }
    }
}

/// What the reader measured, one JSON line on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct Measured {
    /// `open(2)` + `fstat`.
    pub open_us: f64,
    /// `mmap` + touching the pattern's pages.
    pub access_us: f64,
    /// `munmap` + `close`.
    pub close_us: f64,
    /// The mapped file's pages present in memory (`mincore`).
    pub resident_bytes: u64,
    /// Minor + major page faults of the touching thread.
    pub page_faults: u64,
    /// Pages whose every byte was checked against the data.
    pub pages_checked: u64,
    /// What backs the mapping, from /proc/self/maps: the file's path for a
    /// plain mapping, `/memfd:...` for a shadow.
    pub backing: String,
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// The name /proc/self/maps gives the mapping that starts at `addr`.
fn backing_of(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for l in maps.lines() {
        let Some((range, rest)) = l.split_once(' ') else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        if (lo..hi).contains(&addr) {
            // address perms offset dev inode [name]
            return rest
                .split_whitespace()
                .skip(4)
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    String::new()
}

/// The timed open of both readers: `open` and `fstat` of the path, then
/// (after the clock stops) its size checked against `--size`. Returns the
/// file, its length and the microseconds the open and `fstat` took.
fn open_sized(a: &ReaderArgs) -> Result<(File, u64, f64), Box<dyn std::error::Error>> {
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", a.path.display());
    let t0 = Instant::now();
    let file = File::open(&a.path).map_err(|e| err("open", e))?;
    let len = file.metadata().map_err(|e| err("fstat", e))?.len();
    let open_us = us(t0);
    if len != a.size {
        return Err(format!("{} has {len} bytes, expected {}", a.path.display(), a.size).into());
    }
    Ok((file, len, open_us))
}

pub fn run(a: ReaderArgs) -> crate::CliResult {
    if a.io == Io::Read {
        return run_read(a);
    }
    let page = shadowfd::page_size() as u64;
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", a.path.display());
    // Listed before the clock starts, as in the bench itself.
    let pages: Vec<u64> = a.pattern.pages(a.size, page, a.pattern_seed).collect();
    let _pin = a.pin.then(super::raw::PinHere::new);
    let f0 = super::runners::thread_faults();
    let (file, len, open_us) = open_sized(&a)?;
    let t1 = Instant::now();
    let map = FileMap::new(&file, len as usize).map_err(|e| err("mmap", e))?;
    std::hint::black_box(access::touch(&map, pages.iter().copied(), page));
    let access_us = us(t1);
    let page_faults = super::runners::thread_faults() - f0;
    let resident_bytes = map.resident_bytes().map_err(|e| err("mincore", e))?;
    let backing = backing_of(map.as_ptr() as usize);
    // Untimed: every byte of every touched page against the seeded data.
    for &p in &pages {
        let start = p * page;
        let end = (start + page).min(len);
        if let Some(off) =
            data::first_mismatch(&map[start as usize..end as usize], start, a.data_seed)
        {
            return Err(format!(
                "{}: byte {off} is {:#04x}, the data written there is {:#04x}",
                a.path.display(),
                map[off as usize],
                data::expected_byte(a.data_seed, off)
            )
            .into());
        }
    }
    let t2 = Instant::now();
    drop(map);
    drop(file);
    let m = Measured {
        open_us,
        access_us,
        close_us: us(t2),
        resident_bytes,
        page_faults,
        pages_checked: pages.len() as u64,
        backing,
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

/// The `read` reader: `pread` of each touched page, in pattern order, into
/// its own place in one buffer (allocated and faulted in before the clock
/// starts), checked after the clock stops.
fn run_read(a: ReaderArgs) -> crate::CliResult {
    use std::os::unix::fs::FileExt;
    let page = shadowfd::page_size() as u64;
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", a.path.display());
    let pages: Vec<u64> = a.pattern.pages(a.size, page, a.pattern_seed).collect();
    // Every byte written before the clock starts: no page fault of the
    // buffer is timed.
    let mut buf = vec![1u8; pages.len() * page as usize];
    let _pin = a.pin.then(super::raw::PinHere::new);
    let f0 = super::runners::thread_faults();
    let (file, len, open_us) = open_sized(&a)?;
    let t1 = Instant::now();
    let mut lens = Vec::with_capacity(pages.len());
    for (i, &p) in pages.iter().enumerate() {
        let at = p * page;
        let want = (len - at).min(page) as usize;
        let dst = &mut buf[i * page as usize..][..want];
        file.read_exact_at(dst, at)
            .map_err(|e| err(&format!("pread of {want} bytes at {at} of"), e))?;
        lens.push(want);
    }
    let access_us = us(t1);
    let page_faults = super::runners::thread_faults() - f0;
    for (i, &p) in pages.iter().enumerate() {
        let got = &buf[i * page as usize..][..lens[i]];
        if let Some(off) = data::first_mismatch(got, p * page, a.data_seed) {
            return Err(format!(
                "{}: byte {off} read as {:#04x}, the data written there is {:#04x}",
                a.path.display(),
                got[(off - p * page) as usize],
                data::expected_byte(a.data_seed, off)
            )
            .into());
        }
    }
    let t2 = Instant::now();
    drop(file);
    let m = Measured {
        open_us,
        access_us,
        close_us: us(t2),
        resident_bytes: 0,
        page_faults,
        pages_checked: pages.len() as u64,
        backing: String::new(),
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}
