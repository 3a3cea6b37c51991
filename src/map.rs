//! `shadowfd map`.

use crate::access::TouchArgs;
use crate::{CliResult, Common, Target, sigbus};
use clap::{Args, ValueEnum};
use serde::Serialize;
use shadowfd::{Share, Source};

#[derive(Clone, Copy, ValueEnum, Debug)]
enum ShareArg {
    Shared,
    Private,
}

#[derive(Args)]
pub struct MapArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    touch: TouchArgs,
    /// MAP_SHARED or MAP_PRIVATE.
    #[arg(long, value_enum, default_value = "shared")]
    share: ShareArg,
}

impl MapArgs {
    /// Whether `--json` was given: failures are then reported in JSON too.
    pub fn json(&self) -> bool {
        self.touch.json
    }
}

#[derive(Serialize)]
struct Report {
    path: String,
    mode: shadowfd::Mode,
    size: u64,
    access: String,
    share: &'static str,
    pages_touched: u64,
    open_us: f64,
    access_us: f64,
    faults: u64,
    bytes_filled: u64,
    chunks_filled: u64,
    readahead_chunks: u64,
    resident_bytes: u64,
    fill_p50_us: Option<f64>,
    fill_p99_us: Option<f64>,
    errors: u64,
    poisoned_pages: u64,
    source_changed: bool,
    verified: Option<bool>,
    mismatch_offset: Option<u64>,
    /// What an s3:// source did: requests, bytes, retries, cache use.
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<shadowfd::source::object::ObjectStats>,
    /// With `--workset` other than off (docs/worksets.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    workset: Option<WorksetReport>,
}

/// Compares the touched pages of `map` with `src`; the first differing offset.
fn verify(
    map: &[u8],
    pages: impl IntoIterator<Item = u64>,
    page: u64,
    src: &dyn Source,
) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; page as usize];
    for p in pages {
        let off = p * page;
        let n = (map.len() as u64 - off).min(page) as usize;
        let mut done = 0;
        while done < n {
            match src.read_at(&mut buf[done..n], off + done as u64)? {
                0 => return Ok(Some(off + done as u64)),
                k => done += k,
            }
        }
        let got = &map[off as usize..off as usize + n];
        if let Some(i) = got.iter().zip(&buf[..n]).position(|(a, b)| a != b) {
            return Ok(Some(off + i as u64));
        }
    }
    Ok(None)
}

/// A failure whose JSON report is already on stdout.
/// What the working set did in this run.
#[derive(Serialize)]
struct WorksetReport {
    mode: shadowfd::WorksetMode,
    recorded: u64,
    replayed: u64,
    mapped_ahead: u64,
    hits: u64,
    wasted: u64,
    diverged: u64,
    discarded: u64,
    /// Where the record was stored, if it was.
    stored: Option<std::path::PathBuf>,
}

#[derive(Debug)]
pub struct ReportedInJson(pub String);

impl std::fmt::Display for ReportedInJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReportedInJson {}

pub fn run(a: MapArgs) -> CliResult {
    let engine = a.common.engine_for(&a.target)?;
    let shadow = std::sync::Arc::new(a.target.open(&engine)?);
    let share = match a.share {
        ShareArg::Shared => Share::Shared,
        ShareArg::Private => Share::Private,
    };
    let map = shadow.map(share)?;
    sigbus::watch(&map, sigbus::local_cause(shadow.clone()));
    if a.touch.json {
        sigbus::report_in_json();
    }
    let page = shadowfd::page_size() as u64;
    // The pattern streams: no list of pages is built, so a pattern over a
    // huge mapping costs memory only for the pages it touches.
    let pages = || a.touch.pages(map.len() as u64, page);
    let (pages_touched, access_us) = a.touch.touch(&map, page);
    // The SIGBUS watcher keeps the shadow to the end of the process, so
    // its drop would not store the working-set record.
    let stored = shadow.save_workset()?;
    let stats = shadow.stats();
    let ws_mode = engine.config().workset;
    let workset = (ws_mode != shadowfd::WorksetMode::Off).then_some(WorksetReport {
        mode: ws_mode,
        recorded: stats.workset_recorded,
        replayed: stats.workset_replayed,
        mapped_ahead: stats.workset_mapped_ahead,
        hits: stats.workset_hits,
        wasted: stats.workset_wasted,
        diverged: stats.workset_diverged,
        discarded: stats.workset_discarded,
        stored,
    });
    let resident_bytes = shadow.resident_bytes()?;
    let object = a.target.object.stats();
    let (verified, mismatch_offset) = if a.touch.verify {
        let src = a.target.source_uncached()?;
        let m = verify(&map, pages(), page, &*src)?;
        (Some(m.is_none()), m)
    } else {
        (None, None)
    };
    let r = Report {
        path: shadow.name().to_string(),
        mode: shadow.mode(),
        size: shadow.size(),
        access: a.touch.access.to_string(),
        share: share.as_str(),
        pages_touched,
        open_us: shadow.open_time().as_secs_f64() * 1e6,
        access_us,
        faults: stats.faults,
        bytes_filled: stats.bytes_filled,
        chunks_filled: stats.chunks_filled,
        readahead_chunks: stats.readahead_chunks,
        resident_bytes,
        fill_p50_us: stats.fill_p50_us,
        fill_p99_us: stats.fill_p99_us,
        errors: stats.errors,
        poisoned_pages: stats.poisoned_pages,
        source_changed: stats.source_changed,
        verified,
        mismatch_offset,
        object,
        workset,
    };
    if a.touch.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_human(&r);
    }
    if verified == Some(false) {
        let msg = format!(
            "verification failed: the mapping differs from the source at offset {}",
            mismatch_offset.unwrap_or(0)
        );
        // With --json the report above already says so (`verified: false`,
        // `mismatch_offset`): no second JSON object.
        return Err(if a.touch.json {
            Box::new(ReportedInJson(msg))
        } else {
            msg.into()
        });
    }
    Ok(())
}

fn print_human(r: &Report) {
    use crate::bench::report::fmt_us;
    use crate::units::format_size as h;
    println!(
        "{}: {} shadow, {} ({} bytes)",
        r.path,
        r.mode,
        h(r.size),
        r.size
    );
    println!(
        "  access      {} ({}), {} pages touched",
        r.access, r.share, r.pages_touched
    );
    println!("  open        {}", fmt_us(r.open_us));
    println!("  access      {}", fmt_us(r.access_us));
    println!("  faults      {}", r.faults);
    println!(
        "  filled      {} in {} chunks ({} read ahead)",
        h(r.bytes_filled),
        r.chunks_filled,
        r.readahead_chunks
    );
    println!("  resident    {}", h(r.resident_bytes));
    if let (Some(p50), Some(p99)) = (r.fill_p50_us, r.fill_p99_us) {
        println!("  fill time   p50 {}, p99 {}", fmt_us(p50), fmt_us(p99));
    }
    if r.errors > 0 || r.poisoned_pages > 0 {
        println!(
            "  errors      {} ({} pages poisoned)",
            r.errors, r.poisoned_pages
        );
    }
    if let Some(o) = &r.object {
        println!(
            "  fetched     {} in {} requests ({} retries, {} failed); cache {} hits, {} misses, {} refused",
            h(o.bytes_fetched),
            o.requests,
            o.retries,
            o.failures,
            o.cache_hits,
            o.cache_misses,
            o.cache_rejected
        );
        if let (Some(p50), Some(p99)) = (o.fetch_p50_us, o.fetch_p99_us) {
            println!("  fetch time  p50 {}, p99 {}", fmt_us(p50), fmt_us(p99));
        }
        if let Some(e) = &o.last_error {
            println!("  last error  {e}");
        }
    }
    if let Some(w) = &r.workset {
        println!(
            "  workset     {}: {} recorded, {} replayed ({} mapped ahead, {} hits, {} wasted){}{}",
            w.mode,
            w.recorded,
            w.replayed,
            w.mapped_ahead,
            w.hits,
            w.wasted,
            if w.diverged > 0 { ", diverged" } else { "" },
            if w.discarded > 0 {
                ", stale record discarded"
            } else {
                ""
            },
        );
    }
    if r.source_changed {
        println!("  warning     the source changed after open");
    }
    match r.verified {
        Some(true) => println!("  verified    every touched byte equals the source"),
        Some(false) => println!(
            "  verified    MISMATCH at offset {}",
            r.mismatch_offset.unwrap_or(0)
        ),
        None => {}
    }
}
