//! The server side: sessions with client processes (protocol version 4,
//! docs/protocol.md), the table of shared shadows, and the one-shadow
//! [`serve`] kept for embedders.

pub use super::tree::Tree;
use super::tree::{self, Refusal, ServedTree};
use super::wire::{self, Frame, RecvError};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fault::spans::Spans;
use crate::fault::{FaultTarget, Hit};
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

mod small;
mod spaces;
use spaces::{CHILD_CHECK_MS, ChildSpace};

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

/// What a shadow entry holds.
enum Held {
    Shadow(Shadow),
    /// A sealed read-only descriptor (the one-shadow [`serve`] of an eager
    /// or materialized shadow).
    Sealed {
        fd: OwnedFd,
        meta: SourceMeta,
        name: String,
    },
}

/// Identity of a source: container (device, or image identity), inode,
/// size, mtime.
type Key = (u64, u64, u64, u64, i64, i64);

struct Entry {
    id: u64,
    key: Key,
    held: Held,
    /// Open handles on it, over all clients.
    users: AtomicUsize,
    /// Lazy ranges attached to it, over all clients (counted here, so that
    /// STATS never waits on the shadow's own locks).
    attached: AtomicUsize,
    last_used: Mutex<Instant>,
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

impl Entry {
    fn meta(&self) -> &SourceMeta {
        match &self.held {
            Held::Shadow(s) => s.meta(),
            Held::Sealed { meta, .. } => meta,
        }
    }
    fn name(&self) -> &str {
        match &self.held {
            Held::Shadow(s) => s.name(),
            Held::Sealed { name, .. } => name,
        }
    }
    fn size(&self) -> u64 {
        self.meta().size
    }
    fn lazy(&self) -> Option<&Arc<LazyShadow>> {
        match &self.held {
            Held::Shadow(Shadow {
                kind: Kind::Lazy(l),
                ..
            }) => Some(l),
            _ => None,
        }
    }
    fn resident(&self) -> u64 {
        match &self.held {
            Held::Shadow(Shadow {
                kind: Kind::Lazy(l),
                ..
            }) => l.resident_bytes(),
            Held::Shadow(s) => s.resident_bytes().unwrap_or(0),
            Held::Sealed { meta, .. } => meta.size,
        }
    }
    fn stats(&self) -> Stats {
        match &self.held {
            Held::Shadow(s) => s.stats(),
            Held::Sealed { meta, .. } => Stats {
                bytes_filled: meta.size,
                resident_bytes: meta.size,
                ..Stats::default()
            },
        }
    }
    fn mode(&self) -> &'static str {
        match &self.held {
            Held::Shadow(s) if s.mode() == crate::Mode::Lazy => "lazy",
            _ => "eager",
        }
    }
    fn sealed_fd(&self) -> Result<OwnedFd> {
        match &self.held {
            Held::Shadow(s) => s.reopen_readonly(),
            Held::Sealed { fd, .. } => fd
                .try_clone()
                .map_err(|e| Error::sys("duplicate the shadow descriptor", e)),
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        match &self.held {
            Held::Shadow(s) => s.read_at(buf, offset),
            Held::Sealed { fd, meta, .. } => {
                let n = (buf.len() as u64).min(meta.size.saturating_sub(offset)) as usize;
                let f = std::fs::File::from(
                    fd.try_clone()
                        .map_err(|e| Error::sys("duplicate the shadow descriptor", e))?,
                );
                f.read_exact_at(&mut buf[..n], offset)
                    .map_err(|e| Error::sys("read the shadow", e))?;
                Ok(n)
            }
        }
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

/// One handle a client holds.
struct Handle {
    entry: Arc<Entry>,
    /// Where its lazy ranges start (each a key of [`Conn::ranges`]).
    starts: BTreeSet<u64>,
    /// Closed by the client while some of its ranges were still mapped
    /// (moved by `mremap`, say): those stay served, as a file mapping
    /// outlives its descriptor, and the handle goes with the last of them.
    /// Requests on it are refused.
    closed: bool,
}

/// A lazy range a client attached: `len` bytes at `start` in the client
/// show the shadow from `offset` through `handle`; `key` names it among the
/// shadow's consumers.
#[derive(Debug, Clone, Copy)]
struct Attached {
    handle: u64,
    start: u64,
    len: u64,
    offset: u64,
    key: u64,
}

impl Attached {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

struct Conn {
    peer: Peer,
    /// The protocol version chosen at HELLO.
    version: u64,
    activity: Arc<Activity>,
    /// Its ranges as counted in [`Inner::ranges_total`].
    published: usize,
    stream: UnixStream,
    uffd: Option<Arc<Uffd>>,
    handles: BTreeMap<u64, Handle>,
    /// Every lazy range of the connection by start address, none
    /// overlapping another: overlap checks and fault lookups are O(log n).
    ranges: BTreeMap<u64, Attached>,
    next_handle: u64,
    /// The client's forked children that inherited lazy ranges
    /// (`UFFD_EVENT_FORK` on its userfaultfd), served by this thread.
    children: Vec<ChildSpace>,
    /// The client's `/proc/PID/maps`, for faults in ranges it grew (opened
    /// at the first).
    maps: Option<crate::sys::maps::Maps>,
    /// Mapping events read from the client's userfaultfd in the current
    /// window ([`EVENT_WINDOW`]), and when that window began.
    events: (u32, Instant),
    /// When the forked children were last asked whether they live.
    children_checked: Instant,
}

/// How many mapping events of one client the server applies per
/// [`EVENT_WINDOW`]: past that, its session thread waits out the window
/// before reading more. Each event blocks the client call that made it
/// (`munmap`, `mremap`, `MADV_DONTNEED` with `EVENT_REMOVE`) until it is
/// read, so a client making them in a loop goes at this rate, and costs
/// the server a bounded share of a CPU, whatever it negotiated. Far above
/// what programs do with served ranges.
const EVENTS_PER_WINDOW: u32 = 250;
/// See [`EVENTS_PER_WINDOW`].
const EVENT_WINDOW: Duration = Duration::from_millis(50);

impl Conn {
    fn new(
        peer: Peer,
        stream: UnixStream,
        uffd: Option<Arc<Uffd>>,
        activity: Arc<Activity>,
        version: u64,
    ) -> Conn {
        Conn {
            peer,
            version,
            activity,
            published: 0,
            stream,
            uffd,
            handles: BTreeMap::new(),
            ranges: BTreeMap::new(),
            next_handle: 1,
            children: Vec::new(),
            maps: None,
            events: (0, Instant::now()),
            children_checked: Instant::now(),
        }
    }

    /// The range holding address `addr`.
    fn range_at(&self, addr: u64) -> Option<&Attached> {
        self.ranges
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end())
    }

    /// The starts of the ranges overlapping `lo..hi`, in address order.
    fn overlapping(&self, lo: u64, hi: u64) -> Vec<u64> {
        let before = self
            .ranges
            .range(..lo)
            .next_back()
            .filter(|(_, r)| r.end() > lo)
            .map(|(s, _)| *s);
        before
            .into_iter()
            .chain(self.ranges.range(lo..hi).map(|(s, _)| *s))
            .collect()
    }

    fn insert_range(&mut self, r: Attached) {
        if let Some(h) = self.handles.get_mut(&r.handle) {
            h.starts.insert(r.start);
        }
        self.ranges.insert(r.start, r);
    }

    fn remove_range(&mut self, start: u64) -> Option<Attached> {
        let r = self.ranges.remove(&start)?;
        if let Some(h) = self.handles.get_mut(&r.handle) {
            h.starts.remove(&start);
        }
        Some(r)
    }

    /// Takes handle `h` out with its ranges.
    fn take_handle(&mut self, h: u64) -> Option<(Handle, Vec<Attached>)> {
        let mut handle = self.handles.remove(&h)?;
        let ranges = std::mem::take(&mut handle.starts)
            .into_iter()
            .filter_map(|s| self.ranges.remove(&s))
            .collect();
        Some((handle, ranges))
    }
}

fn refuse(kind: u32, code: u64, msg: impl Into<String>) -> (Frame, Option<OwnedFd>) {
    let msg: String = msg.into();
    (
        Frame::new(wire::ERROR, code, u64::from(kind), 0, 0).with_payload(msg.into_bytes()),
        None,
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_opt(v: Option<f64>) -> String {
    v.map_or("null".into(), |x| format!("{x:.1}"))
}

/// What a HELLO asked for.
enum Hello {
    /// A status query: one STATS of handle 0, then the server hangs up.
    Status,
    /// A client, with its userfaultfd if it sent one, and the protocol
    /// version chosen.
    Client(Option<Arc<Uffd>>, Arc<Activity>, u64),
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

/// What happened to a session, for the log line.
enum End {
    Hangup,
    Error(String),
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

    /// Counts a new connection as pending; if the pending table is full,
    /// the oldest pending connection is dropped to make room.
    /// Returns the id of the connection dropped, if one was.
    fn add_pending(&self, st: &mut State, stream: &UnixStream, peer: Peer) -> Option<u64> {
        let gone = if st.pending.len() >= self.opts.max_pending.max(1) {
            st.pending.pop_first()
        } else {
            None
        };
        if let Some((_, p)) = &gone {
            shut(p.fd);
        }
        st.pending.insert(
            peer.id,
            PendingConn {
                fd: stream.as_raw_fd(),
            },
        );
        gone.map(|(id, _)| id)
    }

    /// Logs that pending connection `id` was dropped to admit `peer`.
    fn log_displaced(&self, id: u64, peer: Peer) {
        self.log_limited(
            "pending",
            &format!(
                "client {id}: dropped before HELLO to admit client {}: {} connections were \
                 waiting for HELLO, the maximum (--max-pending)",
                peer.id, self.opts.max_pending
            ),
        );
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

    /// Lists a client that completed HELLO, making room if the table is
    /// full: the client idle longest among those with no lazy range
    /// attached and no request in progress is dropped. Err (a message for
    /// the refused client) if there is no such client.
    fn admit(
        &self,
        peer: Peer,
        uffd: bool,
        stream: &UnixStream,
    ) -> std::result::Result<Arc<Activity>, String> {
        let activity = Arc::new(Activity {
            busy: std::sync::atomic::AtomicBool::new(false),
            last_ms: AtomicU64::new(self.now_ms()),
        });
        let info = ClientInfo {
            pid: peer.pid,
            uid: peer.uid,
            since: Instant::now(),
            uffd,
            handles: 0,
            mappings: 0,
            activity: activity.clone(),
            fd: stream.as_raw_fd(),
        };
        let victim = {
            let mut st = self.state.lock();
            let mut victim = None;
            if st.clients.len() >= self.opts.max_clients {
                let pick = st
                    .clients
                    .iter()
                    .filter(|(_, c)| c.mappings == 0 && !c.activity.busy.load(Ordering::SeqCst))
                    .min_by_key(|(_, c)| c.activity.last_ms.load(Ordering::Relaxed))
                    .map(|(id, _)| *id);
                match pick.and_then(|id| st.clients.remove(&id).map(|c| (id, c))) {
                    Some(v) => {
                        shut(v.1.fd);
                        victim = Some(v);
                    }
                    None => {
                        return Err(format!(
                            "the server has its maximum of {} clients, and each has a lazy \
                             mapping attached or a request in progress; try again later",
                            self.opts.max_clients
                        ));
                    }
                }
            }
            st.clients.insert(peer.id, info);
            victim
        };
        if let Some((id, c)) = victim {
            let idle = self
                .now_ms()
                .saturating_sub(c.activity.last_ms.load(Ordering::Relaxed));
            self.log_limited(
                "displaced",
                &format!(
                    "client {id} (pid {} uid {}): dropped to admit {peer}: the server had its \
                     maximum of {} clients, and this one had no lazy mapping and had been idle \
                     longest ({:.1} s)",
                    c.pid,
                    c.uid,
                    self.opts.max_clients,
                    idle as f64 / 1000.0
                ),
            );
        }
        Ok(activity)
    }

    /// HELLO and its reply (and the whole of a status query). `None` if
    /// there is no session to run (logged if the peer was dropped).
    fn handshake(self: &Arc<Self>, stream: UnixStream, peer: Peer, by: Instant) -> Option<Conn> {
        let r = self.try_handshake(&stream, peer, by);
        let r = match r {
            Ok(Hello::Status) => self.answer_status(&stream, by).map(|()| Hello::Status),
            r => r,
        };
        // Out of the pending table before the socket can be closed.
        self.state.lock().pending.remove(&peer.id);
        match r {
            Ok(Hello::Status) => None,
            Ok(Hello::Client(uffd, activity, version)) => {
                self.log(&format!(
                    "{peer}: connected ({})",
                    if uffd.is_some() {
                        "with a userfaultfd: lazy mappings"
                    } else {
                        "no userfaultfd: sealed descriptors only"
                    }
                ));
                Some(Conn::new(peer, stream, uffd, activity, version))
            }
            Err(e) => {
                self.log_limited("dropped", &format!("{peer}: dropped: {e}"));
                None
            }
        }
    }

    /// A status query's one request: STATS of handle 0, by `by`.
    fn answer_status(&self, stream: &UnixStream, by: Instant) -> Result<()> {
        let protocol = |what: String| Error::Protocol { what };
        let (f, fd) = wire::recv_by(stream, Some(by)).map_err(|e| protocol(e.to_string()))?;
        if fd.is_some() || f.kind != wire::STATS || f.a != 0 {
            let (r, _) = refuse(
                f.kind,
                wire::E_PROTOCOL,
                "a status connection (HELLO with HELLO_STATUS) may send one request: STATS of \
                 handle 0",
            );
            let _ = wire::send_by(stream, &r, None, Some(by));
            return Err(protocol(format!(
                "sent kind {:#x} on a status connection",
                f.kind
            )));
        }
        let r = Frame::new(wire::STATS | wire::REPLY, 0, 0, 0, 0)
            .with_payload(self.status_json().into_bytes());
        wire::send_by(stream, &r, None, Some(by))
    }

    fn try_handshake(&self, stream: &UnixStream, peer: Peer, by: Instant) -> Result<Hello> {
        let t = self.timeout();
        let set = stream
            .set_read_timeout(Some(t))
            .and_then(|()| stream.set_write_timeout(Some(t)));
        set.map_err(|e| Error::sys("set the client socket timeouts", e))?;
        let protocol = |what: String| Error::Protocol { what };
        let (hello, fd) = match wire::recv_by(stream, Some(by)) {
            Ok(x) => x,
            Err(RecvError::TimedOut) => {
                return Err(protocol(format!(
                    "{peer} did not send a whole HELLO within the peer timeout of {t:?} \
                     (protocol version {}). Raise --peer-timeout if clients are that slow",
                    wire::VERSION
                )));
            }
            Err(RecvError::Legacy { kind, a }) => {
                wire::send_legacy_error(stream, wire::E_VERSION);
                return Err(protocol(format!(
                    "{peer} speaks protocol version {} (frame kind {kind}); this server speaks \
                     version {}: refused with ERROR E_VERSION",
                    if kind == 4 { a } else { 1 },
                    wire::VERSION
                )));
            }
            Err(e) => return Err(protocol(format!("{peer}: expected HELLO: {e}"))),
        };
        let send_err = |kind, code, msg: String| {
            let (f, _) = refuse(kind, code, msg.clone());
            let _ = wire::send_by(stream, &f, None, Some(by));
            protocol(msg)
        };
        if hello.kind != wire::HELLO {
            return Err(send_err(
                hello.kind,
                wire::E_PROTOCOL,
                format!(
                    "the first frame was kind {:#x}; expected HELLO ({:#x})",
                    hello.kind,
                    wire::HELLO
                ),
            ));
        }
        if hello.a < wire::MIN_VERSION {
            return Err(send_err(
                hello.kind,
                wire::E_VERSION,
                format!(
                    "the client speaks protocol versions up to {}; this server speaks versions {} to {}",
                    hello.a,
                    wire::MIN_VERSION,
                    wire::VERSION
                ),
            ));
        }
        let cap = self.engine.as_ref().map_or(0, |e| e.config().max_size);
        let reply = Frame::new(
            wire::HELLO | wire::REPLY,
            hello.a.min(wire::VERSION),
            u64::from(std::process::id()),
            cap,
            crate::page_size() as u64,
        );
        let has = hello.b & wire::HELLO_HAS_UFFD != 0;
        if hello.b & wire::HELLO_STATUS != 0 {
            if fd.is_some() {
                return Err(send_err(
                    hello.kind,
                    wire::E_PROTOCOL,
                    "a status HELLO carries no descriptor".into(),
                ));
            }
            wire::send_by(stream, &reply, None, Some(by))?;
            return Ok(Hello::Status);
        }
        let uffd = match (has, fd) {
            (true, Some(fd)) => {
                // (Where /proc cannot say, the ioctls will.)
                let what = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .ok()
                    .map(|l| l.to_string_lossy().into_owned());
                if let Some(what) = what.filter(|w| w != "anon_inode:[userfaultfd]") {
                    return Err(send_err(
                        hello.kind,
                        wire::E_PROTOCOL,
                        format!(
                            "HELLO says a userfaultfd comes with it, and the descriptor that came \
                             is {what:?}; send the userfaultfd itself, or HELLO without it"
                        ),
                    ));
                }
                let u = Uffd::from_fd(fd, hello.c);
                if !u.has_lazy_features() {
                    return Err(send_err(
                        hello.kind,
                        wire::E_NO_UFFD,
                        format!(
                            "the client's userfaultfd negotiated features {:#x}, without \
                             MINOR_SHMEM and POISON; send HELLO without it to get sealed descriptors",
                            hello.c
                        ),
                    ));
                }
                Some(Arc::new(u))
            }
            (true, None) => {
                return Err(send_err(
                    hello.kind,
                    wire::E_PROTOCOL,
                    "HELLO says a userfaultfd comes with it, and none came".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(send_err(
                    hello.kind,
                    wire::E_PROTOCOL,
                    "HELLO carried a descriptor without the HELLO_HAS_UFFD flag".into(),
                ));
            }
            (false, None) => None,
        };
        let activity = match self.admit(peer, uffd.is_some(), stream) {
            Ok(a) => a,
            Err(msg) => return Err(send_err(hello.kind, wire::E_LIMIT, msg)),
        };
        if let Err(e) = wire::send_by(stream, &reply, None, Some(by)) {
            self.state.lock().clients.remove(&peer.id);
            return Err(e);
        }
        Ok(Hello::Client(uffd, activity, reply.a))
    }

    /// The session loop: requests on the socket, faults on the client's
    /// userfaultfd, until the client hangs up or breaks the protocol.
    fn run(self: &Arc<Self>, mut conn: Conn) {
        let end = self.session(&mut conn);
        // The client is gone or dropped, but children it forked may still
        // map its files: they are served until they exit.
        self.serve_orphans(&mut conn);
        let peer = conn.peer;
        let (mut nh, mut nm) = (0, 0);
        let ids: Vec<u64> = conn.handles.keys().copied().collect();
        for id in ids {
            if let Some((h, ranges)) = conn.take_handle(id) {
                nh += 1;
                nm += ranges.len();
                self.release(h, &ranges, None);
            }
        }
        self.note_mappings(&mut conn);
        self.state.lock().clients.remove(&peer.id);
        let why = match end {
            End::Hangup => "disconnected".to_string(),
            End::Error(e) => format!("dropped: {e}"),
        };
        self.log(&format!(
            "{peer}: {why}; released {nh} handle(s) and {nm} lazy mapping(s)"
        ));
        self.evict();
    }

    fn session(self: &Arc<Self>, conn: &mut Conn) -> End {
        let mut raw = vec![uffd_msg::default(); 32];
        let mut faults = Vec::with_capacity(32);
        loop {
            let sfd = conn.stream.as_fd().as_raw_fd();
            let ufd = conn.uffd.as_ref().map_or(-1, |u| u.as_fd().as_raw_fd());
            // Idle clients may stay connected as long as they like: a client
            // holding mappings may say nothing for hours. Forked children,
            // and answers deferred for a pending event, are looked at.
            let timeout = self.serve_spaces(conn);
            let pfd = |fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // The socket, the client's userfaultfd (-1: none, ignored by
            // poll), and its forked children's: a child's fault wakes the
            // loop, which serves it (`serve_spaces`) before polling again.
            let mut fds: Vec<libc::pollfd> = [sfd, ufd].into_iter().map(pfd).collect();
            fds.extend(
                conn.children
                    .iter()
                    .map(|c| pfd(c.uffd.as_fd().as_raw_fd())),
            );
            let n = if ufd >= 0 { 2 } else { 1 };
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            let broken = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
            if fds[2..].iter().any(|p| p.revents & broken != 0) {
                // Asked at once whether the children live: a broken one
                // goes, rather than wake the loop for ever.
                let back = Duration::from_millis(CHILD_CHECK_MS as u64);
                let now = Instant::now();
                conn.children_checked = now.checked_sub(back).unwrap_or(now);
            }
            if r < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return End::Error(format!("poll: {}", std::io::Error::last_os_error()));
            }
            if n == 2 && fds[1].revents != 0 {
                if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    return End::Error("the client's userfaultfd reported an error".into());
                }
                faults.clear();
                let u = conn.uffd.clone().expect("polled");
                let mut events = Vec::new();
                match u.read_msgs(&mut raw, &mut faults, &mut events) {
                    Ok(()) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                    Err(e) => return End::Error(format!("reading its userfaultfd: {e}")),
                }
                let n = events.len() as u32;
                self.client_events(conn, events);
                Self::pace_events(conn, n);
                for f in &faults {
                    if !self.fault(conn, &u, f.address) {
                        return End::Error(
                            "its userfaultfd cannot poison a stray fault; dropped".into(),
                        );
                    }
                }
            }
            if fds[0].revents != 0 {
                // One deadline for the whole frame, from its first byte.
                let by = Instant::now() + self.timeout();
                let (frame, fd) = match wire::recv_by(&conn.stream, Some(by)) {
                    Ok(x) => x,
                    Err(RecvError::Closed) => return End::Hangup,
                    Err(RecvError::TimedOut) => {
                        return End::Error(format!(
                            "began a frame and did not finish it within the peer timeout of {:?}",
                            self.timeout()
                        ));
                    }
                    Err(e) => return End::Error(format!("expected a request frame: {e}")),
                };
                if fd.is_some() {
                    return End::Error(format!(
                        "sent a descriptor with a request of kind {:#x}; only HELLO carries one",
                        frame.kind
                    ));
                }
                conn.activity.busy.store(true, Ordering::SeqCst);
                let done = self.request(conn, frame);
                conn.activity
                    .last_ms
                    .store(self.now_ms(), Ordering::Relaxed);
                conn.activity.busy.store(false, Ordering::SeqCst);
                if let Err(e) = done {
                    return End::Error(e);
                }
            }
        }
    }

    /// Serves one fault of the client. False if the client must be dropped.
    fn fault(&self, conn: &mut Conn, uffd: &Uffd, address: u64) -> bool {
        let page = crate::page_size() as u64;
        let addr = address & !(page - 1);
        let found = conn
            .range_at(addr)
            .and_then(|r| Some((r, conn.handles.get(&r.handle)?)));
        if let Some((r, h)) = found {
            let shadow = h.entry.lazy().expect("lazy ranges are of lazy shadows");
            let core = &shadow.service.core;
            let hit = Hit {
                uffd,
                addr,
                offset: r.offset + (addr - r.start),
                limit: r.end() - addr,
                internal: false,
            };
            if let Some(work) = shadow.on_fault(core, hit) {
                shadow.run(core, work);
            }
            return true;
        }
        if self.adopt_grown(conn, addr) {
            return self.fault(conn, uffd, address);
        }
        // A fault outside every range it attached: SIGBUS in the client.
        if uffd.poison(addr, page).is_err() {
            let _ = uffd.wake(addr, page);
            return false;
        }
        true
    }

    fn send(
        &self,
        conn: &Conn,
        f: &Frame,
        fd: Option<&OwnedFd>,
    ) -> std::result::Result<(), String> {
        wire::send(&conn.stream, f, fd.map(|f| f.as_fd()))
            .map_err(|e| format!("sending a reply: {e}"))
    }

    /// Answers one request. Err ends the session.
    fn request(self: &Arc<Self>, conn: &mut Conn, f: Frame) -> std::result::Result<(), String> {
        let (reply, fd) = match f.kind {
            wire::OPEN => self.open(conn, &f),
            wire::MAP => return self.map(conn, &f),
            wire::FILL => self.fill(conn, &f),
            wire::STATS => self.stats(conn, &f),
            wire::UNMAP => self.unmap(conn, &f),
            wire::CLOSE => self.close(conn, &f),
            wire::STAT => self.stat_path(&f),
            wire::LIST => self.list(&f),
            wire::SMALL => self.small(conn, &f),
            wire::ATTACH => refuse(
                f.kind,
                wire::E_PROTOCOL,
                "ATTACH without a MAP just before it",
            ),
            k => {
                let (r, _) = refuse(k, wire::E_PROTOCOL, format!("unknown request kind {k:#x}"));
                let _ = self.send(conn, &r, None);
                return Err(format!("sent an unknown request kind {k:#x}"));
            }
        };
        self.send(conn, &reply, fd.as_ref())
    }

    fn handle_of<'a>(
        &self,
        conn: &'a Conn,
        kind: u32,
        h: u64,
    ) -> std::result::Result<&'a Handle, (Frame, Option<OwnedFd>)> {
        conn.handles.get(&h).filter(|h| !h.closed).ok_or_else(|| {
            refuse(
                kind,
                wire::E_BAD_HANDLE,
                format!("handle {h} is not open on this connection; OPEN returns handles"),
            )
        })
    }

    fn open(self: &Arc<Self>, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let path = String::from_utf8_lossy(&f.payload).into_owned();
        if conn.handles.len() >= self.opts.max_handles {
            return refuse(
                f.kind,
                wire::E_LIMIT,
                format!(
                    "this connection has its maximum of {} open handles; CLOSE some",
                    self.opts.max_handles
                ),
            );
        }
        let entry = match self.lookup(&f.payload) {
            Ok(e) => e,
            Err((code, msg)) => {
                self.log(&format!(
                    "{}: OPEN {path:?} refused: {} {msg}",
                    conn.peer,
                    wire::code_name(code)
                ));
                return refuse(f.kind, code, msg);
            }
        };
        let h = conn.next_handle;
        conn.next_handle += 1;
        let meta = entry.meta().clone();
        let mut payload = Vec::with_capacity(32);
        payload.extend_from_slice(&meta.mtime.sec.to_le_bytes());
        payload.extend_from_slice(&(meta.mtime.nsec as u64).to_le_bytes());
        payload.extend_from_slice(&entry.id.to_le_bytes());
        payload.extend_from_slice(&u64::from(entry.lazy().is_some()).to_le_bytes());
        self.log(&format!(
            "{}: OPEN {path:?} -> handle {h}, shadow {} ({} bytes, {})",
            conn.peer,
            entry.id,
            meta.size,
            entry.mode()
        ));
        conn.handles.insert(
            h,
            Handle {
                entry,
                starts: BTreeSet::new(),
                closed: false,
            },
        );
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.handles += 1;
        }
        (
            Frame::new(
                wire::OPEN | wire::REPLY,
                h,
                meta.size,
                meta.device,
                meta.inode,
            )
            .with_payload(payload),
            None,
        )
    }

    /// STAT (since version 4): what a path is, without opening a shadow.
    fn stat_path(&self, f: &Frame) -> (Frame, Option<OwnedFd>) {
        match self.path_stat(&f.payload) {
            Ok(s) => {
                let mut p = Vec::with_capacity(24);
                p.extend_from_slice(&s.mtime.sec.to_le_bytes());
                p.extend_from_slice(&(s.mtime.nsec as u64).to_le_bytes());
                p.extend_from_slice(&s.nlink.to_le_bytes());
                (
                    Frame::new(wire::STAT | wire::REPLY, s.kind, s.size, s.device, s.inode)
                        .with_payload(p),
                    None,
                )
            }
            Err((code, msg)) => refuse(f.kind, code, msg),
        }
    }

    /// What `path` is (STAT, and each path of SMALL).
    fn path_stat(&self, path: &[u8]) -> std::result::Result<tree::PathStat, Refusal> {
        tree::relative(path).and_then(|rel| match &self.tree {
            TreeImpl::Tree(t) => t.stat(rel),
            TreeImpl::Single(e) => {
                let m = e.meta();
                Ok(tree::PathStat {
                    kind: wire::KIND_FILE,
                    size: m.size,
                    device: m.device,
                    inode: m.inode,
                    mtime: m.mtime,
                    nlink: 1,
                })
            }
        })
    }

    /// LIST (since version 4): one page of a directory, from cursor `a`.
    fn list(&self, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let r = tree::relative(&f.payload).and_then(|rel| match &self.tree {
            TreeImpl::Tree(t) => t.list(rel, f.a),
            TreeImpl::Single(_) => Err((
                wire::E_NOT_DIR,
                "this server serves one file and has no directories to LIST".into(),
            )),
        });
        match r {
            Ok(page) => {
                let mut p = Vec::new();
                for e in &page.entries {
                    wire::put_entry(&mut p, e);
                }
                (
                    Frame::new(
                        wire::LIST | wire::REPLY,
                        page.entries.len() as u64,
                        page.next,
                        u64::from(page.end),
                        0,
                    )
                    .with_payload(p),
                    None,
                )
            }
            Err((code, msg)) => refuse(f.kind, code, msg),
        }
    }

    /// The shared entry for a client's path, opening a shadow if none
    /// matches the source's identity now; counted as used (under the table
    /// lock, so that eviction never takes an entry being handed out).
    fn lookup(self: &Arc<Self>, path: &[u8]) -> std::result::Result<Arc<Entry>, Refusal> {
        let rel = tree::relative(path)?;
        let (source, meta, container): (Arc<dyn Source>, SourceMeta, (u64, u64)) = match &self.tree
        {
            TreeImpl::Single(e) => {
                e.users.fetch_add(1, Ordering::Relaxed);
                return Ok(e.clone());
            }
            TreeImpl::Tree(t) => {
                let o = t.open(rel)?;
                (o.source, o.meta, o.container)
            }
        };
        let key: Key = (
            container.0,
            container.1,
            meta.inode,
            meta.size,
            meta.mtime.sec,
            meta.mtime.nsec,
        );
        let gate = {
            let mut st = self.state.lock();
            if let Some(e) = st.take_entry(&key) {
                return Ok(e);
            }
            st.opening.entry(key).or_default().clone()
        };
        // Evicted shadows are dropped here, not under a gate: the last drop
        // of a lazy shadow waits for a fill of it still in flight.
        self.evict();
        // Only OPENs of this same source wait here: they share its open.
        let _one = gate.lock();
        if let Some(e) = self.state.lock().take_entry(&key) {
            return Ok(e);
        }
        let opened = self.open_entry(source, key);
        let mut st = self.state.lock();
        if st.opening.get(&key).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
            st.opening.remove(&key);
        }
        let entry = opened?;
        if entry.lazy().is_none() {
            st.sealed_bytes += entry.size();
        }
        st.entries.insert(key, entry.clone());
        drop(st);
        self.log(&format!(
            "shadow {}: opened {} ({} bytes, {}, dev {} inode {})",
            entry.id,
            entry.name(),
            meta.size,
            entry.mode(),
            meta.device,
            meta.inode
        ));
        Ok(entry)
    }

    /// A new shadow of `source`, held once.
    fn open_entry(
        &self,
        source: Arc<dyn Source>,
        key: Key,
    ) -> std::result::Result<Arc<Entry>, Refusal> {
        let engine = self.engine.as_ref().expect("a tree server has an engine");
        let source = match &self.opts.source_hook {
            Some(h) => h(source),
            None => source,
        };
        let shadow = engine.open(source).map_err(|e| {
            let code = match &e {
                Error::TooLarge { .. } => wire::E_TOO_LARGE,
                Error::NotRegular { .. } => wire::E_NOT_REGULAR,
                _ => wire::E_IO,
            };
            (code, e.to_string())
        })?;
        Ok(Arc::new(Entry {
            id: self.next_entry.fetch_add(1, Ordering::Relaxed),
            key,
            held: Held::Shadow(shadow),
            users: AtomicUsize::new(1),
            attached: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }))
    }

    fn map(self: &Arc<Self>, conn: &mut Conn, f: &Frame) -> std::result::Result<(), String> {
        let entry = match self.handle_of(conn, f.kind, f.a) {
            Ok(h) => h.entry.clone(),
            Err((r, _)) => return self.send(conn, &r, None),
        };
        let size = entry.size();
        let page = crate::page_size() as u64;
        let want_lazy = f.b == wire::MAP_LAZY;
        if size == 0 {
            let r = Frame::new(wire::MAP | wire::REPLY, f.a, 0, wire::MAP_SEALED, 0);
            return self.send(conn, &r, None);
        }
        let lazy_shadow = entry.lazy().filter(|l| !l.fully_filled()).cloned();
        match (lazy_shadow, conn.uffd.clone()) {
            (Some(l), Some(uffd)) if want_lazy => {
                let ro = match l.memfd.reopen_readonly() {
                    Ok(fd) => fd,
                    Err(e) => {
                        let (r, _) = refuse(f.kind, wire::E_IO, e.to_string());
                        return self.send(conn, &r, None);
                    }
                };
                let r = Frame::new(wire::MAP | wire::REPLY, f.a, size, wire::MAP_LAZY, 0);
                self.send(conn, &r, Some(&ro))?;
                drop(ro);
                // The client maps it PROT_NONE, registers it and says where.
                // Meanwhile its other threads may fault, or munmap (which
                // waits until its UNMAP event is read): both are served.
                let by = Instant::now() + self.timeout();
                self.serve_until_readable(conn, by);
                let (att, fd) = wire::recv_by(&conn.stream, Some(by)).map_err(|e| {
                    format!(
                        "expected ATTACH within the peer timeout of {:?} after a lazy MAP: {e}",
                        self.timeout()
                    )
                })?;
                if fd.is_some() {
                    return Err("sent a descriptor with its ATTACH".into());
                }
                let whole = size.div_ceil(page) * page;
                if att.kind == wire::ATTACH && att.a == f.a && att.b == 0 && att.c == 0 {
                    // Version 5: the client abandons the MAP (it could not
                    // map or register the descriptor); nothing was attached.
                    self.log(&format!("{}: MAP of handle {} abandoned", conn.peer, f.a));
                    let r = Frame::new(wire::ATTACH | wire::REPLY, f.a, 0, 0, 0);
                    return self.send(conn, &r, None);
                }
                if att.kind != wire::ATTACH || att.a != f.a || att.b % page != 0 || att.b == 0 {
                    let msg = format!(
                        "expected ATTACH of handle {} with a non-zero page-aligned address; got \
                         kind {:#x} handle {} address {:#x}",
                        f.a, att.kind, att.a, att.b
                    );
                    let (r, _) = refuse(att.kind, wire::E_PROTOCOL, msg.clone());
                    let _ = self.send(conn, &r, None);
                    return Err(msg);
                }
                let (start, len, offset) = (att.b, att.c, att.d);
                if let Some(msg) = self.range_cap(conn, &format!("ATTACH at {start:#x}")) {
                    // The client unmaps its range; the session goes on.
                    self.log_limited("attach", &format!("{}: ATTACH refused: {msg}", conn.peer));
                    let (r, _) = refuse(att.kind, wire::E_LIMIT, msg);
                    return self.send(conn, &r, None);
                }
                if uffd.has_events() && start.checked_add(len).is_some() {
                    // The kernel gave these addresses to the client's new
                    // mapping: a range still attached there was unmapped or
                    // moved away, its event not applied yet (another
                    // thread's munmap or mremap, queued after this mmap).
                    Self::cut_client(conn, start, start + len);
                    self.reap_closed(conn);
                }
                if let Err(msg) = attach_span(conn, start, len, offset, whole, page) {
                    // The client unmaps its range; the session goes on.
                    self.log(&format!("{}: ATTACH refused: {msg}", conn.peer));
                    let (r, _) = refuse(att.kind, wire::E_RANGE, msg);
                    return self.send(conn, &r, None);
                }
                let key = l.add_remote(uffd.clone(), start, len, offset);
                entry.attached.fetch_add(1, Ordering::Relaxed);
                conn.insert_range(Attached {
                    handle: f.a,
                    start,
                    len,
                    offset,
                    key,
                });
                self.note_mappings(conn);
                self.log(&format!(
                    "{}: MAP handle {} lazily at {start:#x} ({len} bytes from offset {offset})",
                    conn.peer, f.a
                ));
                let r = Frame::new(wire::ATTACH | wire::REPLY, f.a, start, len, offset);
                self.send(conn, &r, None)
            }
            (lazy, uffd) => {
                if lazy.is_some() {
                    // The eager fallback: fill the shared shadow whole, then
                    // hand out a sealed descriptor, within the eager cap.
                    let cap = self.engine.as_ref().map_or(0, |e| e.config().max_size);
                    if size > cap {
                        let why = if uffd.is_none() {
                            "the client has no userfaultfd"
                        } else {
                            "the client asked for a sealed descriptor"
                        };
                        let msg = format!(
                            "{why}, and the file is {size} bytes, over the server's eager cap of \
                             {cap} bytes; start the server with --max-size {size} or more, or \
                             map it lazily from a client with a userfaultfd"
                        );
                        let (r, _) = refuse(
                            f.kind,
                            if cap == 0 {
                                wire::E_NO_UFFD
                            } else {
                                wire::E_TOO_LARGE
                            },
                            msg,
                        );
                        return self.send(conn, &r, None);
                    }
                    if let Err(e) = entry_materialize(&entry) {
                        let (r, _) = refuse(f.kind, wire::E_IO, e.to_string());
                        return self.send(conn, &r, None);
                    }
                }
                let fd = match entry.sealed_fd() {
                    Ok(fd) => fd,
                    Err(e) => {
                        let (r, _) = refuse(f.kind, wire::E_IO, e.to_string());
                        return self.send(conn, &r, None);
                    }
                };
                self.log(&format!(
                    "{}: MAP handle {} as a sealed descriptor ({size} bytes)",
                    conn.peer, f.a
                ));
                let r = Frame::new(wire::MAP | wire::REPLY, f.a, size, wire::MAP_SEALED, 0);
                self.send(conn, &r, Some(&fd))
            }
        }
    }

    fn fill(&self, conn: &Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let h = match self.handle_of(conn, f.kind, f.a) {
            Ok(h) => h,
            Err(r) => return r,
        };
        let size = h.entry.size();
        if f.c > wire::MAX_FILL || f.b > size {
            return refuse(
                f.kind,
                wire::E_RANGE,
                format!(
                    "FILL of {} bytes at {}: the offset must be at most the size ({size}) and \
                     the length at most {} bytes",
                    f.c,
                    f.b,
                    wire::MAX_FILL
                ),
            );
        }
        let n = f.c.min(size - f.b) as usize;
        let mut buf = vec![0u8; n];
        match h.entry.read_at(&mut buf, f.b) {
            Ok(got) => {
                buf.truncate(got);
                (
                    Frame::new(wire::FILL | wire::REPLY, f.a, f.b, got as u64, 0).with_payload(buf),
                    None,
                )
            }
            Err(e) => refuse(f.kind, wire::E_IO, e.to_string()),
        }
    }

    fn stats(&self, conn: &Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let json = if f.a == 0 {
            self.status_json()
        } else {
            match self.handle_of(conn, f.kind, f.a) {
                Ok(h) => entry_json(&h.entry),
                Err(r) => return r,
            }
        };
        (
            Frame::new(wire::STATS | wire::REPLY, f.a, 0, 0, 0).with_payload(json.into_bytes()),
            None,
        )
    }

    fn unmap(&self, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let uffd = conn.uffd.clone();
        let Some(h) = conn.handles.get(&f.a).filter(|h| !h.closed) else {
            return refuse(
                f.kind,
                wire::E_BAD_HANDLE,
                format!("handle {} is not open on this connection", f.a),
            );
        };
        let lazy = h.entry.lazy().cloned();
        let entry = h.entry.clone();
        let page = crate::page_size() as u64;
        // c = 0: the whole range that starts at b (version 3). Since version
        // 4, c > 0: the part of [b, b+c) inside the handle's ranges.
        // A range the server attached from the kernel's view (a move, a
        // grow) may sit under another handle of the same file: the same
        // shadow counts.
        let same = |r: &Attached| {
            r.handle == f.a
                || conn
                    .handles
                    .get(&r.handle)
                    .is_some_and(|o| Arc::ptr_eq(&o.entry, &entry))
        };
        let (lo, hi) = if f.c == 0 {
            match conn.ranges.get(&f.b).filter(|r| same(r)) {
                Some(r) => (r.start, r.end()),
                None => {
                    return refuse(
                        f.kind,
                        wire::E_RANGE,
                        format!("handle {} has no lazy mapping at {:#x}", f.a, f.b),
                    );
                }
            }
        } else {
            match f.b.checked_add(f.c) {
                Some(hi) if f.b % page == 0 && f.c % page == 0 => (f.b, hi),
                _ => {
                    return refuse(
                        f.kind,
                        wire::E_RANGE,
                        format!(
                            "UNMAP of {} bytes at {:#x}: address and length must be multiples of \
                             the page size ({page}) and the range must not overflow",
                            f.c, f.b
                        ),
                    );
                }
            }
        };
        let hit: Vec<Attached> = conn
            .overlapping(lo, hi)
            .into_iter()
            .filter_map(|s| conn.ranges.get(&s).copied())
            .filter(|r| same(r))
            .collect();
        if hit.is_empty() {
            return refuse(
                f.kind,
                wire::E_RANGE,
                format!(
                    "handle {} has no lazy mapping overlapping {:#x}..{:#x}",
                    f.a, lo, hi
                ),
            );
        }
        // Only a range reaching past both ends of the cut is split in two
        // (one more range): refused at the cap, before anything changes.
        if hit.iter().any(|r| r.start < lo && hi < r.end()) {
            let what = format!("UNMAP of {lo:#x}..{hi:#x} would split a range in two");
            if let Some(msg) = self.range_cap(conn, &what) {
                return refuse(
                    f.kind,
                    wire::E_LIMIT,
                    format!("{msg}, or UNMAP the whole range (length 0) instead"),
                );
            }
        }
        let n = hit.len();
        for r in hit {
            let end = r.end();
            // What stays on either side keeps its file offsets; it is added
            // before the old range goes, so a fill completing meanwhile
            // still answers every waiting page.
            let mut pieces = Vec::with_capacity(2);
            for (start, stop) in [(r.start, lo), (hi, end)] {
                if start < stop && r.start <= start && stop <= end {
                    let offset = r.offset + (start - r.start);
                    let key = match (&uffd, &lazy) {
                        (Some(u), Some(l)) => l.add_remote(u.clone(), start, stop - start, offset),
                        _ => 0,
                    };
                    pieces.push(Attached {
                        handle: f.a,
                        start,
                        len: stop - start,
                        offset,
                        key,
                    });
                }
            }
            if let (Some(u), Some(l)) = (&uffd, &lazy) {
                // Nobody serves the cut part from now on: what is unfilled
                // faults with SIGBUS, never blocks.
                let (a, z) = (r.start.max(lo), end.min(hi));
                let _ = u.poison(a, z - a);
                l.remove_remote(r.key);
            }
            entry.attached.fetch_add(pieces.len(), Ordering::Relaxed);
            entry.attached.fetch_sub(1, Ordering::Relaxed);
            conn.remove_range(r.start);
            for p in pieces {
                conn.insert_range(p);
            }
        }
        self.note_mappings(conn);
        if f.c > 0 {
            self.log(&format!(
                "{}: UNMAP handle {} cut {lo:#x}..{hi:#x} out of {n} lazy range(s)",
                conn.peer, f.a
            ));
        }
        (
            Frame::new(wire::UNMAP | wire::REPLY, f.a, f.b, f.c, 0),
            None,
        )
    }

    /// Publishes the connection's count of lazy ranges (STATS, the global
    /// count and which clients may make room for others).
    fn note_mappings(&self, conn: &mut Conn) {
        let now = conn.ranges.len();
        if now >= conn.published {
            self.ranges_total
                .fetch_add(now - conn.published, Ordering::SeqCst);
        } else {
            self.ranges_total
                .fetch_sub(conn.published - now, Ordering::SeqCst);
        }
        conn.published = now;
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.mappings = now;
        }
    }

    /// A refusal if one more lazy range would pass the connection's cap or
    /// the server's.
    fn range_cap(&self, conn: &Conn, what: &str) -> Option<String> {
        if conn.ranges.len() >= self.opts.max_ranges {
            return Some(format!(
                "{what}: this connection has {} lazy ranges attached, its maximum of {} \
                 (--max-ranges); UNMAP some first",
                conn.ranges.len(),
                self.opts.max_ranges
            ));
        }
        let total = self.ranges_total.load(Ordering::SeqCst);
        // Each connection's first RESERVED_RANGES are not held against the
        // global cap: clients that filled it cannot keep others from
        // mapping.
        if conn.ranges.len() >= RESERVED_RANGES && total >= self.opts.max_ranges_total {
            return Some(format!(
                "{what}: the server has {total} lazy ranges attached over all clients, its \
                 maximum of {} (--max-ranges-total); try again later",
                self.opts.max_ranges_total
            ));
        }
        None
    }

    fn close(&self, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        match conn.handles.get_mut(&f.a) {
            Some(h) if !h.closed && !h.starts.is_empty() => {
                // Still mapped: served until the kernel says the ranges are
                // gone (`Inner::reap_closed`).
                h.closed = true;
                return (Frame::new(wire::CLOSE | wire::REPLY, f.a, 0, 0, 0), None);
            }
            Some(h) if h.closed => {
                return refuse(
                    f.kind,
                    wire::E_BAD_HANDLE,
                    format!("handle {} is closed already", f.a),
                );
            }
            _ => {}
        }
        let Some((h, ranges)) = conn.take_handle(f.a) else {
            return refuse(
                f.kind,
                wire::E_BAD_HANDLE,
                format!("handle {} is not open on this connection", f.a),
            );
        };
        self.release(h, &ranges, conn.uffd.as_deref());
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.handles = c.handles.saturating_sub(1);
        }
        self.note_mappings(conn);
        self.evict();
        (Frame::new(wire::CLOSE | wire::REPLY, f.a, 0, 0, 0), None)
    }

    /// Forgets a handle: its lazy ranges (poisoned first through `uffd` if
    /// the client lives on), and its use of the entry.
    fn release(&self, h: Handle, ranges: &[Attached], uffd: Option<&Uffd>) {
        if let Some(l) = h.entry.lazy() {
            for r in ranges {
                if let Some(u) = uffd {
                    let _ = u.poison(r.start, r.len);
                }
                l.remove_remote(r.key);
            }
        }
        h.entry.attached.fetch_sub(ranges.len(), Ordering::Relaxed);
        let mut st = self.state.lock();
        let now = Instant::now();
        *h.entry.last_used.lock() = now;
        if h.entry.users.fetch_sub(1, Ordering::SeqCst) == 1
            && st
                .entries
                .get(&h.entry.key)
                .is_some_and(|e| Arc::ptr_eq(e, &h.entry))
        {
            st.idle.insert((now, h.entry.id), h.entry.key);
        }
    }

    /// Drops shadows no client holds, least recently used first, while the
    /// shadows' resident bytes are over 3/4 of the memory budget (so that
    /// fills for live clients find room), and beyond 1024 idle entries.
    /// O(log n) a shadow dropped: the idle entries are kept in order, and
    /// the resident total is the engine's running count.
    fn evict(&self) {
        let Some(engine) = &self.engine else { return };
        let budget = engine.config().memory_budget;
        let high = budget / 4 * 3;
        let mut gone = Vec::new();
        {
            let mut st = self.state.lock();
            let mut resident = engine.resident_bytes() + st.sealed_bytes;
            while resident > high || st.idle.len() > 1024 {
                let Some((_, key)) = st.idle.pop_first() else {
                    break;
                };
                if let Some(e) = st.entries.remove(&key) {
                    let r = e.resident();
                    if e.lazy().is_none() {
                        st.sealed_bytes = st.sealed_bytes.saturating_sub(e.size());
                    }
                    resident = resident.saturating_sub(r);
                    gone.push(e);
                }
            }
        }
        for e in gone {
            self.log(&format!(
                "shadow {}: evicted {} (no client; {} bytes resident given back)",
                e.id,
                e.name(),
                e.resident()
            ));
        }
    }

    fn status_json(&self) -> String {
        let st = self.state.lock();
        let now = Instant::now();
        let clients: Vec<String> = st
            .clients
            .iter()
            .map(|(id, c)| {
                format!(
                    "{{\"id\":{id},\"pid\":{},\"uid\":{},\"userfaultfd\":{},\"handles\":{},\"lazy_mappings\":{},\"connected_s\":{:.1}}}",
                    c.pid,
                    c.uid,
                    c.uffd,
                    c.handles,
                    c.mappings,
                    now.duration_since(c.since).as_secs_f64()
                )
            })
            .collect();
        let mut entries: Vec<&Arc<Entry>> = st.entries.values().collect();
        if let TreeImpl::Single(e) = &self.tree {
            entries.push(e);
        }
        entries.sort_by_key(|e| e.id);
        let shadows: Vec<String> = entries.iter().map(|e| entry_json(e)).collect();
        let resident: u64 = entries.iter().map(|e| e.resident()).sum();
        let (budget, max_size, mode) = match &self.engine {
            Some(e) => (
                e.config().memory_budget,
                e.config().max_size,
                if e.mode() == crate::Mode::Lazy {
                    "lazy"
                } else {
                    "eager"
                },
            ),
            None => (0, 0, "single"),
        };
        let tree = match &self.tree {
            TreeImpl::Tree(t) => t.kind(),
            TreeImpl::Single(_) => "single",
        };
        format!(
            "{{\"version\":{},\"pid\":{},\"uptime_s\":{:.1},\"tree\":{},\"mode\":{},\"memory_budget\":{budget},\"max_size\":{max_size},\"resident_bytes\":{resident},\"peer_timeout_ms\":{},\"pending\":{},\"lazy_ranges\":{},\"limits\":{{\"max_clients\":{},\"max_pending\":{},\"max_handles\":{},\"max_ranges\":{},\"max_ranges_total\":{}}},\"clients\":[{}],\"shadows\":[{}]}}",
            wire::VERSION,
            std::process::id(),
            self.started.elapsed().as_secs_f64(),
            json_str(tree),
            json_str(mode),
            self.opts.peer_timeout.as_millis(),
            st.pending.len(),
            self.ranges_total.load(Ordering::Relaxed),
            self.opts.max_clients,
            self.opts.max_pending,
            self.opts.max_handles,
            self.opts.max_ranges,
            self.opts.max_ranges_total,
            clients.join(","),
            shadows.join(",")
        )
    }
}

/// Checks an ATTACH of `len` bytes at `start` showing the shadow from
/// `offset` (since version 4; a version 3 client sends offset 0 and the
/// whole file): page-aligned, inside the file's pages (`whole` bytes),
/// clear of every range the connection has attached.
fn attach_span(
    conn: &Conn,
    start: u64,
    len: u64,
    offset: u64,
    whole: u64,
    page: u64,
) -> std::result::Result<(), String> {
    if len == 0 || len % page != 0 || offset % page != 0 {
        return Err(format!(
            "ATTACH of {len} bytes from file offset {offset}: the length must be a non-zero \
             multiple of the page size ({page}) and the offset a multiple of it; round the \
             offset down and the length up to a page"
        ));
    }
    if offset.checked_add(len).is_none_or(|e| e > whole) {
        return Err(format!(
            "ATTACH of {len} bytes from file offset {offset}: the range must end within the \
             file's pages ({whole} bytes, its size rounded up to a page); map the part past \
             the end some other way (it raises SIGBUS natively)"
        ));
    }
    let Some(end) = start.checked_add(len) else {
        return Err(format!(
            "ATTACH at {start:#x} of {len} bytes: the range overflows the address space"
        ));
    };
    if let Some(r) = conn
        .overlapping(start, end)
        .first()
        .map(|s| &conn.ranges[s])
    {
        return Err(format!(
            "ATTACH at {start:#x} of {len} bytes overlaps the range attached at {:#x} \
             ({} bytes) of handle {}; UNMAP that part first",
            r.start, r.len, r.handle
        ));
    }
    Ok(())
}

fn entry_materialize(e: &Entry) -> Result<()> {
    match &e.held {
        Held::Shadow(s) => s.materialize(),
        Held::Sealed { .. } => Ok(()),
    }
}

fn entry_json(e: &Entry) -> String {
    let s = e.stats();
    let remote = e.attached.load(Ordering::Relaxed);
    format!(
        "{{\"id\":{},\"name\":{},\"size\":{},\"mode\":{},\"handles\":{},\"lazy_mappings\":{remote},\"resident_bytes\":{},\"faults\":{},\"chunks_filled\":{},\"bytes_filled\":{},\"readahead_chunks\":{},\"errors\":{},\"poisoned_pages\":{},\"budget_refusals\":{},\"fill_p50_us\":{},\"fill_p99_us\":{},\"source_changed\":{},\"last_error\":{}{}}}",
        e.id,
        json_str(e.name()),
        e.size(),
        json_str(e.mode()),
        e.users.load(Ordering::Relaxed),
        e.resident(),
        s.faults,
        s.chunks_filled,
        s.bytes_filled,
        s.readahead_chunks,
        s.errors,
        s.poisoned_pages,
        s.budget_refusals,
        json_opt(s.fill_p50_us),
        json_opt(s.fill_p99_us),
        s.source_changed,
        s.last_error.as_deref().map_or("null".to_string(), json_str),
        tree::source_json(e.meta()),
    )
}

/// A consumer being served by [`serve`].
#[derive(Debug)]
pub struct Served {
    thread: Option<JoinHandle<()>>,
}

impl Served {
    /// Waits until the consumer has disconnected and its ranges are
    /// forgotten.
    pub fn wait(self) {
        if let Some(t) = self.thread {
            let _ = t.join();
        }
    }

    /// Whether the consumer is still connected.
    pub fn is_active(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// Serves `shadow` alone to one client on the other end of `stream`, which
/// calls [`super::RemoteMapping::receive`] (or speaks protocol version 4
/// itself: every path it OPENs names this shadow). The client's HELLO is
/// taken here (bounded by [`PEER_TIMEOUT`]); the rest of the session runs on
/// a thread until the client hangs up. A lazy shadow is mapped lazily by a
/// client with a userfaultfd; an eager or materialized one is sent as a
/// sealed descriptor; a lazy one to a client without a userfaultfd is
/// refused (`E_NO_UFFD`: materialize it first).
pub fn serve(shadow: &Shadow, stream: UnixStream) -> Result<Served> {
    let held = match &shadow.kind {
        Kind::Lazy(l) if !shadow.is_materialized() => Held::Shadow(Shadow {
            kind: Kind::Lazy(l.clone()),
            open_time: shadow.open_time,
        }),
        _ => Held::Sealed {
            fd: shadow.reopen_readonly()?,
            meta: shadow.meta().clone(),
            name: shadow.name().to_string(),
        },
    };
    let m = shadow.meta();
    let entry = Arc::new(Entry {
        id: 1,
        key: (0, m.device, m.inode, m.size, m.mtime.sec, m.mtime.nsec),
        held,
        users: AtomicUsize::new(0),
        attached: AtomicUsize::new(0),
        last_used: Mutex::new(Instant::now()),
    });
    let server = Server::build(None, TreeImpl::Single(entry), ServerOptions::default());
    let inner = server.inner;
    let peer = peer_of(&stream, 1);
    let by = Instant::now() + inner.timeout();
    let conn = match inner.try_handshake(&stream, peer, by)? {
        Hello::Client(uffd, activity, version) => Conn::new(peer, stream, uffd, activity, version),
        Hello::Status => {
            inner.answer_status(&stream, by)?;
            return Ok(Served { thread: None });
        }
    };
    let thread = std::thread::Builder::new()
        .name("shadowfd-remote".into())
        .spawn(move || inner.run(conn))
        .map_err(|e| Error::sys("spawn a remote-consumer thread", e))?;
    Ok(Served {
        thread: Some(thread),
    })
}
