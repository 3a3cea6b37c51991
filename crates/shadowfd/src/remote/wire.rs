//! The framed protocol between a shadowfd server and its clients, version 6
//! (docs/protocol.md is the specification).
//!
//! A frame is a 48-byte header, then `len` bytes of payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SHADOWFD` |
//! | 8..12 | kind, u32 little-endian |
//! | 12..16 | payload length, u32 little-endian |
//! | 16..48 | `a`, `b`, `c`, `d`: u64 little-endian |
//!
//! A frame carries at most one descriptor (`SCM_RIGHTS`), sent with its
//! first byte.

use crate::error::{Error, Result};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 8] = *b"SHADOWFD";
pub const HEADER: usize = 48;
/// The largest payload either side accepts (a FILL reply of [`MAX_FILL`]).
pub const MAX_PAYLOAD: usize = MAX_FILL as usize + 4096;
/// The largest range one FILL may ask for.
pub const MAX_FILL: u64 = 1 << 20;
/// The longest path OPEN accepts, in bytes.
pub const MAX_PATH: usize = 4096;

/// The protocol version this crate speaks. Versions 1 and 2 (fixed 40-byte
/// frames, one shadow per connection) are answered with a version-2 ERROR
/// frame, code [`E_VERSION`].
pub const VERSION: u64 = 6;

/// The oldest protocol version this server still answers. A version 3
/// client never sends the requests or arguments version 4 added, so the
/// server treats its session as version 4 with those unused.
pub const MIN_VERSION: u64 = 3;

/// Set in a reply's kind: `OPEN | REPLY` answers `OPEN`.
pub const REPLY: u32 = 0x8000;
pub const HELLO: u32 = 0x301;
pub const OPEN: u32 = 0x302;
pub const MAP: u32 = 0x303;
pub const ATTACH: u32 = 0x304;
pub const FILL: u32 = 0x305;
pub const STATS: u32 = 0x306;
pub const UNMAP: u32 = 0x307;
pub const CLOSE: u32 = 0x308;
/// Since version 4: what a path is (kind, size, identity, mtime) without
/// opening a shadow.
pub const STAT: u32 = 0x309;
/// Since version 4: one page of a directory's entries.
pub const LIST: u32 = 0x30a;
/// Since version 6: what several paths are and, for small regular files,
/// their bytes, in one reply (no handle, no shadow).
pub const SMALL: u32 = 0x30b;
/// Server to client, instead of a reply: `a` = code, `b` = the kind refused;
/// the payload is a message for people (UTF-8).
pub const ERROR: u32 = 0x3ff;

/// HELLO flag: a userfaultfd travels with the frame.
pub const HELLO_HAS_UFFD: u64 = 1;
/// HELLO flag (version 5): a status query. The server answers it from a
/// slot of its own (it is not counted as a client and is never refused for
/// lack of room) and takes one request, STATS of handle 0, then hangs up.
pub const HELLO_STATUS: u64 = 2;
/// MAP modes (`b`).
pub const MAP_LAZY: u64 = 0;
pub const MAP_SEALED: u64 = 1;

// The error codes live in the leaf module `crate::codes`, which the error
// type uses too; re-exported here, where the protocol names them.
pub use crate::codes::{
    E_ACCESS, E_BAD_HANDLE, E_ESCAPE, E_IO, E_LIMIT, E_NO_UFFD, E_NOT_DIR, E_NOT_FOUND,
    E_NOT_REGULAR, E_PROTOCOL, E_RANGE, E_TOO_LARGE, E_VERSION, code_name,
};

/// Since version 4: the kinds STAT and LIST report.
pub const KIND_FILE: u64 = 1;
pub const KIND_DIR: u64 = 2;
/// A socket, FIFO or device (STAT only; LIST leaves them out).
pub const KIND_OTHER: u64 = 3;

/// SMALL (version 6): at most this many paths in one request.
pub const SMALL_MAX_PATHS: usize = 64;
/// SMALL: the largest file whose bytes a reply carries (a request's `a`
/// above it is taken as this).
pub const SMALL_MAX_FILE: u64 = 64 << 10;
/// SMALL: a reply stops taking records once its payload would pass this;
/// the paths left are not answered (ask again).
pub const SMALL_REPLY_BYTES: usize = 1 << 20;
/// SMALL: bytes of a record before its data: u32 code, u16 kind, u16
/// inline, then u64 size, device, inode, mtime seconds, mtime
/// nanoseconds, link count, and u64 the length of what follows.
pub const SMALL_RECORD_HEAD: usize = 64;

/// One record of a SMALL reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmallRecord {
    /// 0, or the `E_*` code that refused the path (`data` is then the
    /// message).
    pub code: u64,
    /// [`KIND_FILE`], [`KIND_DIR`] or [`KIND_OTHER`] (0 with an error).
    pub kind: u64,
    /// Whether `data` is the whole file.
    pub inline: bool,
    pub size: u64,
    pub device: u64,
    pub inode: u64,
    pub mtime: (i64, u64),
    pub nlink: u64,
    pub data: Vec<u8>,
}

/// Appends `r` to a SMALL reply payload.
pub fn put_small(out: &mut Vec<u8>, r: &SmallRecord) {
    put_small_head(out, r, r.data.len() as u64);
    out.extend_from_slice(&r.data);
}

/// Appends the head of `r` to a SMALL reply payload, saying that `n`
/// bytes follow (the caller appends them; `r.data` is not used).
pub fn put_small_head(out: &mut Vec<u8>, r: &SmallRecord, n: u64) {
    out.extend_from_slice(&(r.code as u32).to_le_bytes());
    out.extend_from_slice(&(r.kind as u16).to_le_bytes());
    out.extend_from_slice(&u16::from(r.inline).to_le_bytes());
    for w in [
        r.size,
        r.device,
        r.inode,
        r.mtime.0 as u64,
        r.mtime.1,
        r.nlink,
        n,
    ] {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Decodes a SMALL reply payload of `count` records.
pub fn parse_small(p: &[u8], count: u64) -> std::result::Result<Vec<SmallRecord>, String> {
    let mut out = Vec::with_capacity(count.min(SMALL_MAX_PATHS as u64) as usize);
    let mut at = 0usize;
    let word = |p: &[u8], i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    for i in 0..count {
        if p.len() - at < SMALL_RECORD_HEAD {
            return Err(format!("record {i} of {count} runs past the payload"));
        }
        let h = &p[at..at + SMALL_RECORD_HEAD];
        let code = u64::from(u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")));
        let kind = u64::from(u16::from_le_bytes(h[4..6].try_into().expect("2 bytes")));
        let inline = u16::from_le_bytes(h[6..8].try_into().expect("2 bytes"));
        let n = word(h, 56);
        at += SMALL_RECORD_HEAD;
        if n > (p.len() - at) as u64 {
            return Err(format!(
                "record {i} of {count} says {n} bytes follow; fewer do"
            ));
        }
        let size = word(h, 8);
        if inline > 1 || (inline == 1 && (n != size || code != 0)) {
            return Err(format!(
                "record {i} of {count}: inline {inline}, code {code}, size {size}, {n} bytes"
            ));
        }
        out.push(SmallRecord {
            code,
            kind,
            inline: inline == 1,
            size,
            device: word(h, 16),
            inode: word(h, 24),
            mtime: (word(h, 32) as i64, word(h, 40)),
            nlink: word(h, 48),
            data: p[at..at + n as usize].to_vec(),
        });
        at += n as usize;
    }
    if at != p.len() {
        return Err(format!(
            "{} bytes after the last of {count} records",
            p.len() - at
        ));
    }
    Ok(out)
}

/// Encodes SMALL's request payload: each path as u16 length and bytes.
pub fn put_paths(paths: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in paths {
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// Decodes SMALL's request payload of `count` paths.
pub fn parse_paths(p: &[u8], count: u64) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        if p.len() - at < 2 {
            return Err(format!("path {i} of {count} runs past the payload"));
        }
        let n = u16::from_le_bytes([p[at], p[at + 1]]) as usize;
        at += 2;
        if n > p.len() - at {
            return Err(format!("path {i} of {count} runs past the payload"));
        }
        out.push(&p[at..at + n]);
        at += n;
    }
    if at != p.len() {
        return Err(format!(
            "{} bytes after the last of {count} paths",
            p.len() - at
        ));
    }
    Ok(out)
}

/// At most this many entries in one LIST reply.
pub const LIST_MAX_ENTRIES: usize = 1024;
/// A LIST reply's payload stops growing once it is this large (each entry
/// is at most 12 + 255 bytes, so a page stays far below [`MAX_PAYLOAD`]).
pub const LIST_PAGE_BYTES: usize = 64 << 10;
/// Bytes before an entry's name in a LIST reply: u64 inode, u16 name
/// length, u8 kind, u8 zero.
pub const LIST_ENTRY_HEAD: usize = 12;

/// One directory entry of a LIST reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name, without any `/`.
    pub name: Vec<u8>,
    /// [`KIND_FILE`] or [`KIND_DIR`].
    pub kind: u64,
    /// The inode STAT reports for it.
    pub inode: u64,
}

/// Appends `e` to a LIST reply payload.
pub fn put_entry(out: &mut Vec<u8>, e: &DirEntry) {
    out.extend_from_slice(&e.inode.to_le_bytes());
    out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    out.push(e.kind as u8);
    out.push(0);
    out.extend_from_slice(&e.name);
}

/// Decodes a LIST reply payload of `count` entries.
pub fn parse_entries(p: &[u8], count: u64) -> std::result::Result<Vec<DirEntry>, String> {
    let mut out = Vec::with_capacity(count.min(LIST_MAX_ENTRIES as u64) as usize);
    let mut at = 0;
    for i in 0..count {
        if at + LIST_ENTRY_HEAD > p.len() {
            return Err(format!("entry {i} of {count} runs past the payload"));
        }
        let inode = u64_at(p, at);
        let n = usize::from(u16::from_le_bytes([p[at + 8], p[at + 9]]));
        let kind = u64::from(p[at + 10]);
        let start = at + LIST_ENTRY_HEAD;
        if start + n > p.len() || n == 0 || n > 255 {
            return Err(format!("entry {i} of {count} has a bad name length {n}"));
        }
        let name = p[start..start + n].to_vec();
        if name.contains(&b'/') || name.contains(&0) {
            return Err(format!("entry {i} of {count} has a name with '/' or NUL"));
        }
        out.push(DirEntry { name, kind, inode });
        at = start + n;
    }
    if at != p.len() {
        return Err(format!(
            "{} bytes left over after {count} entries",
            p.len() - at
        ));
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    pub kind: u32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: u32, a: u64, b: u64, c: u64, d: u64) -> Frame {
        Frame {
            kind,
            a,
            b,
            c,
            d,
            payload: Vec::new(),
        }
    }

    pub fn with_payload(mut self, p: Vec<u8>) -> Frame {
        self.payload = p;
        self
    }
}

/// How receiving failed.
#[derive(Debug)]
pub enum RecvError {
    /// The peer closed the connection before a whole frame.
    Closed,
    /// Nothing (or not a whole frame) within the socket's receive timeout.
    TimedOut,
    /// A version 1/2 peer: its 40-byte frame, kind and `a`.
    Legacy {
        kind: u64,
        a: u64,
    },
    /// Not a shadowfd frame, or too large.
    Malformed(String),
    Io(std::io::Error),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => write!(f, "the peer closed the connection"),
            RecvError::TimedOut => write!(f, "timed out"),
            RecvError::Legacy { kind, a } => write!(
                f,
                "the peer speaks the version 1/2 protocol (frame kind {kind}, a={a}); this side speaks version {VERSION}"
            ),
            RecvError::Malformed(m) => write!(f, "malformed frame: {m}"),
            RecvError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + f.payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&f.kind.to_le_bytes());
    out.extend_from_slice(&(f.payload.len() as u32).to_le_bytes());
    for v in [f.a, f.b, f.c, f.d] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&f.payload);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The most descriptors one `SCM_RIGHTS` message can carry (Linux's
/// `SCM_MAX_FD`). The receive buffer has room for that many, so a peer
/// cannot make the kernel truncate the control data; a frame carries at
/// most one, and a frame that brings more is refused (every one of them
/// closed).
pub const SCM_MAX_FD: usize = 253;

/// Room for [`SCM_MAX_FD`] descriptors and a spare header, aligned for
/// `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 2048]);

/// Whether `deadline` has passed; otherwise waits (at most until it) for
/// `events` on `sock`. True if the socket is ready.
fn wait_for(sock: &UnixStream, events: i16, deadline: Option<Instant>) -> bool {
    let Some(deadline) = deadline else {
        return true;
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: `p` is one live pollfd struct.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Let the read or write itself report the error.
            return true;
        }
    }
}

/// The deadline a socket timeout sets for a whole frame from now.
fn deadline_of(t: std::io::Result<Option<Duration>>) -> Option<Instant> {
    t.ok().flatten().map(|t| Instant::now() + t)
}

/// Sends one frame (and `fd` with it). The whole frame must go within the
/// socket's send timeout (one deadline for the frame, not one per write).
pub fn send(sock: &UnixStream, f: &Frame, fd: Option<BorrowedFd<'_>>) -> Result<()> {
    send_bytes(sock, &encode(f), fd, deadline_of(sock.write_timeout()))
}

/// Sends one frame, all of it by `deadline`.
pub fn send_by(
    sock: &UnixStream,
    f: &Frame,
    fd: Option<BorrowedFd<'_>>,
    deadline: Option<Instant>,
) -> Result<()> {
    send_bytes(sock, &encode(f), fd, deadline)
}

fn send_bytes(
    sock: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    deadline: Option<Instant>,
) -> Result<()> {
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let late = || {
        Error::sys(
            "send a frame to the peer (it read nothing within the timeout)",
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        )
    };
    let mut done = 0;
    while done < bytes.len() {
        if !wait_for(sock, libc::POLLOUT, deadline) {
            return Err(late());
        }
        let iov = [IoSlice::new(&bytes[done..])];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() || done > 0 {
            &[]
        } else {
            &cmsg
        };
        let flags = if deadline.is_some() {
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::MSG_NOSIGNAL
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            // Not writable after all (or the socket's own timeout): wait
            // again, within the frame's deadline.
            Err(nix::errno::Errno::EAGAIN) if deadline.is_some() => {}
            Err(nix::errno::Errno::EAGAIN) => return Err(late()),
            Err(e) => return Err(Error::sys("send a frame to the peer", e)),
        }
    }
    Ok(())
}

/// Sends a version-2 ERROR frame (40 bytes) to a legacy peer.
pub fn send_legacy_error(sock: &UnixStream, code: u64) {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&MAGIC);
    for v in [5u64, code, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let _ = send_bytes(sock, &b, None, deadline_of(sock.write_timeout()));
}

/// One `recvmsg` into `buf`: the bytes read, every descriptor that came
/// (each now owned, so closed if dropped), and whether the control data
/// was truncated.
fn recv_once(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: i32,
) -> std::io::Result<(usize, bool)> {
    let mut cbuf = CmsgBuf([0; 2048]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `cbuf`, both live and
    // as long as their lengths say, for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Every SCM_RIGHTS message is taken, truncated (MSG_CTRUNC) or not: the
    // kernel installed those descriptors in our table.
    // SAFETY: `msg` is the header recvmsg just filled in.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return a header inside `cbuf`
        // or null.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: `c` is a valid header; its data follows it in `cbuf`.
            let data = unsafe { libc::CMSG_DATA(c) };
            let head = data as usize - c as usize;
            let count = (h.cmsg_len as usize).saturating_sub(head) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: `count` descriptors lie at `data`, inside the
                // `cmsg_len` bytes the kernel wrote (unaligned reads).
                let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                if raw >= 0 {
                    // SAFETY: SCM_RIGHTS installed this descriptor in our
                    // table for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `c` is a header of `msg`.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n as usize, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Reads exactly `buf.len()` bytes by `deadline`, collecting every
/// descriptor that comes.
fn fill(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Option<Instant>,
) -> std::result::Result<(), RecvError> {
    let mut got = 0;
    while got < buf.len() {
        if !wait_for(sock, libc::POLLIN, deadline) {
            return Err(RecvError::TimedOut);
        }
        let flags = if deadline.is_some() {
            libc::MSG_DONTWAIT
        } else {
            0
        };
        let (n, truncated) = match recv_once(sock, &mut buf[got..], fds, flags) {
            Ok(x) => x,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if deadline.is_some() {
                    continue;
                }
                return Err(RecvError::TimedOut);
            }
            Err(e) => return Err(RecvError::Io(e)),
        };
        if truncated {
            return Err(RecvError::Malformed(format!(
                "the peer sent more descriptors with one message than fit ({} arrived and were                  closed); a frame carries at most one",
                fds.len()
            )));
        }
        if fds.len() > 1 {
            return Err(RecvError::Malformed(format!(
                "the peer sent {} descriptors with one frame (all closed); a frame carries at                  most one",
                fds.len()
            )));
        }
        if n == 0 {
            return Err(RecvError::Closed);
        }
        got += n;
    }
    Ok(())
}

/// Receives one frame and the descriptor that came with it. The whole
/// frame must arrive within the socket's receive timeout (one deadline for
/// the frame, not one per read).
pub fn recv(sock: &UnixStream) -> std::result::Result<(Frame, Option<OwnedFd>), RecvError> {
    recv_by(sock, deadline_of(sock.read_timeout()))
}

/// Receives one frame, all of it by `deadline` (`None`: no bound). A frame
/// with more than one descriptor is refused, and every descriptor that
/// arrived is closed, on every path.
pub fn recv_by(
    sock: &UnixStream,
    deadline: Option<Instant>,
) -> std::result::Result<(Frame, Option<OwnedFd>), RecvError> {
    let mut head = [0u8; HEADER];
    let mut fds = Vec::new();
    fill(sock, &mut head[..40], &mut fds, deadline)?;
    if head[..8] != MAGIC {
        return Err(RecvError::Malformed(
            "not a shadowfd peer (bad magic)".into(),
        ));
    }
    let kind = u32_at(&head, 8);
    let len = u32_at(&head, 12) as usize;
    if kind < 0x100 && len == 0 {
        // A version 1/2 frame: magic, then kind as a u64 (small), a, b, c.
        return Err(RecvError::Legacy {
            kind: u64::from(kind),
            a: u64_at(&head, 16),
        });
    }
    fill(sock, &mut head[40..], &mut fds, deadline)?;
    if len > MAX_PAYLOAD {
        return Err(RecvError::Malformed(format!(
            "payload of {len} bytes; the limit is {MAX_PAYLOAD}"
        )));
    }
    let mut payload = vec![0u8; len];
    fill(sock, &mut payload, &mut fds, deadline)?;
    Ok((
        Frame {
            kind,
            a: u64_at(&head, 16),
            b: u64_at(&head, 24),
            c: u64_at(&head, 32),
            d: u64_at(&head, 40),
            payload,
        },
        fds.pop(),
    ))
}

/// `s` as a JSON string, quoted and escaped (the STATS and status
/// documents are written by hand: serde is an optional dependency of the
/// library).
pub(crate) fn json_str(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = Frame::new(OPEN, 1, 2, 3, u64::MAX).with_payload(b"big.bin".to_vec());
        send(&a, &f, None).unwrap();
        let (g, fd) = recv(&b).unwrap();
        assert_eq!(f, g);
        assert!(fd.is_none());
        assert_eq!(encode(&f).len(), HEADER + 7);
    }

    #[test]
    fn list_entries_round_trip_and_bad_ones_are_refused() {
        let es = vec![
            DirEntry {
                name: b"a b".to_vec(),
                kind: KIND_FILE,
                inode: 7,
            },
            DirEntry {
                name: "é".as_bytes().to_vec(),
                kind: KIND_DIR,
                inode: u64::MAX,
            },
        ];
        let mut p = Vec::new();
        for e in &es {
            put_entry(&mut p, e);
        }
        assert_eq!(p.len(), 2 * LIST_ENTRY_HEAD + 3 + 2);
        assert_eq!(parse_entries(&p, 2).unwrap(), es);
        assert!(parse_entries(&p, 3).is_err(), "past the payload");
        assert!(parse_entries(&p, 1).is_err(), "bytes left over");
        let mut slash = Vec::new();
        put_entry(
            &mut slash,
            &DirEntry {
                name: b"../x".to_vec(),
                kind: KIND_FILE,
                inode: 1,
            },
        );
        assert!(parse_entries(&slash, 1).is_err(), "a name with '/'");
    }

    /// Descriptors in this process's table open on the memfd named `name`
    /// (other tests running meanwhile open other files).
    fn open_on(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| {
                let l = l.to_string_lossy();
                l.starts_with("/memfd:") && l.contains(name)
            })
            .count()
    }

    /// Sends `bytes` with `n` descriptors of the memfd `name` attached.
    fn send_fds(sock: &UnixStream, bytes: &[u8], n: usize, name: &str) {
        let m = crate::sys::memfd::Memfd::create(name, 0).unwrap();
        let fds: Vec<OwnedFd> = (0..n).map(|_| m.reopen_readonly().unwrap()).collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).unwrap();
    }

    /// More than one descriptor with a frame (up to the kernel's 253 in one
    /// message, or one with each of its reads) is refused, and every one of
    /// them closed: none is left in this process's table.
    #[test]
    fn extra_descriptors_are_refused_and_closed() {
        let bytes = encode(&Frame::new(STATS, 0, 0, 0, 0));
        let name = "shadowfd-wire-extra-fds";
        for n in [2, 5, SCM_MAX_FD] {
            let (a, b) = UnixStream::pair().unwrap();
            send_fds(&a, &bytes, n, name);
            let e = recv(&b).unwrap_err();
            assert!(matches!(e, RecvError::Malformed(_)), "{n}: {e}");
            assert_eq!(open_on(name), 0, "{n} descriptors: some were left open");
        }
        // One with the first byte, one more with the rest of the frame.
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, &bytes[..1], 1, name);
        send_fds(&a, &bytes[1..], 1, name);
        assert!(matches!(recv(&b), Err(RecvError::Malformed(_))));
        assert_eq!(open_on(name), 0);
        // One is fine.
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, &bytes, 1, name);
        let (f, fd) = recv(&b).unwrap();
        assert_eq!(f.kind, STATS);
        assert!(fd.is_some());
        assert_eq!(open_on(name), 1, "the check sees the one received");
        drop(fd);
        assert_eq!(open_on(name), 0);
    }

    /// The receive timeout bounds the whole frame: a peer sending a byte
    /// every 50 ms does not keep a 300 ms receive going for its 48 bytes.
    #[test]
    fn a_trickled_frame_times_out_as_a_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let bytes = encode(&Frame::new(STATS, 0, 0, 0, 0));
        let t = std::thread::spawn(move || {
            for x in bytes {
                if send_bytes(&a, &[x], None, None).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t0 = Instant::now();
        assert!(matches!(recv(&b), Err(RecvError::TimedOut)));
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(900),
            "{took:?}"
        );
        drop(b);
        t.join().unwrap();
    }

    #[test]
    fn a_version_2_frame_is_recognised() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut v2 = MAGIC.to_vec();
        for v in [4u64, 2, 0, 0] {
            v2.extend_from_slice(&v.to_le_bytes());
        }
        send_bytes(&a, &v2, None, None).unwrap();
        assert!(matches!(recv(&b), Err(RecvError::Legacy { kind: 4, a: 2 })));
    }
}
