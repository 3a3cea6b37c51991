//! The client side: a connection to a shadowfd server, files opened
//! through it, and mappings of them.

use super::wire::{self, Frame, RecvError};
use crate::error::{Connection, Error, Result};
use crate::shadow::{check_page_aligned, check_span};
use crate::sys::mmap::RawMap;
use crate::sys::uffd_abi::uffd_msg;
use crate::sys::{Advice, Uffd};
use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Make a userfaultfd and send it, for lazy mappings (true by default).
    /// Without one, or if it cannot be made here, every mapping is a sealed
    /// descriptor (the server's eager fallback, within its size cap).
    pub userfaultfd: bool,
    /// The bound on each reply (and on sending each request). It also
    /// bounds a fault the server leaves unread: once a fault has waited in
    /// this client's userfaultfd, unread, for [`STUCK_AFTER`] (or this
    /// timeout, if shorter), the watcher asks the server for its STATS; a
    /// server that does not answer within this timeout is treated as gone
    /// (see [`Client`]).
    pub timeout: Duration,
}

/// How long faults may stay unread in a client's userfaultfd, at every
/// look, before its watcher asks whether the server is still there.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);
/// How often the watcher looks while the client has lazy ranges.
const LOOK_EVERY: Duration = Duration::from_millis(100);

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            userfaultfd: true,
            timeout: Duration::from_secs(60),
        }
    }
}

fn protocol(what: impl Into<String>) -> Error {
    Error::Protocol { what: what.into() }
}

fn broken(what: impl Into<String>, why: Connection) -> Error {
    Error::Connection {
        what: what.into(),
        why,
    }
}

/// The text of a failed `connect` to `path`. "Permission denied" names
/// the socket's owner and mode, the likely cause.
fn connect_error(path: &Path, e: std::io::Error) -> Error {
    use std::os::unix::fs::MetadataExt;
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        match std::fs::metadata(path) {
            Ok(m) => {
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                format!(
                    "the socket belongs to uid {} gid {} with mode {:04o} (`shadowfd serve` \
                     makes it 0600), and this process runs as uid {me}; run as the server's \
                     user, or serve on a socket this user may write",
                    m.uid(),
                    m.gid(),
                    m.mode() & 0o7777
                )
            }
            Err(_) => "a directory on the way to the socket may not be searchable by this \
                       user"
                .to_string(),
        }
    } else {
        format!("is `shadowfd serve --socket {}` running?", path.display())
    };
    Error::Open {
        path: path.into(),
        source: std::io::Error::new(e.kind(), format!("{e} ({hint})")),
    }
}

/// Whether the seals of `fd`, a descriptor the server sent, make it safe
/// to map `need` bytes of: its size can neither shrink nor grow, its
/// contents cannot be written through new descriptors or mappings, and it
/// holds at least `need` bytes.
fn check_sealed(fd: &OwnedFd, need: u64, name: &str) -> Result<()> {
    let seals = crate::sys::memfd::seals_of(fd.as_fd())?;
    let size = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| Error::sys("duplicate the received descriptor", e))?,
    )
    .metadata()
    .map_err(|e| Error::sys("fstat the received descriptor", e))?
    .len();
    let frozen = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
    let write = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
    if seals & frozen != frozen || seals & write == 0 || size < need {
        return Err(protocol(format!(
            "the descriptor of the {name} reply is not a sealed shadow: seals {seals:#x} (it \
             needs F_SEAL_GROW, F_SEAL_SHRINK and F_SEAL_WRITE or F_SEAL_FUTURE_WRITE) and \
             {size} bytes (at least {need} needed); refused, nothing mapped"
        )));
    }
    Ok(())
}

/// The `i`th little-endian `u64` of a reply payload, 0 where the payload
/// is too short to hold it.
fn payload_word(p: &[u8], i: usize) -> u64 {
    p.get(i * 8..i * 8 + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Test-only (`failpoints` feature): whether the step `var` names fails
/// now. `var=N` fails the first N times in the process.
#[cfg(feature = "failpoints")]
fn failpoint(var: &str) -> bool {
    use std::collections::HashMap;
    static SEEN: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let Some(n) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) else {
        return false;
    };
    let mut seen = SEEN.lock();
    let c = seen
        .get_or_insert_with(HashMap::new)
        .entry(var.to_string())
        .or_insert(0);
    *c += 1;
    *c <= n
}

/// Lazy ranges registered with this client's userfaultfd: (start, len).
type Ranges = Arc<Mutex<Vec<(u64, u64)>>>;

/// The connection, shared by the client's calls and its watcher.
struct Conn {
    stream: UnixStream,
    /// One request and its reply at a time.
    io: Mutex<()>,
}

struct Inner {
    conn: Arc<Conn>,
    uffd: Option<Arc<Uffd>>,
    ranges: Ranges,
    server_gone: Arc<AtomicBool>,
    stop: Option<OwnedFd>,
    /// Tells the watcher a lazy range was added.
    kick: Option<OwnedFd>,
    watcher: Option<JoinHandle<()>>,
    server_pid: u64,
    eager_cap: u64,
    /// The protocol version the server chose (4 or 5).
    version: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            crate::sys::event::eventfd_signal(s.as_fd());
        }
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }
}

/// A connection to a shadowfd server (`shadowfd serve`, or
/// [`super::Server`] in another process), speaking protocol version 4
/// (docs/protocol.md).
///
/// If the server hangs up or dies, a thread of this client answers every
/// pending and later fault on the unfilled pages of its lazy mappings with
/// `SIGBUS` (`UFFDIO_POISON`), within milliseconds: a consumer never hangs
/// and never reads zeros. Pages already filled stay readable. A server that
/// is alive but stuck (stopped, or deadlocked) is treated the same way once
/// a fault has waited unread for [`STUCK_AFTER`] and the server has not
/// answered a STATS request within [`ClientOptions::timeout`]: the client
/// then hangs up itself.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the server's socket at `path` with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects to the server's socket at `path` with `opts`. A refused
    /// connection says why it is likely refused (for "Permission denied",
    /// the socket's owner and mode).
    pub fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        Client::from_stream(stream, opts)
    }

    /// Asks the server on `path` for its status (STATS of handle 0, as
    /// JSON) from a status connection (version 5, `HELLO_STATUS`): the
    /// server answers it from a slot of its own, even when it has all the
    /// clients it admits, and does not count it as a client. A version 4
    /// server answers it as an ordinary client.
    pub fn status_at(path: impl AsRef<Path>, timeout: Duration) -> Result<String> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| Error::sys("set the server socket timeouts", e))?;
        let hello = Frame::new(wire::HELLO, wire::VERSION, wire::HELLO_STATUS, 0, 0);
        wire::send(&stream, &hello, None)?;
        reply(&stream, wire::HELLO, "HELLO")?;
        wire::send(&stream, &Frame::new(wire::STATS, 0, 0, 0, 0), None)?;
        let (r, _) = reply(&stream, wire::STATS, "STATS")?;
        String::from_utf8(r.payload).map_err(|_| protocol("STATS reply is not UTF-8"))
    }

    /// Speaks to a server on a connected stream: sends HELLO (with a
    /// userfaultfd if asked and possible) and checks the reply.
    pub fn from_stream(stream: UnixStream, opts: ClientOptions) -> Result<Client> {
        stream
            .set_read_timeout(Some(opts.timeout))
            .and_then(|()| stream.set_write_timeout(Some(opts.timeout)))
            .map_err(|e| Error::sys("set the server socket timeouts", e))?;
        let uffd = if opts.userfaultfd {
            Uffd::open()
                .ok()
                .map(|(u, _)| u)
                .filter(|u| u.has_lazy_features())
                .map(Arc::new)
        } else {
            None
        };
        let hello = Frame::new(
            wire::HELLO,
            wire::VERSION,
            if uffd.is_some() {
                wire::HELLO_HAS_UFFD
            } else {
                0
            },
            uffd.as_ref().map_or(0, |u| u.features()),
            0,
        );
        wire::send(&stream, &hello, uffd.as_ref().map(|u| u.as_fd()))?;
        let (r, _) = reply(&stream, wire::HELLO, "HELLO")?;
        if !(4..=wire::VERSION).contains(&r.a) {
            return Err(protocol(format!(
                "the server chose protocol version {}; this client speaks versions 4 to {}",
                r.a,
                wire::VERSION
            )));
        }
        let ranges: Ranges = Arc::new(Mutex::new(Vec::new()));
        let server_gone = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Conn {
            stream,
            io: Mutex::new(()),
        });
        let (stop, kick, watcher) = match &uffd {
            Some(u) => {
                let stop = crate::sys::event::eventfd()
                    .map_err(|e| Error::sys("eventfd for the server watcher", e))?;
                let kick = crate::sys::event::eventfd()
                    .map_err(|e| Error::sys("eventfd for the server watcher", e))?;
                let kick2 = kick
                    .try_clone()
                    .map_err(|e| Error::sys("duplicate an eventfd", e))?;
                let (u, rg, gone) = (u.clone(), ranges.clone(), server_gone.clone());
                let stop2 = stop
                    .try_clone()
                    .map_err(|e| Error::sys("duplicate an eventfd", e))?;
                let w = Watch {
                    conn: conn.clone(),
                    stop: stop2,
                    kick: kick2,
                    uffd: u,
                    ranges: rg,
                    gone,
                    timeout: opts.timeout,
                };
                let t = std::thread::Builder::new()
                    .name("shadowfd-watch".into())
                    .spawn(move || w.run())
                    .map_err(|e| Error::sys("spawn the server watcher", e))?;
                (Some(stop), Some(kick), Some(t))
            }
            None => (None, None, None),
        };
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                uffd,
                ranges,
                server_gone,
                stop,
                kick,
                watcher,
                server_pid: r.b,
                eager_cap: r.c,
                version: r.a,
            }),
        })
    }

    /// Whether this client sent a userfaultfd (its mappings are lazy).
    pub fn has_userfaultfd(&self) -> bool {
        self.inner.uffd.is_some()
    }

    /// The server's process id, as it said.
    pub fn server_pid(&self) -> u64 {
        self.inner.server_pid
    }

    /// The server's eager cap: the largest file it hands out as a sealed
    /// descriptor to a client without a userfaultfd.
    pub fn eager_cap(&self) -> u64 {
        self.inner.eager_cap
    }

    /// Whether the server has hung up or died (known to clients with a
    /// userfaultfd; others find out at their next request).
    pub fn server_gone(&self) -> bool {
        self.inner.server_gone.load(Ordering::SeqCst)
    }

    fn call(&self, f: &Frame, name: &str, fd_expected: bool) -> Result<(Frame, Option<OwnedFd>)> {
        let _one = self.inner.conn.io.lock();
        wire::send(&self.inner.conn.stream, f, None)?;
        let (r, fd) = reply(&self.inner.conn.stream, f.kind, name)?;
        if fd_expected && fd.is_none() && r.b > 0 {
            return Err(protocol(format!("the {name} reply carried no descriptor")));
        }
        Ok((r, fd))
    }

    /// Opens `path` (inside the served tree; `big.bin` and `/big.bin` are
    /// the same file).
    pub fn open(&self, path: &str) -> Result<RemoteFile> {
        let f = Frame::new(wire::OPEN, 0, 0, 0, 0).with_payload(path.as_bytes().to_vec());
        let (r, _) = self.call(&f, &format!("OPEN {path:?}"), false)?;
        let word = |i| payload_word(&r.payload, i);
        Ok(RemoteFile {
            inner: Arc::new(FileInner {
                client: self.clone(),
                handle: r.a,
                path: path.to_string(),
                size: r.b,
                device: r.c,
                inode: r.d,
                mtime: (word(0) as i64, word(1) as i64),
                shadow_id: word(2),
                lazy: word(3) & 1 == 1,
                inline: None,
                nlink: None,
                opened: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Whether the server speaks SMALL (protocol version 6).
    pub fn has_small(&self) -> bool {
        self.inner.version >= 6
    }

    /// What each of `paths` is and, for each regular file of at most `cap`
    /// bytes (at most [`wire::SMALL_MAX_FILE`]), its bytes, in one request
    /// (protocol version 6, SMALL). Up to [`wire::SMALL_MAX_PATHS`] paths;
    /// the answers come in order and may be fewer than the paths (the
    /// reply is full: ask again for the rest). A file's bytes come as a
    /// [`RemoteFile`] that needs no handle until it is mapped.
    pub fn small(&self, paths: &[&str], cap: u64) -> Result<Vec<SmallAnswer>> {
        if !self.has_small() {
            return Err(protocol(format!(
                "the server chose protocol version {}; SMALL needs version 6",
                self.inner.version
            )));
        }
        if paths.is_empty() || paths.len() > wire::SMALL_MAX_PATHS {
            return Err(protocol(format!(
                "SMALL of {} paths; ask for 1 to {}",
                paths.len(),
                wire::SMALL_MAX_PATHS
            )));
        }
        if let Some(p) = paths.iter().find(|p| p.len() > wire::MAX_PATH) {
            return Err(protocol(format!(
                "a path of {} bytes; the limit is {} bytes",
                p.len(),
                wire::MAX_PATH
            )));
        }
        let f = Frame::new(wire::SMALL, cap, paths.len() as u64, 0, 0)
            .with_payload(wire::put_paths(paths));
        let (r, _) = self.call(&f, "SMALL", false)?;
        if r.a > paths.len() as u64 {
            return Err(protocol(format!(
                "the SMALL reply has {} records for {} paths",
                r.a,
                paths.len()
            )));
        }
        let records = wire::parse_small(&r.payload, r.a)
            .map_err(|e| protocol(format!("the SMALL reply is malformed: {e}")))?;
        let mut out = Vec::with_capacity(records.len());
        for (rec, path) in records.into_iter().zip(paths) {
            if rec.code != 0 {
                out.push(SmallAnswer {
                    info: Err(Error::Refused {
                        request: format!("SMALL {path:?}"),
                        code: rec.code,
                        message: String::from_utf8_lossy(&rec.data).into_owned(),
                    }),
                    file: None,
                });
                continue;
            }
            let info = PathInfo {
                kind: match rec.kind {
                    wire::KIND_FILE => PathKind::File,
                    wire::KIND_DIR => PathKind::Dir,
                    _ => PathKind::Other,
                },
                size: rec.size,
                device: rec.device,
                inode: rec.inode,
                mtime: (rec.mtime.0, rec.mtime.1 as i64),
                nlink: rec.nlink,
            };
            let file = rec.inline.then(|| RemoteFile {
                inner: Arc::new(FileInner {
                    client: self.clone(),
                    handle: 0,
                    path: path.to_string(),
                    size: rec.size,
                    device: rec.device,
                    inode: rec.inode,
                    mtime: info.mtime,
                    shadow_id: 0,
                    lazy: false,
                    inline: Some(rec.data),
                    nlink: Some(rec.nlink),
                    opened: std::sync::OnceLock::new(),
                }),
            });
            out.push(SmallAnswer {
                info: Ok(info),
                file,
            });
        }
        Ok(out)
    }

    /// What `path` is in the served tree (protocol version 4, STAT): a file,
    /// a directory or something else, with its size, identity and mtime.
    /// Symbolic links are followed inside the tree, as [`Client::open`]
    /// follows them; nothing is opened or shadowed.
    pub fn stat(&self, path: &str) -> Result<PathInfo> {
        let f = Frame::new(wire::STAT, 0, 0, 0, 0).with_payload(path.as_bytes().to_vec());
        let (r, _) = self.call(&f, &format!("STAT {path:?}"), false)?;
        let word = |i| payload_word(&r.payload, i);
        Ok(PathInfo {
            kind: match r.a {
                wire::KIND_FILE => PathKind::File,
                wire::KIND_DIR => PathKind::Dir,
                _ => PathKind::Other,
            },
            size: r.b,
            device: r.c,
            inode: r.d,
            mtime: (word(0) as i64, word(1) as i64),
            nlink: word(2),
        })
    }

    /// One page of the directory `path` (protocol version 4, LIST), from
    /// `cursor` (0 for the first page): the entries, the cursor of the next
    /// page, and whether this page is the last.
    pub fn list_page(&self, path: &str, cursor: u64) -> Result<(Vec<wire::DirEntry>, u64, bool)> {
        let f = Frame::new(wire::LIST, cursor, 0, 0, 0).with_payload(path.as_bytes().to_vec());
        let (r, _) = self.call(&f, &format!("LIST {path:?}"), false)?;
        let entries = wire::parse_entries(&r.payload, r.a)
            .map_err(|e| protocol(format!("the LIST reply for {path:?} is malformed: {e}")))?;
        Ok((entries, r.b, r.c == 1))
    }

    /// Every entry of the directory `path` in the served tree (protocol
    /// version 4, LIST, page after page), without `.` and `..`. Entries are
    /// regular files and directories; a symbolic link is listed as what it
    /// leads to inside the tree and left out if it leads nowhere or out of
    /// it, and sockets, FIFOs and devices are left out.
    pub fn list(&self, path: &str) -> Result<Vec<wire::DirEntry>> {
        let mut out = Vec::new();
        let mut cursor = 0;
        // A server that never says "last page" cannot keep us here forever.
        for _ in 0..(1u32 << 20) {
            let (mut e, next, end) = self.list_page(path, cursor)?;
            out.append(&mut e);
            if end {
                return Ok(out);
            }
            cursor = next;
        }
        Err(protocol(format!(
            "LIST {path:?}: the server sent over a million pages without a last one"
        )))
    }

    /// The server's status as JSON (docs/protocol.md, STATS).
    pub fn status_json(&self) -> Result<String> {
        let (r, _) = self.call(&Frame::new(wire::STATS, 0, 0, 0, 0), "STATS", false)?;
        String::from_utf8(r.payload).map_err(|_| protocol("STATS reply is not UTF-8"))
    }
}

/// What a path in the served tree is ([`Client::stat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    File,
    Dir,
    /// A socket, FIFO or device: nothing that can be opened or listed.
    Other,
}

/// One path's answer to [`Client::small`].
pub struct SmallAnswer {
    /// What STAT would answer for it, or the server's refusal.
    pub info: Result<PathInfo>,
    /// A regular file's bytes, when it is small enough and read whole.
    pub file: Option<RemoteFile>,
}

/// What [`Client::stat`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub kind: PathKind,
    /// Size in bytes (of a directory: its size in the source, as `stat`
    /// reports it there).
    pub size: u64,
    /// Device of the source (for an image: the image's identity), as the
    /// OPEN reply reports it.
    pub device: u64,
    /// Inode of the source (inside the image, for an image).
    pub inode: u64,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Link count in the source.
    pub nlink: u64,
}

/// Receives the reply to `kind`: an ERROR becomes an error naming the code
/// and the server's message. A reply that does not come within the client
/// timeout shuts the connection down: a late one would be taken for the
/// answer to the next request. The watcher then treats the server as gone.
fn reply(stream: &UnixStream, kind: u32, name: &str) -> Result<(Frame, Option<OwnedFd>)> {
    let (r, fd) = wire::recv(stream).map_err(|e| match e {
        RecvError::Closed => broken(
            format!("the server closed the connection instead of answering {name}"),
            Connection::Closed,
        ),
        RecvError::TimedOut => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            broken(
                format!(
                    "the server did not answer {name} within the client timeout; \
                     the connection is closed"
                ),
                Connection::TimedOut,
            )
        }
        RecvError::Legacy { .. } => protocol(format!(
            "the server speaks protocol version 2 or older and refused {name}; this client speaks version {}",
            wire::VERSION
        )),
        e => protocol(format!("reading the reply to {name}: {e}")),
    })?;
    if r.kind == wire::ERROR {
        return Err(Error::Refused {
            request: name.to_string(),
            code: r.a,
            message: String::from_utf8_lossy(&r.payload).into_owned(),
        });
    }
    if r.kind != kind | wire::REPLY {
        return Err(protocol(format!(
            "expected the reply to {name} (kind {:#x}), got kind {:#x}",
            kind | wire::REPLY,
            r.kind
        )));
    }
    Ok((r, fd))
}

/// What the watcher thread holds.
struct Watch {
    conn: Arc<Conn>,
    stop: OwnedFd,
    /// Signalled when a lazy range is added: start looking.
    kick: OwnedFd,
    uffd: Arc<Uffd>,
    ranges: Ranges,
    gone: Arc<AtomicBool>,
    timeout: Duration,
}

/// Why [`Watch::wait`] returned.
enum Woke {
    Ready,
    Stop,
    Tick,
}

impl Watch {
    /// Waits for `fd` to show `events`, for the stop signal, or for `tick`
    /// or a kick.
    fn wait(&self, fd: i32, events: i16, tick: Option<Duration>) -> Woke {
        let ms = tick.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            let mut fds =
                [fd, self.stop.as_raw_fd(), self.kick.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            fds[0].events = events;
            // SAFETY: `fds` is a live array of three pollfd structs.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
            if r < 0 {
                continue;
            }
            if fds[1].revents != 0 {
                return Woke::Stop;
            }
            if fds[0].revents != 0 {
                return Woke::Ready;
            }
            if fds[2].revents != 0 {
                crate::sys::event::eventfd_drain(self.kick.as_fd());
            }
            return Woke::Tick;
        }
    }

    /// Whether the server answers a STATS request within the timeout;
    /// `None` while another request holds the connection (each of its
    /// replies is bounded by the timeout: look again later). Without an
    /// answer the connection is shut down before the lock is let go, so no
    /// later request can take the late reply for its own.
    fn server_answers(&self) -> Option<bool> {
        let _one = self.conn.io.try_lock_for(LOOK_EVERY)?;
        let f = Frame::new(wire::STATS, 0, 0, 0, 0);
        let ok = wire::send(&self.conn.stream, &f, None).is_ok()
            && reply(&self.conn.stream, wire::STATS, "STATS").is_ok();
        if !ok {
            let _ = self.conn.stream.shutdown(std::net::Shutdown::Both);
        }
        Some(ok)
    }

    /// Watches the connection; once the server is gone (or stuck, see
    /// [`Client`]), poisons what is unfilled in every lazy range and
    /// answers every later fault the same way.
    fn run(self) {
        let sock = self.conn.stream.as_raw_fd();
        let suspect = STUCK_AFTER.min(self.timeout);
        // Since when faults have been waiting unread at every look.
        let mut unread_since: Option<std::time::Instant> = None;
        loop {
            let tick = (!self.ranges.lock().is_empty()).then_some(LOOK_EVERY);
            match self.wait(sock, libc::POLLRDHUP, tick) {
                Woke::Stop => return,
                Woke::Ready => break,
                Woke::Tick => {}
            }
            if !self.uffd.has_pending() {
                unread_since = None;
                continue;
            }
            let since = *unread_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < suspect {
                continue;
            }
            match self.server_answers() {
                None => {}
                Some(true) => unread_since = None,
                // Stuck: the connection is shut down, so that the server
                // forgets this client if it ever runs again, and every
                // later call fails at once.
                Some(false) => break,
            }
        }
        self.gone.store(true, Ordering::SeqCst);
        {
            let r = self.ranges.lock();
            for &(start, len) in r.iter() {
                // Pages mapped already are skipped (EEXIST); every other page
                // gets a poison marker and its waiters are woken.
                let _ = self.uffd.poison(start, len);
            }
        }
        let page = crate::page_size() as u64;
        let mut raw = vec![uffd_msg::default(); 32];
        let mut faults = Vec::new();
        let ufd = self.uffd.as_fd().as_raw_fd();
        loop {
            match self.wait(ufd, libc::POLLIN, None) {
                Woke::Stop => return,
                Woke::Tick => continue,
                Woke::Ready => {}
            }
            faults.clear();
            let mut events = Vec::new();
            if self
                .uffd
                .read_msgs(&mut raw, &mut faults, &mut events)
                .is_err()
            {
                continue;
            }
            let _r = self.ranges.lock();
            for ev in events {
                if let crate::sys::Event::Fork(fd) = ev {
                    // A child forked after the server went: its copies get
                    // the same poison before its userfaultfd goes.
                    let child = Uffd::from_fd(fd, self.uffd.features());
                    for &(start, len) in _r.iter() {
                        let _ = child.poison(start, len);
                    }
                }
            }
            for f in &faults {
                let addr = f.address & !(page - 1);
                if self.uffd.poison(addr, page).is_err() {
                    let _ = self.uffd.wake(addr, page);
                }
            }
        }
    }
}

struct FileInner {
    client: Client,
    handle: u64,
    path: String,
    size: u64,
    device: u64,
    inode: u64,
    mtime: (i64, i64),
    shadow_id: u64,
    lazy: bool,
    /// A file read whole by SMALL (handle 0, no shadow): its bytes.
    inline: Option<Vec<u8>>,
    /// The link count, when SMALL said it (OPEN's reply has none).
    nlink: Option<u64>,
    /// For an inline file: the same path opened the ordinary way, at the
    /// first need of a handle (mapping it, STATS).
    opened: std::sync::OnceLock<RemoteFile>,
}

impl Drop for FileInner {
    fn drop(&mut self) {
        if self.inline.is_none() && !self.client.server_gone() {
            let f = Frame::new(wire::CLOSE, self.handle, 0, 0, 0);
            let _ = self.client.call(&f, "CLOSE", false);
        }
    }
}

/// A file opened on a server (a handle); closed when the last clone and
/// the last mapping of it are dropped.
#[derive(Clone)]
pub struct RemoteFile {
    inner: Arc<FileInner>,
}

impl RemoteFile {
    /// Size in bytes (the source's size when the shadow was made).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The path it was opened by.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// The handle number on the connection (0 for a file read whole by
    /// [`Client::small`], which has none until it is mapped).
    pub fn handle(&self) -> u64 {
        self.inner.handle
    }

    /// The link count, if the server said it ([`Client::small`] does;
    /// OPEN does not).
    pub fn nlink(&self) -> Option<u64> {
        self.inner.nlink
    }

    /// The file's bytes, if [`Client::small`] read it whole.
    pub fn inline_bytes(&self) -> Option<&[u8]> {
        self.inner.inline.as_deref()
    }

    /// The file with a handle: itself, or for an inline file the same path
    /// opened the ordinary way (once). That one is what the server serves
    /// now: if the file changed since SMALL read it (only possible when
    /// the tree is not immutable), its size and bytes are the new ones.
    fn with_handle(&self) -> Result<RemoteFile> {
        if self.inner.inline.is_none() {
            return Ok(self.clone());
        }
        if let Some(f) = self.inner.opened.get() {
            return Ok(f.clone());
        }
        let f = self.inner.client.open(&self.inner.path)?;
        Ok(self.inner.opened.get_or_init(|| f).clone())
    }

    /// The source's identity: (device, inode, mtime seconds, mtime ns).
    pub fn identity(&self) -> (u64, u64, i64, i64) {
        let i = &self.inner;
        (i.device, i.inode, i.mtime.0, i.mtime.1)
    }

    /// The server's id of the shared shadow: clients that get the same id
    /// share one shadow (and one read of the source per chunk).
    pub fn shadow_id(&self) -> u64 {
        self.inner.shadow_id
    }

    /// Whether the server's shadow is lazy.
    pub fn is_lazy_shadow(&self) -> bool {
        self.inner.lazy
    }

    /// Reads up to `buf.len()` bytes at `offset` through FILL (no mapping):
    /// the server fills the range and sends the bytes, 1 MiB per request.
    /// Short only at the end of the file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if let Some(b) = &self.inner.inline {
            let from = offset.min(b.len() as u64) as usize;
            let n = buf.len().min(b.len() - from);
            buf[..n].copy_from_slice(&b[from..from + n]);
            return Ok(n);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            if at >= self.inner.size {
                break;
            }
            let want = ((buf.len() - done) as u64).min(wire::MAX_FILL);
            let f = Frame::new(wire::FILL, self.inner.handle, at, want, 0);
            let (r, _) = self
                .inner
                .client
                .call(&f, &format!("FILL at {at}"), false)?;
            let n = r.payload.len().min(buf.len() - done);
            if n == 0 {
                break;
            }
            buf[done..done + n].copy_from_slice(&r.payload[..n]);
            done += n;
        }
        Ok(done)
    }

    /// This shadow's counters as JSON (docs/protocol.md, STATS).
    pub fn stats_json(&self) -> Result<String> {
        let this = self.with_handle()?;
        let f = Frame::new(wire::STATS, this.inner.handle, 0, 0, 0);
        let (r, _) = this.inner.client.call(&f, "STATS", false)?;
        String::from_utf8(r.payload).map_err(|_| protocol("STATS reply is not UTF-8"))
    }

    /// Maps the whole file read-only (`MAP_PRIVATE`): lazily through this
    /// client's userfaultfd if it has one, else as a sealed descriptor.
    pub fn map(&self) -> Result<RemoteMapping> {
        self.map_options().map()
    }

    /// Options for mapping part of the file:
    /// `file.map_options().offset(o).len(n).map()`, or at an address the
    /// caller reserved with [`RemoteMapOptions::map_fixed`]. A part is
    /// attached with its file offset (protocol version 4).
    pub fn map_options(&self) -> RemoteMapOptions<'_> {
        RemoteMapOptions {
            file: self,
            offset: 0,
            len: None,
        }
    }
}

/// Options for mapping (part of) a [`RemoteFile`], in the manner of
/// [`crate::MapOptions`]: `offset` must be a multiple of the page size, and
/// `offset + len` at most the file's size (`len` defaults to the rest of
/// the file). The mapping covers `len` rounded up to a page.
#[derive(Clone)]
#[must_use]
pub struct RemoteMapOptions<'a> {
    file: &'a RemoteFile,
    offset: u64,
    len: Option<u64>,
}

impl RemoteMapOptions<'_> {
    /// Offset in the file of the mapping's first byte (page-aligned).
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// Length in bytes (default: from `offset` to the end of the file).
    pub fn len(mut self, len: u64) -> Self {
        self.len = Some(len);
        self
    }

    /// Maps at an address the kernel picks.
    pub fn map(self) -> Result<RemoteMapping> {
        // SAFETY: no fixed address: the kernel picks a fresh range.
        unsafe { self.map_at(None) }
    }

    /// Maps at exactly `addr` (`MAP_FIXED` semantics), replacing the
    /// caller's reservation there. When the [`RemoteMapping`] is dropped
    /// (and on an error) the range is an inaccessible `PROT_NONE` anonymous
    /// reservation again; releasing it stays the caller's job.
    ///
    /// # Safety
    /// `addr` must be page-aligned, and `addr..addr+len` (page-rounded) must
    /// be address space the caller owns (reserved, e.g. with
    /// `mmap(PROT_NONE)`), that no Rust reference points into and that no
    /// other thread touches until this returns.
    pub unsafe fn map_fixed(self, addr: NonNull<u8>) -> Result<RemoteMapping> {
        check_page_aligned("fixed mapping address", addr.as_ptr() as u64)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.map_at(Some(addr.as_ptr())) }
    }

    /// # Safety
    /// As [`RemoteMapOptions::map_fixed`] when `at` is given.
    unsafe fn map_at(self, at: Option<*mut u8>) -> Result<RemoteMapping> {
        if self.file.inner.inline.is_some() {
            let real = self.file.with_handle()?;
            let o = RemoteMapOptions {
                file: &real,
                offset: self.offset,
                len: self.len,
            };
            // SAFETY: forwarded from the caller.
            return unsafe { o.map_at(at) };
        }
        let this = self.file;
        let size = this.inner.size;
        let offset = self.offset;
        let len = self.len.unwrap_or(size.saturating_sub(offset));
        check_span(size, offset, len)?;
        let page = crate::page_size() as u64;
        if len == 0 {
            return Ok(RemoteMapping::nothing(this, offset));
        }
        let maplen = usize::try_from(len.div_ceil(page) * page)
            .map_err(|_| protocol("the mapping length does not fit"))?;
        // A mapping that fails after it was made is dropped only once the
        // io lock is let go: its drop may send UNMAP through that lock.
        let mut doomed = None;
        let r = {
            let _one = this.inner.client.inner.conn.io.lock();
            // SAFETY: forwarded from the caller.
            unsafe { self.map_locked(at, len, maplen, &mut doomed) }
        };
        drop(doomed);
        r
    }

    /// MAP, mmap, and for a lazy mapping register and ATTACH, with the
    /// connection's io lock held. A mapping made and then failed is left in
    /// `doomed` for the caller to drop after the lock.
    ///
    /// # Safety
    /// As [`RemoteMapOptions::map_fixed`] when `at` is given.
    unsafe fn map_locked(
        &self,
        at: Option<*mut u8>,
        len: u64,
        maplen: usize,
        doomed: &mut Option<RemoteMapping>,
    ) -> Result<RemoteMapping> {
        let this = self.file;
        let offset = self.offset;
        let client = &this.inner.client;
        let ci = &client.inner;
        let mode = if ci.uffd.is_some() {
            wire::MAP_LAZY
        } else {
            wire::MAP_SEALED
        };
        let name = format!("MAP of {:?}", this.inner.path);
        wire::send(
            &ci.conn.stream,
            &Frame::new(wire::MAP, this.inner.handle, mode, 0, 0),
            None,
        )?;
        let (r, fd) = reply(&ci.conn.stream, wire::MAP, &name)?;
        if r.b == 0 {
            return Ok(RemoteMapping::nothing(this, offset));
        }
        let lazy = r.c == wire::MAP_LAZY;
        // Before ATTACH, a lazy MAP that fails here is abandoned (version
        // 5), so that the session goes on.
        let abandon = |e: Error| -> Error {
            if lazy {
                let f = Frame::new(wire::ATTACH, this.inner.handle, 0, 0, 0);
                let ok = wire::send(&ci.conn.stream, &f, None)
                    .and_then(|()| reply(&ci.conn.stream, wire::ATTACH, "ATTACH (abandon)"));
                if ok.is_err() || ci.version < 5 {
                    // A version 4 server cannot take it back: the session
                    // is over either way; say so now.
                    let _ = ci.conn.stream.shutdown(std::net::Shutdown::Both);
                }
            }
            e
        };
        let memfd = match fd {
            Some(fd) => fd,
            None => {
                return Err(abandon(protocol(format!(
                    "the {name} reply carried no descriptor"
                ))));
            }
        };
        check_sealed(&memfd, offset + len, &name).map_err(abandon)?;
        let e = |e| Error::sys("mmap the received shadow", e);
        let prot = if lazy {
            libc::PROT_NONE
        } else {
            libc::PROT_READ
        };
        let map = match at {
            // SAFETY: the caller owns the fixed range (map_fixed's contract).
            Some(a) => unsafe {
                RawMap::map(
                    Some(a),
                    memfd.as_fd(),
                    (offset, maplen),
                    prot,
                    libc::MAP_PRIVATE,
                )
            },
            None => RawMap::new(memfd.as_fd(), offset, maplen, prot, libc::MAP_PRIVATE),
        }
        .map_err(|x| abandon(e(x)))?;
        let ino = {
            use std::os::unix::fs::MetadataExt;
            std::fs::File::from(memfd).metadata().map_or(0, |m| m.ino())
        };
        // Not attached yet: dropped without UNMAP.
        let mut mapping = RemoteMapping {
            map: Some(map),
            ino,
            len: len as usize,
            offset,
            lazy: false,
            file: this.clone(),
        };
        if !lazy {
            return Ok(mapping);
        }
        let map = mapping.map.as_ref().expect("mapped");
        let (addr, reg_len) = (map.addr(), maplen as u64);
        let registered = (|| {
            let uffd = ci.uffd.as_ref().ok_or_else(|| {
                protocol("the server sent a lazy mapping to a client without a userfaultfd")
            })?;
            // Kept out of fork children: a child's copy would be served by
            // the server alone (EVENT_FORK), and read zeros if the server
            // died first. A child maps again on a connection of its own
            // (`shadowfd run`'s shim does); a range made MADV_DOFORK again
            // by its user is still served in the child while the server
            // lives (docs/remote.md).
            map.advise(Advice::DontFork)
                .map_err(|e| Error::sys("madvise(MADV_DONTFORK)", e))?;
            #[cfg(feature = "failpoints")]
            if failpoint("SHADOWFD_FAILPOINT_REMOTE_REGISTER") {
                return Err(Error::sys(
                    "UFFDIO_REGISTER of the remote mapping (failpoint)",
                    std::io::Error::from_raw_os_error(libc::ENOMEM),
                ));
            }
            uffd.register(addr, reg_len)
                .map_err(|e| Error::sys("UFFDIO_REGISTER of the remote mapping", e))
        })();
        if let Err(e) = registered {
            *doomed = Some(mapping);
            return Err(abandon(e));
        }
        ci.ranges.lock().push((addr, reg_len));
        if let Some(k) = &ci.kick {
            crate::sys::event::eventfd_signal(k.as_fd());
        }
        let attached = wire::send(
            &ci.conn.stream,
            &Frame::new(wire::ATTACH, this.inner.handle, addr, reg_len, offset),
            None,
        )
        .and_then(|()| reply(&ci.conn.stream, wire::ATTACH, "ATTACH"));
        if let Err(e) = attached {
            ci.ranges.lock().retain(|r| r.0 != addr);
            *doomed = Some(mapping);
            return Err(e);
        }
        mapping.lazy = true;
        let map = mapping.map.as_ref().expect("mapped");
        #[cfg(feature = "failpoints")]
        let protected = if failpoint("SHADOWFD_FAILPOINT_REMOTE_PROTECT") {
            Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            // SAFETY: nothing refers into the mapping yet; every fault on it
            // is now served (or poisoned if the server goes away).
            unsafe { map.protect(libc::PROT_READ) }
        };
        #[cfg(not(feature = "failpoints"))]
        // SAFETY: nothing refers into the mapping yet; every fault on it is
        // now served (or poisoned if the server goes away).
        let protected = unsafe { map.protect(libc::PROT_READ) };
        if let Err(e) = protected {
            // Attached: its drop (after the io lock) sends UNMAP.
            *doomed = Some(mapping);
            return Err(Error::sys("mprotect the remote mapping readable", e));
        }
        Ok(mapping)
    }
}

/// A read-only mapping of a file served by another process
/// (`Deref<Target = [u8]>`).
///
/// A lazy one is registered with the client's userfaultfd and filled by the
/// server on first touch. Touching a page the source could not provide
/// raises `SIGBUS`; so does touching an unfilled page once the server has
/// gone away (never zeros, never a hang).
pub struct RemoteMapping {
    map: Option<RawMap>,
    /// Inode of the memfd it maps: on drop, only what the kernel still
    /// shows of it at the offsets it had is unmapped.
    ino: u64,
    /// Bytes shown (the mapping covers them rounded up to a page).
    len: usize,
    /// Offset in the file of the first byte.
    offset: u64,
    lazy: bool,
    file: RemoteFile,
}

impl Drop for RemoteMapping {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        let client = &self.file.inner.client;
        let addr = map.addr();
        if self.lazy && !client.server_gone() {
            // The server stops serving the range (poisoning what is
            // unfilled) before it is unmapped: the address may be reused.
            let f = Frame::new(wire::UNMAP, self.file.inner.handle, addr, 0, 0);
            let _ = client.call(&f, "UNMAP", false);
        }
        if self.lazy {
            client.inner.ranges.lock().retain(|r| r.0 != addr);
        }
        // Unmapped without any lock held: with UNMAP events the munmap waits
        // until the server (or, once it is gone, the watcher, which takes
        // that lock) has read the event. Only what is still this mapping's:
        // a part its user moved or unmapped may hold something else now.
        let parts = crate::sys::maps::Maps::open_self()
            .filter(crate::sys::maps::Maps::works)
            .map(|m| {
                let end = addr + map.len() as u64;
                m.showing(addr, end, self.ino, self.offset)
            });
        match parts {
            Some(p) if !(p.len() == 1 && p[0] == (addr, map.len() as u64)) => map.drop_parts(&p),
            _ => drop(map),
        }
    }
}

impl RemoteMapping {
    /// A mapping of no bytes of `file` (an empty file or range).
    fn nothing(file: &RemoteFile, offset: u64) -> RemoteMapping {
        RemoteMapping {
            map: None,
            ino: 0,
            len: 0,
            offset,
            lazy: false,
            file: file.clone(),
        }
    }

    /// Receives the one shadow [`super::serve`] serves on the other end of
    /// `stream`, and maps it: lazily through a userfaultfd made here, or as
    /// a sealed descriptor for an eager or materialized shadow.
    pub fn receive(stream: UnixStream) -> Result<RemoteMapping> {
        let client = Client::from_stream(stream, ClientOptions::default())?;
        client.open("")?.map()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping is served lazily (faults go to the server).
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// Offset in the file of the mapping's first byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Address of the first byte (null for an empty mapping).
    pub fn as_ptr(&self) -> *const u8 {
        self.map
            .as_ref()
            .map_or(std::ptr::null(), |m| m.as_ptr().cast_const())
    }

    /// Bytes of address space the mapping covers: its length rounded up to
    /// a page.
    pub fn mapped_len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Takes the pages `at..at+len` out of the mapping (offsets in it, page
    /// multiples; `len` is rounded up to a page and cut at the mapping's
    /// end): the server stops serving them (protocol version 4, UNMAP with
    /// a length) and they become an inaccessible `PROT_NONE` anonymous
    /// reservation that the **caller** owns from then on (to unmap, or to
    /// map over). Returns what is left on either side, each a mapping of
    /// its own (`None` where nothing is left).
    ///
    /// # Safety
    /// No Rust reference points into `at..at+len`, and no other thread
    /// reads it while this runs.
    pub unsafe fn punch(
        mut self,
        at: usize,
        len: usize,
    ) -> Result<(Option<RemoteMapping>, Option<RemoteMapping>)> {
        let (total, z) = self.pages_of(at, len)?;
        let map = self.map.take().expect("a non-empty mapping");
        let base = map.addr();
        let client = self.file.inner.client.clone();
        if self.lazy && !client.server_gone() {
            let f = Frame::new(
                wire::UNMAP,
                self.file.inner.handle,
                base + at as u64,
                (z - at) as u64,
                0,
            );
            if let Err(e) = client.call(&f, "UNMAP of a part", false) {
                self.map = Some(map);
                return Err(e);
            }
        }
        // SAFETY: inside our own mapping; the caller vouches that nothing
        // borrows it.
        unsafe { crate::sys::mmap::reserve_fixed((base as usize + at) as *mut u8, z - at) }
            .map_err(|e| Error::sys("reserve the punched pages", e))?;
        let (left, right) = map.split(at, z);
        if self.lazy {
            let mut rg = client.inner.ranges.lock();
            rg.retain(|r| r.0 != base);
            for m in left.iter().chain(right.iter()) {
                rg.push((m.addr(), m.len() as u64));
            }
        }
        let piece = |m: RawMap, from: usize| {
            let len = if from + m.len() >= total {
                self.len - from
            } else {
                m.len()
            };
            RemoteMapping {
                map: Some(m),
                ino: self.ino,
                len,
                offset: self.offset + from as u64,
                lazy: self.lazy,
                file: self.file.clone(),
            }
        };
        let l = left.map(|m| piece(m, 0));
        let r = right.map(|m| piece(m, z));
        // `self` holds no mapping any more: its drop does nothing.
        Ok((l, r))
    }

    /// Follows its user's `mremap` of the pages `at..at+len` (from the
    /// mapping's start; all of its pages from `at` when `at + len` reaches
    /// its end) to `to`, where they are `new_len` bytes now. The kernel has
    /// moved them already, and the server follows the move through the
    /// client's userfaultfd (`EVENT_REMAP`): nothing is unmapped or
    /// UNMAPped here. Returns what stays at the old place, left and right
    /// of the moved part, and the moved part itself, each a mapping of its
    /// own (released like any other).
    ///
    /// # Safety
    /// The kernel must have moved exactly those pages to `to..to+new_len`
    /// (a successful `mremap` returned `to`), and nothing else may own that
    /// range.
    #[allow(clippy::type_complexity)]
    pub unsafe fn moved(
        mut self,
        at: usize,
        len: usize,
        to: usize,
        new_len: usize,
    ) -> Result<(Option<RemoteMapping>, Option<RemoteMapping>, RemoteMapping)> {
        let page = crate::page_size();
        let (total, z) = self.pages_of(at, len)?;
        if to % page != 0 || new_len == 0 {
            return Err(Error::Range {
                offset: at as u64,
                len: new_len as u64,
                size: total as u64,
            });
        }
        let map = self.map.take().expect("a non-empty mapping");
        let base = map.addr();
        let new_len = new_len.div_ceil(page) * page;
        // SAFETY: the caller vouches that the kernel moved the pages there
        // and that nothing else owns them.
        let there = unsafe { RawMap::adopt(to as *mut u8, new_len, &map) }
            .map_err(|e| Error::sys("take the moved pages", e))?;
        let (left, right) = map.split(at, z);
        if self.lazy {
            let client = &self.file.inner.client;
            let mut rg = client.inner.ranges.lock();
            rg.retain(|r| r.0 != base);
            for m in left
                .iter()
                .chain(right.iter())
                .chain(std::iter::once(&there))
            {
                rg.push((m.addr(), m.len() as u64));
            }
        }
        let piece = |m: RawMap, from: usize, shown: usize| RemoteMapping {
            map: Some(m),
            ino: self.ino,
            len: shown,
            offset: self.offset + from as u64,
            lazy: self.lazy,
            file: self.file.clone(),
        };
        let shown = |from: usize, upto: usize| upto.min(self.len).saturating_sub(from);
        let l = left.map(|m| piece(m, 0, shown(0, at)));
        let r = right.map(|m| piece(m, z, shown(z, total)));
        // Bytes of the file the moved part shows: as many as it showed,
        // or, grown, up to the end of the file.
        let file_end = self.file.inner.size.saturating_sub(self.offset) as usize;
        let moved_shown = new_len.min(file_end.saturating_sub(at));
        let moved = piece(there, at, moved_shown);
        // `self` holds no mapping any more: its drop does nothing.
        Ok((l, r, moved))
    }

    /// Checks the pages `at..at+len` (from the mapping's start; `at`
    /// page-aligned, `len` > 0) against the mapping and returns its length
    /// and where those pages end (page-rounded, at most its length).
    fn pages_of(&self, at: usize, len: usize) -> Result<(usize, usize)> {
        let page = crate::page_size();
        let total = self.mapped_len();
        if at % page != 0 || len == 0 || at >= total {
            return Err(Error::Range {
                offset: at as u64,
                len: len as u64,
                size: total as u64,
            });
        }
        let z = at
            .saturating_add(len)
            .div_ceil(page)
            .saturating_mul(page)
            .min(total);
        Ok((total, z))
    }

    /// The file mapped.
    pub fn file(&self) -> &RemoteFile {
        &self.file
    }
}

impl std::ops::Deref for RemoteMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.map {
            // SAFETY: `len` bytes are mapped PROT_READ for the life of
            // `self`; the memfd is sealed against writes and lazy pages are
            // mapped only once filled (or poisoned: SIGBUS, never a read).
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr(), self.len) },
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watcher over one end of a socket pair, with no lazy range.
    fn watcher() -> Option<(UnixStream, OwnedFd, OwnedFd, JoinHandle<()>)> {
        let (uffd, _) = Uffd::open().ok()?;
        let (ours, peer) = UnixStream::pair().unwrap();
        let stop = crate::sys::event::eventfd().unwrap();
        let kick = crate::sys::event::eventfd().unwrap();
        let w = Watch {
            conn: Arc::new(Conn {
                stream: ours,
                io: Mutex::new(()),
            }),
            stop: stop.try_clone().unwrap(),
            kick: kick.try_clone().unwrap(),
            uffd: Arc::new(uffd),
            ranges: Arc::new(Mutex::new(Vec::new())),
            gone: Arc::new(AtomicBool::new(false)),
            timeout: Duration::from_secs(5),
        };
        Some((peer, stop, kick, std::thread::spawn(move || w.run())))
    }

    /// A server that answers too late: the request fails with the timeout,
    /// and the connection is closed, so the next request fails too instead
    /// of taking the late reply for its own answer.
    #[test]
    fn a_reply_that_times_out_closes_the_connection() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let (hello, _) = wire::recv(&theirs).expect("HELLO");
            assert_eq!(hello.kind, wire::HELLO);
            let r = Frame::new(wire::HELLO | wire::REPLY, wire::VERSION, 1, 0, 0);
            wire::send(&theirs, &r, None).unwrap();
            let (f, _) = wire::recv(&theirs).expect("STATS");
            assert_eq!(f.kind, wire::STATS);
            std::thread::sleep(Duration::from_millis(400));
            let mut late = Frame::new(wire::STATS | wire::REPLY, 0, 0, 0, 0);
            late.payload = b"{}".to_vec();
            let _ = wire::send(&theirs, &late, None);
            theirs
        });
        let opts = ClientOptions {
            userfaultfd: false,
            timeout: Duration::from_millis(200),
        };
        let c = Client::from_stream(ours, opts).expect("HELLO answered");
        let e = c.status_json().unwrap_err().to_string();
        assert!(e.contains("within the client timeout"), "{e}");
        let _theirs = server.join().unwrap();
        // The late reply has been sent by now.
        let again = c.status_json();
        assert!(again.is_err(), "took the late reply: {again:?}");
    }

    /// A descriptor without the seals of a shadow, or too short, is
    /// refused before anything maps it; a sealed one of the right size is
    /// taken.
    #[test]
    fn unsealed_descriptors_are_refused() {
        let m = crate::sys::memfd::Memfd::create("t", 8192).unwrap();
        let fd = || m.reopen_readonly().unwrap();
        let e = check_sealed(&fd(), 8192, "MAP").unwrap_err().to_string();
        assert!(e.contains("not a sealed shadow"), "{e}");
        m.add_seals(libc::F_SEAL_GROW | libc::F_SEAL_SHRINK)
            .unwrap();
        assert!(check_sealed(&fd(), 8192, "MAP").is_err(), "writable");
        m.add_seals(libc::F_SEAL_FUTURE_WRITE).unwrap();
        check_sealed(&fd(), 8192, "MAP").unwrap();
        assert!(check_sealed(&fd(), 8193, "MAP").is_err(), "too short");
    }

    /// A kick left unread when the server hangs up must not end the
    /// watcher: it has to answer every later fault with SIGBUS.
    #[test]
    fn a_pending_kick_at_the_hang_up_does_not_end_the_watcher() {
        let Some((peer, stop, kick, t)) = watcher() else {
            // SAFETY: no arguments.
            let euid = unsafe { libc::geteuid() };
            assert_ne!(euid, 0, "root can always open a userfaultfd");
            return;
        };
        crate::sys::event::eventfd_signal(kick.as_fd());
        drop(peer);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!t.is_finished(), "the watcher exited without being stopped");
        crate::sys::event::eventfd_signal(stop.as_fd());
        t.join().unwrap();
    }
}
