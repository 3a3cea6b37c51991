//! A client's session: reading its requests and its userfaultfd's faults
//! and events, and dispatching each request to its handler.

use super::*;

/// What happened to a session, for the log line.
pub(super) enum End {
    Hangup,
    Error(String),
}

impl Inner {
    /// The session loop: requests on the socket, faults on the client's
    /// userfaultfd, until the client hangs up or breaks the protocol.
    pub(super) fn run(self: &Arc<Self>, mut conn: Conn) {
        let end = self.session(&mut conn);
        // The client is gone or dropped, but children it forked may still
        // map its files: they are served until they exit.
        self.serve_orphans(&mut conn);
        let peer = conn.peer;
        let (mut nh, mut nm) = (0, 0);
        let ids: Vec<u64> = conn.handles.keys().copied().collect();
        for id in ids {
            if let Some((h, ranges)) = conn.take_handle(id) {
                nh += 1;
                nm += ranges.len();
                self.release(h, &ranges, None);
            }
        }
        self.note_mappings(&mut conn);
        self.state.lock().clients.remove(&peer.id);
        let why = match end {
            End::Hangup => "disconnected".to_string(),
            End::Error(e) => format!("dropped: {e}"),
        };
        self.log(&format!(
            "{peer}: {why}; released {nh} handle(s) and {nm} lazy mapping(s)"
        ));
        self.evict();
    }

    pub(super) fn session(self: &Arc<Self>, conn: &mut Conn) -> End {
        let mut raw = vec![uffd_msg::default(); 32];
        let mut faults = Vec::with_capacity(32);
        loop {
            let sfd = conn.stream.as_fd().as_raw_fd();
            let ufd = Self::uffd_side(conn);
            // Idle clients may stay connected as long as they like: a client
            // holding mappings may say nothing for hours. Forked children,
            // and answers deferred for a pending event, are looked at.
            let timeout = self.serve_spaces(conn);
            let pfd = |fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // The socket, the client's userfaultfd (-1: none, ignored by
            // poll), and its forked children's: a child's fault wakes the
            // loop, which serves it (`serve_spaces`) before polling again.
            let mut fds: Vec<libc::pollfd> = [sfd, ufd].into_iter().map(pfd).collect();
            fds.extend(
                conn.children
                    .iter()
                    .map(|c| pfd(c.uffd.as_fd().as_raw_fd())),
            );
            let n = if ufd >= 0 { 2 } else { 1 };
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            let broken = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
            if fds[2..].iter().any(|p| p.revents & broken != 0) {
                // Asked at once whether the children live: a broken one
                // goes, rather than wake the loop for ever.
                let back = Duration::from_millis(CHILD_CHECK_MS as u64);
                let now = Instant::now();
                conn.children_checked = now.checked_sub(back).unwrap_or(now);
            }
            if r < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return End::Error(format!("poll: {}", std::io::Error::last_os_error()));
            }
            if n == 2 && fds[1].revents != 0 {
                if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    return End::Error("the client's userfaultfd reported an error".into());
                }
                if let Err(e) = self.serve_client_uffd(conn, &mut raw, &mut faults) {
                    return End::Error(e);
                }
            }
            if fds[0].revents != 0 {
                // What the workers read from its userfaultfd before this
                // request (the events its calls so far waited for) is
                // applied first.
                if conn.lane.is_some()
                    && let Err(e) = self.serve_client_uffd(conn, &mut raw, &mut faults)
                {
                    return End::Error(e);
                }
                // One deadline for the whole frame, from its first byte.
                let by = Instant::now() + self.timeout();
                let (frame, fd) = match wire::recv_by(&conn.stream, Some(by)) {
                    Ok(x) => x,
                    Err(RecvError::Closed) => return End::Hangup,
                    Err(RecvError::TimedOut) => {
                        return End::Error(format!(
                            "began a frame and did not finish it within the peer timeout of {:?}",
                            self.timeout()
                        ));
                    }
                    Err(e) => return End::Error(format!("expected a request frame: {e}")),
                };
                if fd.is_some() {
                    return End::Error(format!(
                        "sent a descriptor with a request of kind {:#x}; only HELLO carries one",
                        frame.kind
                    ));
                }
                conn.activity.busy.store(true, Ordering::SeqCst);
                let done = self.request(conn, frame);
                conn.activity
                    .last_ms
                    .store(self.now_ms(), Ordering::Relaxed);
                conn.activity.busy.store(false, Ordering::SeqCst);
                if let Err(e) = done {
                    return End::Error(e);
                }
            }
        }
    }

    /// What the session polls for its client's userfaultfd: the fault
    /// service's signal that it left messages (`Conn::lane`), else the
    /// userfaultfd itself (-1: none).
    pub(super) fn uffd_side(conn: &Conn) -> RawFd {
        match (&conn.lane, &conn.uffd) {
            (Some(l), _) => l.notify().as_raw_fd(),
            (None, Some(u)) => u.as_fd().as_raw_fd(),
            (None, None) => -1,
        }
    }

    /// Applies the client's mapping events and serves the faults the
    /// fault service left to the session (or, with no lane, read from its
    /// userfaultfd now). Err ends the session.
    pub(super) fn serve_client_uffd(
        &self,
        conn: &mut Conn,
        raw: &mut [uffd_msg],
        faults: &mut Vec<crate::sys::Fault>,
    ) -> std::result::Result<(), String> {
        let Some(u) = conn.uffd.clone() else {
            return Ok(());
        };
        faults.clear();
        let mut events = Vec::new();
        if let Some(lane) = &conn.lane {
            let mut inbox = Inbox::default();
            lane.take(&mut inbox);
            if let Some(e) = inbox.broken {
                return Err(format!("reading its userfaultfd: {e}"));
            }
            events = inbox.events;
            *faults = inbox.faults;
        } else {
            match u.read_msgs(raw, faults, &mut events) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                Err(e) => return Err(format!("reading its userfaultfd: {e}")),
            }
        }
        let n = events.len() as u32;
        self.client_events(conn, events);
        if let Some(lane) = &conn.lane {
            lane.applied(n as usize);
        }
        Self::pace_events(conn, n);
        for f in faults.iter() {
            if !self.fault(conn, &u, f.address) {
                return Err("its userfaultfd cannot poison a stray fault; dropped".into());
            }
        }
        Ok(())
    }

    /// Serves one fault of the client. False if the client must be dropped.
    pub(super) fn fault(&self, conn: &mut Conn, uffd: &Uffd, address: u64) -> bool {
        let page = crate::page_size() as u64;
        let addr = address & !(page - 1);
        let found = conn
            .range_at(addr)
            .and_then(|r| Some((r, conn.handles.get(&r.handle)?)));
        if let Some((r, h)) = found {
            let shadow = h.entry.lazy().expect("lazy ranges are of lazy shadows");
            let core = &shadow.service.core;
            let hit = Hit {
                uffd,
                addr,
                offset: r.offset + (addr - r.start),
                limit: r.end() - addr,
                internal: false,
            };
            if let Some(work) = shadow.on_fault(core, hit) {
                shadow.run(core, work);
            }
            return true;
        }
        if self.adopt_grown(conn, addr) {
            return self.fault(conn, uffd, address);
        }
        // A fault outside every range it attached: SIGBUS in the client.
        if uffd.poison(addr, page).is_err() {
            let _ = uffd.wake(addr, page);
            return false;
        }
        true
    }

    pub(super) fn send(
        &self,
        conn: &Conn,
        f: &Frame,
        fd: Option<&OwnedFd>,
    ) -> std::result::Result<(), String> {
        wire::send(&conn.stream, f, fd.map(|f| f.as_fd()))
            .map_err(|e| format!("sending a reply: {e}"))
    }

    /// Answers one request. Err ends the session.
    pub(super) fn request(
        self: &Arc<Self>,
        conn: &mut Conn,
        f: Frame,
    ) -> std::result::Result<(), String> {
        let (reply, fd) = match f.kind {
            wire::OPEN => self.open(conn, &f),
            wire::MAP => return self.map(conn, &f),
            wire::FILL => self.fill(conn, &f),
            wire::STATS => self.stats(conn, &f),
            wire::UNMAP => self.unmap(conn, &f),
            wire::CLOSE => self.close(conn, &f),
            wire::STAT => self.stat_path(&f),
            wire::LIST => self.list(&f),
            wire::SMALL => self.small(conn, &f),
            wire::ATTACH => refuse(
                f.kind,
                wire::E_PROTOCOL,
                "ATTACH without a MAP just before it",
            ),
            k => {
                let (r, _) = refuse(k, wire::E_PROTOCOL, format!("unknown request kind {k:#x}"));
                let _ = self.send(conn, &r, None);
                return Err(format!("sent an unknown request kind {k:#x}"));
            }
        };
        self.send(conn, &reply, fd.as_ref())
    }

    pub(super) fn handle_of<'a>(
        &self,
        conn: &'a Conn,
        kind: u32,
        h: u64,
    ) -> std::result::Result<&'a Handle, (Frame, Option<OwnedFd>)> {
        conn.handles.get(&h).filter(|h| !h.closed).ok_or_else(|| {
            refuse(
                kind,
                wire::E_BAD_HANDLE,
                format!("handle {h} is not open on this connection; OPEN returns handles"),
            )
        })
    }
}
