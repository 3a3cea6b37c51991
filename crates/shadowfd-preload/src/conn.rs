//! The connection to the server: made on first use (with the shim's own
//! descriptors kept above the numbers programs pick), one per process.

use crate::env::env;
use crate::forklock::{self, ForkMutex};
use shadowfd::remote::{Client, ClientOptions};
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

/// This process's connection, made on first use (a forked child makes its
/// own: see `fork.rs`).
pub(crate) static CLIENT: ForkMutex<Option<Client>> = ForkMutex::new(None);

/// Whether this process has already said on stderr why the server failed
/// it (said once).
pub(crate) static SAID: AtomicBool = AtomicBool::new(false);

/// The shim's own descriptors (the server socket, the userfaultfd, the
/// watcher's eventfds) are made while every free number below
/// [`LowFds::FLOOR`] is taken, so they land above it. Programs pick low
/// numbers themselves (`exec 3< file` in a shell is `dup2(fd, 3)`, and
/// dash saves descriptors at 10 and up): a `dup2` onto a number the shim
/// holds would close its connection under it.
pub(crate) struct LowFds(Vec<c_int>);

impl LowFds {
    pub(crate) const FLOOR: c_int = 100;

    /// Takes every free descriptor number below [`Self::FLOOR`] (copies of
    /// one `/dev/null` descriptor, raw system calls), until dropped.
    pub(crate) fn reserve() -> LowFds {
        let mut held = Vec::new();
        // SAFETY: opens /dev/null (a NUL-terminated path); every number
        // taken is closed on drop.
        let first = unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        } as c_int;
        let mut fd = first;
        while (0..Self::FLOOR).contains(&fd) {
            held.push(fd);
            // SAFETY: duplicates a descriptor this guard holds onto the
            // lowest free number.
            fd =
                unsafe { libc::syscall(libc::SYS_fcntl, first, libc::F_DUPFD_CLOEXEC, 0) } as c_int;
        }
        if fd >= Self::FLOOR {
            // SAFETY: closes the copy just made, above the floor.
            unsafe { libc::syscall(libc::SYS_close, fd) };
        }
        LowFds(held)
    }
}

impl Drop for LowFds {
    fn drop(&mut self) {
        for &fd in &self.0 {
            // SAFETY: closes a descriptor this guard opened.
            unsafe { libc::syscall(libc::SYS_close, fd) };
        }
    }
}

/// This process's connection (made now if there is none); `EIO` when the
/// server cannot be reached (said once on stderr).
pub(crate) fn client() -> Result<Client, c_int> {
    let mut c = CLIENT.lock();
    if let Some(c) = c.as_ref() {
        return Ok(c.clone());
    }
    let env = env().ok_or(libc::EIO)?;
    let connect = || -> shadowfd::Result<Client> {
        if !env.no_uffd {
            return Client::connect(&env.socket);
        }
        let s = std::os::unix::net::UnixStream::connect(&env.socket).map_err(|e| {
            shadowfd::Error::Open {
                path: env.socket.clone().into(),
                source: e,
            }
        })?;
        let opts = ClientOptions {
            userfaultfd: false,
            ..ClientOptions::default()
        };
        Client::from_stream(s, opts)
    };
    let low = LowFds::reserve();
    let made = connect();
    drop(low);
    match made {
        Ok(n) => {
            *c = Some(n.clone());
            Ok(n)
        }
        Err(e) => {
            if !SAID.swap(true, Ordering::SeqCst) {
                // Also reached in a forked child (forklock::say).
                forklock::say(&format!(
                    "shadowfd-preload: cannot reach the shadowfd server at {}: {e}",
                    env.socket
                ));
            }
            Err(libc::EIO)
        }
    }
}
