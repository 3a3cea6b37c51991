//! A TCP proxy on a loopback port in front of the gateway, to inject
//! faults: latency each way, a stall or a cut after some bytes of an
//! answer, and `503` answers for the next connections. It also counts
//! the GET requests it relays ([`Proxy::gets`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to new connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Relay as is, after `latency` each way (0 for none).
    Pass,
    /// Relay the request, then at most this many bytes of the answer, then
    /// nothing more (the connection stays open).
    StallAfter(u64),
    /// Relay at most this many bytes of the answer, then close both ends.
    CutAfter(u64),
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    latency: Mutex<Duration>,
    fail_next: AtomicU32,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    /// GET requests seen on their way to the gateway.
    gets: AtomicU64,
}

/// A running proxy; stops (and closes every connection) when dropped.
pub struct Proxy {
    pub port: u16,
    sh: Arc<Shared>,
}

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = l.local_addr().unwrap().port();
        let sh = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            mode: Mutex::new(Mode::Pass),
            latency: Mutex::new(Duration::ZERO),
            fail_next: AtomicU32::new(0),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            gets: AtomicU64::new(0),
        });
        let s = sh.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = c {
                    let s = s.clone();
                    std::thread::spawn(move || serve(s, c));
                }
            }
        });
        Proxy { port, sh }
    }

    /// Sets the mode for new connections and closes the open ones, so the
    /// client's next request meets it.
    pub fn set(&self, m: Mode) {
        *self.sh.mode.lock().unwrap() = m;
        self.drop_connections();
    }

    /// Adds `d` each way from now on (new connections).
    pub fn set_latency(&self, d: Duration) {
        *self.sh.latency.lock().unwrap() = d;
        self.drop_connections();
    }

    /// The next `n` connections get `503 Service Unavailable` for their
    /// first request.
    pub fn fail_next(&self, n: u32) {
        self.sh.fail_next.store(n, Ordering::Relaxed);
        self.drop_connections();
    }

    /// How many GET requests went through to the gateway so far. A request
    /// is counted when its head is read from the client, before the
    /// gateway answers it: once a client got its answers, they are all in.
    pub fn gets(&self) -> u64 {
        self.sh.gets.load(Ordering::SeqCst)
    }

    pub fn drop_connections(&self) {
        for c in self.sh.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Relaxed);
        self.drop_connections();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(sh: Arc<Shared>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    if sh
        .fail_next
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
            match client.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => break,
            }
        }
        let _ = client.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(up) = TcpStream::connect_timeout(&sh.upstream, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = up.set_nodelay(true);
    let mode = *sh.mode.lock().unwrap();
    let latency = *sh.latency.lock().unwrap();
    {
        let mut c = sh.conns.lock().unwrap();
        c.push(client.try_clone().unwrap());
        c.push(up.try_clone().unwrap());
    }
    let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
    let s2 = sh.clone();
    std::thread::spawn(move || pump(c2, u2, latency, None, Some(&s2.gets)));
    pump(up, client, latency, Some(mode), None);
}

/// Copies `from` to `to`, each piece delivered `latency` after it was read
/// (a delay line, not a rate limit). `answer`: the mode applied to this
/// direction (the gateway's answers). `gets`: count the GET requests of
/// this direction (the client's requests) there.
fn pump(
    mut from: TcpStream,
    to: TcpStream,
    latency: Duration,
    answer: Option<Mode>,
    gets: Option<&AtomicU64>,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut to_w = to.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for (due, piece) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to_w.write_all(&piece).is_err() {
                break;
            }
        }
    });
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    // The client's bytes so far, and the GETs counted in them.
    let mut requests = Vec::new();
    let mut counted = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(g) = gets {
            requests.extend_from_slice(&buf[..n]);
            let now = count_gets(&requests);
            g.fetch_add((now - counted) as u64, Ordering::SeqCst);
            counted = now;
        }
        let limit = match answer {
            Some(Mode::StallAfter(k)) | Some(Mode::CutAfter(k)) => k,
            _ => u64::MAX,
        };
        let take = (n as u64).min(limit.saturating_sub(sent)) as usize;
        if take > 0
            && tx
                .send((Instant::now() + latency, buf[..take].to_vec()))
                .is_err()
        {
            break;
        }
        sent += take as u64;
        if sent >= limit {
            match answer {
                Some(Mode::CutAfter(_)) => {
                    drop(tx);
                    let _ = writer.join();
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                _ => {
                    // Stalled: keep both ends open, relay nothing, until
                    // the client or the test closes the connection.
                    let mut sink = [0u8; 4096];
                    while matches!(from.read(&mut sink), Ok(n) if n > 0) {}
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.shutdown(Shutdown::Write);
}

/// The GET requests in `stream`, a client's bytes on one connection: a
/// request head starts the stream or follows the blank line that ends the
/// one before (a GET or HEAD carries no body).
fn count_gets(stream: &[u8]) -> usize {
    let starts = std::iter::once(0).chain(
        stream
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"\r\n\r\n")
            .map(|(i, _)| i + 4),
    );
    starts.filter(|&i| stream[i..].starts_with(b"GET ")).count()
}
