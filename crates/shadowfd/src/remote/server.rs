//! The server side: sessions with client processes (protocol version 4,
//! docs/protocol.md), the table of shared shadows, and the one-shadow
//! [`serve`] kept for embedders.

pub use super::tree::Tree;
use super::tree::{self, Refusal, ServedTree};
use super::wire::{self, Frame, RecvError};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fault::spans::Spans;
use crate::fault::{FaultTarget, Foreign, Hit, Inbox, Service};
use crate::shadow::lazy::LazyShadow;
use crate::shadow::{Kind, Shadow};
use crate::source::{Source, SourceMeta};
use crate::stats::Stats;
use crate::sys::uffd_abi::uffd_msg;
use crate::sys::{Event, Uffd};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod admit;
mod conn;
mod entry;
mod paths;
mod ranges;
mod session;
mod single;
mod small;
mod spaces;
mod status;

use admit::Hello;
use conn::{Attached, Conn, EVENT_WINDOW, EVENTS_PER_WINDOW, Handle};
use entry::{Entry, Held, Key, entry_materialize};
pub use single::{Served, serve};
use spaces::{CHILD_CHECK_MS, ChildSpace};
use status::entry_json;

/// The default bound on each thing a peer must say (HELLO after connecting,
/// the rest of a frame once begun, ATTACH after a lazy MAP, reading a
/// reply): `--peer-timeout` of `shadowfd serve`.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// The default bound on the lazy ranges one client may have attached at
/// once: above Linux's default `vm.max_map_count` (65,530 mappings per
/// process), so a real program (one range per mapping) never reaches it,
/// while a hostile client cannot grow the lists every fill and fault scans
/// without bound.
pub const MAX_RANGES: usize = 65_536;

/// The default bound on the lazy ranges attached over all clients at once
/// (`--max-ranges-total`): four clients at [`MAX_RANGES`]. Each range costs
/// the server about 160 bytes (its entry here and among the shadow's
/// consumers; 41 MB for 262,144 measured), so all ranges together, with
/// each connection's [`RESERVED_RANGES`], stay under ~55 MB at the
/// defaults.
pub const MAX_RANGES_TOTAL: usize = 262_144;

/// Lazy ranges every connection may attach even when the server has
/// [`ServerOptions::max_ranges_total`] attached over all clients (within
/// its own `max_ranges`): so a client that fills the global cap cannot keep
/// another from mapping. The true bound on all ranges is thus
/// `max_ranges_total + 256 * max_clients`.
pub const RESERVED_RANGES: usize = 256;

/// The default bound on connections that have not yet been admitted as
/// clients (`--max-pending`): those that have not finished HELLO, and
/// `status` queries. When it is reached, the oldest of them is dropped to
/// make room: a real client says HELLO within microseconds of connecting,
/// so only a peer that sits silent loses its place.
pub const MAX_PENDING: usize = 64;

/// A hook that wraps every source the server opens (for throttling or fault
/// injection by embedders and tests).
pub type SourceHook = Arc<dyn Fn(Arc<dyn Source>) -> Arc<dyn Source> + Send + Sync>;
/// Where a server's event lines go.
pub type EventLog = Arc<dyn Fn(&str) + Send + Sync>;

/// How a [`Server`] behaves.
#[derive(Clone)]
pub struct ServerOptions {
    /// The bound on each thing a peer must say ([`PEER_TIMEOUT`]).
    pub peer_timeout: Duration,
    /// At most this many clients at once. When full, a new client takes
    /// the place of the client that has been idle longest among those with
    /// no lazy range attached and no request in progress; if there is none,
    /// it is refused with `E_LIMIT`. Status queries do not count.
    pub max_clients: usize,
    /// At most this many connections not yet admitted (before HELLO, and
    /// status queries) at once ([`MAX_PENDING`]); the oldest is dropped to
    /// admit another.
    pub max_pending: usize,
    /// At most this many open handles per client.
    pub max_handles: usize,
    /// At most this many lazy ranges attached per client ([`MAX_RANGES`]);
    /// an ATTACH or a splitting UNMAP beyond it is refused with `E_LIMIT`.
    pub max_ranges: usize,
    /// At most this many lazy ranges attached over all clients
    /// ([`MAX_RANGES_TOTAL`]); past it, `E_LIMIT` as for `max_ranges`.
    pub max_ranges_total: usize,
    /// Wraps every source opened (none by default).
    pub source_hook: Option<SourceHook>,
    /// One line per client event (none by default).
    pub log: Option<EventLog>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            peer_timeout: PEER_TIMEOUT,
            max_clients: 256,
            max_pending: MAX_PENDING,
            max_handles: 4096,
            max_ranges: MAX_RANGES,
            max_ranges_total: MAX_RANGES_TOTAL,
            source_hook: None,
            log: None,
        }
    }
}

/// What a server answers from: a tree, or the one shadow of [`serve`].
enum TreeImpl {
    Tree(Arc<dyn ServedTree>),
    Single(Arc<Entry>),
}

impl State {
    /// The entry for `key`, counted as used once more (taken out of the
    /// idle order if nobody held it).
    fn take_entry(&mut self, key: &Key) -> Option<Arc<Entry>> {
        let e = self.entries.get(key)?.clone();
        if e.users.fetch_add(1, Ordering::SeqCst) == 0 {
            let at = *e.last_used.lock();
            self.idle.remove(&(at, e.id));
        }
        Some(e)
    }
}

struct ClientInfo {
    pid: i32,
    uid: u32,
    since: Instant,
    uffd: bool,
    handles: usize,
    mappings: usize,
    /// What the session shares with the table (see [`Activity`]).
    activity: Arc<Activity>,
    /// Its socket, to drop it from another thread (shut down: its session
    /// sees the hang-up). Open while the client is in the table: the
    /// session leaves the table before it closes the socket.
    fd: RawFd,
}

/// When a client's session last ended a request, and whether one is in
/// progress: which idle client may make room for a new one.
struct Activity {
    busy: std::sync::atomic::AtomicBool,
    /// Milliseconds since the server started.
    last_ms: AtomicU64,
}

/// A connection not yet admitted as a client: before HELLO, or a status
/// query. Dropped (its socket shut down) when the pending table is full and
/// it is the oldest.
struct PendingConn {
    /// Its socket; open while it is in the table (the connection's thread
    /// leaves the table before it closes the socket).
    fd: RawFd,
}

/// Shuts down the socket `fd` of a connection in the table (both ways):
/// its thread sees the hang-up and ends the connection.
fn shut(fd: RawFd) {
    // SAFETY: the caller holds the state lock and found `fd` in the table,
    // so the socket is still open (see `PendingConn::fd`, `ClientInfo::fd`);
    // shutdown touches no memory.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

#[derive(Default)]
struct State {
    clients: BTreeMap<u64, ClientInfo>,
    entries: HashMap<Key, Arc<Entry>>,
    /// Entries no client holds, least recently used first: what eviction
    /// takes, O(log n) per open and close.
    idle: BTreeMap<(Instant, u64), Key>,
    /// Bytes held by entries that are not lazy shadows (their whole size;
    /// lazy shadows' bytes are the engine's count).
    sealed_bytes: u64,
    /// One gate per source being opened: OPENs of one file wait for one
    /// open; OPENs of different files run in parallel.
    opening: HashMap<Key, Arc<Mutex<()>>>,
    /// Connections not yet admitted, oldest (lowest id) first.
    pending: BTreeMap<u64, PendingConn>,
}

struct Inner {
    engine: Option<Engine>,
    tree: TreeImpl,
    opts: ServerOptions,
    state: Mutex<State>,
    /// Lazy ranges attached over all connections.
    ranges_total: AtomicUsize,
    limiter: LogLimiter,
    next_client: AtomicU64,
    next_entry: AtomicU64,
    started: Instant,
}

/// A shadowfd server: one engine, many client processes, one shadow per
/// source shared by every client of it. Hand it each accepted connection
/// with [`Server::handle`].
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

/// A connected client's credentials (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
struct Peer {
    id: u64,
    pid: i32,
    uid: u32,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client {} (pid {} uid {})", self.id, self.pid, self.uid)
    }
}

fn peer_of(stream: &UnixStream, id: u64) -> Peer {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(stream, PeerCredentials) {
        Ok(c) => Peer {
            id,
            pid: c.pid(),
            uid: c.uid(),
        },
        Err(_) => Peer {
            id,
            pid: -1,
            uid: u32::MAX,
        },
    }
}

impl Server {
    /// A server of `tree` with `engine`'s configuration and budget.
    pub fn new(engine: Engine, tree: Tree, opts: ServerOptions) -> Result<Server> {
        let tree = TreeImpl::Tree(tree::open(&tree)?);
        Ok(Server::build(Some(engine), tree, opts))
    }

    fn build(engine: Option<Engine>, tree: TreeImpl, opts: ServerOptions) -> Server {
        Server {
            inner: Arc::new(Inner {
                engine,
                tree,
                opts,
                state: Mutex::new(State::default()),
                ranges_total: AtomicUsize::new(0),
                limiter: LogLimiter::default(),
                next_client: AtomicU64::new(1),
                next_entry: AtomicU64::new(1),
                started: Instant::now(),
            }),
        }
    }

    /// Serves one connected client on a thread of its own, until it hangs
    /// up, dies or breaks the protocol. Never blocks the caller.
    pub fn handle(&self, stream: UnixStream) -> Result<()> {
        let inner = self.inner.clone();
        let id = inner.next_client.fetch_add(1, Ordering::Relaxed);
        let peer = peer_of(&stream, id);
        let accepted = Instant::now();
        let inner2 = inner.clone();
        let gone = inner.add_pending(&mut inner.state.lock(), &stream, peer);
        if let Some(g) = gone {
            inner.log_displaced(g, peer);
        }
        // The stream goes to the thread once it runs: if it cannot be
        // spawned, the entry leaves the table before the socket is closed
        // (a socket in the table is always open).
        let (tx, rx) = std::sync::mpsc::sync_channel::<UnixStream>(1);
        let spawned = std::thread::Builder::new()
            .name(format!("shadowfd-client-{id}"))
            .spawn(move || {
                let Ok(stream) = rx.recv() else { return };
                let conn = inner2.handshake(stream, peer, accepted + inner2.timeout());
                if let Some(conn) = conn {
                    inner2.run(conn);
                }
            });
        match spawned {
            Ok(_) => {
                let _ = tx.send(stream);
                Ok(())
            }
            Err(e) => {
                inner.state.lock().pending.remove(&peer.id);
                drop(stream);
                Err(Error::sys("spawn a client thread", e))
            }
        }
    }

    /// The server's state as a JSON object (what STATS with handle 0
    /// answers; docs/protocol.md lists the fields).
    pub fn status_json(&self) -> String {
        self.inner.status_json()
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.inner.state.lock().clients.len()
    }

    /// Connections accepted and not yet admitted (before HELLO, or status
    /// queries).
    pub fn pending(&self) -> usize {
        self.inner.state.lock().pending.len()
    }

    /// Drops the oldest connection that has not finished HELLO (for when
    /// descriptors run out). False if there is none.
    pub fn shed_pending(&self) -> bool {
        let mut st = self.inner.state.lock();
        match st.pending.pop_first() {
            Some((_, p)) => {
                shut(p.fd);
                true
            }
            None => false,
        }
    }
}

fn refuse(kind: u32, code: u64, msg: impl Into<String>) -> (Frame, Option<OwnedFd>) {
    let msg: String = msg.into();
    (
        Frame::new(wire::ERROR, code, u64::from(kind), 0, 0).with_payload(msg.into_bytes()),
        None,
    )
}

/// Rate limit for repeated log lines: at most [`LogLimiter::PER_SECOND`]
/// lines a second of each kind; the next line let through says how many
/// were left out.
#[derive(Default)]
pub struct LogLimiter {
    kinds: Mutex<HashMap<&'static str, (Instant, u32, u64)>>,
}

impl LogLimiter {
    /// Lines of one kind logged per second at most.
    pub const PER_SECOND: u32 = 5;

    /// Whether a line of kind `what` may be logged at `now`: `Some(n)` with
    /// the number of lines left out since the last one logged, or `None`.
    pub fn allow(&self, what: &'static str, now: Instant) -> Option<u64> {
        let mut k = self.kinds.lock();
        let e = k.entry(what).or_insert((now, 0, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (now, 0, e.2);
        }
        if e.1 >= Self::PER_SECOND {
            e.2 += 1;
            return None;
        }
        e.1 += 1;
        Some(std::mem::take(&mut e.2))
    }
}

impl Inner {
    fn log(&self, line: &str) {
        if let Some(l) = &self.opts.log {
            l(line);
        }
    }

    fn timeout(&self) -> Duration {
        self.opts.peer_timeout
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Logs `line`, at most a few lines a second per `what`.
    fn log_limited(&self, what: &'static str, line: &str) {
        if let Some(n) = self.limiter.allow(what, Instant::now()) {
            if n > 0 {
                self.log(&format!("{line} ({n} more like it not logged)"));
            } else {
                self.log(line);
            }
        }
    }
}
