//! The errno a client error means: by the protocol's typed error code
//! (`shadowfd::remote::wire::E_*`), never by the message text.

use crate::conn::SAID;
use std::ffi::c_int;
use std::sync::atomic::Ordering;

/// The errno for a client error: by the server's protocol code
/// ([`shadowfd::Error::refusal_code`]), never by the message, which names
/// the path. Anything else (the connection gone, ...) is `EIO`.
pub(crate) fn errno_of(e: &shadowfd::Error) -> c_int {
    use shadowfd::remote::wire;
    match e.refusal_code() {
        Some(wire::E_NOT_FOUND | wire::E_ESCAPE) => libc::ENOENT,
        Some(wire::E_NOT_REGULAR) => libc::EISDIR,
        Some(wire::E_NOT_DIR) => libc::ENOTDIR,
        Some(wire::E_ACCESS) => libc::EACCES,
        Some(wire::E_LIMIT) => libc::EMFILE,
        Some(wire::E_TOO_LARGE) => libc::EFBIG,
        _ => libc::EIO,
    }
}

/// `EIO` for a failed read of a served file, saying why once on stderr.
pub(crate) fn io_err(e: &shadowfd::Error) -> c_int {
    if !SAID.swap(true, Ordering::SeqCst) {
        eprintln!("shadowfd-preload: {e}");
    }
    libc::EIO
}
