//! Attacks on lazy shadows from outside the engine (issue 10).
//!
//! A lazy shadow is a sparse memfd whose registered mappings are filled on
//! first touch. Anything that reaches the memfd *without* a registered
//! mapping (a reopened `/proc/PID/fd` entry, a descriptor served to a
//! consumer) can make the kernel allocate zero pages in its page cache; a
//! registered mapping then finds a page present, takes no fault, and reads
//! zeros. And kernel-mediated reads of the engine's own mappings
//! (`process_vm_readv`, `/proc/PID/mem`) fault on ranges the fault service
//! does not expect.
//!
//! Promises, each proved with real processes:
//! 1. `fallocate` by a same-uid process on the memfd of a running
//!    `shadowfd cat --mode lazy`: cat exits 0 only with byte-exact output,
//!    and otherwise says what went wrong on stderr.
//! 2. The same with the attacker mapping the memfd unregistered
//!    (`PROT_READ`, `MAP_SHARED`) and touching every page.
//! 3. The same with the attacker reopening it `O_RDWR` and trying
//!    `pwrite`, a writable shared mapping and `FALLOC_FL_PUNCH_HOLE`: the
//!    output is byte-exact (what the kernel refused is recorded).
//! 4. A consumer process that was served the shadow and abuses its
//!    descriptor (maps it unregistered and touches every page, or reopens it
//!    `O_RDWR` and fallocates it) spoils nothing for another served consumer
//!    or for a mapping in the engine's process.
//! 5. Every mapping of the shadow in the engine's process (the consumers'
//!    and the engine's internal ones), read from another process with
//!    `process_vm_readv` and `pread` of `/proc/PID/mem`, gives the right
//!    bytes or fails (EFAULT/EIO) within 10 s, and costs the engine well
//!    under a second of CPU: no fault is answered by a wake that only
//!    repeats it.
//!
//! Every role (the attacker, the engine, the consumers, the readers) is this
//! test binary re-executed; every wait is bounded and every process is
//! killed if the test gives up on it.

use crate::support::attack::{
    Attack, Check, MapRange, Proc, attack, attack_memfd, cpu_time, memfd_maps, memfds_of, pass_fd,
    role_command, wait_memfds_quiet, write_content,
};
use crate::support::child::{self, Outcome, param, param_u64};
use crate::support::{cli, lazy_available, lazy_config, tempdir};
use crate::test_name;
use shadowfd::{Engine, RemoteMapping, Share};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The file `cat` streams: large enough that most of it is still unfilled
/// when the attack lands.
const CAT_SIZE: u64 = 256 << 20;
/// What the test reads of cat's output before the attack. Cat cannot get
/// more than a few MiB further meanwhile: the test stops reading, the pipe
/// fills and cat blocks in write(2).
const CAT_HEAD: u64 = 8 << 20;

/// Plays the role this process was started in.
fn play(role: &str) {
    child::begin();
    match role {
        "attacker" => attack(param_u64("PID") as u32, Attack::parse(&param("ATTACK"))),
        "served-engine" => served_engine(),
        "consumer-a" => consumer_a(),
        "consumer-b" => consumer_b(),
        "mapped-engine" => mapped_engine(),
        "reader" => reader(),
        _ => panic!("unknown role {role}"),
    }
}

// ---- 1-3: a running `shadowfd cat --mode lazy` ----

/// What happened to one `cat` under attack.
struct CatRun {
    attacker: Outcome,
    cat: Outcome,
    out: Check,
    /// Whether cat's memfd was quiet (no fill in flight) before the attack
    /// and cat still running (blocked on the pipe) when the attacker had
    /// finished.
    alive_after_attack: bool,
    /// Output bytes the test had read when the attack started.
    read_before_attack: u64,
}

impl CatRun {
    fn describe(&self) -> String {
        format!(
            "output {} out of {CAT_SIZE}; attack after {} bytes of output, cat quiet before \
             and alive after it: {}\n--- cat ---\n{}\n--- attacker ---\n{}",
            self.out.summary(),
            self.read_before_attack,
            self.alive_after_attack,
            self.cat.describe(),
            self.attacker.describe()
        )
    }

    /// The attack was real: the attacker found the memfd of a cat that was
    /// still mid-stream, and every `key` it lists was reported `ok`.
    fn assert_attack_landed(&self, keys: &[&str]) {
        let a = &self.attacker;
        assert!(
            a.status.success() && a.last("attacked").is_some(),
            "the attacker failed\n{}",
            self.describe()
        );
        assert!(
            a.numbers("memfds").first().is_some_and(|&n| n > 0),
            "vacuous: the attacker found no memfd in cat's /proc/PID/fd or map_files\n{}",
            self.describe()
        );
        for key in keys {
            assert!(
                a.values(key).iter().any(|v| v == "ok"),
                "vacuous: the attacker's {key} did not succeed\n{}",
                self.describe()
            );
        }
        assert!(
            self.alive_after_attack && self.read_before_attack < CAT_SIZE,
            "vacuous: cat was not mid-stream during the attack\n{}",
            self.describe()
        );
    }

    /// Never wrong bytes: exit 0 only with exactly the file's bytes; any
    /// other exit with a `shadowfd: error` on stderr (not a bare signal or a
    /// hang), and only after exact bytes (the output may stop early, but
    /// what was written must be the file's).
    fn assert_exact_or_clear_failure(&self) {
        if self.cat.status.success() {
            assert!(
                self.out.wrong == 0 && self.out.checked() == CAT_SIZE,
                "cat exited 0 with wrong output\n{}",
                self.describe()
            );
        } else {
            assert!(
                !self.cat.timed_out && self.cat.stderr.contains("shadowfd: error"),
                "cat failed without saying why on stderr\n{}",
                self.describe()
            );
            assert!(
                self.out.wrong == 0,
                "cat wrote wrong bytes before it failed\n{}",
                self.describe()
            );
        }
    }
}

/// Pumps `r` into a channel of at most one piece: when the test stops
/// receiving, the pump stops reading and the writer blocks. `None` at EOF.
fn pump(mut r: impl Read + Send + 'static) -> crossbeam_channel::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let piece = match r.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some(buf)
                }
            };
            let end = piece.is_none();
            if tx.send(piece).is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Runs `shadowfd cat --mode lazy` on a fresh `CAT_SIZE` file, reads the
/// first `CAT_HEAD` bytes of its output, lets an attacker process do `how`
/// to cat's memfd while cat is blocked on the full pipe, then reads the rest.
fn cat_under_attack(test: &str, how: Attack, id: u64) -> Option<CatRun> {
    if !lazy_available(test) {
        return None;
    }
    let dir = tempdir();
    let path = write_content(dir.path(), "src", id, CAT_SIZE);
    let path_s = path.display().to_string();
    let mut cat = Proc::spawn(
        "shadowfd cat",
        cli(&["cat", "--mode", "lazy", &path_s]),
        true,
    );
    let rx = pump(cat.take_stdout());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Check::new(id, CAT_SIZE, 0);
    let mut eof = false;
    let next = |out: &mut Check, cat: &mut Proc| match rx.recv_deadline(deadline) {
        Ok(Some(piece)) => {
            out.feed(&piece);
            false
        }
        Ok(None) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => true,
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => panic!(
            "cat's output stalled at {} bytes\n{}",
            out.pos,
            cat.finish(Duration::ZERO).describe()
        ),
    };
    while !eof && out.pos < CAT_HEAD {
        eof = next(&mut out, &mut cat);
    }
    assert!(
        !eof,
        "cat ended after {} bytes, before the attack\n{}",
        out.pos,
        cat.finish(Duration::from_secs(5)).describe()
    );
    let read_before_attack = out.pos;
    // Attack only once no fill is in flight: a fill racing the attack finds
    // planted pages and poisons them, which turns some runs into a SIGBUS
    // after the zeros instead of silent zeros. Either is wrong; this keeps
    // the outcome the same from run to run.
    let quiet = wait_memfds_quiet(
        cat.pid(),
        Duration::from_millis(200),
        Duration::from_secs(10),
    );
    let attacker = child::run(
        role_command(
            test,
            "attacker",
            &[
                ("PID", cat.pid().to_string()),
                ("ATTACK", how.name().to_string()),
            ],
        ),
        Duration::from_secs(30),
    );
    let alive_after_attack = cat.is_running() && quiet;
    while !eof {
        eof = next(&mut out, &mut cat);
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let cat = cat.finish(left.max(Duration::from_secs(5)));
    Some(CatRun {
        attacker,
        cat,
        out,
        alive_after_attack,
        read_before_attack,
    })
}

/// Attack 1.
#[test]
fn fallocate_on_the_memfd_of_a_running_lazy_cat() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    let test = test_name!(fallocate_on_the_memfd_of_a_running_lazy_cat);
    let Some(run) = cat_under_attack(&test, Attack::Fallocate, 0xA7_01) else {
        return;
    };
    run.assert_attack_landed(&["open-rdwr", "fallocate"]);
    run.assert_exact_or_clear_failure();
}

/// Attack 2.
#[test]
fn unregistered_mapping_of_the_memfd_of_a_running_lazy_cat() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    let test = test_name!(unregistered_mapping_of_the_memfd_of_a_running_lazy_cat);
    let Some(run) = cat_under_attack(&test, Attack::MapTouch, 0xA7_02) else {
        return;
    };
    run.assert_attack_landed(&["open-rdonly", "mmap-read"]);
    assert!(
        run.attacker.numbers("touched").iter().any(|&n| n > 0),
        "vacuous: the attacker touched no page\n{}",
        run.describe()
    );
    run.assert_exact_or_clear_failure();
}

/// Attack 3.
#[test]
fn writes_through_a_reopened_memfd_of_a_running_lazy_cat() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    let test = test_name!(writes_through_a_reopened_memfd_of_a_running_lazy_cat);
    let Some(run) = cat_under_attack(&test, Attack::Writes, 0xA7_03) else {
        return;
    };
    run.assert_attack_landed(&["open-rdwr"]);
    let said = |k: &str| run.attacker.values(k).join(", ");
    eprintln!(
        "{test}: the kernel answered pwrite: {}; writable MAP_SHARED mmap: {}; \
         PUNCH_HOLE: {}",
        said("pwrite"),
        said("mmap-write"),
        said("punch-hole")
    );
    assert!(
        run.cat.status.success() && run.out.wrong == 0 && run.out.checked() == CAT_SIZE,
        "cat's output is not byte-exact (pwrite: {}; mmap-write: {}; punch-hole: {})\n{}",
        said("pwrite"),
        said("mmap-write"),
        said("punch-hole"),
        run.describe()
    );
}

// ---- 4: a served consumer abusing its descriptor ----

/// The size of the served shadow.
const SERVED_SIZE: u64 = 64 << 20;

/// Takes the socket this process inherited as parameter `name`.
fn inherited_socket(name: &str) -> UnixStream {
    let fd = param_u64(name) as RawFd;
    // SAFETY: the parent passed this descriptor (FD_CLOEXEC cleared) for us
    // alone; nothing else in this process owns it.
    unsafe { UnixStream::from_raw_fd(fd) }
}

/// Reads all of `map` and reports `@@ NAME summary` and `@@ NAME-exact BOOL`
/// (a SIGBUS is reported by the child harness and kills the process).
fn check_all(name: &str, map: &[u8], id: u64, size: u64) {
    child::watch_sigbus(map);
    let mut c = Check::new(id, size, 0);
    for piece in map.chunks(1 << 20) {
        c.feed(piece);
    }
    child::report(name, c.summary());
    child::report(
        &format!("{name}-exact"),
        c.wrong == 0 && c.checked() == size,
    );
}

/// The engine: serves consumer A, waits until A hangs up, serves B and waits
/// for it, then reads everything through a shared and a private mapping.
fn served_engine() {
    let (id, size) = (param_u64("ID"), param_u64("SIZE"));
    let engine = Engine::new(lazy_config()).expect("lazy engine");
    let shadow = engine.open(param("PATH")).expect("open the shadow");
    match shadowfd::remote::serve(&shadow, inherited_socket("SOCK_A")) {
        Ok(served) => {
            child::report("serve-a", "ok");
            served.wait();
        }
        Err(e) => child::report("serve-a", format!("refused: {e}")),
    }
    child::report("a-gone", "");
    let served = shadowfd::remote::serve(&shadow, inherited_socket("SOCK_B")).expect("serve B");
    child::report("serve-b", "ok");
    served.wait();
    for (name, share) in [
        ("local-shared", Share::Shared),
        ("local-private", Share::Private),
    ] {
        let map = shadow.map(share).expect("local mapping");
        check_all(name, &map, id, size);
    }
    child::report("stats", format!("{:?}", shadow.stats()));
}

/// Consumer A: completes the handshake like any consumer (the consumer
/// speaks first in protocol version 2, so nothing can be peeked before it),
/// then finds the memfd among its mappings and attacks it.
fn consumer_a() {
    let how = Attack::parse(&param("ATTACK"));
    let sock = inherited_socket("SOCK");
    let map = RemoteMapping::receive(sock).expect("receive the shadow");
    child::report("lazy", map.is_lazy());
    let target = memfds_of(std::process::id())
        .into_iter()
        .next()
        .expect("no memfd among this consumer's descriptors or mappings")
        .path;
    child::report("memfd", target.display());
    attack_memfd(&target, how);
    child::report("attacked", how.name());
    drop(map);
}

/// Consumer B: a plain registered consumer that reads everything.
fn consumer_b() {
    let map = RemoteMapping::receive(inherited_socket("SOCK")).expect("receive the shadow");
    child::report("lazy", map.is_lazy());
    check_all("consumer-b", &map, param_u64("ID"), param_u64("SIZE"));
}

/// Attack 4 with consumer A doing `how` (`MapTouch` or `Fallocate`).
fn served_consumer_abuse(test: &str, how: Attack, id: u64) {
    if !lazy_available(test) {
        return;
    }
    let dir = tempdir();
    let path = write_content(dir.path(), "src", id, SERVED_SIZE);
    let (engine_a, sock_a) = UnixStream::pair().expect("socketpair");
    let (engine_b, sock_b) = UnixStream::pair().expect("socketpair");
    let common = [("ID", id.to_string()), ("SIZE", SERVED_SIZE.to_string())];
    let mut params = common.to_vec();
    params.extend([
        ("PATH", path.display().to_string()),
        ("SOCK_A", engine_a.as_raw_fd().to_string()),
        ("SOCK_B", engine_b.as_raw_fd().to_string()),
    ]);
    let mut cmd = role_command(test, "served-engine", &params);
    pass_fd(&mut cmd, engine_a.as_raw_fd());
    pass_fd(&mut cmd, engine_b.as_raw_fd());
    let mut engine = Proc::spawn("engine", cmd, false);
    // Only the processes may hold the ends, or hang-ups would go unseen.
    drop((engine_a, engine_b));
    let spawn_consumer = |role: &str, sock: UnixStream, extra: Option<(&'static str, String)>| {
        let mut params = common.to_vec();
        params.push(("SOCK", sock.as_raw_fd().to_string()));
        params.extend(extra);
        let mut cmd = role_command(test, role, &params);
        pass_fd(&mut cmd, sock.as_raw_fd());
        let p = Proc::spawn(role, cmd, false);
        drop(sock);
        p
    };
    let mut a = spawn_consumer("consumer-a", sock_a, Some(("ATTACK", how.name().into())));
    let mut b = spawn_consumer("consumer-b", sock_b, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = || deadline.saturating_duration_since(Instant::now());
    let oa = a.finish(left());
    let ob = b.finish(left());
    let oe = engine.finish(left());
    let all = format!(
        "--- consumer A ({}) ---\n{}\n--- consumer B ---\n{}\n--- engine ---\n{}",
        how.name(),
        oa.describe(),
        ob.describe(),
        oe.describe()
    );
    // The attack was real.
    assert!(
        oa.status.success() && oa.last("attacked").is_some(),
        "consumer A failed\n{all}"
    );
    let done = match how {
        Attack::MapTouch => "mmap-read",
        _ => "fallocate",
    };
    assert_eq!(
        oa.last(done).as_deref(),
        Some("ok"),
        "vacuous: consumer A's {done} did not succeed\n{all}"
    );
    // Nobody else is spoiled.
    let mut wrong = Vec::new();
    for (o, key, who) in [
        (&ob, "consumer-b", "consumer B"),
        (&oe, "local-shared", "the engine's shared mapping"),
        (&oe, "local-private", "the engine's private mapping"),
    ] {
        if o.last(&format!("{key}-exact")).as_deref() != Some("true") {
            let what = match (o.last(key), o.last("sigbus")) {
                (Some(s), _) => s,
                (None, Some(at)) => format!("SIGBUS at offset {at}"),
                (None, None) => format!("no result ({:?})", o.status),
            };
            wrong.push(format!("{who}: {what}"));
        }
    }
    assert!(
        wrong.is_empty() && ob.status.success() && oe.status.success(),
        "after consumer A's {}, others read wrong bytes out of {SERVED_SIZE}: {}\n{all}",
        how.name(),
        wrong.join("; ")
    );
}

/// Attack 4, consumer A mapping its descriptor and touching every page.
#[test]
fn served_consumer_touching_its_descriptor_spoils_nobody_else() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    served_consumer_abuse(
        &test_name!(served_consumer_touching_its_descriptor_spoils_nobody_else),
        Attack::MapTouch,
        0xA7_04,
    );
}

/// Attack 4, consumer A reopening its descriptor O_RDWR and fallocating it.
#[test]
fn served_consumer_fallocating_its_descriptor_spoils_nobody_else() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    served_consumer_abuse(
        &test_name!(served_consumer_fallocating_its_descriptor_spoils_nobody_else),
        Attack::Fallocate,
        0xA7_05,
    );
}

// ---- 5: kernel-mediated reads of every engine mapping ----

const MAPPED_SIZE: u64 = 16 << 20;
/// A read must end within this.
const READ_WALL: Duration = Duration::from_secs(10);
/// The engine may use at most this much CPU for one read (a legitimate read
/// of the whole shadow fills 16 MiB: tens of milliseconds).
const READ_CPU: Duration = Duration::from_secs(1);

/// The engine: a shared and a private mapping with their first MiB filled
/// (the rest unfilled), reported as `@@ consumer ADDR`; then it waits for
/// stdin to close.
fn mapped_engine() {
    let id = param_u64("ID");
    let engine = Engine::new({
        let mut c = lazy_config();
        c.readahead = 0;
        c
    })
    .expect("lazy engine");
    let shadow = engine.open(param("PATH")).expect("open the shadow");
    let shared = shadow.map(Share::Shared).expect("shared mapping");
    let private = shadow.map(Share::Private).expect("private mapping");
    let head = (1usize << 20).min(shared.len());
    for m in [&shared, &private] {
        crate::support::assert_bytes(&m[..head], id, 0, "engine's own first MiB");
        child::report("consumer", format!("{:x}", m.as_ptr() as usize));
    }
    child::report("resident", shadow.resident_bytes().expect("resident bytes"));
    child::report("ready", std::process::id());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    child::report("stats", format!("{:?}", shadow.stats()));
}

/// A reader: reads `LEN` bytes at `ADDR` of process `PID` (file offset `OFF`)
/// with `METHOD` (`vm-readv` or `proc-mem`) in 1 MiB pieces, stops at the
/// first failure (`@@ failed ERRNO at OFFSET`), and reports `@@ read
/// summary`, `@@ wrong N`.
fn reader() {
    let pid = param_u64("PID") as libc::pid_t;
    let (addr, len, off) = (param_u64("ADDR"), param_u64("LEN"), param_u64("OFF"));
    let method = param("METHOD");
    let mem = (method == "proc-mem")
        .then(|| std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem"));
    let mut check = Check::new(param_u64("ID"), param_u64("SIZE"), off);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let at = addr + done;
        let r = match &mem {
            None => {
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: n,
                };
                let remote = libc::iovec {
                    iov_base: at as *mut libc::c_void,
                    iov_len: n,
                };
                // SAFETY: `local` is our own live buffer of at least `n`
                // bytes; the remote range is only read, by the kernel.
                unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) }
            }
            Some(f) => {
                // SAFETY: pread writes at most `n` bytes into our live buffer.
                unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), n, at as i64) }
            }
        };
        if r <= 0 {
            let why = if r == 0 {
                "EOF".to_string()
            } else {
                crate::support::attack::errno_name(
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                )
            };
            child::report("failed", format!("{why} at {}", off + done));
            break;
        }
        check.feed(&buf[..r as usize]);
        done += r as u64;
    }
    child::report("read", check.summary());
    child::report("wrong", check.wrong);
}

/// One kernel-mediated read of one engine mapping.
struct Read1 {
    line: String,
    ok: bool,
}

fn read_range(
    test: &str,
    engine_pid: u32,
    m: &MapRange,
    label: &str,
    method: &str,
    id: u64,
) -> Read1 {
    let params = [
        ("PID", engine_pid.to_string()),
        ("ADDR", m.start.to_string()),
        ("LEN", (m.end - m.start).to_string()),
        ("OFF", m.offset.to_string()),
        ("METHOD", method.to_string()),
        ("ID", id.to_string()),
        ("SIZE", MAPPED_SIZE.to_string()),
    ];
    let cpu0 = cpu_time(engine_pid).expect("engine CPU time");
    let t0 = Instant::now();
    let mut p = Proc::spawn("reader", role_command(test, "reader", &params), false);
    let mut verdict = None;
    while p.is_running() {
        let used = cpu_time(engine_pid).unwrap_or(cpu0) - cpu0;
        if used > READ_CPU {
            verdict = Some(format!(
                "SPINS: the engine used {:.2} s of CPU in {:.2} s (killed)",
                used.as_secs_f64(),
                t0.elapsed().as_secs_f64()
            ));
            break;
        }
        if t0.elapsed() > READ_WALL {
            verdict = Some(format!(
                "HANGS: no answer in {:.1} s (killed)",
                t0.elapsed().as_secs_f64()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = p.finish(Duration::ZERO);
    let wall = t0.elapsed();
    let used = cpu_time(engine_pid).unwrap_or(cpu0) - cpu0;
    let what = format!("{label} {:x}-{:x} {} {method}", m.start, m.end, m.perms);
    let cost = format!(
        "{:.2} s wall, engine CPU {:.2} s",
        wall.as_secs_f64(),
        used.as_secs_f64()
    );
    if let Some(v) = verdict {
        let so_far = o.last("read").unwrap_or_default();
        return Read1 {
            line: format!("{what}: {v} [{cost}] {so_far}"),
            ok: false,
        };
    }
    let wrong = o.numbers("wrong").first().copied();
    let failed = o
        .last("failed")
        .map_or(String::new(), |f| format!(", then failed: {f}"));
    let read = o.last("read").unwrap_or_else(|| "no result".into());
    let ok = o.status.success() && wrong == Some(0) && used <= READ_CPU;
    let bad = if ok {
        ""
    } else if wrong.is_some_and(|w| w > 0) {
        "WRONG BYTES: "
    } else if used > READ_CPU {
        "TOO MUCH ENGINE CPU: "
    } else {
        "READER FAILED: "
    };
    Read1 {
        line: format!(
            "{what}: {bad}{read}{failed} [{cost}]{}",
            if o.status.success() {
                String::new()
            } else {
                format!(" {:?}\n{}", o.status, o.stderr)
            }
        ),
        ok,
    }
}

/// Attack 5.
#[test]
fn kernel_mediated_reads_of_every_engine_mapping_never_spin() {
    if let Some(r) = child::role() {
        return play(&r);
    }
    let test = test_name!(kernel_mediated_reads_of_every_engine_mapping_never_spin);
    if !lazy_available(&test) {
        return;
    }
    let id = 0xA7_06;
    let dir = tempdir();
    let path = write_content(dir.path(), "src", id, MAPPED_SIZE);
    let mut engine = Proc::spawn(
        "engine",
        role_command(
            &test,
            "mapped-engine",
            &[("PATH", path.display().to_string()), ("ID", id.to_string())],
        ),
        false,
    );
    if engine
        .wait_report("ready", Duration::from_secs(30))
        .is_none()
    {
        panic!(
            "the engine process did not get ready\n{}",
            engine.finish(Duration::ZERO).describe()
        );
    }
    let pid = engine.pid();
    let consumers: Vec<u64> = engine
        .values("consumer")
        .iter()
        .map(|a| u64::from_str_radix(a, 16).expect("consumer address"))
        .collect();
    let resident: u64 = engine.values("resident")[0].parse().expect("resident");
    assert!(
        resident < MAPPED_SIZE,
        "vacuous: the shadow is already filled ({resident} bytes resident)"
    );
    let mut maps = memfd_maps(pid);
    for c in &consumers {
        assert!(
            maps.iter().any(|m| m.start == *c),
            "the consumer mapping at {c:x} is not a memfd mapping in /proc/{pid}/maps: {maps:?}"
        );
    }
    // The engine's internal mappings first, while most pages are unfilled.
    maps.sort_by_key(|m| (consumers.contains(&m.start), m.start));
    let budget = Instant::now() + Duration::from_secs(45);
    let mut lines = Vec::new();
    let mut all_ok = true;
    for m in &maps {
        let label = if consumers.contains(&m.start) {
            "consumer"
        } else {
            "internal"
        };
        // /proc/PID/mem first: vm-readv of a consumer mapping fills it.
        for method in ["proc-mem", "vm-readv"] {
            if Instant::now() > budget {
                lines.push(format!(
                    "{label} {:x} {method}: NOT RUN (time budget)",
                    m.start
                ));
                all_ok = false;
                continue;
            }
            let r = read_range(&test, pid, m, label, method, id);
            all_ok &= r.ok;
            lines.push(r.line);
        }
    }
    let eo = engine.finish(Duration::from_secs(10));
    let table = lines.join("\n");
    eprintln!("{test}: reads of /proc/{pid} mappings:\n{table}");
    assert!(
        all_ok && eo.status.success(),
        "kernel-mediated reads of the engine's mappings went wrong:\n{table}\n--- engine ---\n{}",
        eo.describe()
    );
}
