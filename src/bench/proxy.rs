//! A delay line on a loopback port, in front of the bench's object store
//! (`bench --source s3`): every piece of every connection is passed on a
//! fixed time after it arrived, in each direction. It adds latency, not a
//! rate limit: pieces in flight overlap, as on a real link with a round
//! trip of twice the delay.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read at once from one side.
const PIECE: usize = 64 << 10;
/// Pieces in flight per direction of a connection: 16 MiB, more than a
/// loopback link moves in the delay.
const IN_FLIGHT: usize = 256;

struct Shared {
    upstream: SocketAddr,
    delay: Duration,
    stop: AtomicBool,
    /// Every connection's two sockets, shut down on drop.
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy; on drop it stops accepting and cuts every connection.
pub struct DelayProxy {
    port: u16,
    sh: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on a free loopback port and relays to `upstream`, each way
    /// `delay` late.
    pub fn start(upstream: SocketAddr, delay: Duration) -> io::Result<DelayProxy> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let sh = Arc::new(Shared {
            upstream,
            delay,
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = sh.clone();
        let accept = std::thread::Builder::new()
            .name("bench-proxy".into())
            .spawn(move || {
                for c in l.incoming() {
                    if s.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(c) = c {
                        if let Err(e) = relay(&s, c) {
                            eprintln!("shadowfd bench: proxy: {e}");
                        }
                    }
                }
            })?;
        Ok(DelayProxy {
            port,
            sh,
            accept: Some(accept),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.sh.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Connects `client` to the upstream and starts both directions.
fn relay(sh: &Arc<Shared>, client: TcpStream) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&sh.upstream, Duration::from_secs(5))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    {
        let mut conns = sh.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Forget connections both of whose ends are closed.
        conns.retain(|c| c.peer_addr().is_ok());
        conns.push(client.try_clone()?);
        conns.push(server.try_clone()?);
    }
    direction(client.try_clone()?, server.try_clone()?, sh.delay)?;
    direction(server, client, sh.delay)?;
    Ok(())
}

/// A piece and when it arrived; `None` data: the sender closed its side.
type Piece = (Instant, Option<Vec<u8>>);

/// Two threads: one reads `from` and stamps each piece, the other writes
/// it to `to` once `delay` has passed since the stamp.
fn direction(from: TcpStream, to: TcpStream, delay: Duration) -> io::Result<()> {
    let (tx, rx) = sync_channel::<Piece>(IN_FLIGHT);
    let reader_to = to.try_clone()?;
    std::thread::Builder::new()
        .name("bench-proxy-in".into())
        .spawn(move || read_side(from, reader_to, tx))?;
    std::thread::Builder::new()
        .name("bench-proxy-out".into())
        .spawn(move || write_side(rx, to, delay))?;
    Ok(())
}

fn read_side(mut from: TcpStream, to: TcpStream, tx: SyncSender<Piece>) {
    loop {
        let mut buf = vec![0u8; PIECE];
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send((Instant::now(), None));
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                if tx.send((Instant::now(), Some(buf))).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // A reset: pass it on at once.
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn write_side(rx: Receiver<Piece>, mut to: TcpStream, delay: Duration) {
    while let Ok((at, piece)) = rx.recv() {
        let due = at + delay;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        match piece {
            Some(b) => {
                if to.write_all(&b).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real echo server behind the proxy: the answer comes back intact,
    /// no sooner than two delays (one each way).
    #[test]
    fn relays_bytes_intact_and_late() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = vec![0u8; 300_000];
            c.read_exact(&mut b).unwrap();
            c.write_all(&b).unwrap();
        });
        let p = DelayProxy::start(up, Duration::from_millis(20)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let t0 = Instant::now();
        c.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t0.elapsed()
        );
        assert!(back == data);
        drop(p);
        // Cut on drop: the connection ends.
        let mut rest = Vec::new();
        let n = c.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(n, 0);
    }
}
