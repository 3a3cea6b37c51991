//! The watcher: a thread per client with lazy ranges that notices a server
//! that stopped answering faults, and ends its mappings' waits.

use super::*;

/// What the watcher thread holds.
pub(super) struct Watch {
    pub(super) conn: Arc<Conn>,
    pub(super) stop: OwnedFd,
    /// Signalled when a lazy range is added: start looking.
    pub(super) kick: OwnedFd,
    pub(super) uffd: Arc<Uffd>,
    pub(super) ranges: Ranges,
    pub(super) gone: Arc<AtomicBool>,
    pub(super) timeout: Duration,
}

/// Why [`Watch::wait`] returned.
pub(super) enum Woke {
    Ready,
    Stop,
    Tick,
}

impl Watch {
    /// Waits for `fd` to show `events`, for the stop signal, or for `tick`
    /// or a kick.
    pub(super) fn wait(&self, fd: i32, events: i16, tick: Option<Duration>) -> Woke {
        let ms = tick.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            let mut fds =
                [fd, self.stop.as_raw_fd(), self.kick.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            fds[0].events = events;
            // SAFETY: `fds` is a live array of three pollfd structs.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
            if r < 0 {
                continue;
            }
            if fds[1].revents != 0 {
                return Woke::Stop;
            }
            if fds[0].revents != 0 {
                return Woke::Ready;
            }
            if fds[2].revents != 0 {
                crate::sys::event::eventfd_drain(self.kick.as_fd());
            }
            return Woke::Tick;
        }
    }

    /// Whether the server answers a STATS request within the timeout;
    /// `None` while another request holds the connection (each of its
    /// replies is bounded by the timeout: look again later). Without an
    /// answer the connection is shut down before the lock is let go, so no
    /// later request can take the late reply for its own.
    pub(super) fn server_answers(&self) -> Option<bool> {
        let _one = self.conn.io.try_lock_for(LOOK_EVERY)?;
        let f = Frame::new(wire::STATS, 0, 0, 0, 0);
        let ok = wire::send(&self.conn.stream, &f, None).is_ok()
            && reply(&self.conn.stream, wire::STATS, "STATS").is_ok();
        if !ok {
            let _ = self.conn.stream.shutdown(std::net::Shutdown::Both);
        }
        Some(ok)
    }

    /// Watches the connection; once the server is gone (or stuck, see
    /// [`Client`]), poisons what is unfilled in every lazy range and
    /// answers every later fault the same way.
    pub(super) fn run(self) {
        let sock = self.conn.stream.as_raw_fd();
        let suspect = STUCK_AFTER.min(self.timeout);
        // Since when faults have been waiting unread at every look.
        let mut unread_since: Option<std::time::Instant> = None;
        loop {
            let tick = (!self.ranges.lock().is_empty()).then_some(LOOK_EVERY);
            match self.wait(sock, libc::POLLRDHUP, tick) {
                Woke::Stop => return,
                Woke::Ready => break,
                Woke::Tick => {}
            }
            if !self.uffd.has_pending() {
                unread_since = None;
                continue;
            }
            let since = *unread_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < suspect {
                continue;
            }
            match self.server_answers() {
                None => {}
                Some(true) => unread_since = None,
                // Stuck: the connection is shut down, so that the server
                // forgets this client if it ever runs again, and every
                // later call fails at once.
                Some(false) => break,
            }
        }
        self.gone.store(true, Ordering::SeqCst);
        {
            let r = self.ranges.lock();
            for &(start, len) in r.iter() {
                // Pages mapped already are skipped (EEXIST); every other page
                // gets a poison marker and its waiters are woken.
                let _ = self.uffd.poison(start, len);
            }
        }
        let page = crate::page_size() as u64;
        let mut raw = vec![uffd_msg::default(); 32];
        let mut faults = Vec::new();
        let ufd = self.uffd.as_fd().as_raw_fd();
        loop {
            match self.wait(ufd, libc::POLLIN, None) {
                Woke::Stop => return,
                Woke::Tick => continue,
                Woke::Ready => {}
            }
            faults.clear();
            let mut events = Vec::new();
            if self
                .uffd
                .read_msgs(&mut raw, &mut faults, &mut events)
                .is_err()
            {
                continue;
            }
            let _r = self.ranges.lock();
            for ev in events {
                if let crate::sys::Event::Fork(fd) = ev {
                    // A child forked after the server went: its copies get
                    // the same poison before its userfaultfd goes.
                    let child = Uffd::from_fd(fd, self.uffd.features());
                    for &(start, len) in _r.iter() {
                        let _ = child.poison(start, len);
                    }
                }
            }
            for f in &faults {
                let addr = f.address & !(page - 1);
                if self.uffd.poison(addr, page).is_err() {
                    let _ = self.uffd.wake(addr, page);
                }
            }
        }
    }
}
