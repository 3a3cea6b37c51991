//! The `raw-remote` floor: the `raw` mode's handler ([`raw::Handler`], the
//! same code: a blocking `read(2)` of the userfaultfd, one `pread` of the
//! chunk, one `UFFDIO_COPY`) in another process, as a server answers a
//! client's faults. It is what a fault answered from another process costs
//! at the least: every `UFFDIO_COPY` acts on the bench's address space from
//! the handler's, and each fault switches address spaces twice.
//!
//! How the handler process is made, and why so:
//!
//! - It is this executable again, `shadowfd bench --raw-remote-handler CPU`
//!   (a hidden flag), not a `fork` of the bench: the bench has other threads
//!   (the progress bar's, the engines'), after which a forked child may only
//!   make async-signal-safe calls; a fresh program may allocate, format its
//!   errors and run [`raw::Handler`] unchanged, and its address space is as
//!   small as a server's.
//! - It is started before the clock (as `run`'s embedded server is), gets a
//!   Unix socket as its stdin, pins itself to the CPU it is given (the
//!   touching thread's) and turns `SCHED_IDLE` as `raw`'s thread does, then
//!   says it is ready. The timed open then makes the memfd, the userfaultfd
//!   and the mapping here, registers it (a userfaultfd's ioctls act on the
//!   address space that made it, whoever calls them), and sends the
//!   userfaultfd and the open file over the socket (`SCM_RIGHTS`).
//! - The bench then closes its own copy of the userfaultfd: the handler
//!   holds the only one, so if it dies, however it dies, the userfaultfd is
//!   released, which unregisters the range and wakes a blocked fault (it
//!   then reads a zero page) instead of leaving it blocked for good.
//! - It dies with the bench (`PR_SET_PDEATHSIG`, `SIGKILL`), runs in its own
//!   process group (a terminal's Ctrl-C reaches the bench, which finishes
//!   its run and cleans up), and is killed and reaped on every exit path of
//!   the bench's side ([`RemoteHandler`]'s drop). Every wait of the bench on
//!   it is bounded: its start, its answer to the stop page, its exit.

use super::raw::{self, Handler, Mapping};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the handler process may take to start and say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to answer once the stop page was touched.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after its answer.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the bench sends with the descriptors: a magic word, then where the
/// mapping is and how it is cut (little-endian u64s).
const MAGIC: u64 = 0x7368_6466_7272_6d31; // "shdfrrm1"
const SETUP_LEN: usize = 6 * 8;

/// The handler process, from its start to its reaping.
pub struct RemoteHandler {
    child: Option<Child>,
    sock: UnixStream,
}

impl RemoteHandler {
    /// Starts `exe bench --raw-remote-handler CPU` and waits (bounded) until
    /// it is on `cpu`, `SCHED_IDLE`, and waiting for its userfaultfd.
    pub fn start(exe: &Path, cpu: libc::c_int) -> io::Result<RemoteHandler> {
        let mut cmd = Command::new(exe);
        cmd.arg("bench")
            .arg("--raw-remote-handler")
            .arg(cpu.to_string());
        Self::spawn(cmd)
    }

    /// Starts `cmd` as the handler (its stdin our socket), bounded as
    /// [`RemoteHandler::start`] says.
    fn spawn(mut cmd: Command) -> io::Result<RemoteHandler> {
        let (ours, theirs) = UnixStream::pair()?;
        let parent = std::process::id();
        let exe = cmd.get_program().to_owned();
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env_remove("LD_PRELOAD")
            .env_remove("SHADOWFD_RUN_SOCKET")
            .env_remove("SHADOWFD_RUN_MOUNT")
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and makes
        // only async-signal-safe system calls (prctl, getppid); its error is
        // made without allocating.
        unsafe {
            cmd.pre_exec(move || {
                // The signal comes when the thread that forked exits: the
                // bench's main thread, which runs every mode, lives as long
                // as the bench.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The bench died before the prctl took: go now.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {exe:?}: {e}")))?;
        // The command holds the child's end of the socket until dropped: it
        // must go, so that the child's exit reads as the end of the stream.
        drop(cmd);
        let mut h = RemoteHandler {
            child: Some(child),
            sock: ours,
        };
        let mut b = [0u8; 1];
        h.sock.set_read_timeout(Some(START_TIMEOUT))?;
        let r = h.sock.read(&mut b);
        match r {
            Ok(1) if b[0] == b'R' => Ok(h),
            Ok(_) => Err(h.died("closed its socket before it was ready")),
            Err(e) => Err(h.died(&format!("was not ready within {START_TIMEOUT:?}: {e}"))),
        }
    }

    /// Sends the registered userfaultfd, the open file and the layout.
    fn send_setup(&self, uffd: &OwnedFd, file: &File, words: [u64; 5]) -> io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let mut msg = [0u8; SETUP_LEN];
        for (i, w) in std::iter::once(MAGIC).chain(words).enumerate() {
            msg[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let fds = [uffd.as_raw_fd(), file.as_raw_fd()];
        let iov = [io::IoSlice::new(&msg)];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let n = sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
        .map_err(|e| io::Error::new(e.kind(), format!("sending the userfaultfd: {e}")))?;
        if n != SETUP_LEN {
            return Err(io::Error::other(format!(
                "sending the userfaultfd: {n} of {SETUP_LEN} bytes went"
            )));
        }
        Ok(())
    }

    /// The handler's answer line, read until its newline or the end of the
    /// stream, within [`REPLY_TIMEOUT`].
    fn reply(&mut self) -> io::Result<String> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut got = Vec::new();
        let mut b = [0u8; 512];
        while !got.contains(&b'\n') {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {REPLY_TIMEOUT:?}"),
                ));
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.read(&mut b) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(String::from_utf8_lossy(&got).trim_end().to_string())
    }

    /// Waits (bounded) for the handler to exit, killing it when it does not.
    fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            return Err(io::Error::other("already reaped"));
        };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("did not exit within {EXIT_TIMEOUT:?} of its answer; killed"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills and reaps the handler process, if it is still there.
    fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // Not yet reaped, so the pid is still this child's: kill cannot hit
        // another process.
        let _ = c.kill();
        c.wait().ok()
    }

    /// An error saying the handler failed to `what`, with how it ended
    /// (killed and reaped here).
    fn died(&mut self, what: &str) -> io::Error {
        let how = match self.kill() {
            Some(st) => describe(st),
            None => "reaped".into(),
        };
        io::Error::other(format!("the handler process {what} ({how})"))
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

impl Drop for RemoteHandler {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `raw-remote` mode's region: the same memfd, mapping and stop page as
/// [`raw::RawRegion`], its faults answered by a [`RemoteHandler`]. Dropping
/// it kills and reaps the handler, then unmaps.
pub struct RemoteRegion {
    handler: Option<RemoteHandler>,
    map: Mapping,
    memfd: OwnedFd,
    data_len: u64,
    size: u64,
}

impl RemoteRegion {
    /// Opens `path` and sets the region up over its `size` bytes, its
    /// faults answered by `handler`, `chunk` bytes at a time.
    pub fn open(
        handler: RemoteHandler,
        path: &Path,
        size: u64,
        chunk: u64,
        page: u64,
    ) -> io::Result<RemoteRegion> {
        let file = File::open(path)?;
        let data_len = size.div_ceil(page) * page;
        let memfd = raw::memfd(c"shadowfd-bench-raw-remote", data_len + page)?;
        let uffd = raw::userfaultfd()?;
        let map = Mapping::new(&memfd, (data_len + page) as usize, libc::PROT_READ)?;
        map.register_missing(&uffd)?;
        handler.send_setup(
            &uffd,
            &file,
            [map.addr, size, data_len, raw::fill_unit(chunk, page), page],
        )?;
        // The handler holds the only userfaultfd from here: its death
        // releases it (see the module's comment).
        drop(uffd);
        drop(file);
        Ok(RemoteRegion {
            handler: Some(handler),
            map,
            memfd,
            data_len,
            size,
        })
    }

    pub fn resident_bytes(&self) -> io::Result<u64> {
        raw::allocated(&self.memfd)
    }

    /// Stops the handler (a read of the stop page, which it answers before
    /// it reports and exits); the faults it answered, or its error.
    pub fn close(mut self) -> io::Result<u64> {
        let mut h = self
            .handler
            .take()
            .ok_or_else(|| io::Error::other("closed twice"))?;
        // The handler answers the stop page; or, if it failed (it
        // unregistered the range) or died (the userfaultfd was released),
        // this reads a zero page: it cannot hang.
        // SAFETY: the stop page lies inside our live mapping.
        std::hint::black_box(unsafe {
            std::ptr::read_volatile((self.map.addr + self.data_len) as *const u8)
        });
        let line = match h.reply() {
            Ok(l) if !l.is_empty() => l,
            Ok(_) => return Err(h.died("did not answer the stop page: its socket closed")),
            Err(e) => return Err(h.died(&format!("did not answer the stop page: {e}"))),
        };
        let st = h.wait()?;
        let mut words = line.splitn(3, ' ');
        let (word, faults, rest) = (words.next(), words.next(), words.next());
        let faults = faults.and_then(|f| f.parse::<u64>().ok());
        match (word, faults) {
            (Some("ok"), Some(n)) if st.success() => Ok(n),
            (Some("error"), Some(_)) => Err(io::Error::other(format!(
                "the handler process failed: {}",
                rest.unwrap_or("(no message)")
            ))),
            _ => Err(io::Error::other(format!(
                "the handler process ended ({}) with the answer {line:?}",
                describe(st)
            ))),
        }
    }
}

impl std::ops::Deref for RemoteRegion {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `size` bytes of our live PROT_READ mapping; a
        // missing page is filled by the handler (or, once it is gone, reads
        // as zeros) before a load completes.
        unsafe { std::slice::from_raw_parts(self.map.addr as *const u8, self.size as usize) }
    }
}

impl Drop for RemoteRegion {
    fn drop(&mut self) {
        // The handler first (killed, reaped; its userfaultfd released), then
        // the mapping and the memfd.
        drop(self.handler.take());
    }
}

/// `shadowfd bench --raw-remote-handler CPU`: the handler process. Its stdin
/// is the bench's socket; it places itself on `cpu`, says it is ready,
/// receives the userfaultfd, the file and the layout, serves the faults
/// until the stop page, then answers `ok FAULTS` or `error FAULTS MESSAGE`
/// and exits.
pub fn handler_main(cpu: libc::c_int) -> crate::CliResult {
    // SAFETY: descriptor 0 is owned by nothing else in this process; the
    // bench gives its socket there, and anything else is refused below.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    if sock.local_addr().is_err() {
        return Err(
            "--raw-remote-handler is internal to `shadowfd bench` (its stdin must be \
                    the bench's socket)"
                .into(),
        );
    }
    raw::place_on(cpu);
    (&sock).write_all(b"R")?;
    let (words, uffd, file) = receive_setup(&sock)?;
    let [addr, size, data_len, chunk, page] = words;
    let faults = Arc::new(AtomicU64::new(0));
    let handler = Handler {
        uffd: uffd.as_raw_fd(),
        file,
        addr,
        size,
        data_len,
        chunk,
        page,
        faults: faults.clone(),
    };
    let r = handler.run();
    let n = faults.load(Ordering::Relaxed);
    let line = match r {
        Ok(()) => format!("ok {n}\n"),
        Err(e) => format!("error {n} {}\n", e.to_string().replace('\n', " ")),
    };
    drop(uffd);
    (&sock).write_all(line.as_bytes())?;
    Ok(())
}

/// The layout words and the two descriptors the bench sends.
fn receive_setup(sock: &UnixStream) -> io::Result<([u64; 5], OwnedFd, File)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut msg = [0u8; SETUP_LEN];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let (n, fds) = {
        let mut iov = [io::IoSliceMut::new(&mut msg)];
        let m = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in m
            .cmsgs()
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?
        {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process just now; nothing else owns them.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (m.bytes, fds)
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the bench closed the socket before sending the userfaultfd",
        ));
    }
    // A stream socket: the rest of the layout, if it came apart.
    if n < SETUP_LEN {
        (&*sock).read_exact(&mut msg[n..])?;
    }
    let word = |i: usize| u64::from_le_bytes(msg[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return Err(io::Error::other(
            "the bench's message is not a raw-remote setup",
        ));
    }
    let mut it = fds.into_iter();
    let (Some(uffd), Some(file), None) = (it.next(), it.next(), it.next()) else {
        return Err(io::Error::other(
            "the bench's message did not carry exactly two descriptors",
        ));
    };
    Ok((
        [word(1), word(2), word(3), word(4), word(5)],
        uffd,
        File::from(file),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const CHILD_ENV: &str = "SHADOWFD_TEST_RAW_REMOTE_HANDLER_CPU";

    /// Not a test of its own: the handler process of the tests below, which
    /// run this test binary again with only this test and [`CHILD_ENV`]
    /// set (the real one is `shadowfd bench --raw-remote-handler`, which
    /// unit tests have no path to; tests/bench_cli.rs runs that one).
    /// Without the variable it returns at once.
    #[test]
    fn handler_child() {
        if let Ok(cpu) = std::env::var(CHILD_ENV) {
            handler_main(cpu.parse().unwrap()).unwrap();
        }
    }

    fn handler() -> RemoteHandler {
        // SAFETY: no arguments.
        let cpu = unsafe { libc::sched_getcpu() };
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "bench::raw_remote::tests::handler_child"])
            .args(["--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, cpu.to_string());
        RemoteHandler::spawn(cmd).unwrap()
    }

    fn data_file(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        (dir, p, data)
    }

    /// The byte at `off` of `r`, read on another thread: `None` if the read
    /// did not complete within 10 s (a fault left blocked).
    fn read_bounded(r: &RemoteRegion, off: usize) -> Option<u8> {
        let addr = r.map.addr as usize + off;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: `addr` lies in the region's live mapping, which the
            // caller keeps until this read completed (or fails the test).
            let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
            let _ = tx.send(b);
        });
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    fn is_gone(pid: u32) -> bool {
        !Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn remote_region_serves_the_file_and_stops() {
        if let Some(why) = raw::unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let (_dir, p, data) = data_file(3 * 4096 + 100);
        for chunk in [4096, 8192] {
            let h = handler();
            let pid = h.child.as_ref().unwrap().id();
            let r = RemoteRegion::open(h, &p, data.len() as u64, chunk, 4096).unwrap();
            assert_eq!(&r[..], &data[..]);
            assert_eq!(r.close().unwrap(), (data.len() as u64).div_ceil(chunk));
            assert!(is_gone(pid), "handler {pid} not reaped");
        }
        // Dropped without a touch: the handler is killed and reaped.
        let h = handler();
        let pid = h.child.as_ref().unwrap().id();
        drop(RemoteRegion::open(h, &p, data.len() as u64, 4096, 4096).unwrap());
        assert!(is_gone(pid), "handler {pid} not reaped");
    }

    /// The bench holds no copy of the userfaultfd: a handler killed in the
    /// middle of a run releases it, and the next fault completes (a zero
    /// page) instead of blocking for good; close reports it.
    #[test]
    fn a_killed_handler_leaves_no_fault_blocked() {
        if let Some(why) = raw::unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let (_dir, p, data) = data_file(8 * 4096);
        let mut r = RemoteRegion::open(handler(), &p, data.len() as u64, 4096, 4096).unwrap();
        assert_eq!(read_bounded(&r, 1), Some(data[1]));
        let child = r.handler.as_mut().unwrap().child.as_mut().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let got = read_bounded(&r, 5 * 4096);
        assert_eq!(got, Some(0), "a fault after the handler died");
        let e = r.close().unwrap_err().to_string();
        assert!(e.contains("did not answer the stop page"), "{e}");
    }

    /// A handler that fails (the source shrank under it) unregisters the
    /// range from its side, which wakes the faulting thread (a zero page),
    /// and reports its error at close.
    #[test]
    fn a_failing_handler_wakes_the_toucher_and_reports() {
        if let Some(why) = raw::unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let (_dir, p, _) = data_file(4 * 4096);
        let r = RemoteRegion::open(handler(), &p, 4 * 4096, 4096, 4096).unwrap();
        assert_eq!(read_bounded(&r, 4096 + 7), Some(((4096 + 7) % 251) as u8));
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert_eq!(read_bounded(&r, 2 * 4096), Some(0));
        let e = r.close().unwrap_err().to_string();
        assert!(e.contains("the handler process failed"), "{e}");
        assert!(e.contains("pread"), "{e}");
    }

    /// A handler that is not one (it exits at once) is reported and reaped,
    /// within the start bound.
    #[test]
    fn a_handler_that_exits_at_once_is_reported_and_reaped() {
        let t = Instant::now();
        let e = match RemoteHandler::start(Path::new("/bin/true"), 0) {
            Ok(_) => panic!("/bin/true said it was ready"),
            Err(e) => e,
        };
        assert!(t.elapsed() < START_TIMEOUT, "{:?}", t.elapsed());
        let s = e.to_string();
        assert!(s.contains("closed its socket before it was ready"), "{s}");
        assert!(s.contains("exit status 0"), "{s}");
    }
}
