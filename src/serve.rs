//! `shadowfd serve`: one engine for many client processes, over a Unix
//! socket (docs/protocol.md, docs/remote.md).

use crate::{CliResult, Common};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use shadowfd::remote::{LogLimiter, Server, ServerOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ServeArgs {
    /// The socket to listen on  [default: $XDG_RUNTIME_DIR/shadowfd.sock, else /run/shadowfd.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Serve the regular files beneath this directory (`..` and symlinks out of it are refused),
    /// or the objects under s3://BUCKET/PREFIX/ (docs/object-store.md).
    #[arg(long, value_name = "DIR|URL", conflicts_with = "image")]
    root: Option<PathBuf>,
    /// Serve the files inside this ext2/ext3/ext4 image.
    #[arg(long, value_name = "IMG")]
    image: Option<PathBuf>,
    /// How long a peer may take to say each thing it must (HELLO after
    /// connecting, the rest of a frame, ATTACH after a lazy MAP), e.g. 500ms, 5s, 2m
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration_arg)]
    peer_timeout: Duration,
    /// At most this many clients at once (1 to 65536); when full, the client idle longest without a lazy mapping gives way.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_clients: u32,
    /// At most this many connections that have not finished HELLO, plus
    /// status queries, at once (1 to 65536); the oldest is dropped to admit another.
    #[arg(long, value_name = "N", default_value_t = shadowfd::remote::MAX_PENDING as u32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_pending: u32,
    /// At most this many open handles per client (1 to 1048576).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_handles: u32,
    /// At most this many lazy ranges attached per client (1 to 16777216).
    #[arg(long, value_name = "N", default_value_t = shadowfd::remote::MAX_RANGES as u32, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_ranges: u32,
    /// At most this many lazy ranges attached over all clients (1 to 16777216).
    #[arg(long, value_name = "N", default_value_t = shadowfd::remote::MAX_RANGES_TOTAL as u32, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_ranges_total: u32,
    #[command(flatten)]
    object: crate::object::ObjectOpts,
    #[command(flatten)]
    common: Common,
}

/// `500ms`, `5s`, `2m`, or a number of seconds.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "{s:?} is not a duration; expected a number with ms, s or m (from 1ms to 1h), e.g. 500ms, 5s or 2m"
        )
    };
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * mul;
    if !(0.001..=3600.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Descriptors kept free for admitted clients: a request needs up to four at
/// once (the userfaultfd a client brings, the source it opens, a memfd, its
/// read-only reopen), and a few clients may ask at the same moment. After
/// each accept, connections that have not said HELLO are dropped, oldest
/// first, until this many are free: a silent peer never costs a client its
/// request (CI 2026-12-07 saw a MAP fail with EMFILE at a reserve of 4).
const HEADROOM: usize = 16;

/// How many more descriptors, up to `n`, can be opened now (probed by
/// duplicating `fd`; the duplicates are closed at once).
fn free_up_to(n: usize, fd: std::os::fd::BorrowedFd<'_>) -> usize {
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        match fd.try_clone_to_owned() {
            Ok(f) => held.push(f),
            Err(_) => break,
        }
    }
    held.len()
}

/// `$XDG_RUNTIME_DIR/shadowfd.sock`, else `/run/shadowfd.sock`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("shadowfd.sock"),
        _ => PathBuf::from("/run/shadowfd.sock"),
    }
}

/// Binds `path` with mode 0600. A stale socket (nobody listening) is
/// replaced; a live one, or another kind of file, is an error.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; remove it or choose another --socket",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "a server is already listening on {}; stop it or choose another --socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("removing the stale socket {}: {e}", path.display()))?;
    }
    // SAFETY: umask has no preconditions; the old mask is restored below.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| {
        format!(
            "binding {}: {e} (is its directory there and writable? choose another --socket)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 0600 {}: {e}", path.display()))?;
    Ok(l)
}

pub fn run(a: ServeArgs) -> CliResult {
    // SIGTERM and SIGINT are taken through a signalfd: blocked in every
    // thread, which is why this comes before the engine starts its threads.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block()
        .map_err(|e| format!("blocking SIGTERM and SIGINT: {e}"))?;
    let sfd =
        SignalFd::with_flags(&sigs, SfdFlags::SFD_CLOEXEC).map_err(|e| format!("signalfd: {e}"))?;
    let Some(tree) = crate::object::served_tree(a.root.as_deref(), a.image.as_deref(), &a.object)
    else {
        return Err(
            "say what to serve: --root DIR (the regular files beneath a directory), \
             --root s3://BUCKET/PREFIX/ (the objects under a prefix) or --image IMG (the files \
             inside an ext2/3/4 image)"
                .into(),
        );
    };
    let tree = tree?;
    let socket = a.socket.clone().unwrap_or_else(default_socket);
    let engine = crate::object::engine_for_tree(&a.common, &tree)?;
    let started = Instant::now();
    let log: shadowfd::remote::EventLog = Arc::new(move |line: &str| {
        eprintln!(
            "shadowfd serve [{:9.3}] {line}",
            started.elapsed().as_secs_f64()
        );
    });
    let opts = ServerOptions {
        peer_timeout: a.peer_timeout,
        max_clients: a.max_clients as usize,
        max_pending: a.max_pending as usize,
        max_handles: a.max_handles as usize,
        max_ranges: a.max_ranges as usize,
        max_ranges_total: a.max_ranges_total as usize,
        log: Some(log.clone()),
        ..ServerOptions::default()
    };
    let cfg = engine.config().clone();
    let mode = engine.mode();
    let server = Server::new(engine, tree.clone(), opts)?;
    let listener = bind(&socket)?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("non-blocking listener: {e}"))?;
    log(&format!(
        "listening on {} (mode 0600), serving {}, {mode} shadows, memory budget {} bytes, \
         eager cap {} bytes, peer timeout {:?}",
        socket.display(),
        crate::object::describe(&tree),
        cfg.memory_budget,
        cfg.max_size,
        a.peer_timeout
    ));
    // After an accept error (EMFILE, ENFILE, ENOMEM...) the listener is left
    // out of the poll set for `backoff` (doubling up to 1 s): never a spin.
    let mut backoff = Duration::ZERO;
    let mut resume = Instant::now();
    let limiter = LogLimiter::default();
    let limited = |what: &'static str, line: String| {
        if let Some(n) = limiter.allow(what, Instant::now()) {
            if n > 0 {
                log(&format!("{line} ({n} more like it not logged)"));
            } else {
                log(&line);
            }
        }
    };
    let stop = loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let now = Instant::now();
        let wait = if now < resume {
            // Only the signalfd is watched until the back-off ends.
            fds[0].fd = -1;
            (resume - now).as_millis().max(1) as i32
        } else {
            -1
        };
        // SAFETY: `fds` is a live array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        if r < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            let name = match sfd.read_signal() {
                Ok(Some(s)) if s.ssi_signo == libc::SIGINT as u32 => "SIGINT",
                _ => "SIGTERM",
            };
            break name;
        }
        if fds[0].revents != 0 {
            match listener.accept() {
                Ok((s, _)) => {
                    backoff = Duration::ZERO;
                    // Near a full descriptor table, the oldest connections
                    // that have not said HELLO make room ([`HEADROOM`]) for
                    // what clients bring and open. A dropped connection's
                    // descriptor is closed by its session thread a moment
                    // later, so the whole deficit is dropped at once rather
                    // than probed again after each.
                    let free = free_up_to(HEADROOM, listener.as_fd());
                    if free < HEADROOM {
                        let n = (free..HEADROOM)
                            .take_while(|_| server.shed_pending())
                            .count();
                        limited(
                            "room",
                            format!(
                                "fewer than {HEADROOM} descriptors free: dropped {n} connection(s) \
                                 still before HELLO"
                            ),
                        );
                    }
                    if let Err(e) = s.set_nonblocking(false) {
                        limited("new", format!("dropped a new connection: {e}"));
                        continue;
                    }
                    if let Err(e) = server.handle(s) {
                        limited("new", format!("dropped a new connection: {e}"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors: a connection that has not said
                    // HELLO gives its place first; then wait a while.
                    // Four of them, so that the connection accepted next
                    // has room for what it brings (a userfaultfd) and opens.
                    let out = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    let shed = out && (0..4).filter(|_| server.shed_pending()).count() > 0;
                    if !shed {
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        resume = Instant::now() + backoff;
                    }
                    limited(
                        "accept",
                        format!(
                            "accept: {e}{}",
                            if shed {
                                "; dropped the oldest connections still before HELLO".to_string()
                            } else {
                                format!("; not accepting for {backoff:?}")
                            }
                        ),
                    );
                }
            }
        }
    };
    let _ = std::fs::remove_file(&socket);
    log(&format!(
        "stopping on {stop}: removed {}; {} client(s) were connected (their unfilled pages \
         now raise SIGBUS)",
        socket.display(),
        server.clients()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_arg("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration_arg("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(duration_arg("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration_arg("3").unwrap(), Duration::from_secs(3));
        assert!(duration_arg("0").is_err());
        assert!(duration_arg("x").is_err());
        assert!(duration_arg("2h").is_err());
    }
}
