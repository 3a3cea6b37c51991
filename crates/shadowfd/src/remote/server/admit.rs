//! Admission: pending connections and their cap, the client table's cap
//! with idle displacement, and the HELLO handshake (a status query or a
//! client with its userfaultfd and protocol version).

use super::*;

/// What a HELLO asked for.
pub(super) enum Hello {
    /// A status query: one STATS of handle 0, then the server hangs up.
    Status,
    /// A client, with its userfaultfd if it sent one, and the protocol
    /// version chosen.
    Client(Option<Arc<Uffd>>, Arc<Activity>, u64),
}

impl Inner {
    /// Counts a new connection as pending; if the pending table is full,
    /// the oldest pending connection is dropped to make room.
    /// Returns the id of the connection dropped, if one was.
    pub(super) fn add_pending(
        &self,
        st: &mut State,
        stream: &UnixStream,
        peer: Peer,
    ) -> Option<u64> {
        let gone = if st.pending.len() >= self.opts.max_pending.max(1) {
            st.pending.pop_first()
        } else {
            None
        };
        if let Some((_, p)) = &gone {
            shut(p.fd);
        }
        st.pending.insert(
            peer.id,
            PendingConn {
                fd: stream.as_raw_fd(),
            },
        );
        gone.map(|(id, _)| id)
    }

    /// Logs that pending connection `id` was dropped to admit `peer`.
    pub(super) fn log_displaced(&self, id: u64, peer: Peer) {
        self.log_limited(
            "pending",
            &format!(
                "client {id}: dropped before HELLO to admit client {}: {} connections were \
                 waiting for HELLO, the maximum (--max-pending)",
                peer.id, self.opts.max_pending
            ),
        );
    }

    /// Lists a client that completed HELLO, making room if the table is
    /// full: the client idle longest among those with no lazy range
    /// attached and no request in progress is dropped. Err (a message for
    /// the refused client) if there is no such client.
    pub(super) fn admit(
        &self,
        peer: Peer,
        uffd: bool,
        stream: &UnixStream,
    ) -> std::result::Result<Arc<Activity>, String> {
        let activity = Arc::new(Activity {
            busy: std::sync::atomic::AtomicBool::new(false),
            last_ms: AtomicU64::new(self.now_ms()),
        });
        let info = ClientInfo {
            pid: peer.pid,
            uid: peer.uid,
            since: Instant::now(),
            uffd,
            handles: 0,
            mappings: 0,
            activity: activity.clone(),
            fd: stream.as_raw_fd(),
        };
        let victim = {
            let mut st = self.state.lock();
            let mut victim = None;
            if st.clients.len() >= self.opts.max_clients {
                let pick = st
                    .clients
                    .iter()
                    .filter(|(_, c)| c.mappings == 0 && !c.activity.busy.load(Ordering::SeqCst))
                    .min_by_key(|(_, c)| c.activity.last_ms.load(Ordering::Relaxed))
                    .map(|(id, _)| *id);
                match pick.and_then(|id| st.clients.remove(&id).map(|c| (id, c))) {
                    Some(v) => {
                        shut(v.1.fd);
                        victim = Some(v);
                    }
                    None => {
                        return Err(format!(
                            "the server has its maximum of {} clients, and each has a lazy \
                             mapping attached or a request in progress; try again later",
                            self.opts.max_clients
                        ));
                    }
                }
            }
            st.clients.insert(peer.id, info);
            victim
        };
        if let Some((id, c)) = victim {
            let idle = self
                .now_ms()
                .saturating_sub(c.activity.last_ms.load(Ordering::Relaxed));
            self.log_limited(
                "displaced",
                &format!(
                    "client {id} (pid {} uid {}): dropped to admit {peer}: the server had its \
                     maximum of {} clients, and this one had no lazy mapping and had been idle \
                     longest ({:.1} s)",
                    c.pid,
                    c.uid,
                    self.opts.max_clients,
                    idle as f64 / 1000.0
                ),
            );
        }
        Ok(activity)
    }

    /// HELLO and its reply (and the whole of a status query). `None` if
    /// there is no session to run (logged if the peer was dropped).
    pub(super) fn handshake(
        self: &Arc<Self>,
        stream: UnixStream,
        peer: Peer,
        by: Instant,
    ) -> Option<Conn> {
        let r = self.try_handshake(&stream, peer, by);
        let r = match r {
            Ok(Hello::Status) => self.answer_status(&stream, by).map(|()| Hello::Status),
            r => r,
        };
        // Out of the pending table before the socket can be closed.
        self.state.lock().pending.remove(&peer.id);
        match r {
            Ok(Hello::Status) => None,
            Ok(Hello::Client(uffd, activity, version)) => {
                self.log(&format!(
                    "{peer}: connected ({})",
                    if uffd.is_some() {
                        "with a userfaultfd: lazy mappings"
                    } else {
                        "no userfaultfd: sealed descriptors only"
                    }
                ));
                let mut conn = Conn::new(peer, stream, uffd, activity, version);
                self.hand_over(&mut conn);
                Some(conn)
            }
            Err(e) => {
                self.log_limited("dropped", &format!("{peer}: dropped: {e}"));
                None
            }
        }
    }

    /// A status query's one request: STATS of handle 0, by `by`.
    pub(super) fn answer_status(&self, stream: &UnixStream, by: Instant) -> Result<()> {
        let protocol = |what: String| Error::Protocol { what };
        let (f, fd) = wire::recv_by(stream, Some(by)).map_err(|e| protocol(e.to_string()))?;
        if fd.is_some() || f.kind != wire::STATS || f.a != 0 {
            let (r, _) = refuse(
                f.kind,
                wire::E_PROTOCOL,
                "a status connection (HELLO with HELLO_STATUS) may send one request: STATS of \
                 handle 0",
            );
            let _ = wire::send_by(stream, &r, None, Some(by));
            return Err(protocol(format!(
                "sent kind {:#x} on a status connection",
                f.kind
            )));
        }
        let r = Frame::new(wire::STATS | wire::REPLY, 0, 0, 0, 0)
            .with_payload(self.status_json().into_bytes());
        wire::send_by(stream, &r, None, Some(by))
    }

    pub(super) fn try_handshake(
        &self,
        stream: &UnixStream,
        peer: Peer,
        by: Instant,
    ) -> Result<Hello> {
        let t = self.timeout();
        let set = stream
            .set_read_timeout(Some(t))
            .and_then(|()| stream.set_write_timeout(Some(t)));
        set.map_err(|e| Error::sys("set the client socket timeouts", e))?;
        let protocol = |what: String| Error::Protocol { what };
        let (hello, fd) = match wire::recv_by(stream, Some(by)) {
            Ok(x) => x,
            Err(RecvError::TimedOut) => {
                return Err(protocol(format!(
                    "{peer} did not send a whole HELLO within the peer timeout of {t:?} \
                     (protocol version {}). Raise --peer-timeout if clients are that slow",
                    wire::VERSION
                )));
            }
            Err(RecvError::Legacy { kind, a }) => {
                wire::send_legacy_error(stream, wire::E_VERSION);
                return Err(protocol(format!(
                    "{peer} speaks protocol version {} (frame kind {kind}); this server speaks \
                     version {}: refused with ERROR E_VERSION",
                    if kind == 4 { a } else { 1 },
                    wire::VERSION
                )));
            }
            Err(e) => return Err(protocol(format!("{peer}: expected HELLO: {e}"))),
        };
        let send_err = |kind, code, msg: String| {
            let (f, _) = refuse(kind, code, msg.clone());
            let _ = wire::send_by(stream, &f, None, Some(by));
            protocol(msg)
        };
        if hello.kind != wire::HELLO {
            return Err(send_err(
                hello.kind,
                wire::E_PROTOCOL,
                format!(
                    "the first frame was kind {:#x}; expected HELLO ({:#x})",
                    hello.kind,
                    wire::HELLO
                ),
            ));
        }
        if hello.a < wire::MIN_VERSION {
            return Err(send_err(
                hello.kind,
                wire::E_VERSION,
                format!(
                    "the client speaks protocol versions up to {}; this server speaks versions {} to {}",
                    hello.a,
                    wire::MIN_VERSION,
                    wire::VERSION
                ),
            ));
        }
        let cap = self.engine.as_ref().map_or(0, |e| e.config().max_size);
        let reply = Frame::new(
            wire::HELLO | wire::REPLY,
            hello.a.min(wire::VERSION),
            u64::from(std::process::id()),
            cap,
            crate::page_size() as u64,
        );
        let has = hello.b & wire::HELLO_HAS_UFFD != 0;
        if hello.b & wire::HELLO_STATUS != 0 {
            if fd.is_some() {
                return Err(send_err(
                    hello.kind,
                    wire::E_PROTOCOL,
                    "a status HELLO carries no descriptor".into(),
                ));
            }
            wire::send_by(stream, &reply, None, Some(by))?;
            return Ok(Hello::Status);
        }
        let uffd = match (has, fd) {
            (true, Some(fd)) => {
                // (Where /proc cannot say, the ioctls will.)
                let what = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .ok()
                    .map(|l| l.to_string_lossy().into_owned());
                if let Some(what) = what.filter(|w| w != "anon_inode:[userfaultfd]") {
                    return Err(send_err(
                        hello.kind,
                        wire::E_PROTOCOL,
                        format!(
                            "HELLO says a userfaultfd comes with it, and the descriptor that came \
                             is {what:?}; send the userfaultfd itself, or HELLO without it"
                        ),
                    ));
                }
                let u = Uffd::from_fd(fd, hello.c);
                if !u.has_lazy_features() {
                    return Err(send_err(
                        hello.kind,
                        wire::E_NO_UFFD,
                        format!(
                            "the client's userfaultfd negotiated features {:#x}, without \
                             MINOR_SHMEM and POISON; send HELLO without it to get sealed descriptors",
                            hello.c
                        ),
                    ));
                }
                Some(Arc::new(u))
            }
            (true, None) => {
                return Err(send_err(
                    hello.kind,
                    wire::E_PROTOCOL,
                    "HELLO says a userfaultfd comes with it, and none came".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(send_err(
                    hello.kind,
                    wire::E_PROTOCOL,
                    "HELLO carried a descriptor without the HELLO_HAS_UFFD flag".into(),
                ));
            }
            (false, None) => None,
        };
        let activity = match self.admit(peer, uffd.is_some(), stream) {
            Ok(a) => a,
            Err(msg) => return Err(send_err(hello.kind, wire::E_LIMIT, msg)),
        };
        if let Err(e) = wire::send_by(stream, &reply, None, Some(by)) {
            self.state.lock().clients.remove(&peer.id);
            return Err(e);
        }
        Ok(Hello::Client(uffd, activity, reply.a))
    }
}

impl Inner {
    /// The fault service every lazy shadow of this server shares.
    fn service(&self) -> Option<&Arc<Service>> {
        match (&self.engine, &self.tree) {
            (Some(e), _) => e.service(),
            (None, TreeImpl::Single(e)) => e.lazy().map(|l| &l.service),
            (None, TreeImpl::Tree(_)) => None,
        }
    }

    /// Hands the client's userfaultfd to the fault service's workers
    /// (`fault::Foreign`): its faults are answered there, on the faulting
    /// CPU, never behind this session's requests. If that fails, the
    /// session reads the userfaultfd itself, as before.
    fn hand_over(&self, conn: &mut Conn) {
        let (Some(u), Some(service)) = (&conn.uffd, self.service()) else {
            return;
        };
        match Foreign::watch(service, u.clone()) {
            Ok(lane) => conn.lane = Some(lane),
            Err(e) => self.log_limited(
                "lane",
                &format!(
                    "{}: its faults are served by its session thread: {e}",
                    conn.peer
                ),
            ),
        }
    }
}
