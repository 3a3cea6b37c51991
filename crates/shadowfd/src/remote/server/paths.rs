//! Requests by path: OPEN, STAT and LIST, the shared-shadow lookup (one
//! shadow per source identity, opened once however many clients ask) and
//! eviction of shadows nobody holds.

use super::*;

impl Inner {
    pub(super) fn open(self: &Arc<Self>, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let path = String::from_utf8_lossy(&f.payload).into_owned();
        if conn.handles.len() >= self.opts.max_handles {
            return refuse(
                f.kind,
                wire::E_LIMIT,
                format!(
                    "this connection has its maximum of {} open handles; CLOSE some",
                    self.opts.max_handles
                ),
            );
        }
        let entry = match self.lookup(&f.payload) {
            Ok(e) => e,
            Err((code, msg)) => {
                self.log(&format!(
                    "{}: OPEN {path:?} refused: {} {msg}",
                    conn.peer,
                    wire::code_name(code)
                ));
                return refuse(f.kind, code, msg);
            }
        };
        let h = conn.next_handle;
        conn.next_handle += 1;
        let meta = entry.meta().clone();
        let mut payload = Vec::with_capacity(32);
        payload.extend_from_slice(&meta.mtime.sec.to_le_bytes());
        payload.extend_from_slice(&(meta.mtime.nsec as u64).to_le_bytes());
        payload.extend_from_slice(&entry.id.to_le_bytes());
        payload.extend_from_slice(&u64::from(entry.lazy().is_some()).to_le_bytes());
        self.log(&format!(
            "{}: OPEN {path:?} -> handle {h}, shadow {} ({} bytes, {})",
            conn.peer,
            entry.id,
            meta.size,
            entry.mode()
        ));
        conn.handles.insert(
            h,
            Handle {
                entry,
                starts: BTreeSet::new(),
                closed: false,
            },
        );
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.handles += 1;
        }
        (
            Frame::new(
                wire::OPEN | wire::REPLY,
                h,
                meta.size,
                meta.device,
                meta.inode,
            )
            .with_payload(payload),
            None,
        )
    }

    /// STAT (since version 4): what a path is, without opening a shadow.
    pub(super) fn stat_path(&self, f: &Frame) -> (Frame, Option<OwnedFd>) {
        match self.path_stat(&f.payload) {
            Ok(s) => {
                let mut p = Vec::with_capacity(24);
                p.extend_from_slice(&s.mtime.sec.to_le_bytes());
                p.extend_from_slice(&(s.mtime.nsec as u64).to_le_bytes());
                p.extend_from_slice(&s.nlink.to_le_bytes());
                (
                    Frame::new(wire::STAT | wire::REPLY, s.kind, s.size, s.device, s.inode)
                        .with_payload(p),
                    None,
                )
            }
            Err((code, msg)) => refuse(f.kind, code, msg),
        }
    }

    /// What `path` is (STAT, and each path of SMALL).
    pub(super) fn path_stat(&self, path: &[u8]) -> std::result::Result<tree::PathStat, Refusal> {
        tree::relative(path).and_then(|rel| match &self.tree {
            TreeImpl::Tree(t) => t.stat(rel),
            TreeImpl::Single(e) => {
                let m = e.meta();
                Ok(tree::PathStat {
                    kind: wire::KIND_FILE,
                    size: m.size,
                    device: m.device,
                    inode: m.inode,
                    mtime: m.mtime,
                    nlink: 1,
                })
            }
        })
    }

    /// LIST (since version 4): one page of a directory, from cursor `a`.
    pub(super) fn list(&self, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let r = tree::relative(&f.payload).and_then(|rel| match &self.tree {
            TreeImpl::Tree(t) => t.list(rel, f.a),
            TreeImpl::Single(_) => Err((
                wire::E_NOT_DIR,
                "this server serves one file and has no directories to LIST".into(),
            )),
        });
        match r {
            Ok(page) => {
                let mut p = Vec::new();
                for e in &page.entries {
                    wire::put_entry(&mut p, e);
                }
                (
                    Frame::new(
                        wire::LIST | wire::REPLY,
                        page.entries.len() as u64,
                        page.next,
                        u64::from(page.end),
                        0,
                    )
                    .with_payload(p),
                    None,
                )
            }
            Err((code, msg)) => refuse(f.kind, code, msg),
        }
    }

    /// The shared entry for a client's path, opening a shadow if none
    /// matches the source's identity now; counted as used (under the table
    /// lock, so that eviction never takes an entry being handed out).
    pub(super) fn lookup(
        self: &Arc<Self>,
        path: &[u8],
    ) -> std::result::Result<Arc<Entry>, Refusal> {
        let rel = tree::relative(path)?;
        let (source, meta, container): (Arc<dyn Source>, SourceMeta, (u64, u64)) = match &self.tree
        {
            TreeImpl::Single(e) => {
                e.users.fetch_add(1, Ordering::Relaxed);
                return Ok(e.clone());
            }
            TreeImpl::Tree(t) => {
                let o = t.open(rel)?;
                (o.source, o.meta, o.container)
            }
        };
        let key: Key = (
            container.0,
            container.1,
            meta.inode,
            meta.size,
            meta.mtime.sec,
            meta.mtime.nsec,
        );
        let gate = {
            let mut st = self.state.lock();
            if let Some(e) = st.take_entry(&key) {
                return Ok(e);
            }
            st.opening.entry(key).or_default().clone()
        };
        // Evicted shadows are dropped here, not under a gate: the last drop
        // of a lazy shadow waits for a fill of it still in flight.
        self.evict();
        // Only OPENs of this same source wait here: they share its open.
        let _one = gate.lock();
        if let Some(e) = self.state.lock().take_entry(&key) {
            return Ok(e);
        }
        let opened = self.open_entry(source, key);
        let mut st = self.state.lock();
        if st.opening.get(&key).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
            st.opening.remove(&key);
        }
        let entry = opened?;
        if entry.lazy().is_none() {
            st.sealed_bytes += entry.size();
        }
        st.entries.insert(key, entry.clone());
        drop(st);
        self.log(&format!(
            "shadow {}: opened {} ({} bytes, {}, dev {} inode {})",
            entry.id,
            entry.name(),
            meta.size,
            entry.mode(),
            meta.device,
            meta.inode
        ));
        Ok(entry)
    }

    /// A new shadow of `source`, held once.
    pub(super) fn open_entry(
        &self,
        source: Arc<dyn Source>,
        key: Key,
    ) -> std::result::Result<Arc<Entry>, Refusal> {
        let engine = self.engine.as_ref().expect("a tree server has an engine");
        let source = match &self.opts.source_hook {
            Some(h) => h(source),
            None => source,
        };
        let shadow = engine.open(source).map_err(|e| {
            let code = match &e {
                Error::TooLarge { .. } => wire::E_TOO_LARGE,
                Error::NotRegular { .. } => wire::E_NOT_REGULAR,
                _ => wire::E_IO,
            };
            (code, e.to_string())
        })?;
        Ok(Arc::new(Entry {
            id: self.next_entry.fetch_add(1, Ordering::Relaxed),
            key,
            held: Held::Shadow(shadow),
            users: AtomicUsize::new(1),
            attached: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }))
    }

    /// Drops shadows no client holds, least recently used first, while the
    /// shadows' resident bytes are over 3/4 of the memory budget (so that
    /// fills for live clients find room), and beyond 1024 idle entries.
    /// O(log n) a shadow dropped: the idle entries are kept in order, and
    /// the resident total is the engine's running count.
    pub(super) fn evict(&self) {
        let Some(engine) = &self.engine else { return };
        let budget = engine.config().memory_budget;
        let high = budget / 4 * 3;
        let mut gone = Vec::new();
        {
            let mut st = self.state.lock();
            let mut resident = engine.resident_bytes() + st.sealed_bytes;
            while resident > high || st.idle.len() > 1024 {
                let Some((_, key)) = st.idle.pop_first() else {
                    break;
                };
                if let Some(e) = st.entries.remove(&key) {
                    let r = e.resident();
                    if e.lazy().is_none() {
                        st.sealed_bytes = st.sealed_bytes.saturating_sub(e.size());
                    }
                    resident = resident.saturating_sub(r);
                    gone.push(e);
                }
            }
        }
        for e in gone {
            self.log(&format!(
                "shadow {}: evicted {} (no client; {} bytes resident given back)",
                e.id,
                e.name(),
                e.resident()
            ));
        }
    }
}
