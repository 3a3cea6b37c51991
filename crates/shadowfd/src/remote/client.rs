//! The client side: a connection to a shadowfd server, files opened
//! through it, and mappings of them.

use super::wire::{self, Frame, RecvError};
use crate::error::{Connection, Error, Result};
use crate::sys::mmap::RawMap;
use crate::sys::uffd_abi::uffd_msg;
use crate::sys::{Advice, Uffd};
use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

mod file;
mod mapping;
mod watch;

use file::FileInner;
pub use file::RemoteFile;
pub use mapping::{RemoteMapOptions, RemoteMapping};
use watch::Watch;

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
