//! The engine side: hand a shadow to a consumer in another process, and
//! serve its faults through the userfaultfd it sent.

use super::wire::{self, ATTACH, ERROR, Frame, HELLO, OFFER, READY, VERSION};
use crate::error::{Error, Result};
use crate::fault::{FaultTarget, Hit};
use crate::shadow::lazy::LazyShadow;
use crate::shadow::{Kind, Shadow};
use crate::sys::Uffd;
use crate::sys::uffd_abi::uffd_msg;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a peer may take to say each thing it must say.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// A consumer being served by [`serve`].
#[derive(Debug)]
pub struct Served {
    thread: Option<JoinHandle<()>>,
}

impl Served {
    /// Waits until the consumer has disconnected and its range is forgotten.
    /// Returns at once for eager or materialized shadows.
    pub fn wait(self) {
        if let Some(t) = self.thread {
            let _ = t.join();
        }
    }

    /// Whether the consumer is still attached.
    pub fn is_active(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

fn refused(peer_msg: &str) -> Error {
    Error::Protocol {
        what: peer_msg.to_string(),
    }
}

/// Refuses the peer: an ERROR frame with `code`, then the error.
fn refuse(stream: &UnixStream, code: u64, why: &str) -> Error {
    let f = Frame {
        kind: ERROR,
        a: code,
        b: 0,
        c: 0,
    };
    let _ = wire::send(stream, &f, None);
    refused(why)
}

/// Hands `shadow` to a consumer process on the other end of `stream`, which
/// calls [`super::RemoteMapping::receive`] (docs/remote.md has the
/// protocol). The consumer speaks first (HELLO: protocol version, and its
/// userfaultfd if it has one); nothing of the shadow is sent before that. An
/// eager or materialized shadow is then sent as a read-only descriptor and
/// needs nothing more. A lazy one is sent only to a consumer whose
/// userfaultfd can register MISSING and MINOR faults and poison; the
/// consumer maps it `PROT_NONE`, registers the mapping and says where (ATTACH);
/// a thread then serves its faults, filling the same page cache as local
/// mappings, until the consumer closes the connection or dies, and then
/// forgets it. Every wait on the peer is bounded by [`PEER_TIMEOUT`].
pub fn serve(shadow: &Shadow, stream: UnixStream) -> Result<Served> {
    stream
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(|e| Error::sys("set the consumer socket timeout", e))?;
    let (hello, uffd) = wire::recv(&stream)?;
    if hello.kind != HELLO {
        return Err(refuse(
            &stream,
            wire::E_PROTOCOL,
            "the consumer did not start with HELLO",
        ));
    }
    if hello.a != VERSION {
        return Err(refuse(
            &stream,
            wire::E_VERSION,
            &format!(
                "the consumer speaks protocol version {}, this engine {VERSION}",
                hello.a
            ),
        ));
    }
    let lazy = !shadow.is_materialized();
    let uffd = match (lazy, uffd) {
        (false, _) => None,
        (true, Some(fd)) => {
            let u = Uffd::from_fd(fd, hello.c);
            if !u.has_lazy_features() {
                return Err(refuse(
                    &stream,
                    wire::E_NO_UFFD,
                    "the consumer's userfaultfd lacks MINOR_SHMEM or POISON",
                ));
            }
            Some(u)
        }
        (true, None) => {
            return Err(refuse(
                &stream,
                wire::E_NO_UFFD,
                "the shadow is lazy and the consumer sent no userfaultfd; materialize it first",
            ));
        }
    };
    let ro = shadow.memfd().reopen_readonly()?;
    let offer = Frame {
        kind: OFFER,
        a: shadow.size(),
        b: u64::from(lazy),
        c: VERSION,
    };
    wire::send(&stream, &offer, Some(ro.as_fd()))?;
    drop(ro);
    let thread = match (&shadow.kind, uffd) {
        (Kind::Lazy(l), Some(u)) if shadow.size() > 0 => {
            Some(attach(l.clone(), Arc::new(u), stream)?)
        }
        _ => None,
    };
    Ok(Served { thread })
}

/// Takes the consumer's ATTACH, registers its range with the shadow, answers
/// READY, and starts the thread that serves its faults until it disconnects.
fn attach(shadow: Arc<LazyShadow>, uffd: Arc<Uffd>, stream: UnixStream) -> Result<JoinHandle<()>> {
    let (f, _) = wire::recv(&stream)?;
    let page = shadow.service.core.page;
    let want_len = shadow.size.div_ceil(page) * page;
    if f.kind != ATTACH || f.b != want_len || f.a % page != 0 || f.a == 0 {
        return Err(refuse(&stream, wire::E_PROTOCOL, "malformed ATTACH"));
    }
    let (start, len) = (f.a, f.b);
    let key = shadow.add_remote(uffd.clone(), start, len);
    // Start serving before saying READY: a consumer told READY must never be
    // left with nobody reading its faults. The thread holds its own handles.
    let (tshadow, tstream) = (shadow.clone(), stream.try_clone());
    let spawned = tstream
        .map_err(|e| Error::sys("clone the consumer socket", e))
        .and_then(|tstream| {
            std::thread::Builder::new()
                .name("shadowfd-remote".into())
                .spawn(move || {
                    serve_faults(&tshadow, &uffd, &tstream, start, len);
                    tshadow.remove_remote(key);
                })
                .map_err(|e| Error::sys("spawn a remote-consumer thread", e))
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            shadow.remove_remote(key);
            return Err(e);
        }
    };
    let ready = Frame {
        kind: READY,
        a: 0,
        b: 0,
        c: 0,
    };
    // If READY cannot be sent the consumer is gone; the thread sees the
    // hang-up and forgets it.
    wire::send(&stream, &ready, None)?;
    Ok(thread)
}

/// Serves faults from one consumer until its connection closes or its
/// userfaultfd reports an error. A fault outside the range it attached is
/// refused (SIGBUS in the consumer), never woken into a retry loop.
fn serve_faults(shadow: &LazyShadow, uffd: &Uffd, stream: &UnixStream, start: u64, len: u64) {
    let core = &shadow.service.core;
    let mut raw = vec![uffd_msg::default(); 32];
    let mut faults = Vec::with_capacity(32);
    loop {
        let mut fds = [uffd.as_fd(), stream.as_fd()].map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a live array of two pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            // The consumer only ever closes its end: EOF, hang-up or error.
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return;
        }
        faults.clear();
        match uffd.read_faults(&mut raw, &mut faults) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => continue,
            Err(_) => return,
        }
        for f in &faults {
            let addr = f.address & !(core.page - 1);
            if addr < start || addr >= start + len {
                // A consumer whose userfaultfd cannot even poison its own
                // stray range is dropped rather than woken for ever.
                if !core.refuse(uffd, addr) {
                    return;
                }
                continue;
            }
            let hit = Hit {
                uffd,
                addr,
                offset: addr - start,
                limit: start + len - addr,
                internal: false,
            };
            if let Some(work) = shadow.on_fault(core, hit) {
                shadow.run(core, work);
            }
        }
    }
}
