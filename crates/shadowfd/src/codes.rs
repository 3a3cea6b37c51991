//! The error codes of the remote protocol (docs/protocol.md), in a leaf
//! module so that the error type ([`crate::Error::Refused`]) can name them
//! without importing the protocol layer. `remote::wire` re-exports them.

/// Malformed or unexpected frame.
pub const E_PROTOCOL: u64 = 1;
/// Unsupported protocol version.
pub const E_VERSION: u64 = 2;
/// A lazy mapping needs a userfaultfd with MINOR_SHMEM and POISON.
pub const E_NO_UFFD: u64 = 3;
/// No such file.
pub const E_NOT_FOUND: u64 = 4;
/// The path leaves the served tree (`..`, an absolute symlink, a symlink
/// out of it, a magic link).
pub const E_ESCAPE: u64 = 5;
/// Not a regular file.
pub const E_NOT_REGULAR: u64 = 6;
/// The eager fallback is over the server's size cap.
pub const E_TOO_LARGE: u64 = 7;
/// Unknown handle.
pub const E_BAD_HANDLE: u64 = 8;
/// Offset or length out of range.
pub const E_RANGE: u64 = 9;
/// The source could not be read (the message says why).
pub const E_IO: u64 = 10;
/// A server limit (clients, handles, memory budget) was reached.
pub const E_LIMIT: u64 = 11;
/// Permission denied opening the file.
pub const E_ACCESS: u64 = 12;
/// Since version 4: LIST of something that is not a directory.
pub const E_NOT_DIR: u64 = 13;

/// A short name for an error code, for messages.
pub fn code_name(code: u64) -> &'static str {
    match code {
        E_PROTOCOL => "E_PROTOCOL",
        E_VERSION => "E_VERSION",
        E_NO_UFFD => "E_NO_UFFD",
        E_NOT_FOUND => "E_NOT_FOUND",
        E_ESCAPE => "E_ESCAPE",
        E_NOT_REGULAR => "E_NOT_REGULAR",
        E_TOO_LARGE => "E_TOO_LARGE",
        E_BAD_HANDLE => "E_BAD_HANDLE",
        E_RANGE => "E_RANGE",
        E_IO => "E_IO",
        E_LIMIT => "E_LIMIT",
        E_ACCESS => "E_ACCESS",
        E_NOT_DIR => "E_NOT_DIR",
        _ => "unknown code",
    }
}
