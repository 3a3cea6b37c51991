//! The small framed protocol between an engine and a remote consumer: fixed
//! 40-byte frames (five little-endian u64: magic, kind, a, b, c), each
//! optionally carrying one descriptor (`SCM_RIGHTS`). docs/remote.md has the
//! exchange.

use crate::error::{Error, Result};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

const MAGIC: u64 = u64::from_le_bytes(*b"SHADOWFD");
pub const FRAME: usize = 40;

/// The protocol version this crate speaks. Version 1 (unversioned, the
/// server spoke first and sent the memfd before anything else) is refused.
pub const VERSION: u64 = 2;

/// Consumer to server, first: `a` = protocol version, `c` = the features its
/// userfaultfd negotiated; carries that userfaultfd if it could make one.
pub const HELLO: u64 = 4;
/// Server to consumer: the read-only memfd (`a` = size, `b` = 1 if lazy,
/// `c` = protocol version).
pub const OFFER: u64 = 1;
/// Consumer to server: where it mapped and registered the shadow
/// (`a` = address, `b` = length).
pub const ATTACH: u64 = 2;
/// Server to consumer: faults are now served.
pub const READY: u64 = 3;
/// Either way, before closing: `a` = one of the `E_*` codes.
pub const ERROR: u64 = 5;

/// Malformed or unexpected frame.
pub const E_PROTOCOL: u64 = 1;
/// Unsupported protocol version.
pub const E_VERSION: u64 = 2;
/// A lazy shadow needs a userfaultfd with MINOR_SHMEM and POISON.
pub const E_NO_UFFD: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u64,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

fn encode(f: &Frame) -> [u8; FRAME] {
    let mut out = [0u8; FRAME];
    for (i, v) in [MAGIC, f.kind, f.a, f.b, f.c].iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn word(b: &[u8; FRAME], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

pub fn send(sock: &UnixStream, f: &Frame, fd: Option<BorrowedFd<'_>>) -> Result<()> {
    let bytes = encode(f);
    let iov = [IoSlice::new(&bytes)];
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| Error::sys("send to the remote consumer socket", e))?;
    if n != FRAME {
        return Err(Error::sys(
            "send to the remote consumer socket",
            std::io::Error::new(std::io::ErrorKind::WriteZero, "short send"),
        ));
    }
    Ok(())
}

/// Receives one frame, and the descriptor that came with it.
pub fn recv(sock: &UnixStream) -> Result<(Frame, Option<OwnedFd>)> {
    let mut buf = [0u8; FRAME];
    let mut got = 0;
    let mut fd = None;
    while got < FRAME {
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::sys("receive from the shadowfd socket", e))?;
        if msg.bytes == 0 {
            return Err(Error::sys(
                "receive from the shadowfd socket",
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ),
            ));
        }
        for c in msg
            .cmsgs()
            .map_err(|e| Error::sys("read control message", e))?
        {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: SCM_RIGHTS installed this descriptor in our
                    // table for us; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        got += msg.bytes;
    }
    if word(&buf, 0) != MAGIC {
        return Err(Error::sys(
            "receive from the shadowfd socket",
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a shadowfd peer"),
        ));
    }
    let f = Frame {
        kind: word(&buf, 1),
        a: word(&buf, 2),
        b: word(&buf, 3),
        c: word(&buf, 4),
    };
    Ok((f, fd))
}
