//! `shadowfd client`: cat and map files served by `shadowfd serve`.

use crate::CliResult;
use crate::access;
use crate::map::ReportedInJson;
use crate::serve::{default_socket, duration_arg};
use clap::{Args, Subcommand};
use serde::Serialize;
use shadowfd::remote::{Client, ClientOptions};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Why the served file's page at an offset raised SIGBUS: the server's last
/// error for the file (its STATS), or that the server has gone away.
fn served_cause(f: shadowfd::remote::RemoteFile, client: Client) -> crate::sigbus::Explain {
    Box::new(move |_off| {
        if client.server_gone() {
            return Some("the server has gone away; unfilled pages are not served".into());
        }
        let stats = f.stats_json().ok()?;
        let v: serde_json::Value = serde_json::from_str(&stats).ok()?;
        let last = v["last_error"].as_str()?;
        Some(format!("the server could not fill it: {last}"))
    })
}

#[derive(Args)]
pub struct ClientArgs {
    /// The server's socket  [default: $XDG_RUNTIME_DIR/shadowfd.sock, else /run/shadowfd.sock]
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Send no userfaultfd: every mapping is a sealed descriptor (the server's eager fallback).
    #[arg(long, global = true)]
    no_userfaultfd: bool,
    /// How long to wait for each reply, e.g. 500ms, 30s, 2m.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration_arg, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    cmd: ClientCmd,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Write a served file's bytes to stdout, read through a mapping (or FILL with --fill).
    Cat {
        /// The file, a path inside the served tree.
        file: String,
        /// Read with FILL requests instead of a mapping.
        #[arg(long)]
        fill: bool,
    },
    /// Map a served file, touch it, and report what happened.
    Map {
        /// The file, a path inside the served tree.
        file: String,
        #[command(flatten)]
        touch: access::TouchArgs,
        /// For `shadowfd bench --clients`: once mapped, say "ready" on
        /// stderr and wait for a line on stdin before touching.
        #[arg(long, hide = true)]
        wait_stdin: bool,
    },
}

impl ClientArgs {
    pub fn json(&self) -> bool {
        matches!(&self.cmd, ClientCmd::Map { touch, .. } if touch.json)
    }
}

fn connect(a: &ClientArgs) -> Result<Client, Box<dyn std::error::Error>> {
    let path = a.socket.clone().unwrap_or_else(default_socket);
    let opts = ClientOptions {
        userfaultfd: !a.no_userfaultfd,
        timeout: a.timeout,
    };
    Ok(Client::connect_with(&path, opts)?)
}

#[derive(Serialize)]
struct Report {
    path: String,
    size: u64,
    lazy: bool,
    shadow_id: u64,
    access: String,
    pages_touched: u64,
    open_us: f64,
    map_us: f64,
    access_us: f64,
    verified: Option<bool>,
    mismatch_offset: Option<u64>,
    shadow: serde_json::Value,
}

pub fn run(a: ClientArgs) -> CliResult {
    let client = connect(&a)?;
    match &a.cmd {
        ClientCmd::Cat { file, fill } => cat(&client, file, *fill),
        ClientCmd::Map {
            file,
            touch,
            wait_stdin,
        } => map(&client, file, touch, *wait_stdin),
    }
}

fn cat(client: &Client, file: &str, fill: bool) -> CliResult {
    let f = client.open(file)?;
    // SAFETY: fd 1 stays open for the whole process; ManuallyDrop keeps the
    // File from closing it.
    let stdout = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    let mut out: &std::fs::File = &stdout;
    let mut buf = vec![0u8; 1 << 20];
    let write = |out: &mut &std::fs::File, b: &[u8]| -> Result<bool, String> {
        match out.write_all(b) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(format!("writing to stdout: {e}")),
        }
    };
    if fill {
        let mut off = 0u64;
        while off < f.size() {
            let n = f.read_at(&mut buf, off)?;
            if n == 0 {
                return Err(format!(
                    "the server sent nothing at offset {off} of {} bytes",
                    f.size()
                )
                .into());
            }
            if !write(&mut out, &buf[..n])? {
                return Ok(());
            }
            off += n as u64;
        }
        return Ok(());
    }
    let map = f.map()?;
    // A page the server cannot provide, or an unfilled page once the
    // server is gone, raises SIGBUS: a message naming why and exit 1, never
    // zeros.
    crate::sigbus::watch(&map, served_cause(f.clone(), client.clone()));
    for piece in map.chunks(buf.len()) {
        buf[..piece.len()].copy_from_slice(piece);
        if !write(&mut out, &buf[..piece.len()])? {
            return Ok(());
        }
    }
    Ok(())
}

fn map(client: &Client, file: &str, touch: &access::TouchArgs, wait_stdin: bool) -> CliResult {
    let (acc, verify, json) = (touch.access, touch.verify, touch.json);
    let t = Instant::now();
    let f = client.open(file)?;
    let open_us = t.elapsed().as_secs_f64() * 1e6;
    let t = Instant::now();
    let map = f.map()?;
    let map_us = t.elapsed().as_secs_f64() * 1e6;
    crate::sigbus::watch(&map, served_cause(f.clone(), client.clone()));
    if json {
        crate::sigbus::report_in_json();
    }
    let page = shadowfd::page_size() as u64;
    let pages = || touch.pages(map.len() as u64, page);
    if wait_stdin {
        eprintln!("ready");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    let (pages_touched, access_us) = touch.touch(&map, page);
    let (verified, mismatch_offset) = if verify {
        let mut buf = vec![0u8; page as usize];
        let mut bad = None;
        for p in pages() {
            let off = p * page;
            let n = (map.len() as u64 - off).min(page) as usize;
            let got = f.read_at(&mut buf[..n], off)?;
            let mine = &map[off as usize..off as usize + n];
            if got != n {
                bad = Some(off + got as u64);
                break;
            }
            if let Some(i) = mine.iter().zip(&buf[..n]).position(|(x, y)| x != y) {
                bad = Some(off + i as u64);
                break;
            }
        }
        (Some(bad.is_none()), bad)
    } else {
        (None, None)
    };
    let shadow: serde_json::Value =
        serde_json::from_str(&f.stats_json()?).unwrap_or(serde_json::Value::Null);
    let r = Report {
        path: file.to_string(),
        size: f.size(),
        lazy: map.is_lazy(),
        shadow_id: f.shadow_id(),
        access: acc.to_string(),
        pages_touched,
        open_us,
        map_us,
        access_us,
        verified,
        mismatch_offset,
        shadow,
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {} bytes, {} mapping of shared shadow {}",
            r.path,
            r.size,
            if r.lazy { "lazy" } else { "sealed" },
            r.shadow_id
        );
        println!(
            "  access      {}, {} pages touched in {:.0} µs (open {:.0} µs, map {:.0} µs)",
            r.access, r.pages_touched, r.access_us, r.open_us, r.map_us
        );
        let s = &r.shadow;
        println!(
            "  shadow      {} faults, {} bytes filled in {} chunks, {} errors, {} bytes resident",
            s["faults"], s["bytes_filled"], s["chunks_filled"], s["errors"], s["resident_bytes"]
        );
        match r.verified {
            Some(true) => println!("  verified    every touched byte equals the server's FILL"),
            Some(false) => println!(
                "  verified    MISMATCH at offset {}",
                r.mismatch_offset.unwrap_or(0)
            ),
            None => {}
        }
    }
    if verified == Some(false) {
        let msg = format!(
            "verification failed: the mapping differs from the server's FILL at offset {}",
            mismatch_offset.unwrap_or(0)
        );
        return Err(if json {
            Box::new(ReportedInJson(msg))
        } else {
            msg.into()
        });
    }
    Ok(())
}
