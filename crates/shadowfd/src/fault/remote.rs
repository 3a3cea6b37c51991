//! Serving a consumer in another process through the userfaultfd it sent.

use super::lazy::{LazyShadow, Why, run_chunks};
use crate::error::{Error, Result};
use crate::remote::wire::{self, ATTACH, Frame, READY};
use crate::uffd::{Uffd, sys::uffd_msg};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Takes the consumer's ATTACH, registers its range with the shadow, answers
/// READY, and starts the thread that serves its faults until it disconnects.
pub(crate) fn attach(shadow: Arc<LazyShadow>, stream: UnixStream) -> Result<JoinHandle<()>> {
    // A consumer that never answers must not block the caller for ever.
    let timeout = Some(std::time::Duration::from_secs(30));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| Error::sys("set the consumer socket timeout", e))?;
    let (f, fd) = wire::recv(&stream)?;
    stream
        .set_read_timeout(None)
        .map_err(|e| Error::sys("clear the consumer socket timeout", e))?;
    let page = shadow.service.core.page;
    let want_len = shadow.size.div_ceil(page) * page;
    let bad = |why: &str| {
        Error::sys(
            "attach a remote consumer",
            std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string()),
        )
    };
    if f.kind != ATTACH || f.b != want_len || f.a % page != 0 {
        return Err(bad("malformed attach request"));
    }
    let uffd = Arc::new(Uffd::from_fd(
        fd.ok_or_else(|| bad("no userfaultfd attached"))?,
        f.c,
    ));
    if !uffd.has_poison() {
        return Err(bad("the consumer's userfaultfd lacks UFFD_FEATURE_POISON"));
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
                    serve(&tshadow, &uffd, &tstream, start, len);
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
/// userfaultfd reports an error.
fn serve(shadow: &LazyShadow, uffd: &Uffd, stream: &UnixStream, start: u64, len: u64) {
    let core = &shadow.service.core;
    let run = run_chunks(shadow.chunk);
    let mut buf = vec![0u8; (run * shadow.chunk) as usize];
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
            let page_addr = f.address & !(core.page - 1);
            if page_addr < start || page_addr >= start + len {
                let _ = uffd.wake(page_addr, core.page);
                continue;
            }
            if let Some(r) = shadow.on_fault(core, uffd, start, page_addr - start) {
                shadow.fill(core, r, &mut buf, Why::Fault);
            }
        }
    }
}
