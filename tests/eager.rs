//! Eager shadows: byte identity, seals, read-only hand-out, staleness, caps.

mod common;

use common::*;
use shadowfd::shadow::Field;
use shadowfd::{Config, Engine, Error, Mode, Share, Staleness};
use std::io::Write;
use std::os::fd::AsRawFd;

const SIZES: &[usize] = &[
    0,
    1,
    4095,
    4096,
    4097,
    3 * 1024 * 1024 + 123,
    5 * 1024 * 1024 - 7,
];

#[test]
fn bytes_are_identical_at_awkward_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(Mode::Eager);
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(n, i as u64);
        let path = file_with(dir.path(), &format!("f{n}"), &data);
        let shadow = engine.open(&path).unwrap();
        assert_eq!(shadow.mode(), Mode::Eager);
        assert_eq!(shadow.size(), n as u64);
        for share in [Share::Shared, Share::Private] {
            let map = shadow.map(share).unwrap();
            assert_eq!(first_diff(&map, &data), None, "size {n} {share:?}");
        }
        let mut buf = vec![0u8; n + 10];
        assert_eq!(shadow.read_at(&mut buf, 0).unwrap(), n);
        assert_eq!(&buf[..n], &data[..], "read_at, size {n}");
        // The handed-out descriptor shows the same bytes.
        let fd = shadow.reopen_readonly().unwrap();
        let mut f = std::fs::File::from(fd);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut back).unwrap();
        assert_eq!(back, data, "read through the handed-out fd, size {n}");
    }
}

#[test]
fn seals_are_set_and_writes_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(10_000, 3);
    let path = file_with(dir.path(), "f", &data);
    let engine = engine(Mode::Eager);
    let shadow = engine.open(&path).unwrap();
    let want = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    assert_eq!(shadow.seals().unwrap() & want, want);

    // The handed-out descriptor is O_RDONLY: write(2) fails with EBADF.
    let ro = shadow.reopen_readonly().unwrap();
    let mut f = std::fs::File::from(ro);
    let e = f.write(b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF));

    // Reopened for writing through /proc/self/fd, the seals still refuse.
    let fd = shadow.fd().unwrap();
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut rw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let e = rw.write(b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "write through {path}");
    let e = rw.set_len(1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "shrink through {path}");
    // SAFETY: a fresh mapping request; it must fail, so nothing is mapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rw.as_raw_fd(),
            0,
        )
    };
    assert_eq!(
        p,
        libc::MAP_FAILED,
        "a writable shared mapping must be refused"
    );
    // The shadow is unchanged.
    let map = shadow.map(Share::Shared).unwrap();
    assert_eq!(first_diff(&map, &data), None);
}

#[test]
fn staleness_sees_size_mtime_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(Mode::Eager);
    let data = pattern(8192, 4);

    let p = file_with(dir.path(), "grow", &data);
    let s = engine.open(&p).unwrap();
    assert_eq!(s.staleness().unwrap(), Staleness::Unchanged);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    match s.staleness().unwrap() {
        Staleness::Changed(f) => assert!(f.contains(&Field::Size), "{f:?}"),
        other => panic!("expected a size change, got {other:?}"),
    }
    // The snapshot still holds the old bytes.
    assert_eq!(first_diff(&s.map(Share::Shared).unwrap(), &data), None);

    let p = file_with(dir.path(), "touch", &data);
    let s = engine.open(&p).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    match s.staleness().unwrap() {
        Staleness::Changed(f) => {
            assert!(f.contains(&Field::Mtime), "{f:?}");
            assert!(!f.contains(&Field::Size), "{f:?}");
        }
        other => panic!("expected an mtime change, got {other:?}"),
    }

    let p = file_with(dir.path(), "gone", &data);
    let s = engine.open(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    assert_eq!(s.staleness().unwrap(), Staleness::Gone);
    assert_eq!(first_diff(&s.map(Share::Private).unwrap(), &data), None);

    let p = file_with(dir.path(), "replaced", &data);
    let s = engine.open(&p).unwrap();
    let q = file_with(dir.path(), "other", &data);
    std::fs::rename(&q, &p).unwrap();
    assert_eq!(s.staleness().unwrap(), Staleness::Gone);
}

#[test]
fn over_the_cap_is_refused_with_both_ways_to_raise_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = file_with(dir.path(), "big", &pattern(3 << 20, 5));
    let engine = Engine::new({
        let mut c = config(Mode::Eager);
        c.max_size = 1 << 20;
        c
    })
    .unwrap();
    let e = engine.open(&p).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    let msg = e.to_string();
    for needle in [
        "3145728 bytes",
        "1048576 bytes",
        "--max-size",
        "SHADOWFD_MAX_SIZE",
        "--mode lazy",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    // At the cap exactly, it works.
    let engine = Engine::new({
        let mut c = config(Mode::Eager);
        c.max_size = 3 << 20;
        c
    })
    .unwrap();
    assert_eq!(engine.open(&p).unwrap().size(), 3 << 20);
}

#[test]
fn bad_sources_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(Mode::Eager);
    let missing = dir.path().join("nope");
    let e = engine.open(&missing).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("No such file"), "{e}");
    let e = engine.open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("not a regular file") && e.contains("directory"),
        "{e}"
    );
    let empty = file_with(dir.path(), "empty", b"");
    let s = engine.open(&empty).unwrap();
    assert_eq!(s.size(), 0);
    assert!(s.map(Share::Shared).unwrap().is_empty());
}

#[test]
fn configuration_is_validated() {
    let page = shadowfd::page_size() as u64;
    let base = config(Mode::Eager);
    let cases: Vec<(Config, &str)> = vec![
        (
            {
                let mut c = base.clone();
                c.workers = 0;
                c
            },
            "worker count",
        ),
        (
            {
                let mut c = base.clone();
                c.chunk_size = page + 1;
                c
            },
            "chunk size",
        ),
        (
            {
                let mut c = base.clone();
                c.chunk_size = 0;
                c
            },
            "chunk size",
        ),
        (
            {
                let mut c = base.clone();
                c.max_size = base.memory_budget + 1;
                c
            },
            "size cap",
        ),
        (
            {
                let mut c = base.clone();
                c.memory_budget = u64::MAX / 2;
                c
            },
            "MemAvailable",
        ),
    ];
    for (c, needle) in cases {
        let e = Engine::new(c).err().expect("must be refused").to_string();
        assert!(e.contains(needle), "{needle:?} missing from: {e}");
    }
}
