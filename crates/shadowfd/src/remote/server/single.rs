//! The one-shadow [`serve`] kept for embedders: one shadow, one client,
//! over a connected pair.

use super::*;

/// A consumer being served by [`serve`].
#[derive(Debug)]
pub struct Served {
    pub(super) thread: Option<JoinHandle<()>>,
}

impl Served {
    /// Waits until the consumer has disconnected and its ranges are
    /// forgotten.
    pub fn wait(self) {
        if let Some(t) = self.thread {
            let _ = t.join();
        }
    }

    /// Whether the consumer is still connected.
    pub fn is_active(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// Serves `shadow` alone to one client on the other end of `stream`, which
/// calls [`super::RemoteMapping::receive`] (or speaks protocol version 4
/// itself: every path it OPENs names this shadow). The client's HELLO is
/// taken here (bounded by [`PEER_TIMEOUT`]); the rest of the session runs on
/// a thread until the client hangs up. A lazy shadow is mapped lazily by a
/// client with a userfaultfd; an eager or materialized one is sent as a
/// sealed descriptor; a lazy one to a client without a userfaultfd is
/// refused (`E_NO_UFFD`: materialize it first).
pub fn serve(shadow: &Shadow, stream: UnixStream) -> Result<Served> {
    let held = match &shadow.kind {
        Kind::Lazy(l) if !shadow.is_materialized() => Held::Shadow(Shadow {
            kind: Kind::Lazy(l.clone()),
            open_time: shadow.open_time,
        }),
        _ => Held::Sealed {
            fd: shadow.reopen_readonly()?,
            meta: shadow.meta().clone(),
            name: shadow.name().to_string(),
        },
    };
    let m = shadow.meta();
    let entry = Arc::new(Entry {
        id: 1,
        key: (0, m.device, m.inode, m.size, m.mtime.sec, m.mtime.nsec),
        held,
        users: AtomicUsize::new(0),
        attached: AtomicUsize::new(0),
        last_used: Mutex::new(Instant::now()),
    });
    let server = Server::build(None, TreeImpl::Single(entry), ServerOptions::default());
    let inner = server.inner;
    let peer = peer_of(&stream, 1);
    let by = Instant::now() + inner.timeout();
    let conn = match inner.try_handshake(&stream, peer, by)? {
        Hello::Client(uffd, activity, version) => Conn::new(peer, stream, uffd, activity, version),
        Hello::Status => {
            inner.answer_status(&stream, by)?;
            return Ok(Served { thread: None });
        }
    };
    let thread = std::thread::Builder::new()
        .name("shadowfd-remote".into())
        .spawn(move || inner.run(conn))
        .map_err(|e| Error::sys("spawn a remote-consumer thread", e))?;
    Ok(Served {
        thread: Some(thread),
    })
}
