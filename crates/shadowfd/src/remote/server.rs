//! The server side: sessions with client processes (protocol version 4,
//! docs/protocol.md), the table of shared shadows, and the one-shadow
//! [`serve`] kept for embedders.

use super::tree::{self, Refusal, RootFile};
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
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// At most this many clients at once; more are refused with `E_LIMIT`.
    pub max_clients: usize,
    /// At most this many open handles per client.
    pub max_handles: usize,
    /// At most this many lazy ranges attached per client ([`MAX_RANGES`]);
    /// an ATTACH or a splitting UNMAP beyond it is refused with `E_LIMIT`.
    pub max_ranges: usize,
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
            max_handles: 4096,
            max_ranges: MAX_RANGES,
            source_hook: None,
            log: None,
        }
    }
}

/// What a server serves.
#[derive(Debug, Clone)]
pub enum Tree {
    /// Regular files beneath this host directory.
    Root(PathBuf),
    /// Regular files inside this ext2/3/4 image.
    Image(PathBuf),
}

enum TreeImpl {
    Root(Arc<OwnedFd>),
    Image(PathBuf),
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
    last_used: Mutex<Instant>,
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
}

#[derive(Default)]
struct State {
    clients: BTreeMap<u64, ClientInfo>,
    entries: HashMap<Key, Arc<Entry>>,
}

struct Inner {
    engine: Option<Engine>,
    tree: TreeImpl,
    opts: ServerOptions,
    state: Mutex<State>,
    open_lock: Mutex<()>,
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
        let tree = match tree {
            Tree::Root(p) => TreeImpl::Root(tree::open_root(&p)?),
            Tree::Image(p) => {
                std::fs::metadata(&p).map_err(|e| Error::Open {
                    path: p.clone(),
                    source: e,
                })?;
                TreeImpl::Image(p)
            }
        };
        Ok(Server::build(Some(engine), tree, opts))
    }

    fn build(engine: Option<Engine>, tree: TreeImpl, opts: ServerOptions) -> Server {
        Server {
            inner: Arc::new(Inner {
                engine,
                tree,
                opts,
                state: Mutex::new(State::default()),
                open_lock: Mutex::new(()),
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
        std::thread::Builder::new()
            .name(format!("shadowfd-client-{id}"))
            .spawn(move || {
                if let Some(conn) = inner.handshake(stream, peer) {
                    inner.run(conn);
                }
            })
            .map_err(|e| Error::sys("spawn a client thread", e))?;
        Ok(())
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
}

/// One handle a client holds.
struct Handle {
    entry: Arc<Entry>,
    /// Where its lazy ranges start (each a key of [`Conn::ranges`]).
    starts: BTreeSet<u64>,
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
    /// The client's `/proc/PID/maps`, for faults in ranges it grew.
    maps: Option<crate::sys::maps::Maps>,
}

impl Conn {
    fn new(peer: Peer, stream: UnixStream, uffd: Option<Arc<Uffd>>) -> Conn {
        let maps = uffd
            .as_ref()
            .filter(|u| u.has_events())
            .and_then(|_| crate::sys::maps::Maps::open_pid(peer.pid as u32).ok());
        Conn {
            peer,
            stream,
            uffd,
            handles: BTreeMap::new(),
            ranges: BTreeMap::new(),
            next_handle: 1,
            children: Vec::new(),
            maps,
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

    /// Lists a client that completed HELLO.
    fn add_client(&self, peer: Peer, uffd: bool) {
        let info = ClientInfo {
            pid: peer.pid,
            uid: peer.uid,
            since: Instant::now(),
            uffd,
            handles: 0,
            mappings: 0,
        };
        self.state.lock().clients.insert(peer.id, info);
    }

    /// HELLO and its reply. `None` if the peer was dropped (logged).
    fn handshake(self: &Arc<Self>, stream: UnixStream, peer: Peer) -> Option<Conn> {
        match self.try_handshake(&stream, peer) {
            Ok(uffd) => {
                self.add_client(peer, uffd.is_some());
                self.log(&format!(
                    "{peer}: connected ({})",
                    if uffd.is_some() {
                        "with a userfaultfd: lazy mappings"
                    } else {
                        "no userfaultfd: sealed descriptors only"
                    }
                ));
                Some(Conn::new(peer, stream, uffd))
            }
            Err(e) => {
                self.log(&format!("{peer}: dropped: {e}"));
                None
            }
        }
    }

    fn try_handshake(&self, stream: &UnixStream, peer: Peer) -> Result<Option<Arc<Uffd>>> {
        let t = self.timeout();
        let set = stream
            .set_read_timeout(Some(t))
            .and_then(|()| stream.set_write_timeout(Some(t)));
        set.map_err(|e| Error::sys("set the client socket timeouts", e))?;
        let protocol = |what: String| Error::Protocol { what };
        let full = self.state.lock().clients.len() >= self.opts.max_clients;
        let (hello, fd) = match wire::recv(stream) {
            Ok(x) => x,
            Err(RecvError::TimedOut) => {
                return Err(protocol(format!(
                    "{peer} sent nothing within the peer timeout of {t:?}; expected HELLO \
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
            let _ = wire::send(stream, &f, None);
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
        if full {
            return Err(send_err(
                hello.kind,
                wire::E_LIMIT,
                format!(
                    "the server has its maximum of {} clients; try again later",
                    self.opts.max_clients
                ),
            ));
        }
        let has = hello.b & wire::HELLO_HAS_UFFD != 0;
        let uffd = match (has, fd) {
            (true, Some(fd)) => {
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
            (false, _) => None,
        };
        let cap = self.engine.as_ref().map_or(0, |e| e.config().max_size);
        let reply = Frame::new(
            wire::HELLO | wire::REPLY,
            hello.a.min(wire::VERSION),
            u64::from(std::process::id()),
            cap,
            crate::page_size() as u64,
        );
        wire::send(stream, &reply, None)?;
        Ok(uffd)
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
            let mut fds = [sfd, ufd].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            let n = if ufd >= 0 { 2 } else { 1 };
            // Idle clients may stay connected as long as they like: a client
            // holding mappings may say nothing for hours. Forked children,
            // and answers deferred for a pending event, are looked at.
            let timeout = self.serve_spaces(conn);
            // SAFETY: `fds` is a live array of at least `n` pollfd structs.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
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
                self.client_events(conn, events);
                for f in &faults {
                    if !self.fault(conn, &u, f.address) {
                        return End::Error(
                            "its userfaultfd cannot poison a stray fault; dropped".into(),
                        );
                    }
                }
            }
            if fds[0].revents != 0 {
                let (frame, fd) = match wire::recv(&conn.stream) {
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
                drop(fd);
                match self.request(conn, frame) {
                    Ok(()) => {}
                    Err(e) => return End::Error(e),
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
        conn.handles.get(&h).ok_or_else(|| {
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
        *entry.last_used.lock() = Instant::now();
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
        let r = tree::relative(&f.payload).and_then(|rel| match &self.tree {
            TreeImpl::Root(dir) => tree::stat_root(dir, rel),
            TreeImpl::Image(img) => tree::stat_in_image(img, rel),
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
        });
        match r {
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

    /// LIST (since version 4): one page of a directory, from cursor `a`.
    fn list(&self, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let r = tree::relative(&f.payload).and_then(|rel| match &self.tree {
            TreeImpl::Root(dir) => tree::list_root(dir, rel, f.a),
            TreeImpl::Image(img) => tree::list_in_image(img, rel, f.a),
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
            TreeImpl::Root(dir) => {
                let (f, meta) = RootFile::open(dir, rel)?;
                (Arc::new(f), meta.clone(), (0, meta.device))
            }
            TreeImpl::Image(img) => {
                let (src, meta, (d, i, ino)) = tree::open_in_image(img, rel)?;
                let _ = ino;
                (src, meta, (d, i))
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
        let take = |e: &Arc<Entry>| {
            e.users.fetch_add(1, Ordering::Relaxed);
            e.clone()
        };
        if let Some(e) = self.state.lock().entries.get(&key) {
            return Ok(take(e));
        }
        // Evicted shadows are dropped here, not under `open_lock`: the last
        // drop of a lazy shadow waits for a fill of it still in flight.
        self.evict();
        let _one = self.open_lock.lock();
        if let Some(e) = self.state.lock().entries.get(&key) {
            return Ok(take(e));
        }
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
        let entry = Arc::new(Entry {
            id: self.next_entry.fetch_add(1, Ordering::Relaxed),
            key,
            held: Held::Shadow(shadow),
            users: AtomicUsize::new(1),
            last_used: Mutex::new(Instant::now()),
        });
        self.state.lock().entries.insert(key, entry.clone());
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
        match (lazy_shadow, &conn.uffd) {
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
                let (att, _) = wire::recv(&conn.stream).map_err(|e| {
                    format!(
                        "expected ATTACH within the peer timeout of {:?} after a lazy MAP: {e}",
                        self.timeout()
                    )
                })?;
                let whole = size.div_ceil(page) * page;
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
                if conn.ranges.len() >= self.opts.max_ranges {
                    // The client unmaps its range; the session goes on.
                    let msg = format!(
                        "ATTACH at {start:#x}: this connection has {} lazy ranges attached, its \
                         maximum of {}; UNMAP some first, or open another connection",
                        conn.ranges.len(),
                        self.opts.max_ranges
                    );
                    self.log(&format!("{}: ATTACH refused: {msg}", conn.peer));
                    let (r, _) = refuse(att.kind, wire::E_LIMIT, msg);
                    return self.send(conn, &r, None);
                }
                if let Err(msg) = attach_span(conn, start, len, offset, whole, page) {
                    // The client unmaps its range; the session goes on.
                    self.log(&format!("{}: ATTACH refused: {msg}", conn.peer));
                    let (r, _) = refuse(att.kind, wire::E_RANGE, msg);
                    return self.send(conn, &r, None);
                }
                let key = l.add_remote(uffd.clone(), start, len, offset);
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
        let Some(h) = conn.handles.get(&f.a) else {
            return refuse(
                f.kind,
                wire::E_BAD_HANDLE,
                format!("handle {} is not open on this connection", f.a),
            );
        };
        let lazy = h.entry.lazy().cloned();
        let page = crate::page_size() as u64;
        // c = 0: the whole range that starts at b (version 3). Since version
        // 4, c > 0: the part of [b, b+c) inside the handle's ranges.
        let (lo, hi) = if f.c == 0 {
            match conn.ranges.get(&f.b).filter(|r| r.handle == f.a) {
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
            .filter(|r| r.handle == f.a)
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
        if hit.iter().any(|r| r.start < lo && hi < r.end())
            && conn.ranges.len() >= self.opts.max_ranges
        {
            return refuse(
                f.kind,
                wire::E_LIMIT,
                format!(
                    "UNMAP of {:#x}..{:#x} would split a range in two, and this connection has \
                     {} lazy ranges attached, its maximum of {}; UNMAP the whole range \
                     (length 0) instead",
                    lo,
                    hi,
                    conn.ranges.len(),
                    self.opts.max_ranges
                ),
            );
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

    /// Publishes the connection's count of lazy ranges (STATS).
    fn note_mappings(&self, conn: &Conn) {
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.mappings = conn.ranges.len();
        }
    }

    fn close(&self, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
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
            c.mappings = conn.ranges.len();
        }
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
        h.entry.users.fetch_sub(1, Ordering::Relaxed);
        *h.entry.last_used.lock() = Instant::now();
    }

    /// Drops shadows no client holds, least recently used first, while the
    /// shadows' resident bytes are over 3/4 of the memory budget (so that
    /// fills for live clients find room), and beyond 1024 idle entries.
    fn evict(&self) {
        let Some(engine) = &self.engine else { return };
        let budget = engine.config().memory_budget;
        let high = budget / 4 * 3;
        let mut gone = Vec::new();
        {
            let mut st = self.state.lock();
            let mut idle: Vec<(Instant, Key, u64)> = st
                .entries
                .values()
                .filter(|e| e.users.load(Ordering::Relaxed) == 0)
                .map(|e| (*e.last_used.lock(), e.key, e.resident()))
                .collect();
            idle.sort_by_key(|x| x.0);
            let mut resident: u64 = st.entries.values().map(|e| e.resident()).sum();
            let mut n_idle = idle.len();
            for (_, key, r) in idle {
                if resident <= high && n_idle <= 1024 {
                    break;
                }
                if let Some(e) = st.entries.remove(&key) {
                    gone.push(e);
                }
                resident = resident.saturating_sub(r);
                n_idle -= 1;
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
            TreeImpl::Root(_) => "root",
            TreeImpl::Image(_) => "image",
            TreeImpl::Single(_) => "single",
        };
        format!(
            "{{\"version\":{},\"pid\":{},\"uptime_s\":{:.1},\"tree\":{},\"mode\":{},\"memory_budget\":{budget},\"max_size\":{max_size},\"resident_bytes\":{resident},\"peer_timeout_ms\":{},\"clients\":[{}],\"shadows\":[{}]}}",
            wire::VERSION,
            std::process::id(),
            self.started.elapsed().as_secs_f64(),
            json_str(tree),
            json_str(mode),
            self.opts.peer_timeout.as_millis(),
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
    let remote = e.lazy().map_or(0, |l| l.remote_consumers());
    format!(
        "{{\"id\":{},\"name\":{},\"size\":{},\"mode\":{},\"handles\":{},\"lazy_mappings\":{remote},\"resident_bytes\":{},\"faults\":{},\"chunks_filled\":{},\"bytes_filled\":{},\"readahead_chunks\":{},\"errors\":{},\"poisoned_pages\":{},\"budget_refusals\":{},\"fill_p50_us\":{},\"fill_p99_us\":{},\"source_changed\":{},\"last_error\":{}}}",
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
        last_used: Mutex::new(Instant::now()),
    });
    let server = Server::build(None, TreeImpl::Single(entry), ServerOptions::default());
    let inner = server.inner;
    let peer = peer_of(&stream, 1);
    let uffd = inner.try_handshake(&stream, peer)?;
    inner.add_client(peer, uffd.is_some());
    let conn = Conn::new(peer, stream, uffd);
    let thread = std::thread::Builder::new()
        .name("shadowfd-remote".into())
        .spawn(move || inner.run(conn))
        .map_err(|e| Error::sys("spawn a remote-consumer thread", e))?;
    Ok(Served {
        thread: Some(thread),
    })
}

/// Forked children a client may leave the server to serve at once; past
/// it, a new child's inherited ranges are poisoned (SIGBUS where unfilled)
/// and its userfaultfd closed.
pub const MAX_CHILDREN: usize = 64;

/// How often forked children are checked for being alive, in ms.
const CHILD_CHECK_MS: i32 = 1000;

/// A range a forked child of a client inherited: it holds its shadow's
/// entry (not a handle: the parent may close that).
struct ChildRange {
    entry: Arc<Entry>,
    offset: u64,
    key: u64,
}

/// The address space of a client's forked child (or of a child's child):
/// its copies of the lazy ranges, registered with the userfaultfd that the
/// `FORK` event handed over.
struct ChildSpace {
    uffd: Arc<Uffd>,
    ranges: Spans<ChildRange>,
}

impl Clone for ChildRange {
    fn clone(&self) -> Self {
        self.entry.users.fetch_add(1, Ordering::Relaxed);
        ChildRange {
            entry: self.entry.clone(),
            offset: self.offset,
            key: 0,
        }
    }
}

impl Drop for ChildRange {
    fn drop(&mut self) {
        if let Some(l) = self.entry.lazy() {
            l.remove_remote(self.key);
        }
        self.entry.users.fetch_sub(1, Ordering::Relaxed);
        *self.entry.last_used.lock() = Instant::now();
    }
}

impl ChildSpace {
    /// Registers the new pieces (key 0) of its table with their shadows.
    fn attach_new(&mut self) {
        let fresh: Vec<(u64, u64, u64)> = self
            .ranges
            .iter()
            .filter(|(_, s)| s.value.key == 0)
            .map(|(a, s)| (a, s.len, s.offset))
            .collect();
        for (a, len, offset) in fresh {
            self.ranges.insert_with(a, |r| {
                if let Some(l) = r.entry.lazy() {
                    r.key = l.add_remote(self.uffd.clone(), a, len, offset);
                }
            });
        }
    }

    /// Applies mapping events of its userfaultfd; returns forked children.
    fn apply(&mut self, events: Vec<Event>) -> Vec<OwnedFd> {
        let mut forks = Vec::new();
        for ev in events {
            match ev {
                Event::Unmap { start, end } => {
                    drop(self.ranges.cut(start, end));
                    self.attach_new();
                }
                Event::Remap { from, to, len } => {
                    drop(self.ranges.copy(from, to, len, Clone::clone));
                    self.attach_new();
                }
                Event::Remove => {}
                Event::Fork(fd) => forks.push(fd),
            }
        }
        forks
    }

    /// Serves one fault.
    fn fault(&self, address: u64) {
        let page = crate::page_size() as u64;
        let addr = address & !(page - 1);
        let found = self.ranges.find(addr).and_then(|(s, r)| {
            let l = r.value.entry.lazy()?;
            Some((l, r.offset + (addr - s), s + r.len - addr))
        });
        let Some((shadow, offset, limit)) = found else {
            if self.uffd.poison(addr, page).is_err() {
                let _ = self.uffd.wake(addr, page);
            }
            return;
        };
        let core = &shadow.service.core;
        let hit = Hit {
            uffd: &self.uffd,
            addr,
            offset,
            limit,
            internal: false,
        };
        if let Some(work) = shadow.on_fault(core, hit) {
            shadow.run(core, work);
        }
    }
}

impl Inner {
    /// A piece `lo..hi` of `r` as a new attached range of `conn` (a new
    /// consumer of its shadow through `uffd`).
    fn attach_piece(conn: &Conn, r: &Attached, lo: u64, hi: u64, at: u64) -> Attached {
        let offset = r.offset + (lo - r.start);
        let key = match (
            &conn.uffd,
            conn.handles.get(&r.handle).and_then(|h| h.entry.lazy()),
        ) {
            (Some(u), Some(l)) => l.add_remote(u.clone(), at, hi - lo, offset),
            _ => 0,
        };
        Attached {
            handle: r.handle,
            start: at,
            len: hi - lo,
            offset,
            key,
        }
    }

    /// Forgets `lo..hi` of the client's ranges (the kernel unmapped it):
    /// what sticks out stays attached.
    fn cut_client(conn: &mut Conn, lo: u64, hi: u64) {
        let hit: Vec<Attached> = conn
            .overlapping(lo, hi)
            .into_iter()
            .filter_map(|s| conn.ranges.get(&s).copied())
            .collect();
        for r in hit {
            let mut pieces = Vec::with_capacity(2);
            for (a, b) in [(r.start, lo.max(r.start)), (hi.min(r.end()), r.end())] {
                if a < b {
                    pieces.push(Self::attach_piece(conn, &r, a, b, a));
                }
            }
            if let Some(l) = conn.handles.get(&r.handle).and_then(|h| h.entry.lazy()) {
                l.remove_remote(r.key);
            }
            conn.remove_range(r.start);
            for p in pieces {
                conn.insert_range(p);
            }
        }
    }

    /// Applies mapping events read from the client's own userfaultfd.
    fn client_events(&self, conn: &mut Conn, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Unmap { start, end } => Self::cut_client(conn, start, end),
                Event::Remap { from, to, len } => {
                    let end = from.saturating_add(len);
                    let moved: Vec<Attached> = conn
                        .overlapping(from, end)
                        .into_iter()
                        .filter_map(|s| conn.ranges.get(&s).copied())
                        .map(|r| {
                            let (a, b) = (r.start.max(from), r.end().min(end));
                            Self::attach_piece(conn, &r, a, b, to + (a - from))
                        })
                        .collect();
                    Self::cut_client(conn, to, to.saturating_add(len));
                    for p in moved {
                        conn.insert_range(p);
                    }
                }
                Event::Remove => {}
                Event::Fork(fd) => {
                    let mut ranges = Spans::default();
                    for r in conn.ranges.values() {
                        if let Some(h) = conn.handles.get(&r.handle) {
                            h.entry.users.fetch_add(1, Ordering::Relaxed);
                            let c = ChildRange {
                                entry: h.entry.clone(),
                                offset: 0,
                                key: 0,
                            };
                            ranges.insert(r.start, r.len, r.offset, c);
                        }
                    }
                    let features = conn.uffd.as_ref().map_or(0, |u| u.features());
                    self.add_child(conn, fd, features, ranges);
                }
            }
        }
        self.note_mappings(conn);
    }

    /// Takes on a forked child's userfaultfd with its inherited ranges, or,
    /// past [`MAX_CHILDREN`], poisons those ranges and lets it go.
    fn add_child(&self, conn: &mut Conn, fd: OwnedFd, features: u64, ranges: Spans<ChildRange>) {
        let mut child = ChildSpace {
            uffd: Arc::new(Uffd::from_fd(fd, features)),
            ranges,
        };
        if conn.children.len() >= MAX_CHILDREN {
            for (s, r) in child.ranges.iter() {
                let _ = child.uffd.poison(s, r.len);
            }
            self.log(&format!(
                "{}: a forked child past the limit of {MAX_CHILDREN} served children; its \
                 inherited lazy ranges are poisoned (SIGBUS where not yet filled)",
                conn.peer
            ));
            return;
        }
        child.attach_new();
        conn.children.push(child);
    }

    /// Serves forked children with messages waiting, drops those that are
    /// gone, and wakes threads whose answers waited for an event. Returns
    /// the poll timeout for the session loop (ms; -1: none).
    fn serve_spaces(&self, conn: &mut Conn) -> i32 {
        let mut raw = vec![uffd_msg::default(); 32];
        let mut i = 0;
        while i < conn.children.len() {
            let (mut faults, mut events) = (Vec::new(), Vec::new());
            let c = &conn.children[i];
            if c.uffd.has_pending() && c.uffd.read_msgs(&mut raw, &mut faults, &mut events).is_ok()
            {
                let forks = conn.children[i].apply(events);
                for fd in forks {
                    let ranges = {
                        let mut t = Spans::default();
                        for (s, r) in conn.children[i].ranges.iter() {
                            t.insert(s, r.len, r.offset, r.value.clone());
                        }
                        t
                    };
                    let features = conn.children[i].uffd.features();
                    self.add_child(conn, fd, features, ranges);
                }
                for f in &faults {
                    conn.children[i].fault(f.address);
                }
            }
            i += 1;
        }
        conn.children
            .retain(|c| c.uffd.alive() && !c.ranges.is_empty());
        let mut deferred = false;
        for u in conn
            .uffd
            .iter()
            .chain(conn.children.iter().map(|c| &c.uffd))
        {
            if u.has_deferred() {
                // Woken now, the threads fault again once the event's sender
                // went on; a pending event makes their answer wait 1 ms more.
                u.flush_deferred();
                deferred = true;
            }
        }
        if deferred {
            1
        } else if conn.children.is_empty() {
            -1
        } else {
            CHILD_CHECK_MS.min(50)
        }
    }

    /// After the client went away: serves its forked children until the
    /// last one exits.
    fn serve_orphans(&self, conn: &mut Conn) {
        while !conn.children.is_empty() {
            let timeout = self.serve_spaces(conn);
            let mut fds: Vec<libc::pollfd> = conn
                .children
                .iter()
                .map(|c| libc::pollfd {
                    fd: c.uffd.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.max(1)) };
        }
    }

    /// A fault at `addr` outside the client's ranges may be in a range it
    /// grew with `mremap` (in place the kernel sends no event): if its
    /// `/proc/PID/maps` shows a shadow's memfd there, that part is attached
    /// at the offset the kernel shows. Returns whether it was.
    fn adopt_grown(&self, conn: &mut Conn, addr: u64) -> bool {
        let Some(vma) = conn.maps.as_ref().and_then(|m| m.query(addr)) else {
            return false;
        };
        let Some((&handle, _)) = conn.handles.iter().find(|(_, h)| {
            h.entry
                .lazy()
                .is_some_and(|l| l.memfd.inode().ok() == Some(vma.inode))
        }) else {
            return false;
        };
        let lo = conn
            .ranges
            .range(..addr)
            .next_back()
            .map_or(vma.start, |(_, r)| r.end().max(vma.start));
        let hi = conn
            .ranges
            .range(addr..)
            .next()
            .map_or(vma.end, |(&s, _)| s.min(vma.end));
        if !(lo <= addr && addr < hi) {
            return false;
        }
        let seed = Attached {
            handle,
            start: lo,
            len: hi - lo,
            offset: vma.offset + (lo - vma.start),
            key: 0,
        };
        let r = Self::attach_piece(conn, &seed, lo, hi, lo);
        conn.insert_range(r);
        true
    }
}
