//! Consumers in other processes: a child maps a shadow served over a Unix
//! socket, through a userfaultfd it made and passed to us. (A consumer killed
//! mid-fault is scenario 6 of the fault-injection suite, fault-tests/remote.rs.)

mod common;

use common::*;
use shadowfd::{Mode, RemoteMapping, Shadow};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const ROLE: &str = "SHADOWFD_TEST_CONSUMER_FD";

/// Entry point of the consumer child (run only when re-executed).
#[test]
#[ignore = "run as a child process by the other tests"]
fn consumer_child() {
    let fd: i32 = std::env::var(ROLE).unwrap().parse().unwrap();
    let expect = std::fs::read(std::env::var("SHADOWFD_TEST_EXPECT").unwrap()).unwrap();
    let pages: Option<Vec<usize>> = std::env::var("SHADOWFD_TEST_PAGES")
        .ok()
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect());
    // SAFETY: the parent passed us this socket's descriptor number; we are
    // its only owner in this process.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let map = RemoteMapping::receive(stream).unwrap();
    assert_eq!(map.len(), expect.len());
    println!("lazy={}", map.is_lazy());
    match pages {
        Some(pages) => {
            for p in pages {
                let off = p * 4096;
                assert_eq!(map[off..off + 4096], expect[off..off + 4096], "page {p}");
            }
        }
        None => assert!(map[..] == expect[..], "remote mapping differs"),
    }
    println!("ok");
}

fn spawn_consumer(expect: &Path, pages: Option<&str>) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "consumer_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, fd.to_string())
    .env("SHADOWFD_TEST_EXPECT", expect)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(p) = pages {
        c.env("SHADOWFD_TEST_PAGES", p);
    }
    // SAFETY: the hook only clears FD_CLOEXEC on an inherited descriptor,
    // which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    // SAFETY: `fd` is the descriptor we took out of `theirs`; the child has
    // its own copy now, so closing ours is right.
    unsafe { libc::close(fd) };
    (child, ours)
}

fn serve_one(shadow: &Shadow, expect: &Path, pages: Option<&str>) -> String {
    let (child, sock) = spawn_consumer(expect, pages);
    let served = shadow.serve(sock).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "consumer failed: {}\n{}",
        text,
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
fn a_child_process_maps_a_lazy_shadow_through_its_own_userfaultfd() {
    if !lazy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pattern((5 << 20) + 321, 21);
    let path = file_with(dir.path(), "f", &data);
    let engine = engine(Mode::Lazy);
    let shadow = engine.open_path(&path).unwrap();
    let out = serve_one(&shadow, &path, None);
    assert!(out.contains("lazy=true") && out.contains("ok"), "{out}");
    let st = shadow.stats();
    assert!(st.faults > 0, "the child's faults were served here: {st:?}");
    assert_eq!(st.bytes_filled, data.len().div_ceil(4096) as u64 * 4096);
    // Filled pages are in the shared page cache: a local mapping agrees.
    let local = shadow.map(shadowfd::Share::Shared).unwrap();
    assert_eq!(first_diff(&local, &data), None);
}

#[test]
fn eager_and_materialized_shadows_are_sent_as_plain_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 << 20, 22);
    let path = file_with(dir.path(), "f", &data);
    let eager = engine(Mode::Eager);
    let out = serve_one(&eager.open_path(&path).unwrap(), &path, None);
    assert!(out.contains("lazy=false"), "{out}");
    if lazy_available() {
        let lazy = engine(Mode::Lazy);
        let s = lazy.open_path(&path).unwrap();
        s.materialize().unwrap();
        let out = serve_one(&s, &path, None);
        assert!(out.contains("lazy=false"), "{out}");
    }
}
