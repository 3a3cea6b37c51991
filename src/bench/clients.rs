//! `shadowfd bench --clients N`: N client processes of one server
//! (`shadowfd client map`, each its own address space and userfaultfd)
//! fault the same lazy shadow at random, against N threads of this process
//! doing the same on one in-process lazy shadow. Both start together (a
//! barrier; the clients map first, then wait on their standard input), and
//! each side's aggregate rate is the pages all of them touched over the
//! slowest one's access time. Every touched byte is checked afterwards
//! (untimed): the threads against the data, the clients with `--verify`.

use super::args::{BenchArgs, base_config};
use super::{data, interrupt};
use crate::CliResult;
use crate::access::Access;
use shadowfd::remote::{Server, ServerOptions, Tree};
use shadowfd::{Engine, Mode, Share};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// How long a client may take to connect, open and map before it says
/// it is ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// One side's run: pages touched by all, the slowest one's access time
/// (µs), and the userfaultfd faults the shadow served.
#[derive(Debug, Clone, Copy)]
struct Side {
    pages: u64,
    slowest_us: f64,
    faults: u64,
}

impl Side {
    fn per_second(&self) -> f64 {
        self.pages as f64 / (self.slowest_us / 1e6)
    }
}

pub fn run(n: usize, a: &BenchArgs) -> CliResult {
    interrupt::install();
    let patterns: Vec<Access> = a
        .patterns
        .iter()
        .filter(|p| matches!(p, Access::Random(_)))
        .copied()
        .collect();
    let patterns = if patterns.is_empty() {
        vec![Access::Random(0.01)]
    } else {
        patterns
    };
    let mut cfg = base_config(a)?;
    cfg.mode = Mode::Lazy;
    cfg.workset = shadowfd::WorksetMode::Off;
    let root = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = std::fs::canonicalize(&root)
        .map_err(|e| format!("--dir {}: {e}; give an existing directory", root.display()))?;
    let work = data::Workdir::create(&root)?;
    let data_dir = work.path().join("data");
    std::fs::create_dir(&data_dir)?;
    let file = data_dir.join("bench.bin");
    data::write_random(&file, a.size, a.seed)
        .map_err(|e| format!("writing {}: {e}", file.display()))?;
    data::warm(&file)?;
    let exe = std::env::current_exe()?;
    let page = shadowfd::page_size() as u64;
    if !a.json {
        println!(
            "shadowfd bench --clients {n}: {} of seeded random bytes (host file, warm), {} reps; \
             {n} threads of one process vs {n} client processes of one server, each touching \
             its own seeded random pages of the same lazy shadow",
            crate::units::format_size(a.size),
            a.reps
        );
        println!(
            "{:<14} {:>4} {:>16} {:>16} {:>10} {:>10}",
            "pattern", "rep", "threads pages/s", "clients pages/s", "threads/clients", "faults"
        );
    }
    let mut out = Vec::new();
    for pat in &patterns {
        let mut ratios = Vec::new();
        let mut reps = Vec::new();
        for rep in 0..a.reps {
            interrupt::check()?;
            let seed = a.seed + 1000 * rep as u64;
            // Rotated, so that neither side always runs on a warmer machine.
            let (threads, clients) = if rep % 2 == 0 {
                let t = threads_side(&cfg, &file, n, pat, seed, a.size, page, a.seed)?;
                (
                    t,
                    clients_side(&cfg, &exe, work.path(), &data_dir, n, pat, seed)?,
                )
            } else {
                let c = clients_side(&cfg, &exe, work.path(), &data_dir, n, pat, seed)?;
                (
                    threads_side(&cfg, &file, n, pat, seed, a.size, page, a.seed)?,
                    c,
                )
            };
            let ratio = threads.per_second() / clients.per_second();
            ratios.push(ratio);
            if !a.json {
                println!(
                    "{:<14} {:>4} {:>16.0} {:>16.0} {:>15.2}x {:>5}/{:<5}",
                    pat.to_string(),
                    rep,
                    threads.per_second(),
                    clients.per_second(),
                    ratio,
                    threads.faults,
                    clients.faults
                );
            }
            reps.push(format!(
                "{{\"rep\":{rep},\"threads\":{},\"clients\":{},\"threads_over_clients\":{ratio:.4}}}",
                side_json(&threads),
                side_json(&clients)
            ));
        }
        let median = median(&mut ratios);
        if !a.json {
            let verdict = if median <= 1.3 { "met" } else { "MISSED" };
            println!(
                "{pat}: median threads/clients {median:.2}x (target <= 1.30x: {verdict}); \
                 per rep {}",
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}x"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        out.push(format!(
            "{{\"pattern\":\"{pat}\",\"median_threads_over_clients\":{median:.4},\"reps\":[{}]}}",
            reps.join(",")
        ));
    }
    if a.json {
        println!(
            "{{\"clients\":{n},\"size\":{},\"reps\":{},\"patterns\":[{}]}}",
            a.size,
            a.reps,
            out.join(",")
        );
    }
    Ok(())
}

fn side_json(s: &Side) -> String {
    format!(
        "{{\"pages\":{},\"slowest_access_us\":{:.1},\"pages_per_s\":{:.0},\"faults\":{}}}",
        s.pages,
        s.slowest_us,
        s.per_second(),
        s.faults
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `n` threads of this process, each with its own mapping of one fresh
/// lazy shadow of `file`, touch their pages after a common start.
#[allow(clippy::too_many_arguments)]
fn threads_side(
    cfg: &shadowfd::Config,
    file: &Path,
    n: usize,
    pat: &Access,
    seed: u64,
    size: u64,
    page: u64,
    data_seed: u64,
) -> Result<Side, Box<dyn std::error::Error>> {
    let engine = Engine::new(cfg.clone())?;
    let shadow = Arc::new(engine.open(file)?);
    let go = Arc::new(Barrier::new(n + 1));
    let mut threads = Vec::with_capacity(n);
    for i in 0..n {
        let (shadow, go, pat) = (shadow.clone(), go.clone(), *pat);
        threads.push(std::thread::spawn(move || -> Result<(u64, f64), String> {
            let map = shadow.map(Share::Shared).map_err(|e| e.to_string())?;
            let seed = seed + i as u64;
            go.wait();
            // Timed as `client map` times it: the pattern made as it goes.
            let t = Instant::now();
            std::hint::black_box(crate::access::touch(
                &map,
                pat.pages(size, page, seed),
                page,
            ));
            let us = t.elapsed().as_secs_f64() * 1e6;
            let pages: Vec<u64> = pat.pages(size, page, seed).collect();
            for &p in &pages {
                let start = (p * page) as usize;
                let end = (start + page as usize).min(map.len());
                if let Some(at) = data::first_mismatch(&map[start..end], start as u64, data_seed) {
                    return Err(format!("thread {i} read a wrong byte at {at}"));
                }
            }
            Ok((pages.len() as u64, us))
        }));
    }
    go.wait();
    let mut side = Side {
        pages: 0,
        slowest_us: 0.0,
        faults: 0,
    };
    for t in threads {
        let (p, us) = t.join().map_err(|_| "a bench thread panicked")??;
        side.pages += p;
        side.slowest_us = side.slowest_us.max(us);
    }
    side.faults = shadow.stats().faults;
    Ok(side)
}

/// A server of `dir` on a socket in `work` for one run: its accept loop
/// ends when the result drops.
struct Served {
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(cfg: &shadowfd::Config, work: &Path, dir: &Path) -> Result<Served, String> {
        let engine = Engine::new(cfg.clone()).map_err(|e| e.to_string())?;
        let server = Server::new(
            engine,
            Tree::Root(dir.to_path_buf()),
            ServerOptions::default(),
        )
        .map_err(|e| e.to_string())?;
        let sock = work.join("clients.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| format!("binding the bench's socket {}: {e}", sock.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for s in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = s {
                    let _ = server.handle(s);
                }
            }
        });
        Ok(Served {
            sock,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop to see the flag.
        let _ = UnixStream::connect(&self.sock);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// `n` `shadowfd client map` processes of a fresh server, started together.
fn clients_side(
    cfg: &shadowfd::Config,
    exe: &Path,
    work: &Path,
    dir: &Path,
    n: usize,
    pat: &Access,
    seed: u64,
) -> Result<Side, Box<dyn std::error::Error>> {
    let served = Served::start(cfg, work, dir)?;
    let mut kids = Vec::with_capacity(n);
    for i in 0..n {
        let child = Command::new(exe)
            .arg("client")
            .arg("--socket")
            .arg(&served.sock)
            .args(["map", "bench.bin", "--json", "--verify", "--wait-stdin"])
            .arg(format!("--access={pat}"))
            .arg(format!("--seed={}", seed + i as u64))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {} client: {e}", exe.display()))?;
        kids.push(child);
    }
    // Each says "ready" on stderr once it has mapped the file.
    let by = Instant::now() + READY_WITHIN;
    for k in kids.iter_mut() {
        let err = k.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(err);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // The rest (errors) is drained so the child never blocks.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let left = by.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.trim() == "ready" => {}
            Ok(l) => {
                for k in kids.iter_mut() {
                    let _ = k.kill();
                }
                return Err(
                    format!("a bench client failed before its access: {}", l.trim()).into(),
                );
            }
            Err(_) => {
                for k in kids.iter_mut() {
                    let _ = k.kill();
                }
                return Err(
                    format!("a bench client did not map the file within {READY_WITHIN:?}").into(),
                );
            }
        }
    }
    for k in kids.iter_mut() {
        if let Some(mut i) = k.stdin.take() {
            i.write_all(b"\n")?;
        }
    }
    let mut side = Side {
        pages: 0,
        slowest_us: 0.0,
        faults: 0,
    };
    for mut k in kids {
        let mut s = String::new();
        k.stdout.take().ok_or("no stdout")?.read_to_string(&mut s)?;
        let status = k.wait()?;
        let v: serde_json::Value = serde_json::from_str(s.trim())
            .map_err(|e| format!("a bench client's report {s:?}: {e}"))?;
        if !status.success() || v["verified"] != serde_json::Value::Bool(true) {
            return Err(format!("a bench client failed or read wrong bytes: {s}").into());
        }
        if v["lazy"] != serde_json::Value::Bool(true) {
            return Err(format!("a bench client's mapping was not lazy: {s}").into());
        }
        side.pages += v["pages_touched"].as_u64().unwrap_or(0);
        side.slowest_us = side.slowest_us.max(v["access_us"].as_f64().unwrap_or(0.0));
        side.faults = side.faults.max(v["shadow"]["faults"].as_u64().unwrap_or(0));
    }
    drop(served);
    Ok(side)
}
