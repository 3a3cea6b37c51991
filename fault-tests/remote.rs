//! Consumers in other processes. Scenario 6: a consumer *process* killed
//! while its faults are in flight; also the plain cases (lazy through the
//! consumer's own userfaultfd, eager and materialized as descriptors).
//!
//! The consumer is this test binary re-executed (`remote::consumer_child`,
//! ignored in normal runs): it receives a lazy shadow over a Unix socket with
//! `RemoteMapping::receive`, which registers its mapping with a userfaultfd of
//! its own and hands that userfaultfd to the engine here.

use crate::support::content::write_file;
use crate::support::{assert_bytes, lazy_available, lazy_config, tempdir};
use shadowfd::{Engine, RemoteMapping, Share, Source, SourceMeta};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ID: u64 = 0x6e;
const FD_VAR: &str = "FAULT_REMOTE_FD";
const PAGES_VAR: &str = "FAULT_REMOTE_PAGES";

/// The consumer process: maps the received shadow and checks the listed
/// pages (or every page) against the deterministic content.
#[test]
#[ignore = "the consumer process of scenario 6; run by the tests below"]
fn consumer_child() {
    let fd: i32 = std::env::var(FD_VAR).unwrap().parse().unwrap();
    // SAFETY: the parent passed this socket's descriptor number; this process
    // owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let map = RemoteMapping::receive(stream).unwrap();
    println!("lazy={}", map.is_lazy());
    let page = shadowfd::page_size();
    let pages: Vec<usize> = match std::env::var(PAGES_VAR) {
        Ok(s) => s.split(',').map(|x| x.parse().unwrap()).collect(),
        Err(_) => (0..map.len().div_ceil(page)).collect(),
    };
    for p in pages {
        let end = ((p + 1) * page).min(map.len());
        assert_bytes(&map[p * page..end], ID, (p * page) as u64, "remote page");
    }
    println!("consumer ok");
}

pub(crate) fn spawn_consumer(pages: Option<&str>) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "remote::consumer_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(FD_VAR, fd.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(p) = pages {
        c.env(PAGES_VAR, p);
    }
    // SAFETY: the hook only clears FD_CLOEXEC on one descriptor, which is
    // async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    // SAFETY: closes our copy of the child's end; the child has its own.
    unsafe { libc::close(fd) };
    (child, ours)
}

/// A source that sleeps in every read, so that fills stay in flight.
struct Slow {
    inner: shadowfd::FileSource,
    delay: Duration,
}

impl Source for Slow {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::thread::sleep(self.delay);
        self.inner.read_at(buf, offset)
    }
    fn metadata(&self) -> std::io::Result<SourceMeta> {
        self.inner.metadata()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// Serves one consumer process to the end; its stdout.
fn serve_one(shadow: &shadowfd::Shadow) -> String {
    let (child, sock) = spawn_consumer(None);
    let served = shadowfd::remote::serve(shadow, sock).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("consumer ok"),
        "consumer failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    served.wait();
    assert_eq!(
        shadow.remote_consumers(),
        0,
        "a finished consumer is forgotten"
    );
    text
}

#[test]
fn a_consumer_process_maps_a_lazy_shadow_through_its_own_userfaultfd() {
    if !lazy_available("remote consumers") {
        return;
    }
    let dir = tempdir();
    let size = (5 << 20) + 321;
    let path = write_file(dir.path(), "src", ID, size);
    let engine = Engine::new(lazy_config()).unwrap();
    let shadow = engine.open(&path).unwrap();
    let out = serve_one(&shadow);
    assert!(out.contains("lazy=true"), "{out}");
    let st = shadow.stats();
    assert!(
        st.faults > 0,
        "the consumer's faults were served here: {st:?}"
    );
    assert_eq!(st.bytes_filled, size.div_ceil(4096) * 4096);
    // Pages filled for the consumer are in the shared page cache.
    let local = shadow.map(Share::Shared).unwrap();
    assert_bytes(&local, ID, 0, "local mapping after a remote consumer");
}

#[test]
fn eager_and_materialized_shadows_are_sent_as_plain_descriptors() {
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 3 << 20);
    let eager = Engine::new(crate::support::eager_config()).unwrap();
    let out = serve_one(&eager.open(&path).unwrap());
    assert!(out.contains("lazy=false"), "{out}");
    if lazy_available("materialized remote consumers") {
        let lazy = Engine::new(lazy_config()).unwrap();
        let s = lazy.open(&path).unwrap();
        s.materialize().unwrap();
        let out = serve_one(&s);
        assert!(out.contains("lazy=false"), "{out}");
    }
}

#[test]
fn a_consumer_process_killed_mid_fault_is_forgotten_and_others_are_served() {
    if !lazy_available("remote consumers") {
        return;
    }
    let dir = tempdir();
    let size = 4u64 << 20;
    let path = write_file(dir.path(), "src", ID, size);
    let engine = Engine::new({
        let mut c = lazy_config();
        c.readahead = 0;
        c
    })
    .unwrap();
    let shadow = engine
        .open(Slow {
            inner: shadowfd::FileSource::open(&path).unwrap(),
            delay: Duration::from_millis(300),
        })
        .unwrap();

    // Two victims touch every page; each fill takes 300 ms.
    let mut victims: Vec<_> = (0..2)
        .map(|_| {
            let (child, sock) = spawn_consumer(None);
            (child, shadowfd::remote::serve(&shadow, sock).unwrap())
        })
        .collect();
    let t = Instant::now();
    while shadow.stats().faults < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the victims never faulted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(shadow.remote_consumers(), 2);
    // Kill both while fills for them are in flight (SIGKILL: no cleanup).
    for (child, _) in &mut victims {
        child.kill().unwrap();
    }
    for (mut child, served) in victims {
        let status = child.wait().unwrap();
        assert!(!status.success(), "a killed victim exited cleanly");
        served.wait();
    }
    assert_eq!(shadow.remote_consumers(), 0, "dead consumers are forgotten");
    let st = shadow.stats();
    assert_eq!(st.errors, 0, "no fill failed: {st:?}");
    assert!(shadow.poisoned_pages().is_empty());

    // The engine keeps serving: a new consumer process and a local mapping
    // read the right bytes, including pages the victims were waiting on.
    let (child, sock) = spawn_consumer(Some("0,1,2,511,1023"));
    let served = shadowfd::remote::serve(&shadow, sock).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("consumer ok"),
        "the next consumer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    served.wait();
    let local = shadow.map(Share::Private).unwrap();
    assert_bytes(&local[..8192], ID, 0, "local mapping after the kills");
    assert_eq!(shadow.remote_consumers(), 0);
}
