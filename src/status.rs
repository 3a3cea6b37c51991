//! `shadowfd status`: what a running `shadowfd serve` is doing.

use crate::CliResult;
use crate::serve::{default_socket, duration_arg};
use clap::Args;
use shadowfd::remote::Client;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct StatusArgs {
    /// The server's socket  [default: $XDG_RUNTIME_DIR/shadowfd.sock, else /run/shadowfd.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the server's JSON object (docs/protocol.md, STATS).
    #[arg(long)]
    json: bool,
    /// How long to wait for the answer, e.g. 500ms, 5s.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration_arg)]
    timeout: Duration,
}

impl StatusArgs {
    pub fn json(&self) -> bool {
        self.json
    }
}

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn us(v: &serde_json::Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.0} µs"))
}

pub fn run(a: StatusArgs) -> CliResult {
    let path = a.socket.clone().unwrap_or_else(default_socket);
    // A status connection: answered from a slot of its own, even when the
    // server is full, and not counted as a client.
    let text = Client::status_at(&path, a.timeout)?;
    if a.json {
        return emit(format!("{text}\n"));
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("the server's STATS answer is not JSON ({e}): {text}"))?;
    use crate::units::format_size as h;
    use std::fmt::Write as _;
    let mut o = String::new();
    writeln!(
        o,
        "server pid {}, protocol {}, up {:.0} s, serving {} ({} shadows)",
        v["pid"],
        v["version"],
        v["uptime_s"].as_f64().unwrap_or(0.0),
        v["tree"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?")
    )?;
    writeln!(
        o,
        "memory      {} resident of a {} budget (eager cap {})",
        h(num(&v["resident_bytes"])),
        h(num(&v["memory_budget"])),
        h(num(&v["max_size"]))
    )?;
    let clients = v["clients"].as_array().cloned().unwrap_or_default();
    let limits = &v["limits"];
    if limits.is_object() {
        writeln!(
            o,
            "clients     {} of at most {} ({} connection(s) before HELLO or querying status, \
             at most {}); {} lazy range(s) attached, at most {} ({} a client)",
            clients.len(),
            limits["max_clients"],
            v["pending"],
            limits["max_pending"],
            v["lazy_ranges"],
            limits["max_ranges_total"],
            limits["max_ranges"]
        )?;
    } else {
        writeln!(o, "clients     {}", clients.len())?;
    }
    for c in &clients {
        writeln!(
            o,
            "  #{:<4} pid {:<8} uid {:<6} {} handle(s), {} lazy mapping(s){}",
            c["id"],
            c["pid"],
            c["uid"],
            c["handles"],
            c["lazy_mappings"],
            if c["userfaultfd"] == true {
                ""
            } else {
                ", no userfaultfd"
            }
        )?;
    }
    let shadows = v["shadows"].as_array().cloned().unwrap_or_default();
    writeln!(o, "shadows     {}", shadows.len())?;
    for s in &shadows {
        writeln!(
            o,
            "  #{:<4} {} ({}, {} bytes): {} handle(s), {} resident, {} faults, {} chunks filled, {} errors, fill p50 {} p99 {}",
            s["id"],
            s["name"].as_str().unwrap_or("?"),
            s["mode"].as_str().unwrap_or("?"),
            s["size"],
            s["handles"],
            h(num(&s["resident_bytes"])),
            s["faults"],
            s["chunks_filled"],
            s["errors"],
            us(&s["fill_p50_us"]),
            us(&s["fill_p99_us"])
        )?;
        let ob = &s["object"];
        if ob.is_object() {
            writeln!(
                o,
                "        fetched {} in {} request(s) ({} retries, {} failed); cache {} hits, {} misses, {} refused; fetch p50 {} p99 {}",
                h(num(&ob["bytes_fetched"])),
                ob["requests"],
                ob["retries"],
                ob["failures"],
                ob["cache_hits"],
                ob["cache_misses"],
                ob["cache_rejected"],
                us(&ob["fetch_p50_us"]),
                us(&ob["fetch_p99_us"])
            )?;
            if let Some(e) = ob["last_error"].as_str() {
                writeln!(o, "        last error {e}")?;
            }
        }
    }
    emit(o)
}

/// Writes `text` to stdout; a reader that went away (`status | head`) is
/// not an error.
fn emit(text: String) -> CliResult {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
