//! Requests on a handle's bytes and ranges: MAP (a sealed descriptor, or a
//! lazy range the client ATTACHes), FILL, STATS, UNMAP and CLOSE, with the
//! per-client and global range caps.

use super::*;

/// Checks an ATTACH of `len` bytes at `start` showing the shadow from
/// `offset` (since version 4; a version 3 client sends offset 0 and the
/// whole file): page-aligned, inside the file's pages (`whole` bytes),
/// clear of every range the connection has attached.
pub(super) fn attach_span(
    conn: &Conn,
    start: u64,
    len: u64,
    offset: u64,
    whole: u64,
    page: u64,
) -> std::result::Result<(), String> {
    if len == 0 || len % page != 0 || offset % page != 0 {
        return Err(format!(
            "ATTACH of {len} bytes from file offset {offset}: the length must be a non-zero \
             multiple of the page size ({page}) and the offset a multiple of it; round the \
             offset down and the length up to a page"
        ));
    }
    if offset.checked_add(len).is_none_or(|e| e > whole) {
        return Err(format!(
            "ATTACH of {len} bytes from file offset {offset}: the range must end within the \
             file's pages ({whole} bytes, its size rounded up to a page); map the part past \
             the end some other way (it raises SIGBUS natively)"
        ));
    }
    let Some(end) = start.checked_add(len) else {
        return Err(format!(
            "ATTACH at {start:#x} of {len} bytes: the range overflows the address space"
        ));
    };
    if let Some(r) = conn
        .overlapping(start, end)
        .first()
        .map(|s| &conn.ranges[s])
    {
        return Err(format!(
            "ATTACH at {start:#x} of {len} bytes overlaps the range attached at {:#x} \
             ({} bytes) of handle {}; UNMAP that part first",
            r.start, r.len, r.handle
        ));
    }
    Ok(())
}

impl Inner {
    pub(super) fn map(
        self: &Arc<Self>,
        conn: &mut Conn,
        f: &Frame,
    ) -> std::result::Result<(), String> {
        let entry = match self.handle_of(conn, f.kind, f.a) {
            Ok(h) => h.entry.clone(),
            Err((r, _)) => return self.send(conn, &r, None),
        };
        let size = entry.size();
        let page = crate::page_size() as u64;
        let want_lazy = f.b == wire::MAP_LAZY;
        if size == 0 {
            let r = Frame::new(wire::MAP | wire::REPLY, f.a, 0, wire::MAP_SEALED, 0);
            return self.send(conn, &r, None);
        }
        let lazy_shadow = entry.lazy().filter(|l| !l.fully_filled()).cloned();
        match (lazy_shadow, conn.uffd.clone()) {
            (Some(l), Some(uffd)) if want_lazy => {
                let ro = match l.memfd.reopen_readonly() {
                    Ok(fd) => fd,
                    Err(e) => {
                        let (r, _) = refuse(f.kind, wire::E_IO, e.to_string());
                        return self.send(conn, &r, None);
                    }
                };
                let r = Frame::new(wire::MAP | wire::REPLY, f.a, size, wire::MAP_LAZY, 0);
                self.send(conn, &r, Some(&ro))?;
                drop(ro);
                // The client maps it PROT_NONE, registers it and says where.
                // Meanwhile its other threads may fault, or munmap (which
                // waits until its UNMAP event is read): both are served.
                let by = Instant::now() + self.timeout();
                self.serve_until_readable(conn, by);
                let (att, fd) = wire::recv_by(&conn.stream, Some(by)).map_err(|e| {
                    format!(
                        "expected ATTACH within the peer timeout of {:?} after a lazy MAP: {e}",
                        self.timeout()
                    )
                })?;
                if fd.is_some() {
                    return Err("sent a descriptor with its ATTACH".into());
                }
                let whole = size.div_ceil(page) * page;
                if att.kind == wire::ATTACH && att.a == f.a && att.b == 0 && att.c == 0 {
                    // Version 5: the client abandons the MAP (it could not
                    // map or register the descriptor); nothing was attached.
                    self.log(&format!("{}: MAP of handle {} abandoned", conn.peer, f.a));
                    let r = Frame::new(wire::ATTACH | wire::REPLY, f.a, 0, 0, 0);
                    return self.send(conn, &r, None);
                }
                if att.kind != wire::ATTACH || att.a != f.a || att.b % page != 0 || att.b == 0 {
                    let msg = format!(
                        "expected ATTACH of handle {} with a non-zero page-aligned address; got \
                         kind {:#x} handle {} address {:#x}",
                        f.a, att.kind, att.a, att.b
                    );
                    let (r, _) = refuse(att.kind, wire::E_PROTOCOL, msg.clone());
                    let _ = self.send(conn, &r, None);
                    return Err(msg);
                }
                let (start, len, offset) = (att.b, att.c, att.d);
                if let Some(msg) = self.range_cap(conn, &format!("ATTACH at {start:#x}")) {
                    // The client unmaps its range; the session goes on.
                    self.log_limited("attach", &format!("{}: ATTACH refused: {msg}", conn.peer));
                    let (r, _) = refuse(att.kind, wire::E_LIMIT, msg);
                    return self.send(conn, &r, None);
                }
                if uffd.has_events() && start.checked_add(len).is_some() {
                    // The kernel gave these addresses to the client's new
                    // mapping: a range still attached there was unmapped or
                    // moved away, its event not applied yet (another
                    // thread's munmap or mremap, queued after this mmap).
                    Self::cut_client(conn, start, start + len);
                    self.reap_closed(conn);
                }
                if let Err(msg) = attach_span(conn, start, len, offset, whole, page) {
                    // The client unmaps its range; the session goes on.
                    self.log(&format!("{}: ATTACH refused: {msg}", conn.peer));
                    let (r, _) = refuse(att.kind, wire::E_RANGE, msg);
                    return self.send(conn, &r, None);
                }
                let key = l.add_remote(uffd.clone(), start, len, offset);
                entry.attached.fetch_add(1, Ordering::Relaxed);
                conn.insert_range(Attached {
                    handle: f.a,
                    start,
                    len,
                    offset,
                    key,
                });
                self.note_mappings(conn);
                self.log(&format!(
                    "{}: MAP handle {} lazily at {start:#x} ({len} bytes from offset {offset})",
                    conn.peer, f.a
                ));
                let r = Frame::new(wire::ATTACH | wire::REPLY, f.a, start, len, offset);
                self.send(conn, &r, None)
            }
            (lazy, uffd) => {
                if lazy.is_some() {
                    // The eager fallback: fill the shared shadow whole, then
                    // hand out a sealed descriptor, within the eager cap.
                    let cap = self.engine.as_ref().map_or(0, |e| e.config().max_size);
                    if size > cap {
                        let why = if uffd.is_none() {
                            "the client has no userfaultfd"
                        } else {
                            "the client asked for a sealed descriptor"
                        };
                        let msg = format!(
                            "{why}, and the file is {size} bytes, over the server's eager cap of \
                             {cap} bytes; start the server with --max-size {size} or more, or \
                             map it lazily from a client with a userfaultfd"
                        );
                        let (r, _) = refuse(
                            f.kind,
                            if cap == 0 {
                                wire::E_NO_UFFD
                            } else {
                                wire::E_TOO_LARGE
                            },
                            msg,
                        );
                        return self.send(conn, &r, None);
                    }
                    if let Err(e) = entry_materialize(&entry) {
                        let (r, _) = refuse(f.kind, wire::E_IO, e.to_string());
                        return self.send(conn, &r, None);
                    }
                }
                let fd = match entry.sealed_fd() {
                    Ok(fd) => fd,
                    Err(e) => {
                        let (r, _) = refuse(f.kind, wire::E_IO, e.to_string());
                        return self.send(conn, &r, None);
                    }
                };
                self.log(&format!(
                    "{}: MAP handle {} as a sealed descriptor ({size} bytes)",
                    conn.peer, f.a
                ));
                let r = Frame::new(wire::MAP | wire::REPLY, f.a, size, wire::MAP_SEALED, 0);
                self.send(conn, &r, Some(&fd))
            }
        }
    }

    pub(super) fn fill(&self, conn: &Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let h = match self.handle_of(conn, f.kind, f.a) {
            Ok(h) => h,
            Err(r) => return r,
        };
        let size = h.entry.size();
        if f.c > wire::MAX_FILL || f.b > size {
            return refuse(
                f.kind,
                wire::E_RANGE,
                format!(
                    "FILL of {} bytes at {}: the offset must be at most the size ({size}) and \
                     the length at most {} bytes",
                    f.c,
                    f.b,
                    wire::MAX_FILL
                ),
            );
        }
        let n = f.c.min(size - f.b) as usize;
        let mut buf = vec![0u8; n];
        match h.entry.read_at(&mut buf, f.b) {
            Ok(got) => {
                buf.truncate(got);
                (
                    Frame::new(wire::FILL | wire::REPLY, f.a, f.b, got as u64, 0).with_payload(buf),
                    None,
                )
            }
            Err(e) => refuse(f.kind, wire::E_IO, e.to_string()),
        }
    }

    pub(super) fn stats(&self, conn: &Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let json = if f.a == 0 {
            self.status_json()
        } else {
            match self.handle_of(conn, f.kind, f.a) {
                Ok(h) => entry_json(&h.entry),
                Err(r) => return r,
            }
        };
        (
            Frame::new(wire::STATS | wire::REPLY, f.a, 0, 0, 0).with_payload(json.into_bytes()),
            None,
        )
    }

    pub(super) fn unmap(&self, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        let uffd = conn.uffd.clone();
        let Some(h) = conn.handles.get(&f.a).filter(|h| !h.closed) else {
            return refuse(
                f.kind,
                wire::E_BAD_HANDLE,
                format!("handle {} is not open on this connection", f.a),
            );
        };
        let lazy = h.entry.lazy().cloned();
        let entry = h.entry.clone();
        let page = crate::page_size() as u64;
        // c = 0: the whole range that starts at b (version 3). Since version
        // 4, c > 0: the part of [b, b+c) inside the handle's ranges.
        // A range the server attached from the kernel's view (a move, a
        // grow) may sit under another handle of the same file: the same
        // shadow counts.
        let same = |r: &Attached| {
            r.handle == f.a
                || conn
                    .handles
                    .get(&r.handle)
                    .is_some_and(|o| Arc::ptr_eq(&o.entry, &entry))
        };
        let (lo, hi) = if f.c == 0 {
            match conn.ranges.get(&f.b).filter(|r| same(r)) {
                Some(r) => (r.start, r.end()),
                None => {
                    return refuse(
                        f.kind,
                        wire::E_RANGE,
                        format!("handle {} has no lazy mapping at {:#x}", f.a, f.b),
                    );
                }
            }
        } else {
            match f.b.checked_add(f.c) {
                Some(hi) if f.b % page == 0 && f.c % page == 0 => (f.b, hi),
                _ => {
                    return refuse(
                        f.kind,
                        wire::E_RANGE,
                        format!(
                            "UNMAP of {} bytes at {:#x}: address and length must be multiples of \
                             the page size ({page}) and the range must not overflow",
                            f.c, f.b
                        ),
                    );
                }
            }
        };
        let hit: Vec<Attached> = conn
            .overlapping(lo, hi)
            .into_iter()
            .filter_map(|s| conn.ranges.get(&s).copied())
            .filter(|r| same(r))
            .collect();
        if hit.is_empty() {
            return refuse(
                f.kind,
                wire::E_RANGE,
                format!(
                    "handle {} has no lazy mapping overlapping {:#x}..{:#x}",
                    f.a, lo, hi
                ),
            );
        }
        // Only a range reaching past both ends of the cut is split in two
        // (one more range): refused at the cap, before anything changes.
        if hit.iter().any(|r| r.start < lo && hi < r.end()) {
            let what = format!("UNMAP of {lo:#x}..{hi:#x} would split a range in two");
            if let Some(msg) = self.range_cap(conn, &what) {
                return refuse(
                    f.kind,
                    wire::E_LIMIT,
                    format!("{msg}, or UNMAP the whole range (length 0) instead"),
                );
            }
        }
        let n = hit.len();
        for r in hit {
            let end = r.end();
            // What stays on either side keeps its file offsets; it is added
            // before the old range goes, so a fill completing meanwhile
            // still answers every waiting page.
            let mut pieces = Vec::with_capacity(2);
            for (start, stop) in [(r.start, lo), (hi, end)] {
                if start < stop && r.start <= start && stop <= end {
                    let offset = r.offset + (start - r.start);
                    let key = match (&uffd, &lazy) {
                        (Some(u), Some(l)) => l.add_remote(u.clone(), start, stop - start, offset),
                        _ => 0,
                    };
                    pieces.push(Attached {
                        handle: f.a,
                        start,
                        len: stop - start,
                        offset,
                        key,
                    });
                }
            }
            // The mirror first (see `Inner::cut_client_except`).
            conn.remove_range(r.start);
            if let (Some(u), Some(l)) = (&uffd, &lazy) {
                // Nobody serves the cut part from now on: what is unfilled
                // faults with SIGBUS, never blocks.
                let (a, z) = (r.start.max(lo), end.min(hi));
                l.poison_unfilled_via(u, a, z - a, r.offset + (a - r.start));
                l.remove_remote(r.key);
            }
            entry.attached.fetch_add(pieces.len(), Ordering::Relaxed);
            entry.attached.fetch_sub(1, Ordering::Relaxed);
            for p in pieces {
                conn.insert_range(p);
            }
        }
        self.note_mappings(conn);
        if f.c > 0 {
            self.log(&format!(
                "{}: UNMAP handle {} cut {lo:#x}..{hi:#x} out of {n} lazy range(s)",
                conn.peer, f.a
            ));
        }
        (
            Frame::new(wire::UNMAP | wire::REPLY, f.a, f.b, f.c, 0),
            None,
        )
    }

    /// Publishes the connection's count of lazy ranges (STATS, the global
    /// count and which clients may make room for others).
    pub(super) fn note_mappings(&self, conn: &mut Conn) {
        let now = conn.ranges.len();
        if now >= conn.published {
            self.ranges_total
                .fetch_add(now - conn.published, Ordering::SeqCst);
        } else {
            self.ranges_total
                .fetch_sub(conn.published - now, Ordering::SeqCst);
        }
        conn.published = now;
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.mappings = now;
        }
    }

    /// A refusal if one more lazy range would pass the connection's cap or
    /// the server's.
    pub(super) fn range_cap(&self, conn: &Conn, what: &str) -> Option<String> {
        if conn.ranges.len() >= self.opts.max_ranges {
            return Some(format!(
                "{what}: this connection has {} lazy ranges attached, its maximum of {} \
                 (--max-ranges); UNMAP some first",
                conn.ranges.len(),
                self.opts.max_ranges
            ));
        }
        let total = self.ranges_total.load(Ordering::SeqCst);
        // Each connection's first RESERVED_RANGES are not held against the
        // global cap: clients that filled it cannot keep others from
        // mapping.
        if conn.ranges.len() >= RESERVED_RANGES && total >= self.opts.max_ranges_total {
            return Some(format!(
                "{what}: the server has {total} lazy ranges attached over all clients, its \
                 maximum of {} (--max-ranges-total); try again later",
                self.opts.max_ranges_total
            ));
        }
        None
    }

    pub(super) fn close(&self, conn: &mut Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        match conn.handles.get_mut(&f.a) {
            Some(h) if !h.closed && !h.starts.is_empty() => {
                // Still mapped: served until the kernel says the ranges are
                // gone (`Inner::reap_closed`).
                h.closed = true;
                return (Frame::new(wire::CLOSE | wire::REPLY, f.a, 0, 0, 0), None);
            }
            Some(h) if h.closed => {
                return refuse(
                    f.kind,
                    wire::E_BAD_HANDLE,
                    format!("handle {} is closed already", f.a),
                );
            }
            _ => {}
        }
        let Some((h, ranges)) = conn.take_handle(f.a) else {
            return refuse(
                f.kind,
                wire::E_BAD_HANDLE,
                format!("handle {} is not open on this connection", f.a),
            );
        };
        self.release(h, &ranges, conn.uffd.as_deref());
        if let Some(c) = self.state.lock().clients.get_mut(&conn.peer.id) {
            c.handles = c.handles.saturating_sub(1);
        }
        self.note_mappings(conn);
        self.evict();
        (Frame::new(wire::CLOSE | wire::REPLY, f.a, 0, 0, 0), None)
    }

    /// Forgets a handle: its lazy ranges (poisoned first through `uffd` if
    /// the client lives on), and its use of the entry.
    pub(super) fn release(&self, h: Handle, ranges: &[Attached], uffd: Option<&Uffd>) {
        if let Some(l) = h.entry.lazy() {
            for r in ranges {
                if let Some(u) = uffd {
                    l.poison_unfilled_via(u, r.start, r.len, r.offset);
                }
                l.remove_remote(r.key);
            }
        }
        h.entry.attached.fetch_sub(ranges.len(), Ordering::Relaxed);
        let mut st = self.state.lock();
        let now = Instant::now();
        *h.entry.last_used.lock() = now;
        if h.entry.users.fetch_sub(1, Ordering::SeqCst) == 1
            && st
                .entries
                .get(&h.entry.key)
                .is_some_and(|e| Arc::ptr_eq(e, &h.entry))
        {
            st.idle.insert((now, h.entry.id), h.entry.key);
        }
    }
}
