//! The client of a `shadowfd serve` server: `shadowfd_client_*`, and what
//! the shadow functions do with a file opened through it (a "client
//! shadow", the Rust `shadowfd::remote::RemoteFile`).

use crate::errors::{Failure, errno_of, guard};
use crate::{
    SHADOWFD_MODE_EAGER, SHADOWFD_MODE_LAZY, ShadowKind, arg_bytes, arg_str, handle,
    shadowfd_shadow,
};
use libc::{c_char, c_int, c_void};
use sfd::remote::{Client, RemoteFile, RemoteMapping, wire};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

/// A connection to a shadowfd server (`shadowfd serve --socket PATH`).
/// Opaque.
pub struct shadowfd_client {
    inner: Client,
}

/// The errno for a server's ERROR code (docs/c-api.md has the table).
fn code_errno(code: u64) -> c_int {
    match code {
        wire::E_NOT_FOUND => libc::ENOENT,
        wire::E_ESCAPE | wire::E_ACCESS => libc::EACCES,
        wire::E_NOT_REGULAR => libc::EINVAL,
        wire::E_TOO_LARGE => libc::EFBIG,
        wire::E_BAD_HANDLE => libc::EBADF,
        wire::E_RANGE => libc::ERANGE,
        wire::E_IO => libc::EIO,
        wire::E_LIMIT => libc::EMFILE,
        wire::E_NO_UFFD => libc::EOPNOTSUPP,
        wire::E_VERSION => libc::EPROTONOSUPPORT,
        _ => libc::EPROTO,
    }
}

/// A failure from the Rust client. A server's refusal carries its
/// protocol code ([`sfd::Error::refusal_code`]); the code becomes the
/// errno, so a C caller can tell a missing file from a path out of the
/// served tree.
pub(crate) fn failure(e: sfd::Error) -> Failure {
    let msg = e.to_string();
    let errno = match (e.refusal_code(), e.connection()) {
        (Some(c), _) => code_errno(c),
        (None, Some(sfd::Connection::TimedOut)) => libc::ETIMEDOUT,
        (None, Some(_)) => libc::ECONNRESET,
        (None, None) => errno_of(&e),
    };
    Failure::new(errno, msg)
}

/// The failure for an engine-only function called on a client shadow.
pub(crate) fn unsupported(func: &str, f: &RemoteFile) -> Failure {
    Failure::new(
        libc::EOPNOTSUPP,
        format!(
            "{func}: {:?} is a client shadow (shadowfd_client_open): its memory belongs to the \
             server, so there is no descriptor to register, materialize or hand out here; use \
             shadowfd_map, shadowfd_read or shadowfd_fill on it, or open the file with \
             shadowfd_open_path in the process that owns an engine",
            f.path()
        ),
    )
}

/// `shadowfd_map` of a client shadow: the whole file only (the Rust client
/// maps whole files), at an address the kernel picks.
pub(crate) fn map(
    func: &str,
    f: &RemoteFile,
    offset: u64,
    len: u64,
    fixed: *mut c_void,
) -> Result<RemoteMapping, Failure> {
    let size = f.size();
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(Failure::new(
            libc::ERANGE,
            format!(
                "{func}: offset {offset} + length {len} is past the end of {:?} ({size} bytes)",
                f.path()
            ),
        ));
    }
    if offset != 0 || len != size {
        return Err(Failure::new(
            libc::EOPNOTSUPP,
            format!(
                "{func}: a client shadow is mapped whole: pass offset 0 and len 0 (or its size, \
                 {size}), not offset {offset} and len {len}; read a part with shadowfd_read, or \
                 map the whole file and use the part"
            ),
        ));
    }
    if !fixed.is_null() {
        return Err(Failure::new(
            libc::EOPNOTSUPP,
            format!(
                "{func}: a client shadow cannot be mapped at a fixed address ({fixed:p}); pass \
                 NULL and let the kernel pick it"
            ),
        ));
    }
    f.map().map_err(failure)
}

/// `shadowfd_fill` of a client shadow: the server fills the range (FILL;
/// the bytes it sends back are dropped).
pub(crate) fn fill(func: &str, f: &RemoteFile, offset: u64, len: u64) -> Result<(), Failure> {
    let size = f.size();
    let Some(end) = offset.checked_add(len).filter(|&e| e <= size) else {
        return Err(Failure::new(
            libc::ERANGE,
            format!(
                "{func}: offset {offset} + length {len} is past the end of {:?} ({size} bytes)",
                f.path()
            ),
        ));
    };
    let mut scratch = vec![0u8; (len.min(wire::MAX_FILL)) as usize];
    let mut at = offset;
    while at < end {
        let want = (end - at).min(scratch.len() as u64) as usize;
        let n = f.read_at(&mut scratch[..want], at).map_err(failure)?;
        if n == 0 {
            return Err(Failure::new(
                libc::EIO,
                format!(
                    "{func}: the server sent nothing at offset {at} of {:?} ({size} bytes)",
                    f.path()
                ),
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// `shadowfd_stats_json` of a client shadow: the server's STATS of it.
pub(crate) fn stats_json(f: &RemoteFile) -> Result<*mut c_char, Failure> {
    let text = f.stats_json().map_err(failure)?;
    let c = CString::new(text)
        .map_err(|_| Failure::new(libc::EPROTO, "the server's STATS held a NUL byte".into()))?;
    Ok(c.into_raw())
}

/// Connects to the shadowfd server listening on the Unix socket
/// `socket_path` (`shadowfd serve --socket PATH`), speaking protocol
/// version 4 (docs/protocol.md). If this process can make a usable
/// userfaultfd, it is sent along and mappings of lazy server shadows are
/// lazy (filled by the server on first touch); where userfaultfd is denied
/// (seccomp, sysctl, an old kernel), the client falls back to sealed
/// descriptors: each mapping is a complete copy, within the server's eager
/// cap. `shadowfd_client_mode` says which.
///
/// If the server dies or hangs up, a thread of the client answers every
/// fault on an unfilled page of its lazy mappings with SIGBUS: a consumer
/// never hangs and never reads zeros. Filled pages stay readable.
///
/// Returns NULL on error, with errno (the socket's: ENOENT, ECONNREFUSED,
/// ...; EPROTO or EPROTONOSUPPORT if the peer does not speak the protocol)
/// and a message for `shadowfd_last_error`.
///
/// Ownership: `socket_path` is borrowed; the caller owns the client and
/// frees it with `shadowfd_client_free`. Thread-safety: any thread; the
/// client may then be used from several threads at once (requests on one
/// connection are answered one at a time).
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_client_connect(
    socket_path: *const c_char,
) -> *mut shadowfd_client {
    const F: &str = "shadowfd_client_connect";
    guard(|| {
        // SAFETY: the caller vouches for the string.
        let p = unsafe { arg_bytes(F, "socket_path", socket_path) }?;
        let inner = Client::connect(std::ffi::OsStr::from_bytes(p)).map_err(failure)?;
        Ok(Box::into_raw(Box::new(shadowfd_client { inner })))
    })
}

/// `SHADOWFD_MODE_LAZY` if the client sent the server a userfaultfd (its
/// mappings of lazy server shadows are lazy), `SHADOWFD_MODE_EAGER` if it
/// could not make one (every mapping is a sealed copy); -EINVAL for NULL.
/// Thread-safety: any thread.
///
/// # Safety
/// `client` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_client_mode(client: *const shadowfd_client) -> c_int {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let c = unsafe { handle("shadowfd_client_mode", "client", client) }?;
        Ok(if c.inner.has_userfaultfd() {
            SHADOWFD_MODE_LAZY
        } else {
            SHADOWFD_MODE_EAGER
        })
    })
}

/// Opens `path` on the server (inside the tree it serves: `big.bin` and
/// `/big.bin` are the same file; `..` or symlinks out of the tree are
/// refused). Returns a client shadow, or NULL with errno: ENOENT (no such
/// file), EACCES (the path leaves the served tree, or the server may not
/// open it), EINVAL (not a regular file, or not UTF-8), EMFILE (too many
/// handles), EPIPE/ECONNRESET (the server is gone), EPROTO; the message is
/// the server's.
///
/// A client shadow works with `shadowfd_shadow_size`, `shadowfd_map` (the
/// whole file only, at an address the kernel picks), `shadowfd_unmap`,
/// `shadowfd_read`, `shadowfd_fill` (asks the server to fill the range),
/// `shadowfd_stats_json` (the server's counters of its shadow) and
/// `shadowfd_shadow_free`. `shadowfd_register`, `shadowfd_mapping_fd`,
/// `shadowfd_materialize` and `shadowfd_fd` fail with -EOPNOTSUPP: the
/// memory is the server's.
///
/// Ownership: `path` is borrowed; the caller owns the shadow and frees it
/// with `shadowfd_shadow_free`. The shadow and its mappings keep the
/// connection open: they stay valid after `shadowfd_client_free`.
/// Thread-safety: any thread, concurrently on one client.
///
/// # Safety
/// `client` is NULL or live; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_client_open(
    client: *mut shadowfd_client,
    path: *const c_char,
) -> *mut shadowfd_shadow {
    const F: &str = "shadowfd_client_open";
    guard(|| {
        // SAFETY: the caller vouches for both pointers.
        let (c, p) = unsafe { (handle(F, "client", client)?, arg_str(F, "path", path)?) };
        let file = c.inner.open(p).map_err(failure)?;
        Ok(Box::into_raw(Box::new(shadowfd_shadow {
            inner: ShadowKind::Remote(file),
        })))
    })
}

/// Frees a client. NULL is ignored. Shadows opened through it and their
/// mappings stay valid: the connection (and the thread that turns faults
/// into SIGBUS once the server is gone) lasts until the last of them is
/// freed or unmapped. Thread-safety: not while another thread uses
/// `client`.
///
/// # Safety
/// `client` is NULL or from `shadowfd_client_connect` and not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_client_free(client: *mut shadowfd_client) {
    guard(|| {
        if !client.is_null() {
            // SAFETY: made by Box::into_raw in shadowfd_client_connect and
            // not freed before (the caller's promise).
            drop(unsafe { Box::from_raw(client) });
        }
        Ok(())
    })
}
