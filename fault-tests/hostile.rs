//! Hostile clients of `shadowfd serve` (issue 20), as real processes.
//!
//! Each attack runs against a real `shadowfd serve` while a well-behaved
//! client of the same file (`shadowfd client cat` piped into `cmp` against
//! the source) must be byte-exact and finish within 3x its time alone,
//! `shadowfd status` must answer within 1 s, and the server must use at
//! most a third of a CPU. Afterwards the server's descriptor and thread
//! counts must come back to their baseline.
//!
//! Attacks: frames carrying many descriptors; HELLO and requests trickled a
//! byte at a time; 1,500 connections that never say HELLO; the client table
//! filled with idle clients; lazy ranges attached up to the caps; the
//! server's descriptor table exhausted (accept fails with EMFILE); a
//! client keeping userfaultfd REMOVE events pending (MADV_DONTNEED in a
//! loop with EVENT_REMOVE negotiated), with its own bounds. Plus the
//! client side: a register or mprotect failing in `map_at` (failpoints)
//! abandons the MAP without a deadlock and the session goes on; OPENs of
//! different files proceed in parallel while one is slow, and two OPENs of
//! the slow file share one open.

use crate::serve::Slow;
use crate::support::attack::{Proc, cpu_time, role_command, write_content};
use crate::support::child::{self, param, param_u64};
use crate::support::content::first_mismatch;
use crate::support::{cli, lazy_available, tempdir};
use crate::test_name;
use shadowfd::remote::{Client, ClientOptions, Server, ServerOptions, Tree, wire};
use shadowfd::{Engine, Source};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BOUND: Duration = Duration::from_secs(30);
const SIZE: u64 = 32 << 20;
const ID_A: u64 = 0x20_0a;
const ID_B: u64 = 0x20_0b;

fn count_dir(p: String) -> usize {
    std::fs::read_dir(p).map_or(0, |d| d.count())
}
fn fds_of(pid: u32) -> usize {
    count_dir(format!("/proc/{pid}/fd"))
}
fn threads_of(pid: u32) -> usize {
    count_dir(format!("/proc/{pid}/task"))
}

/// A served root with two files of the same size (A for the time alone, B
/// for the time under attack), a `shadowfd serve` of it, and the baseline.
struct Bed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    sock: PathBuf,
    server: Proc,
    alone: Duration,
    /// Descriptors and threads after the first client, and what one more
    /// shadow may add.
    fds: usize,
    threads: usize,
    fd_step: usize,
    thread_step: usize,
}

impl Bed {
    fn new(what: &str, extra: &[&str]) -> Option<Bed> {
        if !lazy_available(what) {
            return None;
        }
        let dir = tempdir();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        write_content(&root, "A.bin", ID_A, SIZE);
        write_content(&root, "B.bin", ID_B, SIZE);
        let sock = dir.path().join("s.sock");
        let mut args = vec!["--mode", "lazy", "--chunk", "64K"];
        args.extend_from_slice(extra);
        let server = crate::serve::cli_server(&sock, &root, &args);
        let pid = server.pid();
        std::thread::sleep(Duration::from_millis(100));
        let (f0, t0) = (fds_of(pid), threads_of(pid));
        let mut bed = Bed {
            _dir: dir,
            root,
            sock,
            server,
            alone: Duration::ZERO,
            fds: 0,
            threads: 0,
            fd_step: 0,
            thread_step: 0,
        };
        bed.alone = bed.victim("A.bin", Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
        bed.fds = fds_of(pid);
        bed.threads = threads_of(pid);
        bed.fd_step = bed.fds.saturating_sub(f0);
        bed.thread_step = bed.threads.saturating_sub(t0);
        Some(bed)
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// `shadowfd client cat FILE | cmp - ROOT/FILE`: byte-exact, within
    /// `bound`; its time.
    fn victim(&self, file: &str, bound: Duration) -> Duration {
        let script = "\"$0\" client --socket \"$1\" --timeout 20s cat \"$2\" | cmp - \"$3\" \
                      && echo exact";
        let mut c = Command::new("sh");
        c.args([
            "-c",
            script,
            env!("CARGO_BIN_EXE_shadowfd"),
            self.sock.to_str().unwrap(),
            file,
            self.root.join(file).to_str().unwrap(),
        ]);
        let t = Instant::now();
        let o = child::run(c, bound);
        let took = t.elapsed();
        assert!(
            !o.timed_out && o.status.success() && o.stdout.trim() == "exact",
            "the well-behaved client of {file} failed (or took over {bound:?})\n{}",
            o.describe()
        );
        took
    }

    /// `shadowfd status --json`: answers within 1 s, as JSON.
    fn status(&self) -> serde_json::Value {
        let t = Instant::now();
        let o = child::run(
            cli(&[
                "status",
                "--socket",
                self.sock.to_str().unwrap(),
                "--json",
                "--timeout",
                "1s",
            ]),
            Duration::from_secs(5),
        );
        let took = t.elapsed();
        assert!(
            o.status.success() && took < Duration::from_secs(1),
            "status took {took:?}\n{}",
            o.describe()
        );
        serde_json::from_str(o.stdout.trim()).expect("status --json is JSON")
    }

    /// While the attack holds or runs: the victim of B within 3x its time
    /// alone (at least 300 ms, for process start-up noise on a shared
    /// machine), status within 1 s, the server under a third of a CPU.
    /// A victim over the bound runs again, up to three times in all, while
    /// the attack still holds: a server that makes clients wait behind an
    /// attacker is slow every time, a loaded machine seldom three times in
    /// a row (CI 2026-12-08 saw one run of 1.1 s against 165 ms alone,
    /// with the machine at a load of 8).
    fn check_under_attack(&self, what: &str) -> serde_json::Value {
        let pid = self.pid();
        let (c0, w0) = (cpu_time(pid).unwrap(), Instant::now());
        let bound = (self.alone * 3).max(Duration::from_millis(300));
        let mut tries = vec![self.victim("B.bin", Duration::from_secs(20))];
        while tries.len() < 3 && tries.last().is_some_and(|t| *t > bound) {
            tries.push(self.victim("B.bin", Duration::from_secs(20)));
        }
        let took = *tries.iter().min().unwrap();
        let v = self.status();
        // A window of at least a second for the CPU share.
        if let Some(rest) = Duration::from_secs(1).checked_sub(w0.elapsed()) {
            std::thread::sleep(rest);
        }
        let cpu = cpu_time(pid).unwrap().saturating_sub(c0);
        let wall = w0.elapsed();
        eprintln!(
            "hostile {what}: victim {tries:?} under attack, {:?} alone; server CPU {cpu:?} in \
             {wall:?}; {} fds, {} threads (baseline {} and {})",
            self.alone,
            fds_of(pid),
            threads_of(pid),
            self.fds,
            self.threads
        );
        assert!(
            took <= bound,
            "{what}: the victim took {tries:?}, each over 3x its {:?} alone",
            self.alone
        );
        assert!(
            cpu.as_secs_f64() <= wall.as_secs_f64() / 3.0,
            "{what}: the server used {cpu:?} of CPU in {wall:?}"
        );
        v
    }

    /// After the attack: descriptors and threads back to the baseline (one
    /// more shadow allowed), within 10 s.
    fn check_settled(&mut self, what: &str) {
        let pid = self.pid();
        let (fd_max, th_max) = (self.fds + self.fd_step, self.threads + self.thread_step);
        let t = Instant::now();
        loop {
            let (f, th) = (fds_of(pid), threads_of(pid));
            if f <= fd_max && th <= th_max {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: the server kept {f} descriptors and {th} threads after the attack; \
                 baseline {fd_max} and {th_max}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(self.server.is_running(), "{what}: the server died");
    }

    fn stderr(&mut self) -> String {
        self.server.finish(Duration::ZERO).stderr
    }
}

/// The entry of `status --json` for the shadow whose name ends in `file`.
fn shadow_named(v: &serde_json::Value, file: &str) -> serde_json::Value {
    v["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"].as_str().is_some_and(|n| n.ends_with(file)))
        .cloned()
        .unwrap_or_else(|| panic!("no shadow of {file} in {v}"))
}

/// A raw connection to the server.
fn raw(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// HELLO without a userfaultfd, answered.
fn hello(s: &UnixStream) {
    wire::send(s, &Frame::new(wire::HELLO, wire::VERSION, 0, 0, 0), None).unwrap();
    let (r, _) = wire::recv(s).expect("HELLO reply");
    assert_eq!(r.kind, wire::HELLO | wire::REPLY, "{r:?}");
}

use wire::Frame;

/// The bytes of `f`, as the wire carries them.
fn frame_bytes(f: &Frame) -> Vec<u8> {
    let (a, b) = UnixStream::pair().unwrap();
    wire::send(&a, f, None).unwrap();
    drop(a);
    let mut v = Vec::new();
    (&b).read_to_end(&mut v).unwrap();
    v
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS).
fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> nix::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
}

/// Waits (bounded) for the server to close `s`; how long it took.
fn closed_within(s: &mut UnixStream, bound: Duration) -> Option<Duration> {
    let t = Instant::now();
    s.set_read_timeout(Some(bound)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(t.elapsed());
            }
            Err(_) => return None,
        }
        if t.elapsed() > bound {
            return None;
        }
    }
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// Frames carrying 8 descriptors each (HELLO, and requests of a HELLO'd
/// client), 150 connections' worth while the victim runs: every descriptor
/// is closed and the connection refused; the server's table never grows by
/// more than its pending connections, and comes back to its baseline.
#[test]
fn frames_with_extra_descriptors_leak_nothing() {
    let Some(mut bed) = Bed::new("hostile: descriptors", &[]) else {
        return;
    };
    let pid = bed.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let attacker = {
        let (sock, stop, peak, sent) = (bed.sock.clone(), stop.clone(), peak.clone(), sent.clone());
        std::thread::spawn(move || {
            let devnull = std::fs::File::open("/dev/null").unwrap();
            let fds: Vec<OwnedFd> = (0..8)
                .map(|_| devnull.as_fd().try_clone_to_owned().unwrap())
                .collect();
            let hello_b = frame_bytes(&Frame::new(wire::HELLO, wire::VERSION, 0, 0, 0));
            let stats_b = frame_bytes(&Frame::new(wire::STATS, 0, 0, 0, 0));
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 150 {
                let mut s = raw(&sock);
                if i % 2 == 0 {
                    let _ = send_with_fds(&s, &hello_b, &fds);
                } else {
                    hello(&s);
                    let _ = send_with_fds(&s, &stats_b, &fds);
                }
                sent.fetch_add(8, Ordering::Relaxed);
                assert!(
                    closed_within(&mut s, Duration::from_secs(5)).is_some(),
                    "frame {i} with 8 descriptors was not refused"
                );
                peak.fetch_max(fds_of(pid), Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    bed.check_under_attack("8 descriptors a frame");
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("attacker");
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= bed.fds + bed.fd_step + 16,
        "the server's descriptors peaked at {peak} (baseline {}) after {} were sent to it",
        bed.fds,
        sent.load(Ordering::Relaxed)
    );
    // A HELLO whose "userfaultfd" is something else is refused.
    let s = raw(&bed.sock);
    let null = std::fs::File::open("/dev/null").unwrap();
    let f = Frame::new(wire::HELLO, wire::VERSION, wire::HELLO_HAS_UFFD, 0, 0);
    send_with_fds(
        &s,
        &frame_bytes(&f),
        &[null.as_fd().try_clone_to_owned().unwrap()],
    )
    .unwrap();
    let (r, _) = wire::recv(&s).expect("an ERROR");
    assert_eq!((r.kind, r.a), (wire::ERROR, wire::E_PROTOCOL), "{r:?}");
    let msg = String::from_utf8_lossy(&r.payload);
    assert!(msg.contains("/dev/null"), "{msg}");
    bed.check_settled("8 descriptors a frame");
    let err = bed.stderr();
    assert!(
        err.contains("descriptors with one frame (all closed)")
            || err.contains("only HELLO carries one"),
        "{err}"
    );
}

/// HELLO and an OPEN trickled a byte every 200 ms are dropped at the
/// frame's deadline (--peer-timeout 2s), not kept alive byte by byte.
#[test]
fn trickled_frames_are_dropped_at_the_frame_deadline() {
    let Some(mut bed) = Bed::new("hostile: trickle", &["--peer-timeout", "2s"]) else {
        return;
    };
    let open_b = {
        let f = Frame::new(wire::OPEN, 0, 0, 0, 0).with_payload(b"B.bin".to_vec());
        frame_bytes(&f)
    };
    let hello_b = frame_bytes(&Frame::new(wire::HELLO, wire::VERSION, 0, 0, 0));
    let trickler = |pre_hello: bool| {
        let sock = bed.sock.clone();
        let (hello_b, open_b) = (hello_b.clone(), open_b.clone());
        std::thread::spawn(move || {
            let s = raw(&sock);
            let bytes = if pre_hello {
                hello_b
            } else {
                hello(&s);
                open_b
            };
            let t = Instant::now();
            for b in bytes {
                if (&s).write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                if t.elapsed() > Duration::from_secs(6) {
                    break;
                }
            }
            // Dropped by now: the next read sees the end.
            let mut s = s;
            let end = closed_within(&mut s, Duration::from_millis(100));
            (t.elapsed(), end.is_some())
        })
    };
    let ts: Vec<_> = (0..8).map(|i| trickler(i % 2 == 0)).collect();
    std::thread::sleep(Duration::from_millis(100));
    bed.check_under_attack("trickled frames");
    for t in ts {
        let (took, closed) = t.join().unwrap();
        assert!(
            closed && took < Duration::from_millis(3500),
            "a trickling peer was kept {took:?} (closed: {closed}); the deadline is 2 s a frame"
        );
    }
    bed.check_settled("trickled frames");
    let err = bed.stderr();
    assert!(err.contains("did not send a whole HELLO"), "{err}");
    assert!(
        err.contains("did not finish it within the peer timeout"),
        "{err}"
    );
}

/// 1,500 connections that never say HELLO: at most --max-pending (64) of
/// them are kept (the oldest is dropped for each new one), so the server
/// keeps a bounded number of threads and descriptors and serves the victim.
#[test]
fn connections_that_never_say_hello_are_capped() {
    let Some(mut bed) = Bed::new("hostile: no HELLO", &[]) else {
        return;
    };
    raise_nofile();
    let pid = bed.pid();
    let mut held = Vec::with_capacity(1500);
    let mut peak_threads = 0;
    for i in 0..1500 {
        held.push(UnixStream::connect(&bed.sock).expect("connect"));
        if i % 100 == 0 {
            peak_threads = peak_threads.max(threads_of(pid));
        }
    }
    // Threads of dropped connections are still exiting while new ones
    // come: bounded, not one per connection.
    assert!(
        peak_threads <= bed.threads + 3 * 64,
        "{peak_threads} threads while 1,500 silent connections came (baseline {})",
        bed.threads
    );
    std::thread::sleep(Duration::from_millis(300));
    let settled = threads_of(pid);
    let v = bed.check_under_attack("1,500 silent connections");
    assert!(
        settled <= bed.threads + bed.thread_step + 64 + 2,
        "{settled} threads held by 1,500 silent connections (baseline {})",
        bed.threads
    );
    assert!(
        fds_of(pid) <= bed.fds + bed.fd_step + 2 * 64 + 8,
        "{} descriptors (baseline {})",
        fds_of(pid),
        bed.fds
    );
    assert_eq!(v["clients"].as_array().unwrap().len(), 0, "{v}");
    drop(held);
    bed.check_settled("1,500 silent connections");
}

/// 256 idle clients (the default --max-clients) from one uid: the victim
/// takes the place of the one idle longest, `status` answers from its own
/// slot and is not listed as a client.
#[test]
fn idle_clients_give_way_when_the_server_is_full() {
    let Some(mut bed) = Bed::new("hostile: idle clients", &[]) else {
        return;
    };
    raise_nofile();
    let held: Vec<UnixStream> = (0..256)
        .map(|_| {
            let s = raw(&bed.sock);
            hello(&s);
            s
        })
        .collect();
    // The table is full: one more raw client displaces the oldest idle.
    let v = bed.check_under_attack("256 idle clients");
    let clients = v["clients"].as_array().unwrap();
    assert!(clients.len() <= 256, "{v}");
    let me = std::process::id();
    assert!(
        clients.iter().all(|c| c["pid"] == me),
        "status counted itself (or the victim stayed): {v}"
    );
    let dropped = held
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            matches!((&**s).read(&mut b), Ok(0))
        })
        .count();
    assert!(dropped >= 1, "no idle client gave way");
    drop(held);
    bed.check_settled("256 idle clients");
    let err = bed.stderr();
    assert!(err.contains("had been idle longest"), "{err}");
}

/// Lazy ranges attached up to the caps (--max-ranges 1024 a connection,
/// --max-ranges-total 4096, each connection's first 256 outside the global
/// cap): refused with E_LIMIT past them, and the victim of the same file
/// maps it meanwhile.
#[test]
fn attached_ranges_stop_at_their_caps() {
    let Some(mut bed) = Bed::new(
        "hostile: ranges",
        &["--max-ranges", "1024", "--max-ranges-total", "4096"],
    ) else {
        return;
    };
    let page = shadowfd::page_size() as u64;
    let mut clients = Vec::new();
    let mut maps = Vec::new();
    let mut limits = 0;
    for _ in 0..6 {
        let c = Client::connect(&bed.sock).expect("connect");
        assert!(c.has_userfaultfd());
        let f = c.open("B.bin").expect("open");
        let mut n = 0;
        loop {
            let at = (n % (SIZE / page)) * page;
            match f.map_options().offset(at).len(page).map() {
                Ok(m) => maps.push(m),
                Err(e) => {
                    assert_eq!(e.refusal_code(), Some(wire::E_LIMIT), "{e}");
                    limits += 1;
                    break;
                }
            }
            n += 1;
            assert!(n <= 1024, "the per-connection cap of 1024 was not enforced");
        }
        clients.push((c, f));
    }
    assert_eq!(
        maps.len(),
        4096 + 2 * shadowfd::remote::RESERVED_RANGES,
        "the global cap of 4096, then each connection's reserve"
    );
    assert_eq!(limits, 6);
    let v = bed.check_under_attack("ranges at the caps");
    let total: u64 = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["lazy_mappings"].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, maps.len(), "{v}");
    let b = shadow_named(&v, "B.bin");
    assert_eq!(
        b["lazy_mappings"].as_u64().unwrap() as usize,
        maps.len(),
        "{b}"
    );
    drop(maps);
    drop(clients);
    bed.check_settled("ranges at the caps");
}

/// A connection as a hostile client makes it: HELLO with a userfaultfd
/// negotiating what the library's client does (the descriptor is ours and
/// is never read), then OPEN of `file`; the handle.
fn raw_lazy_session(sock: &Path, file: &str) -> (UnixStream, OwnedFd, u64) {
    let (uffd, _) = uffd_with(uffd_raw::CLIENT).expect("UFFDIO_API");
    let s = raw(sock);
    let hello = Frame::new(
        wire::HELLO,
        wire::VERSION,
        wire::HELLO_HAS_UFFD,
        uffd_raw::CLIENT,
        0,
    );
    wire::send(&s, &hello, Some(uffd.as_fd())).expect("send HELLO");
    let (r, _) = wire::recv(&s).expect("HELLO reply");
    assert_eq!(r.kind, wire::HELLO | wire::REPLY, "{r:?}");
    let open = Frame::new(wire::OPEN, 0, 0, 0, 0).with_payload(file.as_bytes().to_vec());
    wire::send(&s, &open, None).expect("send OPEN");
    let (r, _) = wire::recv(&s).expect("OPEN reply");
    assert_eq!(r.kind, wire::OPEN | wire::REPLY, "{r:?}");
    (s, uffd, r.a)
}

/// Attaches `n` one-page lazy ranges of `handle` at addresses nothing is
/// mapped at (MAP, then ATTACH, pipelined 256 pairs at a time); how many
/// the server took.
fn attach_unmapped(s: &UnixStream, handle: u64, n: u64, base: u64) -> u64 {
    let page = shadowfd::page_size() as u64;
    let mut took = 0;
    let mut at = 0;
    while at < n {
        let batch = (n - at).min(256);
        let mut bytes = Vec::new();
        for i in at..at + batch {
            bytes.extend(frame_bytes(&Frame::new(
                wire::MAP,
                handle,
                wire::MAP_LAZY,
                0,
                0,
            )));
            let addr = base + 2 * i * page;
            let off = (i % (SIZE / page)) * page;
            bytes.extend(frame_bytes(&Frame::new(
                wire::ATTACH,
                handle,
                addr,
                page,
                off,
            )));
        }
        (&*s).write_all(&bytes).expect("MAP and ATTACH");
        for _ in 0..batch {
            let (r, memfd) = wire::recv(s).expect("MAP reply");
            assert_eq!(r.kind, wire::MAP | wire::REPLY, "{r:?}");
            drop(memfd);
            let (r, _) = wire::recv(s).expect("ATTACH reply");
            if r.kind == wire::ATTACH | wire::REPLY {
                took += 1;
            }
        }
        at += batch;
    }
    took
}

/// Four connections attach the server's whole global cap of lazy ranges
/// (262,144) over one file, at addresses where they map nothing, and never
/// fault. A fill looks up only the ranges where a fault waits, and a range
/// is found and dropped by its address: the victim of the same file is
/// within the usual bounds, and when the connections close the server
/// lets go of everything within the settling bound. (Before, every fill
/// walked every range, and each range dropped walked them all again: the
/// teardown took over 10 s, and with 16 such connections, when the caps
/// allowed it, a 0.15 s `cat` took 12.6 s.)
#[test]
fn ranges_nobody_faults_in_cost_fills_nothing() {
    raise_nofile();
    let Some(mut bed) = Bed::new("hostile: unused ranges", &[]) else {
        return;
    };
    let per = shadowfd::remote::MAX_RANGES as u64;
    let t = Instant::now();
    let sessions: Vec<_> = (0..4u64)
        .map(|k| {
            let sock = bed.sock.clone();
            std::thread::spawn(move || {
                let (s, uffd, h) = raw_lazy_session(&sock, "B.bin");
                let took = attach_unmapped(&s, h, per, 0x1000_0000_0000 + k * 0x100_0000_0000);
                assert_eq!(
                    took, per,
                    "connection {k} was refused ranges under the caps"
                );
                (s, uffd)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|j| j.join().expect("an attaching connection failed"))
        .collect();
    eprintln!("attached {} ranges in {:?}", 4 * per, t.elapsed());
    let v = bed.check_under_attack("ranges nobody faults in");
    let b = shadow_named(&v, "B.bin");
    assert!(
        b["lazy_mappings"].as_u64().unwrap() >= 4 * per,
        "the ranges were not attached while the victim ran: {b}"
    );
    drop(sessions);
    bed.check_settled("ranges nobody faults in");
}

/// Reads `len` (at most a pipe's 64 KiB) bytes at `addr` of this process
/// the way the kernel reaches a mapping: `write(2)` from it into a pipe
/// (a fault taken inside the kernel, answered through the userfaultfd
/// like a touch), on a thread of its own; `None` if it did not return
/// within `bound` (a fault nobody answers).
fn read_self(addr: u64, len: usize, bound: Duration) -> Option<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills the two descriptors of a new pipe.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: write(2) reads `len` bytes at `addr` in this process (a
        // mapping the caller holds); a fault it cannot serve is EFAULT.
        let n = unsafe { libc::write(fds[1], addr as *const libc::c_void, len) };
        let r = if n == len as isize {
            let mut buf = vec![0u8; len];
            // SAFETY: reads what was just written into our own buffer.
            let m = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), len) };
            assert_eq!(m, len as isize);
            Ok(buf)
        } else {
            Err(std::io::Error::last_os_error())
        };
        // SAFETY: the pipe's two descriptors, ours.
        unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
        let _ = tx.send(r);
    });
    rx.recv_timeout(bound).ok()
}

/// A client UNMAPs its lazy range while it is still mapped and registered
/// (the library's client does, just before its `munmap`; a raw client may
/// leave it mapped). The server stops serving the range: the pages filled
/// before stay readable with the file's bytes, and a page nothing filled
/// fails at once (a poison marker), never blocks and never reads zeros.
/// (The server marks only the unfilled runs and wakes the range once; it
/// used to poison the whole range, crawling over every mapped page with
/// two system calls each: half a second at the end of a 1 GiB scan under
/// `run`.)
#[test]
fn an_unmap_under_a_live_mapping_keeps_filled_pages_and_fails_the_rest() {
    let Some(mut bed) = Bed::new("hostile: UNMAP under a mapping", &[]) else {
        return;
    };
    let page = shadowfd::page_size() as u64;
    let (s, uffd, h) = raw_lazy_session(&bed.sock, "B.bin");
    wire::send(&s, &Frame::new(wire::MAP, h, wire::MAP_LAZY, 0, 0), None).expect("send MAP");
    let (r, memfd) = wire::recv(&s).expect("MAP reply");
    assert_eq!(r.kind, wire::MAP | wire::REPLY, "{r:?}");
    let memfd = memfd.expect("the MAP reply carries the memfd");
    // SAFETY: a new private read-only mapping at an address the kernel
    // picks; it aliases nothing and is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            memfd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of the memfd");
    let addr = p as u64;
    let mode = uffd_raw::MODE_MISSING | uffd_raw::MODE_MINOR;
    uffd_register(&uffd, addr, SIZE, mode).expect("UFFDIO_REGISTER");
    wire::send(&s, &Frame::new(wire::ATTACH, h, addr, SIZE, 0), None).expect("ATTACH");
    let (r, _) = wire::recv(&s).expect("ATTACH reply");
    assert_eq!(r.kind, wire::ATTACH | wire::REPLY, "{r:?}");
    let bound = Duration::from_secs(20);
    // Served while the handle is open: pages of two chunks (64 KiB).
    let filled = [0, 37 * page + 512];
    for &off in &filled {
        let got = read_self(addr + off, 256, bound)
            .expect("a served read hung")
            .unwrap_or_else(|e| panic!("a served read failed: {e}\n{}", bed.stderr()));
        assert_eq!(first_mismatch(ID_B, off, &got), None, "at {off}");
    }
    wire::send(&s, &Frame::new(wire::UNMAP, h, addr, 0, 0), None).expect("send UNMAP");
    let (r, _) = wire::recv(&s).expect("UNMAP reply");
    assert_eq!(r.kind, wire::UNMAP | wire::REPLY, "{r:?}");
    for &off in &filled {
        let got = read_self(addr + off, 256, bound)
            .expect("a filled page's read hung after UNMAP")
            .expect("a filled page's read failed after UNMAP");
        assert_eq!(
            first_mismatch(ID_B, off, &got),
            None,
            "at {off} after UNMAP"
        );
    }
    // Pages no fault asked for (64 KiB chunks 1 and 6, which readahead may
    // have filled meanwhile, and the last, which nothing filled): each read
    // ends at once, with the file's bytes or an error, never zeros.
    let mut failed = 0;
    for off in [20 * page, 100 * page, SIZE - page] {
        let t = Instant::now();
        let r = read_self(addr + off, 16, bound)
            .unwrap_or_else(|| panic!("the read at {off} blocked after UNMAP"));
        match r {
            Ok(got) => assert_eq!(first_mismatch(ID_B, off, &got), None, "at {off}"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "at {off}: {e}");
                failed += 1;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?} at {off}",
            t.elapsed()
        );
    }
    assert!(
        failed >= 1,
        "the last page, which nothing filled, was read after UNMAP\n{}",
        bed.stderr()
    );
    // SAFETY: our own mapping from above; nothing refers into it.
    unsafe { libc::munmap(p, SIZE as usize) };
    drop(s);
    bed.check_settled("UNMAP under a mapping");
}

/// The server's descriptor table is made nearly full (RLIMIT_NOFILE lowered
/// under it) and 300 silent connections arrive: the table runs full (accept
/// fails with EMFILE, or leaves less than the server's reserve free), and
/// the server drops its oldest silent connections and backs off instead of
/// spinning, logs a few lines a second at most, and serves the victim.
#[test]
fn accept_errors_back_off_and_do_not_flood_the_log() {
    let Some(mut bed) = Bed::new("hostile: EMFILE", &[]) else {
        return;
    };
    raise_nofile();
    let pid = bed.pid();
    let limit = (bed.fds + 24) as u64;
    let r = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit on a child process of ours; `r` is a valid struct.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &r, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let t0 = Instant::now();
    let mut held = Vec::new();
    for _ in 0..300 {
        match UnixStream::connect(&bed.sock) {
            Ok(s) => held.push(s),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    bed.check_under_attack("EMFILE");
    drop(held);
    bed.check_settled("EMFILE");
    let secs = t0.elapsed().as_secs_f64().ceil() as usize;
    let err = bed.stderr();
    // Either accept failed (EMFILE), or an accept left fewer than the
    // server's reserve free and it dropped silent connections: both are
    // the table running full, each kind rate-limited on its own.
    let accept_lines = err.lines().filter(|l| l.contains("accept:")).count();
    let room_lines = err
        .lines()
        .filter(|l| l.contains("descriptors free: dropped"))
        .count();
    assert!(
        accept_lines + room_lines >= 1,
        "the descriptor table never ran full (limit {limit}): the test is vacuous\n{err}"
    );
    assert!(
        accept_lines <= 6 * (secs + 1) && room_lines <= 6 * (secs + 1),
        "{accept_lines} accept lines and {room_lines} reserve lines in {secs} s"
    );
}

// ---- the client side: map_at's error paths and MAP abandon ----

fn play(role: &str) {
    child::begin();
    match role {
        "failing-mapper" => failing_mapper(),
        "remove-hostile" => remove_hostile(),
        other => panic!("unknown role {other}"),
    }
}

/// With SHADOWFD_FAILPOINT_REMOTE_REGISTER=1 and ..._PROTECT=1: the first
/// map fails in register (the MAP is abandoned), the second in mprotect
/// (attached: UNMAPped after the io lock); the third maps, byte-exact, on
/// the same connection.
fn failing_mapper() {
    let c = Client::connect(param("SOCK")).expect("connect");
    let f = c.open("B.bin").expect("open");
    let e = f.map().err().expect("the register failpoint");
    child::report("first", e.to_string().replace('\n', " "));
    let e = f.map().err().expect("the mprotect failpoint");
    child::report("second", e.to_string().replace('\n', " "));
    let m = f.map().expect("the third map");
    assert!(m.is_lazy());
    let id = param_u64("ID");
    if let Some(at) = first_mismatch(id, 0, &m[..1 << 20]) {
        child::report("bad", at);
        return;
    }
    let v: serde_json::Value = serde_json::from_str(&c.status_json().expect("STATS")).unwrap();
    let mine = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["pid"] == std::process::id())
        .cloned()
        .unwrap();
    child::report("mappings", &mine["lazy_mappings"]);
    child::report("exact", "");
}

/// map_at's error paths: a failed register abandons the MAP (protocol
/// version 5) and a failed mprotect UNMAPs the attached range, both after
/// the connection's io lock is let go (before, the drop deadlocked on it),
/// and the session goes on.
#[test]
fn failed_maps_are_abandoned_and_the_session_goes_on() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    let test = test_name!(failed_maps_are_abandoned_and_the_session_goes_on);
    let Some(mut bed) = Bed::new("hostile: map abandon", &[]) else {
        return;
    };
    let mut cmd = role_command(
        &test,
        "failing-mapper",
        &[
            ("SOCK", bed.sock.display().to_string()),
            ("ID", ID_B.to_string()),
        ],
    );
    cmd.env("SHADOWFD_FAILPOINT_REMOTE_REGISTER", "1")
        .env("SHADOWFD_FAILPOINT_REMOTE_PROTECT", "1");
    let o = child::run(cmd, Duration::from_secs(20));
    assert!(!o.timed_out, "map_at deadlocked\n{}", o.describe());
    assert!(o.status.success(), "{}", o.describe());
    assert!(
        o.last("first").unwrap().contains("UFFDIO_REGISTER"),
        "{}",
        o.describe()
    );
    assert!(
        o.last("second").unwrap().contains("mprotect"),
        "{}",
        o.describe()
    );
    assert_eq!(o.last("mappings").as_deref(), Some("1"), "{}", o.describe());
    assert!(o.last("exact").is_some(), "{}", o.describe());
    let err = bed.stderr();
    assert!(err.contains("abandoned"), "{err}");
}

// ---- a hostile keeping a userfaultfd REMOVE event pending ----

/// Raw userfaultfd ABI for the hostile (the crate keeps its own private):
/// `UFFD_API`, the `UFFDIO_API` and `UFFDIO_REGISTER` ioctls, and the
/// feature and mode bits of `<linux/userfaultfd.h>`.
mod uffd_raw {
    pub const API: u64 = 0xAA;
    pub const IOC_API: libc::c_ulong = 0xC018_AA3F;
    pub const IOC_REGISTER: libc::c_ulong = 0xC020_AA00;
    pub const EVENT_FORK: u64 = 1 << 1;
    pub const EVENT_REMAP: u64 = 1 << 2;
    pub const EVENT_REMOVE: u64 = 1 << 3;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const EVENT_UNMAP: u64 = 1 << 6;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    pub const POISON: u64 = 1 << 14;
    /// What the library's client negotiates (sys/uffd.rs WANTED_FEATURES),
    /// EVENT_FORK aside.
    pub const CLIENT: u64 = MISSING_SHMEM
        | MINOR_SHMEM
        | EXACT_ADDRESS
        | POISON
        | THREAD_ID
        | EVENT_REMAP
        | EVENT_UNMAP;
    pub const MODE_MISSING: u64 = 1 << 0;
    pub const MODE_MINOR: u64 = 1 << 2;
    pub const CONTINUE_BIT: u64 = 1 << 0x07;
    pub const EVENT_REMOVE_MSG: u8 = 0x15;
}

/// A userfaultfd (non-blocking, close-on-exec, like the library's) with
/// `features` negotiated; the features the kernel says it has.
fn uffd_with(features: u64) -> std::io::Result<(OwnedFd, u64)> {
    use std::os::fd::FromRawFd;
    // SAFETY: the userfaultfd syscall takes flags only and returns a new
    // descriptor (or -1).
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [uffd_raw::API, features, 0u64];
    // SAFETY: UFFDIO_API reads and writes a struct uffdio_api, three u64s,
    // which `api` is, live for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), uffd_raw::IOC_API, api.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fd, api[1]))
}

/// What the library's client negotiates plus EVENT_REMOVE (EVENT_FORK too
/// when the kernel allows it, as the library does): the descriptor, the
/// features negotiated and those the kernel offers.
fn uffd_with_remove() -> (OwnedFd, u64, u64) {
    let base = uffd_raw::CLIENT | uffd_raw::EVENT_REMOVE;
    match uffd_with(base | uffd_raw::EVENT_FORK) {
        Ok((fd, offered)) => (fd, base | uffd_raw::EVENT_FORK, offered),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let (fd, offered) = uffd_with(base).expect("UFFDIO_API with EVENT_REMOVE");
            (fd, base, offered)
        }
        Err(e) => panic!("UFFDIO_API with EVENT_REMOVE: {e}"),
    }
}

fn uffd_register(uffd: &OwnedFd, start: u64, len: u64, mode: u64) -> std::io::Result<u64> {
    let mut arg = [start, len, mode, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes a struct uffdio_register
    // (range start and len, mode, ioctls: four u64s), which `arg` is; the
    // kernel only looks at the range, not its memory.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), uffd_raw::IOC_REGISTER, arg.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(arg[3])
}

/// Proof that `features` make MADV_DONTNEED queue a REMOVE event and wait
/// for it: on a userfaultfd of our own, over an anonymous page, a thread's
/// madvise waits until we read the event, which is a REMOVE.
fn remove_event_delivered(features: u64) -> bool {
    let page = shadowfd::page_size();
    let (fd, _) = uffd_with(features).expect("a second userfaultfd");
    // SAFETY: a new anonymous private page at an address the kernel picks.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(a, libc::MAP_FAILED);
    uffd_register(&fd, a as u64, page as u64, uffd_raw::MODE_MISSING).expect("register");
    let addr = a as usize;
    let t = std::thread::spawn(move || {
        // SAFETY: madvise of the page mapped above, which nothing refers
        // into; it is unmapped only after this thread is joined.
        unsafe { libc::madvise(addr as *mut libc::c_void, page, libc::MADV_DONTNEED) }
    });
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one live pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 3000) } == 1;
    let mut msg = [0u8; 32];
    // SAFETY: read into a live 32-byte buffer (one struct uffd_msg); the
    // descriptor is non-blocking.
    let n = unsafe { libc::read(fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
    let ok = ready && n == 32 && msg[0] == uffd_raw::EVENT_REMOVE_MSG;

    // The madvise returns once the event is read (or at once if none was
    // queued).
    let rc = t.join().unwrap();
    assert_eq!(rc, 0, "madvise(MADV_DONTNEED) of an anonymous page");
    // Closed first: with EVENT_UNMAP the munmap would wait for a reader.
    drop(fd);
    // SAFETY: the page mapped above; the thread using it was joined.
    unsafe { libc::munmap(a, page) };
    ok
}

/// Connects with a userfaultfd negotiating EVENT_REMOVE, maps FILE lazily
/// as the library does (MAP, mmap PROT_NONE MAP_PRIVATE, MADV_DONTFORK,
/// register MISSING|MINOR, ATTACH, mprotect readable), touches 16 pages,
/// then until stdin closes calls MADV_DONTNEED on the whole range (each
/// waits in the kernel until the server reads the REMOVE event), checking
/// one page every 16 calls.
fn remove_hostile() {
    let page = shadowfd::page_size();
    let (uffd, features, offered) = uffd_with_remove();
    child::report("features", format!("{features:#x}"));
    child::report("offered", format!("{offered:#x}"));
    child::report("selftest", remove_event_delivered(features));
    let s = raw(Path::new(&param("SOCK")));
    let greeting = Frame::new(
        wire::HELLO,
        wire::VERSION,
        wire::HELLO_HAS_UFFD,
        features,
        0,
    );
    wire::send(&s, &greeting, Some(uffd.as_fd())).expect("send HELLO");
    let (r, _) = wire::recv(&s).expect("HELLO reply");
    assert_eq!(r.kind, wire::HELLO | wire::REPLY, "{r:?}");
    let file = param("FILE");
    let open = Frame::new(wire::OPEN, 0, 0, 0, 0).with_payload(file.as_bytes().to_vec());
    wire::send(&s, &open, None).expect("send OPEN");
    let (r, _) = wire::recv(&s).expect("OPEN reply");
    assert_eq!(r.kind, wire::OPEN | wire::REPLY, "{r:?}");
    let (handle, size) = (r.a, r.b);
    wire::send(
        &s,
        &Frame::new(wire::MAP, handle, wire::MAP_LAZY, 0, 0),
        None,
    )
    .expect("MAP");
    let (r, memfd) = wire::recv(&s).expect("MAP reply");
    assert_eq!(
        (r.kind, r.c),
        (wire::MAP | wire::REPLY, wire::MAP_LAZY),
        "{r:?}"
    );
    let memfd = memfd.expect("the MAP reply's memfd");
    let len = size.div_ceil(page as u64) as usize * page;
    // SAFETY: a new private mapping of the received memfd at an address the
    // kernel picks; nothing else refers to it.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE,
            memfd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(a, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: madvise of our own mapping, made above.
    let rc = unsafe { libc::madvise(a, len, libc::MADV_DONTFORK) };
    assert_eq!(rc, 0);
    let mode = uffd_raw::MODE_MISSING | uffd_raw::MODE_MINOR;
    let ioctls = uffd_register(&uffd, a as u64, len as u64, mode).expect("UFFDIO_REGISTER");
    assert_ne!(ioctls & uffd_raw::CONTINUE_BIT, 0, "no UFFDIO_CONTINUE");
    let attach = Frame::new(wire::ATTACH, handle, a as u64, len as u64, 0);
    wire::send(&s, &attach, None).expect("ATTACH");
    let (r, _) = wire::recv(&s).expect("ATTACH reply");
    assert_eq!(r.kind, wire::ATTACH | wire::REPLY, "{r:?}");
    // SAFETY: our own mapping, registered and attached: every fault on it
    // is served by the server.
    let rc = unsafe { libc::mprotect(a, len, libc::PROT_READ) };
    assert_eq!(rc, 0);
    // SAFETY: `len` readable bytes mapped above, unmapped only at exit;
    // MADV_DONTNEED drops its pages, which read the same bytes again (from
    // the memfd, through the server) when touched.
    let map: &[u8] = unsafe { std::slice::from_raw_parts(a as *const u8, len) };
    let id = param_u64("ID");
    if let Some(at) = first_mismatch(id, 0, &map[..16 * page]) {
        child::report("bad", at);
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while std::io::stdin().read(&mut b).is_ok_and(|n| n > 0) {}
            stop.store(true, Ordering::Relaxed);
        });
    }
    child::report("attacking", "");
    let pages = size as usize / page;
    let (mut n, mut checked) = (0u64, 0u64);
    let t = Instant::now();
    while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(30) {
        // SAFETY: MADV_DONTNEED on our own private mapping (see `map`).
        let rc = unsafe { libc::madvise(a, len, libc::MADV_DONTNEED) };
        if rc != 0 {
            child::report("madvise-error", std::io::Error::last_os_error());
            break;
        }
        n += 1;
        if n % 16 == 0 {
            let p = (n / 16) as usize * 7919 % pages;
            if let Some(at) = first_mismatch(id, (p * page) as u64, &map[p * page..(p + 1) * page])
            {
                child::report("bad", at);
                break;
            }
            checked += 1;
        }
    }
    child::report("iterations", n);
    child::report("checked", checked);
    child::report("attack-secs", t.elapsed().as_secs_f64());
    drop(uffd);
}

/// Each thread of `pid`: its name and CPU time (utime+stime) in ticks.
fn thread_ticks(pid: u32) -> Vec<(u64, String, u64)> {
    let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    d.filter_map(|e| {
        let e = e.ok()?;
        let tid = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let comm = stat[stat.find('(')? + 1..stat.rfind(')')?].to_string();
        let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((tid, comm, ticks))
    })
    .collect()
}

/// A library client (lazy) reads all of `file` and compares it: its time,
/// bounded by 20 s.
fn library_victim(sock: &Path, file: &'static str, id: u64) -> Duration {
    let sock = sock.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let c = Client::connect(&sock).expect("connect");
        assert!(c.has_userfaultfd());
        let f = c.open(file).expect("open");
        let m = f.map().expect("map");
        assert!(m.is_lazy());
        assert_eq!(m.len() as u64, SIZE);
        let bad = first_mismatch(id, 0, &m);
        drop((m, f, c));
        let _ = tx.send((t.elapsed(), bad));
    });
    let (took, bad) = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the library client of {file} did not finish in 20 s: {e}"));
    assert_eq!(bad, None, "the library client of {file} read wrong bytes");
    took
}

/// A client that keeps a userfaultfd REMOVE event pending (EVENT_REMOVE
/// negotiated, MADV_DONTNEED in a loop on its lazy range of A: each call
/// waits in the kernel until the server reads the event, and meanwhile
/// every UFFDIO_CONTINUE on its userfaultfd fails with EAGAIN) costs the
/// other clients nothing: library clients of the same file and of another
/// read exact bytes in about their time alone, `status` answers, the server
/// does not spin; afterwards its descriptors and threads come back.
#[test]
fn a_pending_remove_event_costs_other_clients_nothing() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    let test = test_name!(a_pending_remove_event_costs_other_clients_nothing);
    let Some(mut bed) = Bed::new("hostile: pending REMOVE", &[]) else {
        return;
    };
    let pid = bed.pid();
    // Fresh files (a shadow read whole is handed out sealed): the same
    // file as the hostile's (A2) and another (B2) under attack; two of the
    // same size alone, before.
    let files = [
        ("A1.bin", 0x20_a1),
        ("B1.bin", 0x20_b1),
        ("A2.bin", 0x20_a2),
        ("B2.bin", 0x20_b2),
    ];
    for (name, id) in files {
        write_content(&bed.root, name, id, SIZE);
    }
    let alone_a = library_victim(&bed.sock, files[0].0, files[0].1);
    let alone_b = library_victim(&bed.sock, files[1].0, files[1].1);
    let mut h = Proc::spawn(
        "the REMOVE hostile",
        role_command(
            &test,
            "remove-hostile",
            &[
                ("SOCK", bed.sock.display().to_string()),
                ("FILE", files[2].0.to_string()),
                ("ID", files[2].1.to_string()),
            ],
        ),
        false,
    );
    if h.wait_report("attacking", Duration::from_secs(10))
        .is_none()
    {
        panic!(
            "the hostile did not start its attack\n{}",
            h.finish(Duration::ZERO).describe()
        );
    }
    let hpid = h.pid();
    let (c0, w0, t0) = (cpu_time(pid).unwrap(), Instant::now(), thread_ticks(pid));
    let under_a = library_victim(&bed.sock, files[2].0, files[2].1);
    let under_b = library_victim(&bed.sock, files[3].0, files[3].1);
    let v = bed.status();
    // A window of at least 2 s for the CPU share.
    if let Some(rest) = Duration::from_secs(2).checked_sub(w0.elapsed()) {
        std::thread::sleep(rest);
    }
    let cpu = cpu_time(pid).unwrap().saturating_sub(c0);
    let wall = w0.elapsed();
    // Each server thread: name, ticks in the window, where it sleeps now.
    let threads: Vec<String> = thread_ticks(pid)
        .into_iter()
        .map(|(tid, comm, ticks)| {
            let before = t0.iter().find(|t| t.0 == tid).map_or(0, |t| t.2);
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan"))
                .unwrap_or_default();
            format!("{comm} {} ticks, {wchan}", ticks - before)
        })
        .collect();
    let o = h.finish(Duration::from_secs(10));
    let iterations = o.last("iterations").and_then(|s| s.parse::<u64>().ok());
    eprintln!(
        "hostile pending REMOVE: A {under_a:?} under attack, {alone_a:?} alone; B {under_b:?} \
         under attack, {alone_b:?} alone; server CPU {cpu:?} in {wall:?}; hostile: {:?} \
         madvise calls in {:?} s, {:?} pages checked, features {:?} (offered {:?}); server \
         threads: {threads:?}",
        iterations,
        o.last("attack-secs"),
        o.last("checked"),
        o.last("features"),
        o.last("offered"),
    );
    assert!(!o.timed_out, "the hostile hung\n{}", o.describe());
    assert!(o.status.success(), "{}", o.describe());
    assert_eq!(o.last("bad"), None, "{}", o.describe());
    assert_eq!(o.last("madvise-error"), None, "{}", o.describe());
    let features = u64::from_str_radix(o.last("features").unwrap().trim_start_matches("0x"), 16)
        .expect("features in hex");
    assert_ne!(features & uffd_raw::EVENT_REMOVE, 0, "{}", o.describe());
    assert_eq!(
        o.last("selftest").as_deref(),
        Some("true"),
        "MADV_DONTNEED queued no REMOVE event with these features: the test is vacuous\n{}",
        o.describe()
    );
    assert!(
        iterations.is_some_and(|n| n > 0) && o.last("checked").is_some_and(|c| c != "0"),
        "the hostile made no progress\n{}",
        o.describe()
    );
    // The hostile was a client with its range attached during the attack.
    let mine = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["pid"] == hpid)
        .cloned();
    assert!(
        mine.as_ref()
            .is_some_and(|c| c["lazy_mappings"].as_u64() == Some(1)),
        "the hostile was not a client with one lazy mapping: {v}"
    );
    for (file, alone, under) in [("A2.bin", alone_a, under_a), ("B2.bin", alone_b, under_b)] {
        assert!(
            under <= alone * 10 + Duration::from_secs(2),
            "the library client of {file} took {under:?} under attack, {alone:?} alone"
        );
    }
    // Each MADV_DONTNEED waits until the server reads its REMOVE event, and
    // the server reads at most EVENTS_PER_WINDOW of one client's events per
    // window (remote/server.rs): the hostile goes at that pace, and the
    // server stays under a third of a CPU, the bound every attack here
    // meets. (Before that pacing: 0.3 to 0.55 of a CPU, 35,000 to 180,000
    // calls a second, 2026-12-07.) One that stopped reading the events
    // hangs the hostile (checked above).
    assert!(
        cpu.as_secs_f64() <= wall.as_secs_f64() / 3.0,
        "the server used {cpu:?} of CPU in {wall:?} while the hostile kept REMOVE events \
         pending; its threads: {threads:?}"
    );
    // The server keeps the four new files' shadows (a descriptor step
    // each): what the hostile held (its userfaultfd, its connection, its
    // range) must be gone.
    bed.fds += files.len() * bed.fd_step;
    bed.check_settled("pending REMOVE");
    drop(bed.stderr());
}

// ---- parallel OPENs ----

/// An eager server whose copy of `slow.bin` takes ~2 s: an OPEN of another
/// file answers meanwhile (no lock across the copy), and a second OPEN of
/// `slow.bin` shares the first one's open (one shadow, one copy).
#[test]
fn opens_of_other_files_go_on_while_one_is_slow() {
    let dir = tempdir();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    write_content(&root, "slow.bin", ID_A, 2 << 20);
    write_content(&root, "fast.bin", ID_B, 2 << 20);
    let engine = Engine::new(crate::support::eager_config()).expect("eager engine");
    let copies = Arc::new(AtomicUsize::new(0));
    let c2 = copies.clone();
    let opts = ServerOptions {
        source_hook: Some(Arc::new(move |s: Arc<dyn Source>| {
            if s.name().ends_with("slow.bin") {
                c2.fetch_add(1, Ordering::SeqCst);
                Arc::new(Slow {
                    inner: s,
                    delay: Duration::from_millis(1000),
                }) as Arc<dyn Source>
            } else {
                s
            }
        })),
        ..ServerOptions::default()
    };
    let server = Server::new(engine, Tree::Root(root.clone()), opts).expect("server");
    let sock = dir.path().join("s.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let srv = server.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let _ = srv.handle(s);
        }
    });
    let opts = || ClientOptions {
        userfaultfd: false,
        timeout: BOUND,
    };
    let slow = |sock: PathBuf| {
        let o = opts();
        std::thread::spawn(move || {
            let c = Client::connect_with(&sock, o).expect("connect");
            let t = Instant::now();
            let f = c.open("slow.bin").expect("open slow.bin");
            (t.elapsed(), f.shadow_id())
        })
    };
    let a = slow(sock.clone());
    std::thread::sleep(Duration::from_millis(150));
    let b = slow(sock.clone());
    std::thread::sleep(Duration::from_millis(50));
    let c = Client::connect_with(&sock, opts()).expect("connect");
    let t = Instant::now();
    let f = c.open("fast.bin").expect("open fast.bin");
    let fast = t.elapsed();
    let (ta, ida) = a.join().unwrap();
    let (tb, idb) = b.join().unwrap();
    eprintln!("hostile opens: fast.bin {fast:?} while slow.bin took {ta:?} and {tb:?}");
    assert!(
        fast < Duration::from_millis(500),
        "OPEN of fast.bin waited {fast:?} for slow.bin"
    );
    assert!(
        ta >= Duration::from_millis(900),
        "slow.bin was not slow: {ta:?}"
    );
    assert_eq!(ida, idb, "two OPENs of slow.bin, two shadows");
    assert_eq!(
        copies.load(Ordering::SeqCst),
        1,
        "slow.bin was opened twice"
    );
    let m = f.map().expect("map fast.bin");
    assert_eq!(first_mismatch(ID_B, 0, &m), None);
}

// ---- errors a client can act on ----

/// A connect refused with "Permission denied" names the socket's owner and
/// mode (and the caller's uid); a server's refusal reaches `--json` output
/// as its typed code.
#[test]
fn errors_name_their_cause_and_code() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let Some(mut bed) = Bed::new("hostile: errors", &[]) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let dir = bed.sock.parent().unwrap().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = cli(&["status", "--socket", bed.sock.to_str().unwrap()]);
        c.uid(65534).gid(65534);
        let o = child::run(c, Duration::from_secs(10));
        assert!(!o.status.success(), "{}", o.describe());
        assert!(
            o.stderr.contains("Permission denied")
                && o.stderr.contains("belongs to uid 0")
                && o.stderr.contains("mode 0600")
                && o.stderr.contains("runs as uid 65534"),
            "{}",
            o.describe()
        );
    }
    let o = child::run(
        cli(&[
            "client",
            "--socket",
            bed.sock.to_str().unwrap(),
            "map",
            "no-such-file",
            "--json",
        ]),
        Duration::from_secs(10),
    );
    assert!(!o.status.success(), "{}", o.describe());
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("JSON error");
    assert_eq!(v["code"], "E_NOT_FOUND", "{v}");
    drop(bed.stderr());
}
