//! The page-pattern driver: builds the data (and the image, mount and
//! engines the modes need), runs every pattern under every mode for every
//! repetition (the order rotated per rep), and reports.

use super::args::{BenchArgs, BenchMode, SourceKind, base_config, check_args, default_modes};
use super::notes::{machine, standing_notes, targets, touched_bytes};
use super::report::{self, Cell, Ratio, Report, Sample, Skip};
use super::runners::{Ctx, DataSource, ReaderCmd, run_one};
use super::{clients, data, fuse, interrupt, plot, raw, raw_remote, s3, small};
use crate::units::format_size;
use crate::{CliResult, Target};
use indicatif::{ProgressBar, ProgressStyle};
use shadowfd::{Engine, Mode};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
    if let Some(cpu) = a.raw_remote_handler {
        return raw_remote::handler_main(cpu);
    }
    if let Some(n) = a.small_files {
        let root = a.dir.clone().unwrap_or_else(std::env::temp_dir);
        return small::run(n, a.reps, &root, None, a.json);
    }
    // Read before anything runs: the load the runs start under.
    let machine = machine();
    super::runners::PIN.store(
        a.pin == super::args::Pin::On,
        std::sync::atomic::Ordering::Relaxed,
    );
    if let Some(n) = a.clients {
        return clients::run(n as usize, &a);
    }
    default_modes(&mut a);
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

    for m in [BenchMode::Raw, BenchMode::RawRemote] {
        if a.modes.contains(&m) {
            if let Some(reason) = raw::unavailable() {
                skipped.push(Skip {
                    mode: m.name(),
                    reason,
                });
            }
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
    // --source s3: the gateway, the proxy, s3fs; stopped when `object`
    // drops (before the work directory), also on error.
    let object = match a.source {
        SourceKind::S3 => Some(s3::S3Bench::start(
            &a,
            work.path(),
            &host_file,
            &base,
            &mut skipped,
            &|m| pb.set_message(m),
        )?),
        SourceKind::File => None,
    };
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
    let data_desc = match &object {
        Some(_) => format!(
            "{} in a local SeaweedFS gateway, {} ms each way through a proxy",
            s3::url(),
            a.latency_ms()
        ),
        None => ctx.data.describe(),
    };
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
                    let s = match &object {
                        Some(o) => o.run_one(&ctx, mode, pat, seed, &pages),
                        None => run_one(&ctx, mode, pat, seed, &pages),
                    }
                    .map_err(|e| format!("{pat} under {}: {e}", mode.name()))?;
                    samples[pi][mi].push(s);
                }
                pb.inc(1);
            }
        }
    }
    pb.set_message("cleaning up");
    drop(ctx);
    let object_tuning = object
        .as_ref()
        .map(|o| (o.object_chunk, o.object_readahead));
    if let Some(o) = object {
        notes.extend(o.finish()?);
    }
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
    let wanted: [(&'static str, Term, Term); 22] = [
        (
            "total_speedup_lazy_vs_download",
            (Download, total),
            (Lazy, total),
        ),
        ("total_speedup_lazy_vs_s3fs", (S3fs, total), (Lazy, total)),
        (
            "total_speedup_lazy_warm_vs_download",
            (Download, total),
            (LazyWarm, total),
        ),
        (
            "total_lazy_warm_over_lazy_local",
            (LazyWarm, total),
            (LazyLocal, total),
        ),
        (
            "total_eager_over_download",
            (Eager, total),
            (Download, total),
        ),
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
        ("total_speedup_lazy_vs_eager", (Eager, total), (Lazy, total)),
        ("total_speedup_lazy_vs_fuse", (Fuse, total), (Lazy, total)),
        (
            "total_lazy_image_over_lazy",
            (LazyImage, total),
            (Lazy, total),
        ),
        ("total_lazy_over_native", (Lazy, total), (Native, total)),
        ("total_lazy_over_raw", (Lazy, total), (Raw, total)),
        (
            "total_raw_remote_over_raw",
            (RawRemote, total),
            (Raw, total),
        ),
        (
            "total_run_over_raw_remote",
            (Run, total),
            (RawRemote, total),
        ),
        ("total_lazy_over_memcpy", (Lazy, total), (Memcpy, total)),
        ("total_speedup_run_vs_fuse", (Fuse, total), (Run, total)),
        ("total_run_over_lazy", (Run, total), (Lazy, total)),
        ("total_run_read_over_lazy", (RunRead, total), (Lazy, total)),
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

    match object_tuning {
        Some((chunk, readahead)) => notes.extend(s3::notes(&a, chunk, readahead)),
        None => notes.extend(standing_notes(&a, mount_was_used(&skipped, &a.modes))),
    }
    let warnings = report::spread_warnings(&ratios, &machine.loadavg_at_start);
    let r = Report {
        rows,
        ratios,
        targets,
        skipped,
        machine,
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
            pinned: a.pin == super::args::Pin::On,
            object_lazy: object_tuning.map(|(chunk_size, readahead)| report::ObjectLazy {
                chunk_size,
                readahead,
            }),
        },
        notes,
        warnings,
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
