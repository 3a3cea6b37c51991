//! Extra scenarios about consumers that are not a registered mapping.
//!
//! Promises:
//! - after `materialize()`, unregistered consumers (a plain `mmap` of the
//!   descriptor, `read(2)` on `reopen_readonly()`) see exactly the source;
//! - a lazy shadow that is incomplete (a page could not be filled) never
//!   hands out its descriptor, so no consumer can see zeros through it;
//! - nobody can write to a shadow through its descriptor (seals);
//! - a forked child does not inherit a lazy mapping (MADV_DONTFORK): it
//!   faults (SIGSEGV) instead of reading unregistered zeros;
//! - private and shared mappings share one fill of each page;
//! - empty sources work in both modes.

use crate::support::child::{self, param};
use crate::support::*;
use crate::test_name;
use shadowfd::{Config, Engine, Error, Share};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

const ID: u64 = 0xC0C0;

fn cfg() -> Config {
    {
        let mut c = lazy_config();
        c.readahead = 0;
        c
    }
}

/// Maps `len` bytes of `fd` read-only, unregistered, and compares with `id`.
fn plain_mmap_matches(fd: BorrowedFd<'_>, len: usize, id: u64, what: &str) {
    // SAFETY: a fresh read-only shared mapping chosen by the kernel; it is
    // read only within `len` and unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{what}: mmap");
    // SAFETY: `p` maps `len` readable bytes until the munmap below.
    let got = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    let r = first_mismatch(id, 0, got);
    // SAFETY: `p`/`len` is exactly the mapping made above; `got` is not used after.
    unsafe { libc::munmap(p, len) };
    assert_eq!(r, None, "{what}: plain mmap differs from the source");
}

/// Tries to write through `fd` in the two ways a consumer could.
fn assert_unwritable(fd: BorrowedFd<'_>, what: &str) {
    let b = [0u8; 1];
    // SAFETY: pwrite reads one byte from a live buffer.
    let r = unsafe { libc::pwrite(fd.as_raw_fd(), b.as_ptr().cast(), 1, 0) };
    assert_eq!(r, -1, "{what}: pwrite succeeded");
    // SAFETY: asks for a new writable shared mapping; unmapped if it was made.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p != libc::MAP_FAILED {
        // SAFETY: the mapping just made.
        unsafe { libc::munmap(p, page() as usize) };
        panic!("{what}: a writable shared mapping was allowed");
    }
}

#[test]
fn materialized_shadow_serves_unregistered_consumers() {
    bounded("materialized_shadow_serves_unregistered_consumers", || {
        let Some(engine) = lazy_engine("materialize", cfg()) else {
            return;
        };
        let dir = tempdir();
        let size = (5 << 20) + 321;
        let path = write_file(dir.path(), "src", ID, size);
        let src = Injected::clean(&path);
        let s = engine.open(src.clone()).unwrap();
        // Before: the descriptor is withheld (it would show zeros).
        assert!(matches!(s.fd(), Err(Error::NotMaterialized { .. })));
        assert!(matches!(
            s.reopen_readonly(),
            Err(Error::NotMaterialized { .. })
        ));
        s.materialize().unwrap();
        assert!(s.is_materialized());
        assert_eq!(s.resident_bytes().unwrap(), size.div_ceil(page()) * page());
        // Unregistered consumers: a plain mmap, and read(2).
        plain_mmap_matches(s.fd().unwrap(), size as usize, ID, "fd()");
        let ro = s.reopen_readonly().unwrap();
        plain_mmap_matches(ro.as_fd(), size as usize, ID, "reopen_readonly()");
        let mut all = Vec::new();
        std::fs::File::from(ro).read_to_end(&mut all).unwrap();
        assert_eq!(all.len() as u64, size);
        assert_bytes(&all, ID, 0, "read(2) of reopen_readonly()");
        // Nobody writes through it.
        assert_unwritable(s.fd().unwrap(), "lazy memfd");
        assert_unwritable(s.reopen_readonly().unwrap().as_fd(), "read-only reopen");
        let seals = s.seals().unwrap();
        for (bit, name) in [
            (libc::F_SEAL_FUTURE_WRITE, "FUTURE_WRITE"),
            (libc::F_SEAL_GROW, "GROW"),
            (libc::F_SEAL_SHRINK, "SHRINK"),
            (libc::F_SEAL_SEAL, "SEAL"),
        ] {
            assert!(seals & bit != 0, "lazy seals {seals:#x} lack {name}");
        }
        assert!(src.reread_pages().is_empty());
        // Eager: the same promises.
        let e = Engine::new(eager_config()).unwrap().open(&path).unwrap();
        plain_mmap_matches(e.fd().unwrap(), size as usize, ID, "eager fd()");
        assert_unwritable(e.fd().unwrap(), "eager memfd");
        assert!(e.seals().unwrap() & libc::F_SEAL_WRITE != 0);
    });
}

#[test]
fn incomplete_shadow_never_hands_out_its_descriptor() {
    bounded("incomplete_shadow_never_hands_out_its_descriptor", || {
        let Some(engine) = lazy_engine("materialize bad page", cfg()) else {
            return;
        };
        let dir = tempdir();
        let path = write_file(dir.path(), "src", ID, 1 << 20);
        let bad = 77 * page();
        let s = engine
            .open(Injected::open(
                &path,
                Plan {
                    eio: bytes_at(&[bad]),
                    ..Plan::default()
                },
            ))
            .unwrap();
        let err = s.materialize().unwrap_err();
        assert!(
            matches!(err, Error::Unfillable { offset, .. } if offset == bad),
            "{err:?}"
        );
        assert!(!s.is_materialized());
        assert!(matches!(s.fd(), Err(Error::NotMaterialized { .. })));
        assert!(matches!(
            s.reopen_readonly(),
            Err(Error::NotMaterialized { .. })
        ));
        let msg = s.fd().unwrap_err().to_string();
        assert!(msg.contains("materialize()"), "{msg}");
    });
}

#[test]
fn private_and_shared_mappings_share_one_fill() {
    bounded("private_and_shared_mappings_share_one_fill", || {
        let Some(engine) = lazy_engine("private/shared", cfg()) else {
            return;
        };
        let dir = tempdir();
        let size = 2 << 20;
        let path = write_file(dir.path(), "src", ID, size);
        let src = Injected::clean(&path);
        let s = engine.open(src.clone()).unwrap();
        let private = s.map(Share::Private).unwrap();
        let shared = s.map(Share::Shared).unwrap();
        let half = size as usize / 2;
        assert_bytes(&private[..half], ID, 0, "private, first half");
        assert_bytes(&shared[half..], ID, half as u64, "shared, second half");
        let calls = src.calls();
        // Each now reads the other's half: no new source reads.
        assert_bytes(&shared[..half], ID, 0, "shared, first half");
        assert_bytes(&private[half..], ID, half as u64, "private, second half");
        assert_eq!(
            src.calls(),
            calls,
            "a page was read again for the other mapping"
        );
        assert!(src.reread_pages().is_empty());
    });
}

#[test]
fn empty_sources_work_in_both_modes() {
    bounded("empty_sources_work_in_both_modes", || {
        let dir = tempdir();
        let path = write_file(dir.path(), "empty", ID, 0);
        let mut engines = vec![Engine::new(eager_config()).unwrap()];
        if let Some(e) = lazy_engine("empty source", cfg()) {
            engines.push(e);
        }
        for engine in engines {
            let s = engine.open(&path).unwrap();
            assert_eq!(s.size(), 0);
            let m = s.map(Share::Shared).unwrap();
            assert!(m.is_empty());
            let mut b = [0u8; 8];
            assert_eq!(s.read_at(&mut b, 0).unwrap(), 0);
            s.populate(0, 0).unwrap();
            assert!(s.populate(0, 1).is_err());
            s.materialize().unwrap();
            assert!(s.is_materialized());
            s.fd().unwrap();
        }
    });
}

fn fork_child() {
    child::begin();
    let engine = Engine::new(cfg()).unwrap();
    let s = engine.open(param("PATH")).unwrap();
    let map = s.map(Share::Private).unwrap();
    assert_bytes(&map[..4096], ID, 0, "parent's view");
    let addr = map.as_ptr() as usize;
    // SAFETY: the forked process only reads one byte with a volatile load
    // and calls _exit; it touches no lock or allocator.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: reads one byte at `addr`: mapped in the parent; in this
        // process either unmapped (SIGSEGV, the promise) or readable.
        let b = unsafe { std::ptr::read_volatile((addr + 100) as *const u8) };
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(if b == 0 { 20 } else { 21 }) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a live int.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        child::report("grandchild-signal", libc::WTERMSIG(status));
    } else {
        child::report("grandchild-exit", libc::WEXITSTATUS(status));
    }
    assert_bytes(&map, ID, 0, "parent's view after the fork");
    child::report("parent", "ok");
}

#[test]
fn a_forked_child_inherits_a_lazy_mapping_or_none_never_zeros() {
    if child::role().is_some() {
        return fork_child();
    }
    if !lazy_available("fork") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 1 << 20);
    let o = child::spawn(
        &test_name!(a_forked_child_inherits_a_lazy_mapping_or_none_never_zeros),
        "fork",
        &[("PATH", path.display().to_string())],
    );
    assert!(o.status.success(), "{}", o.describe());
    // With fork events (root, or CAP_SYS_PTRACE) the child's copy is served
    // and shows the source's bytes (exit 21); without them the mapping is
    // MADV_DONTFORK and absent in the child (SIGSEGV). Never zeros (20).
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert_eq!(
            o.numbers("grandchild-exit"),
            vec![21],
            "the forked child did not read the source's bytes (exit 20: zeros)\n{}",
            o.describe()
        );
    } else {
        assert_eq!(
            o.numbers("grandchild-signal"),
            vec![libc::SIGSEGV as u64],
            "the forked child read the mapping (exit 20: zeros, 21: data)\n{}",
            o.describe()
        );
    }
    assert_eq!(o.last("parent").as_deref(), Some("ok"));
}

#[test]
fn kernel_mode_reads_of_a_lazy_mapping_are_served() {
    // write(2) from a lazy mapping makes the kernel take the fault. With a
    // userfaultfd that handles kernel faults (not UFFD_USER_MODE_ONLY), the
    // syscall waits for the fill and copies the right bytes.
    bounded("kernel_mode_reads_of_a_lazy_mapping_are_served", || {
        let p = shadowfd::probe();
        if p.access == Some(shadowfd::Access::SyscallUserModeOnly) {
            eprintln!(
                "SKIPPED kernel-mode reads: only UFFD_USER_MODE_ONLY is available here, \
                 which refuses them by design"
            );
            return;
        }
        let Some(engine) = lazy_engine("kernel-mode reads", cfg()) else {
            return;
        };
        let dir = tempdir();
        let size = 1 << 20;
        let path = write_file(dir.path(), "src", ID, size);
        let s = engine.open(&path).unwrap();
        let map = s.map(Share::Private).unwrap();
        let out_path = dir.path().join("out");
        let out = std::fs::File::create(&out_path).unwrap();
        // SAFETY: write(2) reads `size` bytes of the mapping, which is mapped
        // (read-only) for its whole length.
        let n = unsafe { libc::write(out.as_raw_fd(), map.as_ptr().cast(), size as usize) };
        assert_eq!(n, size as isize, "{}", std::io::Error::last_os_error());
        drop(out);
        let got = std::fs::read(&out_path).unwrap();
        assert_bytes(&got, ID, 0, "bytes written by the kernel from the mapping");
    });
}
