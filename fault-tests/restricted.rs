//! Scenario 8: a restricted kernel (a container's seccomp profile).
//!
//! The CLI runs under a seccomp filter that fails `userfaultfd(2)` and the
//! `/dev/userfaultfd` ioctl with EPERM, or with ENOSYS.
//!
//! Promise: `probe --json` says lazy is unusable and why; `--mode auto`
//! falls back to eager with identical bytes; `--mode lazy` fails with a
//! clear message saying what to change, and a non-zero exit, no panic.

use crate::support::*;
use std::path::Path;

const ID: u64 = 0x5EC;

fn restricted(args: &[&str], errno: i32) -> child::Outcome {
    let mut c = cli(args);
    seccomp::deny_userfaultfd(&mut c, errno);
    run(c)
}

fn check_one(errno: i32, strerror: &str, path: &Path) {
    let p = path.to_str().unwrap();
    let case = format!("seccomp errno {strerror}");

    // probe --json
    let o = restricted(&["probe", "--json"], errno);
    assert!(o.status.success(), "{case}: probe\n{}", o.describe());
    let v: serde_json::Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("{case}: probe --json is not JSON ({e})\n{}", o.stdout));
    assert_eq!(v["lazy_usable"], false, "{case}: {v}");
    assert_eq!(v["access"], serde_json::Value::Null, "{case}: {v}");
    assert_eq!(v["auto_mode"], "eager", "{case}: {v}");
    let attempts = v["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{case}: {v}");
    for a in attempts {
        let e = a["error"].as_str().unwrap_or_else(|| panic!("{case}: {a}"));
        // The device node may be absent (ENOENT); otherwise the filter's errno.
        let devnode_absent = a["method"] == "devnode" && e.contains("No such file");
        assert!(e.contains(strerror) || devnode_absent, "{case}: {a}");
    }
    let reason = v["reason"].as_str().expect("reason");
    for want in ["sysctl", "/dev/userfaultfd", "seccomp"] {
        assert!(
            reason.contains(want),
            "{case}: reason lacks {want:?}: {reason}"
        );
    }

    // cat --mode auto: eager fallback, identical bytes.
    // (Raw bytes: `run` would convert stdout to text.)
    let mut c = cli(&["cat", "--mode", "auto", p]);
    seccomp::deny_userfaultfd(&mut c, errno);
    let raw = c.output().expect("run cat");
    assert!(raw.status.success(), "{case}: cat: {raw:?}");
    assert_eq!(
        raw.stdout,
        std::fs::read(path).unwrap(),
        "{case}: cat bytes"
    );

    // map --mode auto reports eager.
    let o = restricted(&["map", "--mode", "auto", "--json", "--verify", p], errno);
    assert!(o.status.success(), "{case}: map auto\n{}", o.describe());
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(v["mode"], "eager", "{case}: {v}");
    assert_eq!(v["verified"], true, "{case}: {v}");

    // map --mode lazy: refused, saying what to change.
    let o = restricted(&["map", "--mode", "lazy", p], errno);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{case}: map lazy\n{}",
        o.describe()
    );
    for want in [
        "lazy mode is not available",
        "sysctl",
        "/dev/userfaultfd",
        "seccomp",
        "--mode eager",
        strerror,
    ] {
        assert!(
            o.stderr.contains(want),
            "{case}: message lacks {want:?}\n{}",
            o.stderr
        );
    }
    assert!(!o.stderr.contains("panicked"), "{case}\n{}", o.stderr);
}

/// In the eager fallback (userfaultfd denied), the over-cap error used to
/// suggest `--mode lazy`, which then failed. It says lazy is not possible
/// here instead, and still suggests raising the cap.
#[test]
fn over_cap_in_the_eager_fallback_does_not_suggest_lazy() {
    if !seccomp::supported() {
        eprintln!("SKIPPED seccomp scenario: no BPF filter written for this architecture");
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 2 << 20);
    let p = path.to_str().unwrap();
    for mode in ["auto", "eager"] {
        let o = restricted(&["cat", "--mode", mode, "--max-size", "1M", p], libc::EPERM);
        assert_eq!(o.status.code(), Some(1), "{mode}\n{}", o.describe());
        for want in ["over the eager size cap", "--max-size", "not possible here"] {
            assert!(
                o.stderr.contains(want),
                "{mode}: lacks {want:?}\n{}",
                o.stderr
            );
        }
        assert!(
            !o.stderr.contains("or use a lazy shadow"),
            "{mode}: suggests lazy\n{}",
            o.stderr
        );
    }
}

#[test]
fn userfaultfd_denied_by_seccomp() {
    if !seccomp::supported() {
        eprintln!("SKIPPED seccomp scenario: no BPF filter written for this architecture");
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, (1 << 20) + 17);
    // Without the filter, this machine's answer (the control).
    let o = run(cli(&["probe", "--json"]));
    let free: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    if free["lazy_usable"] != true {
        eprintln!(
            "note: userfaultfd is unusable here even without a filter; \
             the scenario still checks the restricted behaviour"
        );
    }
    check_one(libc::EPERM, "Operation not permitted", &path);
    check_one(libc::ENOSYS, "Function not implemented", &path);
}

#[test]
fn library_falls_back_under_seccomp() {
    // The same through the library, in a child that installs the filter on
    // itself: Engine::new(Auto) gives an eager engine, Lazy a clear error.
    use crate::support::child::{self, param};
    use crate::test_name;
    use shadowfd::{Config, Engine, Mode};
    if child::role().is_some() {
        child::begin();
        let errno: i32 = param("ERRNO").parse().unwrap();
        // The same filter as for the CLI, on this process, before any engine.
        seccomp::install_here(seccomp::Rules::none(errno)).expect("install seccomp filter");
        let auto = Engine::new({
            let mut c = Config::default();
            c.mode = Mode::Auto;
            c
        })
        .unwrap();
        child::report("auto-mode", auto.mode());
        let s = auto.open(param("PATH")).unwrap();
        child::report("shadow-mode", s.mode());
        let mut buf = vec![0u8; s.size() as usize];
        s.read_at(&mut buf, 0).unwrap();
        child::report(
            "mismatch",
            first_mismatch(ID, 0, &buf).map_or("none".into(), |o| o.to_string()),
        );
        match Engine::new({
            let mut c = Config::default();
            c.mode = Mode::Lazy;
            c
        }) {
            Ok(_) => child::report("lazy", "accepted"),
            Err(e) => child::report("lazy", e.to_string().replace('\n', " ")),
        }
        return;
    }
    if !seccomp::supported() {
        eprintln!("SKIPPED seccomp scenario: no BPF filter written for this architecture");
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 300_000);
    for errno in [libc::EPERM, libc::ENOSYS] {
        let o = child::spawn(
            &test_name!(library_falls_back_under_seccomp),
            "seccomp",
            &[
                ("PATH", path.display().to_string()),
                ("ERRNO", errno.to_string()),
            ],
        );
        assert!(o.status.success(), "{}", o.describe());
        assert_eq!(
            o.last("auto-mode").as_deref(),
            Some("eager"),
            "{}",
            o.describe()
        );
        assert_eq!(o.last("shadow-mode").as_deref(), Some("eager"));
        assert_eq!(o.last("mismatch").as_deref(), Some("none"));
        let lazy = o.last("lazy").unwrap();
        assert!(lazy.contains("lazy mode is not available"), "{lazy}");
        assert!(lazy.contains("--mode eager"), "{lazy}");
    }
}

#[test]
fn devnode_is_used_when_the_syscall_is_denied() {
    use seccomp::{Rules, SyscallRule};
    if !seccomp::supported() {
        eprintln!("SKIPPED devnode scenario: no BPF filter written for this architecture");
        return;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        eprintln!("SKIPPED devnode scenario: /dev/userfaultfd cannot be opened here ({e})");
        return;
    }
    if !lazy_available("devnode scenario") {
        return;
    }
    let rules = Rules {
        errno: libc::EPERM,
        syscall: SyscallRule::Deny,
        devnode: false,
    };
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, (3 << 20) + 5);
    let p = path.to_str().unwrap();
    let with = |args: &[&str]| {
        let mut c = cli(args);
        seccomp::restrict(&mut c, rules);
        run(c)
    };
    let o = with(&["probe", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["access"], "devnode", "{v}");
    assert_eq!(v["lazy_usable"], true, "{v}");
    let first = v["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(first.contains("Operation not permitted"), "{v}");
    let o = with(&["map", "--mode", "lazy", "--json", "--verify", p]);
    assert!(o.status.success(), "{}", o.describe());
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(
        (&v["mode"], &v["verified"]),
        (&"lazy".into(), &true.into()),
        "{v}"
    );
    // Served by the fault service (a fault is counted before it is answered).
    assert!(v["faults"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn user_mode_only_userfaultfd_works_and_kernel_reads_are_refused() {
    use crate::support::child::{self, param};
    use crate::test_name;
    use seccomp::{Rules, SyscallRule};
    use shadowfd::{Engine, Mode, Share};
    let rules = Rules {
        errno: libc::EPERM,
        syscall: SyscallRule::DenyUnlessUserModeOnly,
        devnode: true,
    };
    if child::role().is_some() {
        child::begin();
        seccomp::install_here(rules).expect("install seccomp filter");
        let p = shadowfd::probe();
        child::report("access", format!("{:?}", p.access));
        let engine = Engine::new({
            let mut c = lazy_config();
            c.mode = Mode::Lazy;
            c.readahead = 0;
            c
        })
        .unwrap();
        let s = engine.open(param("PATH")).unwrap();
        let map = s.map(Share::Shared).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into a live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let pg = page() as usize;
        let send = |off: usize| {
            // SAFETY: write(2) reads `pg` bytes of the mapping, which is
            // mapped for its whole length; the kernel may fail the access.
            let n = unsafe { libc::write(fds[1], map.as_ptr().add(off).cast(), pg) };
            if n < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                let mut buf = vec![0u8; n as usize];
                // SAFETY: reads back what was written into a buffer of that size.
                let r = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
                assert_eq!(r, n);
                match first_mismatch(ID, off as u64, &buf) {
                    None => format!("ok {n}"),
                    Some(at) => format!("mismatch {at}"),
                }
            }
        };
        // A kernel-mode access to an unfilled page: refused (documented).
        child::report("kernel-unfilled", send(10 * pg));
        // Touched in user mode first, then the kernel may read it.
        assert_bytes(
            &map[20 * pg..21 * pg],
            ID,
            (20 * pg) as u64,
            "user-mode touch",
        );
        child::report("kernel-touched", send(20 * pg));
        s.populate((30 * pg) as u64, pg as u64).unwrap();
        child::report("kernel-populated", send(30 * pg));
        assert_bytes(&map, ID, 0, "the whole mapping in user mode");
        child::report("user", "ok");
        return;
    }
    if !seccomp::supported() {
        eprintln!("SKIPPED user-mode-only scenario: no BPF filter written for this architecture");
        return;
    }
    if !lazy_available("user-mode-only scenario") {
        return;
    }
    let dir = tempdir();
    let path = write_file(dir.path(), "src", ID, 1 << 20);
    let o = child::spawn(
        &test_name!(user_mode_only_userfaultfd_works_and_kernel_reads_are_refused),
        "umo",
        &[("PATH", path.display().to_string())],
    );
    assert!(o.status.success(), "{}", o.describe());
    assert_eq!(
        o.last("access").as_deref(),
        Some("Some(SyscallUserModeOnly)")
    );
    let unfilled = o.last("kernel-unfilled").unwrap();
    assert!(unfilled.contains("Bad address"), "{unfilled}");
    let pg = page().to_string();
    assert_eq!(o.last("kernel-touched"), Some(format!("ok {pg}")));
    assert_eq!(o.last("kernel-populated"), Some(format!("ok {pg}")));
    assert_eq!(o.last("user").as_deref(), Some("ok"));
}
