//! `shadowfd run`: real programs (coreutils, python, C) reading served
//! files under a mount prefix through the LD_PRELOAD shim, byte-exact
//! against the host files (docs/run.md).

mod common;

use common::pattern;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_shadowfd");
const MOUNT: &str = "/shadowfd-run-test";
const BIG: usize = 64 << 20;

use common::OutputWithin;
use common::preload;
use common::python_with_numpy;

/// How long any one program of these tests may run before it is killed
/// and its test fails (a hang must never hang the suite).
const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A served tree: big.bin (64 MiB), small.txt, sub/odd.bin (not page-sized).
struct Tree {
    dir: tempfile::TempDir,
    big: Vec<u8>,
}

fn tree() -> &'static Tree {
    static T: OnceLock<Tree> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let big = pattern(BIG, 7);
        std::fs::write(dir.path().join("big.bin"), &big).unwrap();
        std::fs::write(dir.path().join("small.txt"), b"hello, shadow\n").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/odd.bin"), pattern(10_001, 3)).unwrap();
        std::fs::write(dir.path().join("arr.npy"), npy(&npy_values())).unwrap();
        Tree { dir, big }
    })
}

/// 4 Mi little-endian u32 values (16 MiB of data).
fn npy_values() -> Vec<u32> {
    pattern(16 << 20, 5)
        .chunks(4)
        .zip(0u32..)
        .map(|(c, i)| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ i)
        .collect()
}

/// A version 1.0 `.npy` file of a 1-D `<u4` array (the header padded so
/// the data starts at a multiple of 64 bytes, as numpy writes it).
fn npy(values: &[u32]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '<u4', 'fortran_order': False, 'shape': ({},), }}",
        values.len()
    );
    let mut header = dict.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header);
    for v in values {
        out.extend(v.to_le_bytes());
    }
    out
}

fn host(rel: &str) -> PathBuf {
    tree().dir.path().join(rel)
}

fn shadow(rel: &str) -> String {
    format!("{MOUNT}/{rel}")
}

/// An ext4 image of [`tree`], made with `mkfs.ext4 -d` (issue 15: the
/// programs read files inside an image).
fn tree_image() -> &'static Path {
    static I: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &I.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("tree.ext4");
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(tree().dir.path())
            .arg(&img)
            .arg("160M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs) is needed: scripts/test installs it");
        assert!(st.success(), "mkfs.ext4 -d of the test tree failed: {st}");
        (dir, img)
    })
    .1
}

/// `shadowfd run --image IMAGE-OF-TREE --mount MOUNT -- args...`
fn run(args: &[&str]) -> Output {
    run_with(&["--image", tree_image().to_str().unwrap()], args)
}

/// `shadowfd run --root TREE --mount MOUNT -- args...`
fn run_root(args: &[&str]) -> Output {
    run_with(&["--root", tree().dir.path().to_str().unwrap()], args)
}

fn run_with(serve: &[&str], args: &[&str]) -> Output {
    common::run_under(MOUNT, serve, args, LIMIT)
}

use common::stdout_ok as ok;

#[test]
fn cat_is_byte_exact() {
    // From the image (as every test through `run`), then from the directory.
    for run in [run, run_root] {
        let out = ok(run(&["cat", &shadow("big.bin")]));
        assert!(
            out == tree().big,
            "cat of big.bin differs from the host file"
        );
        let out = ok(run(&["cat", &shadow("small.txt"), &shadow("sub/odd.bin")]));
        let mut want = std::fs::read(host("small.txt")).unwrap();
        want.extend(std::fs::read(host("sub/odd.bin")).unwrap());
        assert_eq!(out, want);
    }
}

#[test]
fn sha256sum_matches_the_host() {
    let sh = |args: &[&str]| -> String {
        let o = Command::new("sha256sum").args(args).output_within(LIMIT);
        String::from_utf8(o.stdout).unwrap()
    };
    let want = sh(&[host("big.bin").to_str().unwrap()]);
    let got = String::from_utf8(ok(run(&["sha256sum", &shadow("big.bin")]))).unwrap();
    assert_eq!(
        got.split_whitespace().next(),
        want.split_whitespace().next()
    );
    assert!(got.contains(&shadow("big.bin")));
}

#[test]
fn head_c_reads_a_prefix() {
    let out = ok(run(&["head", "-c", "1000001", &shadow("big.bin")]));
    assert!(out == tree().big[..1_000_001]);
}

#[test]
fn cp_to_the_host_then_cmp() {
    let dst = tempfile::tempdir().unwrap();
    let to = dst.path().join("copy.bin");
    ok(run(&["cp", &shadow("big.bin"), to.to_str().unwrap()]));
    let o = Command::new("cmp")
        .arg(&to)
        .arg(host("big.bin"))
        .output_within(LIMIT);
    assert!(
        o.status.success(),
        "cmp: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn dd_with_1m_blocks() {
    let out = ok(run(&[
        "dd",
        &format!("if={}", shadow("big.bin")),
        "bs=1M",
        "status=none",
    ]));
    assert!(out == tree().big);
    let out = ok(run(&[
        "dd",
        &format!("if={}", shadow("big.bin")),
        "bs=1M",
        "skip=3",
        "count=2",
        "status=none",
    ]));
    assert!(out == tree().big[3 << 20..5 << 20]);
}

#[test]
fn python_read_mmap_and_numpy_memmap() {
    let py = python_with_numpy();
    let script = format!(
        r#"
import hashlib, mmap, numpy, sys
p = "{big}"
d = open(p, "rb").read()
print("read", len(d), hashlib.sha256(d).hexdigest())
with open(p, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print("mmap", len(m), hashlib.sha256(m[:]).hexdigest())
    m.close()
    m = mmap.mmap(f.fileno(), 3 * 4096, access=mmap.ACCESS_READ, offset=5 * 4096)
    print("mmap-off", m[:] == d[5 * 4096 : 8 * 4096])
    m.close()
a = numpy.memmap(p, dtype=numpy.uint8, mode="r", offset=1234567, shape=(100000,))
print("memmap", bytes(a) == d[1234567 : 1234567 + 100000], int(a[0]) == d[1234567])
del a
n = numpy.load("{npy}", mmap_mode="r")
print("npy", type(n).__name__, n.shape[0], int(n.sum(dtype=numpy.uint64)), int(n[1234567]))
del n
import os
fd = os.open(p, os.O_RDONLY)
b1, b2 = bytearray(100), bytearray(5000)
print("readv", os.readv(fd, [b1, b2]) == 5100 and bytes(b1 + b2) == d[:5100])
print("preadv", os.preadv(fd, [b1, b2], 77777) == 5100 and bytes(b1 + b2) == d[77777:82877])
print("access", os.access(p, os.R_OK), os.access(p, os.W_OK), os.access(p + ".no", os.F_OK))
print("stat", os.stat(p).st_size, os.path.isfile(p))
try:
    os.readlink(p)
except OSError as e:
    print("readlink errno", e.errno)
try:
    os.readlink(p + ".no")
except OSError as e:
    print("readlink-missing errno", e.errno)
os.lseek(fd, 9000, os.SEEK_SET)
pid = os.fork()
if pid == 0:
    # The child reads the descriptor it inherited (at the inherited offset).
    ok = os.read(fd, 4096) == d[9000:13096] and os.pread(fd, 10, 12345678) == d[12345678:12345688]
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("fork-child", os.waitstatus_to_exitcode(status))
print("parent-after-fork", os.read(fd, 10) == d[9000:9010])
"#,
        big = shadow("big.bin"),
        npy = shadow("arr.npy")
    );
    let out = String::from_utf8(ok(run(&[py, "-c", &script]))).unwrap();
    let v = npy_values();
    let sum: u64 = v.iter().map(|&x| x as u64).sum();
    assert!(
        out.contains(&format!("npy memmap {} {sum} {}", v.len(), v[1234567])),
        "{out}"
    );
    let want = {
        let o = Command::new("sha256sum")
            .arg(host("big.bin"))
            .output_within(LIMIT);
        String::from_utf8(o.stdout).unwrap()
    };
    let want = want.split_whitespace().next().unwrap();
    assert!(out.contains(&format!("read {BIG} {want}")), "{out}");
    assert!(out.contains(&format!("mmap {BIG} {want}")), "{out}");
    assert!(out.contains("mmap-off True"), "{out}");
    assert!(out.contains("memmap True True"), "{out}");
    assert!(out.contains("readv True"), "{out}");
    assert!(out.contains("preadv True"), "{out}");
    assert!(out.contains("access True False False"), "{out}");
    assert!(out.contains(&format!("stat {BIG} True")), "{out}");
    assert!(out.contains("fork-child 0"), "{out}");
    assert!(out.contains("readlink errno 22"), "{out}");
    assert!(out.contains("readlink-missing errno 2"), "{out}");
    assert!(out.contains("parent-after-fork True"), "{out}");
}

/// Compiles a C program into a temp dir.
fn compile(src: &str) -> (tempfile::TempDir, PathBuf) {
    compile_with(src, &["-O1", "-Wall", "-Werror"])
}

/// Compiles a C program into a temp dir with these `cc` flags.
fn compile_with(src: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("p.c");
    let exe = dir.path().join("p");
    std::fs::write(&c, src).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (dir, exe)
}

#[test]
fn a_raw_read_syscall_fails_never_zeros() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 2; }
    unsigned char b[4096];
    memset(b, 0xAA, sizeof b);
    /* Through libc (the shim): the file's bytes. */
    if (read(fd, b, 16) != 16 || b[0] == 0) { printf("libc read failed\n"); return 3; }
    memset(b, 0xAA, sizeof b);
    long r = syscall(SYS_read, fd, b, sizeof b);
    int e = errno;
    printf("raw read %ld errno %d untouched %d\n", r, r < 0 ? e : 0, b[0] == 0xAA);
    r = syscall(SYS_pread64, fd, b, sizeof b, 0);
    e = errno;
    printf("raw pread %ld errno %d\n", r, r < 0 ? e : 0);
    long m = syscall(SYS_mmap, 0, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    printf("raw mmap %s\n", m < 0 && m > -4096 ? "failed" : "mapped");
    /* A stream on a dup of it reads through the shim. */
    unsigned char first[16], again[16];
    /* (at offset 16: a dup shares the offset, which the read above moved) */
    if (pread(fd, first, 16, 16) != 16) { printf("pread failed\n"); return 4; }
    FILE *f = fdopen(dup(fd), "r");
    printf("fdopen %d\n", f != NULL && fread(again, 1, 16, f) == 16 && memcmp(first, again, 16) == 0);
    return 0;
}
"#,
    );
    let out = String::from_utf8(ok(run(&[exe.to_str().unwrap(), &shadow("big.bin")]))).unwrap();
    assert!(
        out.contains(&format!("raw read -1 errno {} untouched 1", libc_ebadf())),
        "{out}"
    );
    assert!(
        out.contains(&format!("raw pread -1 errno {}", libc_ebadf())),
        "{out}"
    );
    assert!(out.contains("raw mmap failed"), "{out}");
    assert!(out.contains("fdopen 1"), "{out}");
}

fn libc_ebadf() -> i32 {
    9
}

#[test]
fn writing_under_the_prefix_is_erofs() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int a = open(argv[1], O_WRONLY); int ea = errno;
    int b = open(argv[1], O_RDWR); int eb = errno;
    int c = openat(AT_FDCWD, argv[2], O_CREAT | O_WRONLY, 0644); int ec = errno;
    FILE *f = fopen(argv[1], "w"); int ef = errno;
    printf("%d %d %d %d %d %d %d %d\n", a, ea == EROFS, b, eb == EROFS, c, ec == EROFS,
           f == NULL, ef == EROFS);
    return 0;
}
"#,
    );
    let out = String::from_utf8(ok(run(&[
        exe.to_str().unwrap(),
        &shadow("small.txt"),
        &shadow("new.txt"),
    ])))
    .unwrap();
    assert_eq!(out.trim(), "-1 1 -1 1 -1 1 1 1");
    assert!(!host("new.txt").exists());
    // And through the shell: a redirection onto the prefix.
    let o = run(&["sh", "-c", &format!("echo x > {}", shadow("small.txt"))]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read(host("small.txt")).unwrap(),
        b"hello, shadow\n"
    );
}

#[test]
fn missing_files_and_stat() {
    let o = run(&["cat", &shadow("nope")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("No such file"));
    let out = ok(run(&["stat", "-c", "%s %F", &shadow("sub/odd.bin")]));
    assert_eq!(String::from_utf8(out).unwrap().trim(), "10001 regular file");
}

#[test]
fn exit_status_is_the_commands() {
    assert_eq!(run(&["sh", "-c", "exit 7"]).status.code(), Some(7));
    assert_eq!(
        run(&["sh", "-c", "kill -9 $$"]).status.code(),
        Some(128 + 9)
    );
}

#[test]
fn refuses_static_and_setuid_commands_before_running_them() {
    // A statically linked program: compiled here if static libc is
    // installed, else the system's static ldconfig.
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("ran");
    let c = d.path().join("s.c");
    let exe = d.path().join("s");
    std::fs::write(
        &c,
        format!(
            "#include <stdio.h>\nint main(void){{FILE*f=fopen(\"{}\",\"w\");return f?0:1;}}\n",
            marker.display()
        ),
    )
    .unwrap();
    let built = Command::new("cc")
        .args(["-static", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .is_ok_and(|o| o.status.success());
    let stat = if built {
        exe.clone()
    } else {
        PathBuf::from("/usr/sbin/ldconfig")
    };
    let o = run(&[stat.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("statically linked"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!marker.exists(), "the static command ran");

    let su = d.path().join("su-true");
    std::fs::copy("/bin/true", &su).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&su, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let o = run(&[su.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("set-user-ID"));
}

#[test]
fn setup_errors_never_run_the_command() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let o = run_with(
        &["--root", "/nonexistent-shadowfd-root"],
        &["sh", "-c", &touch],
    );
    assert!(!o.status.success());
    assert!(!marker.exists());
    let o = Command::new(BIN)
        .args([
            "run", "--root", "/tmp", "--mount", "relative", "--", "sh", "-c", &touch,
        ])
        .env("SHADOWFD_PRELOAD", preload())
        .output_within(LIMIT);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--mount"));
    let o = Command::new(BIN)
        .args([
            "run",
            "--socket",
            "/nonexistent/sock",
            "--mount",
            MOUNT,
            "--",
            "sh",
            "-c",
            &touch,
        ])
        .env("SHADOWFD_PRELOAD", preload())
        .output_within(LIMIT);
    assert!(!o.status.success());
    assert!(!marker.exists());
}

#[test]
fn cat_from_an_ext4_image() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data = pattern(3 << 20, 11);
    std::fs::write(src.join("in-image.bin"), &data).unwrap();
    let img = d.path().join("fs.img");
    common::mkfs_d(&src, &img, "16M");
    let out = ok(run_with(
        &["--image", img.to_str().unwrap()],
        &["cat", &shadow("in-image.bin")],
    ));
    assert!(out == data);
}

/// `sqlite3` (which needs a read lock, falls back to read-only on EROFS and
/// maps the database with `PRAGMA mmap_size`) on a database inside an ext4
/// image, with the same answers as on the host file.
#[test]
fn sqlite3_with_mmap_in_an_ext4_image() {
    let have = Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "the sqlite3 command-line tool is needed for this test: apt-get install sqlite3"
    );
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let db = src.join("t.db");
    let make = "create table t(x integer, y text); \
        with recursive c(i) as (select 1 union all select i + 1 from c where i < 200000) \
        insert into t select i, hex(randomblob(24)) from c; \
        create index ty on t(y);";
    let o = Command::new("sqlite3")
        .arg(&db)
        .arg(make)
        .output_within(LIMIT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let query = "select count(*), sum(x), min(y), max(y) from t; \
                 select x from t where y = (select y from t where x = 123456);";
    let host = Command::new("sqlite3")
        .arg(&db)
        .arg(query)
        .output_within(LIMIT);
    assert!(host.status.success());
    let img = d.path().join("fs.img");
    common::mkfs_d(&src, &img, "64M");
    let out = ok(run_with(
        &["--image", img.to_str().unwrap()],
        &[
            "sqlite3",
            &shadow("t.db"),
            &format!("PRAGMA mmap_size=1073741824; {query}"),
        ],
    ));
    let out = String::from_utf8(out).unwrap();
    let want = String::from_utf8(host.stdout).unwrap();
    assert_eq!(out, format!("1073741824\n{want}"));
    assert!(want.contains("123456"), "{want}");
}

#[test]
fn a_running_server_by_socket_and_lazy_maps() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let mut server = serve_tree(&sock, Some(&d.path().join("log")));
    let script = format!(
        r#"
import mmap
f = open("{big}", "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
print("page", m[100 * 4096 : 100 * 4096 + 8].hex())
"#,
        big = shadow("big.bin")
    );
    let o = run_with(
        &["--socket", sock.to_str().unwrap()],
        &["python3", "-c", &script],
    );
    let _ = server.kill();
    let _ = server.wait();
    let out = String::from_utf8(ok(o)).unwrap();
    let want: String = tree().big[100 * 4096..100 * 4096 + 8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(out.contains(&format!("page {want}")), "{out}");
    let log = std::fs::read_to_string(d.path().join("log")).unwrap();
    if log.contains("with a userfaultfd") {
        assert!(log.contains("lazily at"), "the map was not lazy:\n{log}");
    } else {
        eprintln!("NOTE: no userfaultfd here; the map was the sealed eager fallback:\n{log}");
    }
}

/// Runs `args` under `shadowfd run --socket` of a `shadowfd serve` of the
/// tree started for it; the output and the server's event log.
fn run_logged(args: &[&str]) -> (Output, String) {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let mut server = serve_tree(&sock, Some(&d.path().join("log")));
    let o = run_with(&["--socket", sock.to_str().unwrap()], args);
    let _ = server.kill();
    let _ = server.wait();
    (o, std::fs::read_to_string(d.path().join("log")).unwrap())
}

/// The pids of the clients that mapped lazily in a server log, and the
/// number of partial UNMAPs (pages cut out of a lazy mapping).
fn lazy_activity(log: &str) -> (std::collections::BTreeSet<u32>, usize) {
    let pid = |line: &str| -> Option<u32> {
        let at = line.find("(pid ")? + 5;
        line[at..].split(' ').next()?.parse().ok()
    };
    let pids = log
        .lines()
        .filter(|l| l.contains(" lazily at "))
        .filter_map(pid)
        .collect();
    let cuts = log
        .lines()
        .filter(|l| l.contains(": UNMAP handle "))
        .count();
    (pids, cuts)
}

/// Without a userfaultfd (as where a process may not create one) every map
/// is the server's sealed eager fallback: still byte-exact.
#[test]
fn without_a_userfaultfd_maps_are_the_eager_fallback() {
    let script = format!(
        r#"
import mmap
d = open("{big}", "rb").read()
with open("{big}", "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print("whole", m[:] == d)
    m.close()
    m = mmap.mmap(f.fileno(), 2 * 4096, access=mmap.ACCESS_READ, offset=1000 * 4096)
    print("offset", m[:] == d[1000 * 4096 : 1002 * 4096])
    m.close()
print("done")
"#,
        big = shadow("big.bin")
    );
    let o = Command::new(BIN)
        .args(["run", "--root"])
        .arg(tree().dir.path())
        .args(["--mount", MOUNT, "--memory-budget", "1G", "--"])
        .args(["python3", "-c", &script])
        .env("SHADOWFD_PRELOAD", preload())
        .env("SHADOWFD_RUN_NO_USERFAULTFD", "1")
        .env_remove("SHADOWFD_MODE")
        .output_within(LIMIT);
    let out = String::from_utf8(ok(o)).unwrap();
    assert!(out.contains("whole True"), "{out}");
    assert!(out.contains("offset True"), "{out}");
}

/// A descriptor carried across exec is adopted by the new image's shim,
/// at the offset it had: `cat` reads the rest of the file after the
/// shell's own read.
#[test]
fn descriptors_survive_exec() {
    let o = run(&[
        "sh",
        "-c",
        &format!(
            "exec 3<{}; read -r x <&3; echo \"[$x]\"; cat <&3",
            shadow("sub/odd.bin")
        ),
    ]);
    let host = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "exec 3<{}; read -r x <&3; echo \"[$x]\"; cat <&3",
                host("sub/odd.bin").display()
            ),
        ])
        .output()
        .unwrap();
    assert!(ok(o) == host.stdout);
}

/// The server going away under a running command: reads and opens fail
/// with EIO, and an untouched page of a lazy mapping raises SIGBUS (the
/// command's status is 128 + SIGBUS): never zeros.
#[test]
fn server_death_is_an_error_never_zeros() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let (ready, go) = (d.path().join("ready"), d.path().join("go"));
    let mut server = serve_tree(&sock, None);
    let script = format!(
        r#"
import mmap, os, time
f = open("{big}", "rb", buffering=0)
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
assert f.read(4) != b"\0\0\0\0"
open("{ready}", "w").close()
while not os.path.exists("{go}"):
    time.sleep(0.02)
try:
    print("read", f.read(10), flush=True)
except OSError as e:
    print("read errno", e.errno, flush=True)
try:
    print("open", open("{small}", "rb").read(), flush=True)
except OSError as e:
    print("open errno", e.errno, flush=True)
print("page", m[50 << 20], flush=True)
"#,
        big = shadow("big.bin"),
        small = shadow("small.txt"),
        ready = ready.display(),
        go = go.display(),
    );
    let o = python_until_the_server_dies(&mut server, &sock, &script, &ready, &go, 200);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("read errno 5"), "{out}");
    assert!(out.contains("open errno 5"), "{out}");
    assert!(!out.contains("page"), "an unfilled page was read: {out}");
    assert_eq!(
        o.status.code(),
        Some(128 + 7),
        "expected SIGBUS: {}",
        o.status
    );
}

#[test]
fn c_program_maps_ranges_seeks_and_copies() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>
#define PG 4096
int main(int argc, char **argv) {
    const char *p = argv[1], *out = argv[2];
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { perror("open"); return 2; }
    struct stat st;
    int lr = lstat(p, &st);
    printf("lstat %d %lld %d\n", lr, (long long)st.st_size, S_ISREG(st.st_mode));
    long long sd = lseek(fd, 4096, SEEK_DATA), sh = lseek(fd, 0, SEEK_HOLE);
    printf("seek-data %lld hole %lld\n", sd, sh);
    unsigned char *want = malloc(16 * PG);
    if (pread(fd, want, 16 * PG, 4 * PG) != 16 * PG) { printf("pread failed\n"); return 3; }
    unsigned char *m = mmap(NULL, 16 * PG, PROT_READ, MAP_SHARED, fd, 4 * PG);
    if (m == MAP_FAILED) { perror("mmap"); return 4; }
    int same = memcmp(m, want, 16 * PG) == 0;
    /* A hole in the middle, then the rest: the first page stays readable. */
    int u1 = munmap(m + 4 * PG, 4 * PG);
    int still = memcmp(m, want, 4 * PG) == 0 && memcmp(m + 8 * PG, want + 8 * PG, 8 * PG) == 0;
    int u2 = munmap(m, 4 * PG);
    int u3 = munmap(m + 8 * PG, 8 * PG);
    printf("map %d %d unmap %d %d %d\n", same, still, u1, u2, u3);
    void *w = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int ew = errno;
    void *fx = mmap(want, PG, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
    int ef = errno;
    printf("refused %d %d %d %d\n", w == MAP_FAILED, ew == EACCES, fx == MAP_FAILED, ef == EINVAL);
    /* A private writable map of the read-only descriptor, as natively:
     * copy-on-write pages of this process, the file unchanged. */
    unsigned char *pw = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 4 * PG);
    int cow = pw != MAP_FAILED && memcmp(pw, want, PG) == 0;
    if (pw != MAP_FAILED) {
        pw[0] = (unsigned char)(want[0] + 1);
        unsigned char b0 = 0;
        cow = cow && pw[0] != want[0] && pread(fd, &b0, 1, 4 * PG) == 1 && b0 == want[0];
        munmap(pw, PG);
    }
    printf("private-write %d\n", cow);
    int c = creat(p, 0644);
    printf("creat %d %d\n", c, errno == EROFS);
    int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    off_t off = 12345;
    ssize_t total = 0, n;
    while (total < 300000 && (n = sendfile(o, fd, &off, 300000 - total)) > 0) total += n;
    close(o);
    printf("sendfile %zd %lld\n", total, (long long)off);
    return 0;
}
"#,
    );
    let d = tempfile::tempdir().unwrap();
    let out_file = d.path().join("sent.bin");
    let out = String::from_utf8(ok(run(&[
        exe.to_str().unwrap(),
        &shadow("big.bin"),
        out_file.to_str().unwrap(),
    ])))
    .unwrap();
    assert!(out.contains(&format!("lstat 0 {BIG} 1")), "{out}");
    assert!(out.contains(&format!("seek-data 4096 hole {BIG}")), "{out}");
    assert!(out.contains("map 1 1 unmap 0 0 0"), "{out}");
    assert!(out.contains("refused 1 1 1 1"), "{out}");
    assert!(out.contains("private-write 1"), "{out}");
    assert!(out.contains("creat -1 1"), "{out}");
    assert!(out.contains("sendfile 300000 312345"), "{out}");
    assert!(std::fs::read(&out_file).unwrap() == tree().big[12345..312345]);
}

/// A tree for the directory tests, and an ext4 image of it made with
/// `mkfs.ext4 -d`: nested directories, an empty one, a 3 MiB file with no
/// zero byte, and names with spaces and UTF-8.
struct DirTree {
    _dir: tempfile::TempDir,
    src: PathBuf,
    img: PathBuf,
}

fn dir_tree() -> &'static DirTree {
    static T: OnceLock<DirTree> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for d in ["sub/deeper/deepest", "empty", "naïve dir"] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        std::fs::write(src.join("top.txt"), b"top level\n").unwrap();
        std::fs::write(src.join("sub/big.bin"), pattern(3 << 20, 21)).unwrap();
        std::fs::write(src.join("sub/file"), b"in sub\n").unwrap();
        std::fs::write(src.join("sub/deeper/deepest/leaf.txt"), b"leaf\n").unwrap();
        std::fs::write(src.join("naïve dir/with space é.txt"), pattern(5000, 22)).unwrap();
        let img = dir.path().join("tree.ext4");
        common::mkfs_d(&src, &img, "32M");
        DirTree {
            _dir: dir,
            src,
            img,
        }
    })
}

/// The two ways to serve the directory tree: `--image` and `--root`.
fn dir_serves() -> [Vec<String>; 2] {
    let t = dir_tree();
    [
        vec!["--image".into(), t.img.display().to_string()],
        vec!["--root".into(), t.src.display().to_string()],
    ]
}

fn run_dirs(serve: &[String], args: &[&str]) -> Output {
    let serve: Vec<&str> = serve.iter().map(String::as_str).collect();
    run_with(&serve, args)
}

/// Walks a tree with `os.walk`, `os.scandir`, `os.listdir` and `os.stat`
/// (and hashes every file) and prints it all as JSON, with paths relative
/// to the root (`lost+found`, which `mkfs.ext4` adds, left out).
const PY_WALK: &str = r#"
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = []
for r, d, f in os.walk(root):
    d[:] = sorted(x for x in d if x != 'lost+found')
    rel = os.path.relpath(r, root)
    out.append(['walk', rel, d, sorted(f)])
    for e in sorted(os.scandir(r), key=lambda e: e.name):
        if e.name != 'lost+found':
            out.append(['scandir', rel, e.name, e.is_dir(), e.is_file(), e.is_symlink()])
    st = os.stat(r)
    out.append(['statdir', rel, stat.S_ISDIR(st.st_mode), oct(st.st_mode & 0o222)])
    for x in sorted(f):
        p = os.path.join(r, x)
        st = os.stat(p)
        with open(p, 'rb') as fh:
            h = hashlib.sha256(fh.read()).hexdigest()
        out.append(['file', rel, x, stat.S_ISREG(st.st_mode), st.st_size, h])
out.append(['listdir', sorted(x for x in os.listdir(root) if x != 'lost+found')])
out.append(['listdir-empty', os.listdir(os.path.join(root, 'empty'))])
print(json.dumps(out, ensure_ascii=False))
"#;

#[test]
fn python_lists_walks_and_stats_directories_like_the_host() {
    let t = dir_tree();
    let host = ok(Command::new("python3")
        .args(["-c", PY_WALK])
        .arg(&t.src)
        .output_within(LIMIT));
    // On the host the directories are writable; served ones are not.
    let host = String::from_utf8(host)
        .unwrap()
        .replace("\"0o200\"", "\"0o0\"");
    assert!(host.contains("with space é.txt"), "{host}");
    for serve in dir_serves() {
        let got = ok(run_dirs(&serve, &["python3", "-c", PY_WALK, MOUNT]));
        assert_eq!(String::from_utf8(got).unwrap(), host, "{serve:?}");
        // Errors, never an empty listing: a file, a missing path.
        let errs = ok(run_dirs(
            &serve,
            &[
                "python3",
                "-c",
                r#"
import os, sys
for p in [sys.argv[1] + '/top.txt', sys.argv[1] + '/missing']:
    try:
        os.listdir(p)
        print('listed', p)
    except OSError as e:
        print(type(e).__name__)
fd = os.open(sys.argv[1] + '/sub', os.O_RDONLY | os.O_DIRECTORY)
print(sorted(os.listdir(fd)), os.stat('file', dir_fd=fd).st_size)
os.chdir(sys.argv[1] + '/sub/deeper')
pid = os.fork()
if pid == 0:
    # A forked child keeps the directory descriptor and the working
    # directory, on a connection of its own.
    print('child', sorted(os.listdir(fd)), os.getcwd(), os.listdir('.'), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"#,
                MOUNT,
            ],
        ));
        assert_eq!(
            String::from_utf8(errs).unwrap(),
            format!(
                "NotADirectoryError\nFileNotFoundError\n['big.bin', 'deeper', 'file'] 7\n\
                 child ['big.bin', 'deeper', 'file'] {MOUNT}/sub/deeper ['deepest']\n"
            ),
            "{serve:?}"
        );
    }
}

/// Lines of `out` with `from` replaced by `to`, sorted.
fn sorted_lines(out: &[u8], from: &str, to: &str) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(out)
        .lines()
        .map(|l| l.replace(from, to))
        .collect();
    v.sort();
    v
}

#[test]
fn ls_and_find_list_served_directories() {
    let t = dir_tree();
    let src = t.src.to_str().unwrap();
    let host_ls = ok(Command::new("ls")
        .args(["-a1", &format!("{src}/sub")])
        .output_within(LIMIT));
    let host_find = ok(Command::new("find")
        .args([src, "-type", "f"])
        .output_within(LIMIT));
    let host_find = sorted_lines(&host_find, src, MOUNT);
    assert_eq!(host_find.len(), 5);
    for serve in dir_serves() {
        // `ls` exits non-zero on any entry it cannot stat.
        let long = ok(run_dirs(&serve, &["ls", "-la", &format!("{MOUNT}/sub")]));
        let long = String::from_utf8(long).unwrap();
        for l in long.lines().skip(1) {
            let (mode, name) = (
                l.split_whitespace().next().unwrap(),
                l.rsplit(' ').next().unwrap(),
            );
            let want = if name == "big.bin" || name == "file" {
                "-r--r--r--"
            } else {
                "dr-xr-xr-x"
            };
            assert_eq!(mode, want, "{l}");
        }
        assert!(long.contains(&format!(" {} ", 3 << 20)), "{long}");
        let names = ok(run_dirs(&serve, &["ls", "-a1", &format!("{MOUNT}/sub")]));
        assert_eq!(names, host_ls, "{serve:?}");
        let find = ok(run_dirs(&serve, &["find", MOUNT, "-type", "f"]));
        assert_eq!(sorted_lines(&find, "", ""), host_find, "{serve:?}");
    }
}

#[test]
fn tar_of_the_prefix_lists_and_extracts_byte_exact() {
    let t = dir_tree();
    let mut want: Vec<String> = vec!["./".into()];
    for e in walk(&t.src) {
        let rel = e
            .strip_prefix(&t.src)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        want.push(if e.is_dir() {
            format!("./{rel}/")
        } else {
            format!("./{rel}")
        });
    }
    want.sort();
    for serve in dir_serves() {
        let image = serve[0] == "--image";
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("a.tar");
        let o = run_dirs(
            &serve,
            &[
                "sh",
                "-c",
                &format!("tar -C {MOUNT} -cf - . > {}", archive.display()),
            ],
        );
        ok(o);
        let list = ok(Command::new("tar")
            .arg("-tf")
            .arg(&archive)
            .output_within(LIMIT));
        let mut got = sorted_lines(&list, "", "");
        if image {
            got.retain(|l| !l.starts_with("./lost+found"));
        }
        assert_eq!(got, want, "{serve:?}");
        let x = out.path().join("x");
        std::fs::create_dir(&x).unwrap();
        ok(Command::new("tar")
            .arg("-C")
            .arg(&x)
            .arg("-xf")
            .arg(&archive)
            .output_within(LIMIT));
        let diff = Command::new("diff")
            .args(["-r", "-x", "lost+found"])
            .arg(&t.src)
            .arg(&x)
            .output_within(LIMIT);
        assert!(
            diff.status.success(),
            "{serve:?}: {}",
            String::from_utf8_lossy(&diff.stdout)
        );
        // Extracted files are read-only (0444, as served): let the temp
        // directory go.
        ok(Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&x)
            .output_within(LIMIT));
    }
}

/// Every path below `dir`, depth first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn cd_into_the_prefix_then_relative_paths() {
    let t = dir_tree();
    let want = std::fs::read(t.src.join("sub/file")).unwrap();
    let leaf = std::fs::read(t.src.join("sub/deeper/deepest/leaf.txt")).unwrap();
    for serve in dir_serves() {
        // The shell's `cd` is a chdir in the shell; `cat` is a child that
        // gets the working directory in its environment.
        let o = ok(run_dirs(
            &serve,
            &["sh", "-c", &format!("cd {MOUNT}/sub && cat file")],
        ));
        assert_eq!(o, want, "{serve:?}");
        let o = ok(run_dirs(
            &serve,
            &[
                "sh",
                "-c",
                &format!(
                    "cd {MOUNT}/sub/deeper && cat deepest/leaf.txt ../file && pwd && \
                     python3 -c 'import os; print(os.getcwd(), sorted(os.listdir(\"..\")))'"
                ),
            ],
        ));
        let mut w = leaf.clone();
        w.extend_from_slice(&want);
        w.extend_from_slice(
            format!("{MOUNT}/sub/deeper\n{MOUNT}/sub/deeper ['big.bin', 'deeper', 'file']\n")
                .as_bytes(),
        );
        assert_eq!(
            String::from_utf8_lossy(&o),
            String::from_utf8_lossy(&w),
            "{serve:?}"
        );
        // Out of the prefix again: relative paths are the host's.
        let o = run_dirs(
            &serve,
            &[
                "sh",
                "-c",
                &format!("cd {MOUNT}/sub && cd / && ls -d etc && cat file"),
            ],
        );
        assert!(!o.status.success(), "{serve:?}: /file is not on the host");
        assert_eq!(o.stdout, b"etc\n", "{serve:?}");
    }
}

/// A C program on served directories: streams (`readdir`, `readdir_r`,
/// `telldir`/`seekdir`, `rewinddir`, `dirfd`, `fdopendir`, `scandir`) next
/// to a host stream, a directory descriptor as `dirfd` for the `*at`
/// calls, `fchdir`/`getcwd`, refusals with `ENOTDIR`, and a raw
/// `getdents64` on the descriptor failing instead of listing anything.
#[test]
fn c_program_uses_directory_streams_and_descriptors() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}
int main(int argc, char **argv) {
    char sub[4096], file[4096], buf[64];
    snprintf(sub, sizeof sub, "%s/sub", argv[1]);
    snprintf(file, sizeof file, "%s/sub/file", argv[1]);
    DIR *host = opendir("/");
    DIR *d = opendir(sub);
    if (!d || !host) { perror("opendir"); return 2; }
    struct dirent *e;
    int n = 0, etc = 0;
    long mark = -1;
    char at_mark[256] = "";
    while ((e = readdir(d))) {
        if (n == 2) strcpy(at_mark, e->d_name);
        n++;
        if (n == 2) mark = telldir(d);
        struct dirent *h = readdir(host);
        (void)h;
    }
    seekdir(d, mark);
    e = readdir(d);
    printf("entries %d seek %d\n", n, e && strcmp(e->d_name, at_mark) == 0);
    rewinddir(d);
    struct dirent ent, *res;
    const char *first = readdir(d)->d_name;
    printf("rewind %s", first);
    printf(" r %d\n", readdir_r(d, &ent, &res) == 0 && res == &ent);
    rewinddir(host);
    while ((e = readdir(host))) etc |= strcmp(e->d_name, "etc") == 0;
    printf("host etc %d\n", etc);
    int fd = dirfd(d);
    struct stat st;
    fstat(fd, &st);
    printf("dirfd dir %d %o\n", S_ISDIR(st.st_mode), st.st_mode & 0777);
    int f = openat(fd, "file", O_RDONLY);
    ssize_t r = read(f, buf, sizeof buf - 1);
    buf[r > 0 ? r : 0] = 0;
    printf("openat %s", buf);
    printf("fstatat %d\n", fstatat(fd, "deeper", &st, 0) == 0 && S_ISDIR(st.st_mode));
    struct statx sx;
    printf("statx %d\n", statx(fd, "deeper/deepest", 0, STATX_BASIC_STATS, &sx) == 0 && S_ISDIR(sx.stx_mode));
    printf("faccessat %d", faccessat(fd, "file", R_OK, 0));
    int w = faccessat(fd, "file", W_OK, 0);
    printf(" %d %d\n", w, errno == EROFS);
    ssize_t rl = readlinkat(fd, "file", buf, sizeof buf);
    printf("readlinkat %zd %d\n", rl, errno == EINVAL);
    errno = 0;
    long raw = syscall(SYS_getdents64, fd, buf, sizeof buf);
    printf("raw getdents %ld %d\n", raw, errno == EBADF);
    int bad = fdopendir(f) == NULL;
    printf("fdopendir file %d %d\n", bad, errno == ENOTDIR);
    bad = opendir(file) == NULL;
    printf("opendir file %d %d\n", bad, errno == ENOTDIR);
    bad = open(file, O_RDONLY | O_DIRECTORY);
    printf("O_DIRECTORY file %d %d\n", bad, errno == ENOTDIR);
    int dfd = open(sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d2 = fdopendir(dfd);
    n = 0;
    while (readdir(d2)) n++;
    printf("fdopendir %d\n", n);
    if (fchdir(dirfd(d2)) != 0) { perror("fchdir"); return 3; }
    char cwd[4096];
    printf("cwd %s\n", getcwd(cwd, sizeof cwd));
    printf("relative %d\n", access("deeper/deepest", R_OK | X_OK));
    closedir(d2);
    closedir(d);
    closedir(host);
    printf("chdir %d ", chdir("/"));
    printf("cwd %s\n", getcwd(cwd, sizeof cwd));
    struct dirent **list;
    n = scandir(sub, &list, NULL, by_name);
    printf("scandir %d:", n);
    for (int i = 0; i < n; i++) { printf(" %s", list[i]->d_name); free(list[i]); }
    free(list);
    printf("\n");
    char pat[4096];
    snprintf(pat, sizeof pat, "%s/sub/*", argv[1]);
    glob_t g;
    int gr = glob(pat, 0, NULL, &g);
    printf("glob %d %zu %s\n", gr, g.gl_pathc, gr == 0 ? strrchr(g.gl_pathv[0], '/') : "-");
    return 0;
}
"#,
    );
    for serve in dir_serves() {
        let out = ok(run_dirs(&serve, &[exe.to_str().unwrap(), MOUNT]));
        let want = format!(
            "entries 5 seek 1\nrewind . r 1\nhost etc 1\ndirfd dir 1 555\nopenat in sub\n\
             fstatat 1\nstatx 1\nfaccessat 0 -1 1\nreadlinkat -1 1\nraw getdents -1 1\n\
             fdopendir file 1 1\nopendir file 1 1\nO_DIRECTORY file -1 1\nfdopendir 5\n\
             cwd {MOUNT}/sub\nrelative 0\nchdir 0 cwd /\nscandir 5: . .. big.bin deeper file\n\
             glob 0 3 /big.bin\n"
        );
        assert_eq!(String::from_utf8_lossy(&out), want, "{serve:?}");
    }
}

/// `mmap` of served files at an address: `MAP_FIXED` over a reservation at
/// a file offset, a `MAP_FIXED` over part of an existing served mapping
/// (whose other pages stay served), `MAP_FIXED_NOREPLACE` (`EEXIST` when
/// occupied), pages past the end of the file (`SIGBUS`), and forked
/// children, and a child of a child, reading inherited pages nobody touched
/// before the fork.
#[test]
fn c_program_maps_fixed_and_forks() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#define PG 4096L
static int fd;
/* 1 if the n bytes at p are the file's bytes at off. */
static int same(const unsigned char *p, long off, long n) {
    unsigned char *w = malloc(n);
    int ok = pread(fd, w, n, off) == n && memcmp(p, w, n) == 0;
    free(w);
    return ok;
}
/* How a child that runs f ended: its exit status, or -signal. */
static int in_child(int (*f)(void)) {
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) { int r = f(); fflush(stdout); _exit(r); }
    int st;
    waitpid(c, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}
static unsigned char *R, *big, *tail;
static long size;
static int touch_past_eof(void) { printf("past-eof byte %d\n", tail[PG]); return 9; }
static int grandchild(void) { return same(big + 700 * PG, 12 * 1048576L + 700 * PG, PG) ? 0 : 1; }
static int child(void) {
    int ok = same(big + 300 * PG, 12 * 1048576L + 300 * PG, 2 * PG)   /* untouched */
        && same(R + 4 * PG, 100 * PG, 2 * PG)                          /* left piece */
        && same(R + 6 * PG, 300 * PG, 2 * PG)                          /* MAP_FIXED over it */
        && same(R + 8 * PG, 104 * PG, 2 * PG)                          /* right piece */
        && same(R + 10 * PG, 500 * PG, PG)                             /* over it */
        && same(R + 11 * PG, 107 * PG, PG)
        && same(R + 20 * PG, 7 * PG, 4 * PG);                          /* NOREPLACE */
    return ok ? 10 + in_child(grandchild) : 1;
}
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
static double t0;
static int timed(void) { printf("fork-us %.0f\n", (now() - t0) * 1e6); return 0; }
int main(int argc, char **argv) {
    fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 2; }
    size = lseek(fd, 0, SEEK_END);
    R = mmap(NULL, 32 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* MAP_FIXED over the reservation, at a file offset. */
    unsigned char *m1 = mmap(R + 4 * PG, 8 * PG, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 100 * PG);
    /* MAP_FIXED over the middle of it, before its pages were touched. */
    unsigned char *m2 = mmap(R + 6 * PG, 2 * PG, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 300 * PG);
    printf("fixed %d %d\n", m1 == R + 4 * PG, m2 == R + 6 * PG);
    printf("pieces %d %d %d\n", same(R + 4 * PG, 100 * PG, 2 * PG), same(R + 6 * PG, 300 * PG, 2 * PG),
           same(R + 8 * PG, 104 * PG, 4 * PG));
    /* An anonymous MAP_FIXED over one of its pages, then a served one over
       that again (refused by the server if the shim had not cut the page out
       of the first mapping): the pages around stay served. */
    unsigned char *a = mmap(R + 10 * PG, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    a[0] = 1;
    unsigned char *b = mmap(R + 10 * PG, PG, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 500 * PG);
    printf("over %d %d %d %d %d\n", a == R + 10 * PG, b == R + 10 * PG, same(b, 500 * PG, PG),
           same(R + 8 * PG, 104 * PG, 2 * PG), same(R + 11 * PG, 107 * PG, PG));
    /* NOREPLACE: refused over the reservation, then in a hole. */
    void *n1 = mmap(R + 20 * PG, 4 * PG, PROT_READ, MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, 7 * PG);
    int e1 = errno;
    munmap(R + 20 * PG, 4 * PG);
    unsigned char *n2 = mmap(R + 20 * PG, 4 * PG, PROT_READ, MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, 7 * PG);
    printf("noreplace %d %d %d %d\n", n1 == MAP_FAILED, e1 == EEXIST, n2 == R + 20 * PG, same(n2, 7 * PG, 4 * PG));
    /* Past the end of the file: the mapping succeeds, the page raises SIGBUS. */
    tail = mmap(NULL, 2 * PG, PROT_READ, MAP_PRIVATE, fd, size - PG);
    printf("tail %d %d\n", same(tail, size - PG, PG), in_child(touch_past_eof));
    /* Inherited lazy pages nobody touched, in a child and a grandchild. */
    big = mmap(NULL, 4 * 1048576L, PROT_READ, MAP_SHARED, fd, 12 * 1048576L);
    printf("child %d\n", in_child(child));
    printf("parent-after %d\n", same(big + 900 * PG, 12 * 1048576L + 900 * PG, PG));
    printf("unmap %d %d %d\n", munmap(R, 32 * PG), munmap(big, 4 * 1048576L), munmap(tail, 2 * PG));
    /* What a fork costs with N lazy mappings (the child maps them again). */
    unsigned char *many[16];
    for (int n = 0; n < 16; n++) many[n] = mmap(NULL, 64 * PG, PROT_READ, MAP_PRIVATE, fd, n * 64 * PG);
    t0 = now();
    in_child(timed);
    for (int n = 0; n < 16; n++) munmap(many[n], 64 * PG);
    t0 = now();
    in_child(timed);
    return 0;
}
"#,
    );
    let (o, log) = run_logged(&[exe.to_str().unwrap(), &shadow("big.bin")]);
    let out = String::from_utf8(ok(o)).unwrap();
    eprintln!("{out}");
    if common::lazy_available() {
        // Lazy all the way: the parent, a child and a grandchild (the fork
        // remap) mapped lazily, and pages were cut out of a lazy mapping
        // (partial UNMAP), not a fallback to sealed descriptors.
        let (pids, cuts) = lazy_activity(&log);
        assert!(pids.len() >= 3, "lazy maps from {pids:?} only:\n{log}");
        assert!(cuts >= 2, "{cuts} partial UNMAP(s):\n{log}");
    }
    assert!(out.contains("fixed 1 1"), "{out}");
    assert!(out.contains("pieces 1 1 1"), "{out}");
    assert!(out.contains("over 1 1 1 1 1"), "{out}");
    assert!(out.contains("noreplace 1 1 1 1"), "{out}");
    assert!(out.contains(&format!("tail 1 -{}", libc_sigbus())), "{out}");
    assert!(
        !out.contains("past-eof byte"),
        "a page past the end was read: {out}"
    );
    assert!(out.contains("child 10"), "child and grandchild: {out}");
    assert!(out.contains("parent-after 1"), "{out}");
    assert!(out.contains("unmap 0 0 0"), "{out}");
    assert_eq!(out.matches("fork-us").count(), 2, "{out}");
    // The same without a userfaultfd: sealed mappings, inherited as they are.
    let o = Command::new(BIN)
        .args(["run", "--root"])
        .arg(tree().dir.path())
        .args(["--mount", MOUNT, "--memory-budget", "1G", "--"])
        .args([exe.to_str().unwrap(), &shadow("big.bin")])
        .env("SHADOWFD_PRELOAD", preload())
        .env("SHADOWFD_RUN_NO_USERFAULTFD", "1")
        .env_remove("SHADOWFD_MODE")
        .output_within(LIMIT);
    let out = String::from_utf8(ok(o)).unwrap();
    for want in [
        "fixed 1 1",
        "pieces 1 1 1",
        "over 1 1 1 1 1",
        "noreplace 1 1 1 1",
        "child 10",
        "parent-after 1",
        "unmap 0 0 0",
    ] {
        assert!(out.contains(want), "eager: {want}: {out}");
    }
    assert!(
        out.contains(&format!("tail 1 -{}", libc_sigbus())),
        "eager: {out}"
    );
}

fn libc_sigbus() -> i32 {
    7
}

/// A python `multiprocessing` pool with the `fork` start method whose
/// workers sum disjoint slices of a `numpy.memmap` they inherited: slices
/// the parent never touched, and one it did. Sums are checked against the
/// host file.
#[test]
fn python_fork_pool_sums_an_inherited_memmap() {
    let py = python_with_numpy();
    // Ten disjoint slices of 6 MiB (+ an odd tail) from 1 MiB on; the
    // parent touches only the first MiB, which the last slice covers.
    let mut slices: Vec<(usize, usize)> = (0..10)
        .map(|i| {
            (
                (1 << 20) + i * (6 << 20) + 4096 + i * 7,
                (6 << 20) - 8191 + i,
            )
        })
        .map(|(a, n)| (a, a + n))
        .collect();
    slices.push((4096 * 3 + 5, (1 << 20) - 3));
    let want: Vec<u64> = slices
        .iter()
        .map(|&(a, b)| tree().big[a..b].iter().map(|&x| u64::from(x)).sum())
        .collect();
    let list: Vec<String> = slices.iter().map(|(a, b)| format!("({a},{b})")).collect();
    let script = format!(
        r#"
import multiprocessing as mp, numpy, os
SL = [{list}]
m = numpy.memmap("{big}", dtype=numpy.uint8, mode="r")
touched = int(m[: 1 << 20].sum(dtype=numpy.uint64))
ctx = mp.get_context("fork")
# Every worker's first task waits until all three hold one, so the work is
# spread over three processes however the machine schedules them.
gate = ctx.Barrier(3)
first = [True]
def work(i):
    if first[0]:
        first[0] = False
        gate.wait(timeout=60)
    a, b = SL[i]
    return os.getpid(), int(m[a:b].sum(dtype=numpy.uint64))
with ctx.Pool(3) as pool:
    # Bounded: a worker killed by a signal would leave map() waiting.
    got = pool.map_async(work, range(len(SL)), chunksize=1).get(timeout=120)
print("workers", len(set(p for p, _ in got)), "parent", os.getpid() not in set(p for p, _ in got))
print("sums", ",".join(str(s) for _, s in got))
print("touched", touched)
"#,
        list = list.join(","),
        big = shadow("big.bin"),
    );
    let (o, log) = run_logged(&[py, "-c", &script]);
    let out = String::from_utf8(ok(o)).unwrap();
    eprintln!("{out}");
    if common::lazy_available() {
        // The parent and at least two workers (each mapping the memmap
        // again in its fork handler) mapped lazily.
        let (pids, _) = lazy_activity(&log);
        assert!(pids.len() >= 3, "lazy maps from {pids:?} only:\n{log}");
    }
    let sums: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    assert!(
        out.contains(&format!("sums {}", sums.join(","))),
        "want sums {}: {out}",
        sums.join(",")
    );
    let first: u64 = tree().big[..1 << 20].iter().map(|&x| u64::from(x)).sum();
    assert!(out.contains(&format!("touched {first}")), "{out}");
    assert!(out.contains("parent True"), "{out}");
    assert!(out.contains("workers 3 "), "the work was not spread: {out}");
}

/// The server is killed under a command holding a lazy mapping: a child
/// forked before (which mapped it again and read a page) touches an
/// unfilled inherited page afterwards, and a child forked after it touches
/// one: both die of SIGBUS, never read zeros.
#[test]
fn forked_children_of_a_dead_server_get_sigbus() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let (ready, go) = (d.path().join("ready"), d.path().join("go"));
    let mut server = serve_tree(&sock, None);
    let script = format!(
        r#"
import mmap, os, sys, time
f = open("{big}", "rb", buffering=0)
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
first = m[0]
def wait_go():
    t = time.time()
    while not os.path.exists("{go}") and time.time() - t < 60:
        time.sleep(0.02)
early = os.fork()
if early == 0:
    print("early-read", m[4096] == {b4096}, flush=True)
    open("{ready}.early", "w").close()
    wait_go()
    time.sleep(0.3)
    print("early page", m[40 << 20], flush=True)
    os._exit(0)
t = time.time()
while not os.path.exists("{ready}.early") and time.time() - t < 30:
    time.sleep(0.02)
open("{ready}", "w").close()
wait_go()
time.sleep(0.3)
late = os.fork()
if late == 0:
    print("late page", m[50 << 20], flush=True)
    os._exit(0)
for name, pid in (("early", early), ("late", late)):
    _, st = os.waitpid(pid, 0)
    print(name, os.waitstatus_to_exitcode(st), flush=True)
"#,
        big = shadow("big.bin"),
        b4096 = tree().big[4096],
        ready = ready.display(),
        go = go.display(),
    );
    let o = python_until_the_server_dies(&mut server, &sock, &script, &ready, &go, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("page"), "an unfilled page was read: {out}");
    assert!(out.contains("early-read True"), "{out}");
    assert!(out.contains("early -7"), "{out}");
    assert!(out.contains("late -7"), "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("could not map \"big.bin\" again"),
        "the late child says why"
    );
    assert!(o.status.success(), "{}", o.status);
}

/// The file changes on the host after the parent mapped it: a forked child
/// does not map the new file's shadow at the parent's addresses (its
/// inherited pages raise SIGBUS, with a line saying why); the parent keeps
/// its mapping (its later fills follow `--stale`, docs/staleness.md).
#[test]
fn a_forked_child_never_maps_a_changed_file_in_place() {
    let d = tempfile::tempdir().unwrap();
    let old = pattern(1 << 20, 11);
    let host = d.path().join("f.bin");
    std::fs::write(&host, &old).unwrap();
    let script = format!(
        r#"
import mmap, os
f = open("{MOUNT}/f.bin", "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
first = m[0]
with open("{host}", "r+b") as h:
    h.write(b"\x01" * 8192)
os.utime("{host}", (1, 1))
pid = os.fork()
if pid == 0:
    print("child page", m[200 * 4096], flush=True)
    os._exit(0)
_, st = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(st))
print("parent", m[0] == first == {b0})
"#,
        host = host.display(),
        b0 = old[0],
    );
    let o = run_with(
        &["--root", d.path().to_str().unwrap()],
        &["python3", "-c", &script],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = String::from_utf8(ok(o)).unwrap();
    assert!(!out.contains("child page"), "the child read a page: {out}");
    assert!(out.contains("child -7"), "{out}");
    assert!(out.contains("parent True"), "{out}");
    assert!(err.contains("the file changed on the server"), "{err}");
}

/// The checks of `python_numpy_and_mmap_in_an_ext4_image`, run once on the
/// host directory (plain python3) and once under `shadowfd run --image`
/// (the same files inside the image): every line must be the same.
const IMAGE_PY_CHECKS: &str = r#"
import hashlib, mmap, sys
import numpy as np
base = sys.argv[1]
n = np.load(base + "/big.npy", mmap_mode="r")
print("npy", type(n).__name__, n.dtype.str, n.shape, int(n.sum(dtype=np.uint64)), int(n[0]), int(n[-1]))
del n
p = base + "/data.bin"
d = open(p, "rb").read()
print("read", len(d), hashlib.sha256(d).hexdigest())
with open(p, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print("mmap", len(m), hashlib.sha256(m[:]).hexdigest())
    m.close()
    m = mmap.mmap(f.fileno(), 7 * 4096, access=mmap.ACCESS_READ, offset=16 * 4096)
    print("mmap-off", hashlib.sha256(m[:]).hexdigest(), m[:] == d[16 * 4096 : 23 * 4096])
    m.close()
a = np.memmap(p, dtype=np.uint32, mode="r", offset=3 * 4096 + 8, shape=(200000,))
print("memmap", int(a.sum(dtype=np.uint64)), int(a[0]), bytes(a) == d[3 * 4096 + 8 : 3 * 4096 + 8 + 800000])
del a
"#;

/// python3 with numpy against an ext4 image made with `mkfs.ext4 -d`:
/// `numpy.load(mmap_mode='r')` of a 512 MiB `.npy` summed, `open().read()`,
/// `mmap.mmap` (whole and at an offset) and `numpy.memmap` at an offset,
/// all the same as on the host files.
#[test]
fn python_numpy_and_mmap_in_an_ext4_image() {
    let py = python_with_numpy();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data = pattern((5 << 20) + 123, 13);
    std::fs::write(src.join("data.bin"), &data).unwrap();
    // 128 Mi uint32 (512 MiB) written by numpy itself, from a multiplicative
    // hash of the index: no page repeats another and none is all zeros.
    let make = r#"
import sys
import numpy as np
n = 128 << 20
a = np.lib.format.open_memmap(sys.argv[1], mode="w+", dtype="<u4", shape=(n,))
step = 16 << 20
for i in range(0, n, step):
    x = np.arange(i, i + step, dtype=np.uint64)
    a[i : i + step] = (x * 2654435761 + 12345) & 0xFFFFFFFF
a.flush()
del a
"#;
    let npy = src.join("big.npy");
    let o = Command::new(py)
        .args(["-c", make])
        .arg(&npy)
        .output_within(LIMIT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::metadata(&npy).unwrap().len() > 512 << 20);
    let img = d.path().join("fs.img");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("600M")
        .output_within(LIMIT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let on_host = Command::new(py)
        .args(["-c", IMAGE_PY_CHECKS])
        .arg(&src)
        .output_within(LIMIT);
    let want = String::from_utf8(ok(on_host)).unwrap();
    // The host's answers are right in themselves: numpy's sum is the sum
    // of the values written, and the hash is that of the bytes written.
    let n: u64 = 128 << 20;
    let sum: u64 = (0..n)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(12345)) & 0xFFFF_FFFF)
        .sum();
    assert!(
        want.contains(&format!(
            "npy memmap <u4 ({n},) {sum} 12345 {}",
            ((n - 1).wrapping_mul(2654435761).wrapping_add(12345)) & 0xFFFF_FFFF
        )),
        "{want}"
    );
    let sha = {
        let o = Command::new("sha256sum")
            .arg(src.join("data.bin"))
            .output_within(LIMIT);
        String::from_utf8(o.stdout).unwrap()
    };
    let sha = sha.split_whitespace().next().unwrap();
    assert!(
        want.contains(&format!("read {} {sha}", data.len())),
        "{want}"
    );
    assert!(
        want.contains(&format!("mmap {} {sha}", data.len())),
        "{want}"
    );
    assert!(
        want.contains("True\nmemmap") && want.ends_with("True\n"),
        "{want}"
    );
    let got = ok(run_with(
        &["--image", img.to_str().unwrap()],
        &[py, "-c", IMAGE_PY_CHECKS, MOUNT],
    ));
    assert_eq!(String::from_utf8(got).unwrap(), want);
}

/// The read path's read-ahead (a sequential reader of small blocks gets
/// its next blocks from one larger request): small, odd-sized and
/// interleaved reads of more files than a thread keeps read-ahead for,
/// random `pread`s between them, two threads, the end of a file that is
/// not page-sized, and a forked child reading on from its parent's offset,
/// all byte-exact against the host files.
#[test]
fn small_sequential_and_interleaved_reads_are_byte_exact() {
    let script = format!(
        r#"
import hashlib, os, sys, threading
m = "{mount}"
big = open(m + "/big.bin", "rb", buffering=0)
h = hashlib.sha256()
while True:
    b = big.read(3000)
    if not b:
        break
    h.update(b)
print("big3000", h.hexdigest())
# Five files read round-robin in small pieces (a thread keeps four).
names = ["big.bin", "small.txt", "sub/odd.bin", "arr.npy", "big.bin"]
fds = [os.open(m + "/" + n, os.O_RDONLY) for n in names]
got = [bytearray() for _ in names]
for step in range(600):
    for k, fd in enumerate(fds):
        got[k] += os.read(fd, 1000 + 37 * k)
    # Random preads in between do not disturb the sequential reads.
    assert len(os.pread(fds[0], 5000, 33333333 + step * 4096)) == 5000
for k, n in enumerate(names):
    print("rr", n, len(got[k]), hashlib.sha256(bytes(got[k])).hexdigest())
for fd in fds:
    os.close(fd)
# Two threads, each preading its own half sequentially in 4 KiB blocks.
fd = os.open(m + "/big.bin", os.O_RDONLY)
half = {half}
out = [None, None]
def part(i):
    hh = hashlib.sha256()
    for off in range(i * half, (i + 1) * half, 4096):
        hh.update(os.pread(fd, 4096, off))
    out[i] = hh.hexdigest()
ts = [threading.Thread(target=part, args=(i,)) for i in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
print("threads", out[0], out[1])
# A child forked mid-way reads on from the offset it inherited.
os.lseek(fd, 0, os.SEEK_SET)
first = b"".join(os.read(fd, 4096) for _ in range(10))
pid = os.fork()
if pid == 0:
    rest = b"".join(iter(lambda: os.read(fd, 8192), b""))
    print("child", hashlib.sha256(first + rest).hexdigest(), flush=True)
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("child-exit", os.waitstatus_to_exitcode(status))
print("parent-next", hashlib.sha256(os.read(fd, 4096)).hexdigest())
"#,
        mount = MOUNT,
        half = BIG / 2
    );
    let out = String::from_utf8(ok(run(&[python_with_numpy(), "-c", &script]))).unwrap();
    let sha = |b: &[u8]| -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b).unwrap();
        let o = Command::new("sha256sum").arg(&p).output_within(LIMIT);
        String::from_utf8(o.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let big = &tree().big;
    let big_sha = sha(big);
    assert!(out.contains(&format!("big3000 {big_sha}\n")), "{out}");
    for (k, name) in ["big.bin", "small.txt", "sub/odd.bin", "arr.npy", "big.bin"]
        .iter()
        .enumerate()
    {
        let host_bytes = std::fs::read(host(name)).unwrap();
        let n = (600 * (1000 + 37 * k)).min(host_bytes.len());
        let want = format!("rr {name} {n} {}\n", sha(&host_bytes[..n]));
        assert!(out.contains(&want), "want {want:?} in {out}");
    }
    let (a, b) = big.split_at(BIG / 2);
    assert!(
        out.contains(&format!("threads {} {}\n", sha(a), sha(b))),
        "{out}"
    );
    assert!(out.contains(&format!("child {big_sha}\n")), "{out}");
    assert!(out.contains("child-exit 0\n"), "{out}");
    assert!(
        out.contains(&format!("parent-next {}\n", sha(&big[40960..45056]))),
        "{out}"
    );
}

/// Threads map, read and unmap served ranges in a loop while the main
/// thread forks: each child (its `pthread_atfork` handler remaps the lazy
/// mappings while the shim's locks were contended at the fork) reads a page
/// of an inherited mapping nobody touched, byte-exact, and exits; none
/// hangs (a child still running after 10 s is killed and counted).
#[test]
fn forks_while_threads_map_and_unmap() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#define PG 4096L
static int fd;
static volatile int stop;
static long loops[4];
static int same(const unsigned char *p, long off, long n) {
    unsigned char w[PG];
    return n <= PG && pread(fd, w, n, off) == n && memcmp(p, w, n) == 0;
}
static void *churn(void *arg) {
    long t = (long)arg;
    for (long i = 0; !stop; i++) {
        long off = ((i * 4 + t) * 8 % 16000) * PG;
        unsigned char *m = mmap(NULL, 8 * PG, PROT_READ, MAP_PRIVATE, fd, off);
        if (m == MAP_FAILED) { perror("mmap"); exit(3); }
        if (!same(m + 3 * PG, off + 3 * PG, 64)) { fprintf(stderr, "thread %ld: wrong bytes\n", t); exit(4); }
        munmap(m, 8 * PG);
        /* munmap of anything takes the shim's map lock: contend for it. */
        for (int k = 0; k < 50; k++) {
            void *a = mmap(NULL, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            munmap(a, PG);
        }
        loops[t]++;
    }
    return NULL;
}
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 2; }
    unsigned char *big = mmap(NULL, 64 * 1048576L, PROT_READ, MAP_SHARED, fd, 0);
    pthread_t th[4];
    for (long t = 0; t < 4; t++) pthread_create(&th[t], NULL, churn, (void *)t);
    int forks = 0, good = 0, hung = 0, bad = 0;
    double t0 = now();
    while (now() - t0 < 2.0 && forks < 200) {
        long page = (forks * 37L + 11) % 16384;
        fflush(stdout);
        pid_t c = fork();
        if (c == 0) _exit(same(big + page * PG, page * PG, PG) ? 0 : 1);
        forks++;
        double w0 = now();
        int st = 0;
        while (waitpid(c, &st, WNOHANG) == 0) {
            if (now() - w0 > 10.0) { kill(c, SIGKILL); waitpid(c, &st, 0); hung++; st = -1; break; }
            usleep(1000);
        }
        if (st == -1) continue;
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0) good++; else bad++;
    }
    stop = 1;
    for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
    printf("forks %d good %d hung %d bad %d loops %ld\n", forks, good, hung, bad,
           loops[0] + loops[1] + loops[2] + loops[3]);
    return 0;
}
"#,
    );
    let out = String::from_utf8(ok(run(&[exe.to_str().unwrap(), &shadow("big.bin")]))).unwrap();
    eprintln!("{out}");
    let n = |key: &str| -> u64 {
        let w: Vec<&str> = out.split_whitespace().collect();
        let i = w
            .iter()
            .position(|x| *x == key)
            .unwrap_or_else(|| panic!("{key}: {out}"));
        w[i + 1].parse().unwrap()
    };
    assert_eq!((n("hung"), n("bad")), (0, 0), "{out}");
    assert!(n("forks") >= 20, "too few forks to mean anything: {out}");
    assert_eq!(n("good"), n("forks"), "{out}");
    assert!(n("loops") >= 100, "the threads hardly ran: {out}");
}

/// Runs `script` in python3 under `shadowfd run --socket SOCK`; once it has
/// made the file `ready`, kills the server, waits `settle_ms`, makes the
/// file `go` for the script to go on, and returns its output.
fn python_until_the_server_dies(
    server: &mut std::process::Child,
    sock: &Path,
    script: &str,
    ready: &Path,
    go: &Path,
    settle_ms: u64,
) -> Output {
    let child = Command::new(BIN)
        .args([
            "run",
            "--socket",
            sock.to_str().unwrap(),
            "--mount",
            MOUNT,
            "--",
        ])
        .args(["python3", "-c", script])
        .env("SHADOWFD_PRELOAD", preload())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !ready.exists() && t.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ready.exists(), "the command never got ready");
    server.kill().unwrap();
    server.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(settle_ms));
    std::fs::write(go, b"").unwrap();
    let o = child.wait_with_output().unwrap();
    eprintln!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `shadowfd serve --socket SOCK --image IMAGE-OF-TREE`, its log to `log`
/// (or nowhere), once it accepts connections (within 10 s).
fn serve_tree(sock: &Path, log: Option<&Path>) -> std::process::Child {
    let stderr = match log {
        Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
        None => std::process::Stdio::null(),
    };
    let server = Command::new(BIN)
        .args(["serve", "--socket", sock.to_str().unwrap(), "--image"])
        .arg(tree_image())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "the server did not listen within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server
}

/// An ext4 image (4 KiB blocks) of `DIR/` with three files and
/// `sub/file`, whose directory `DIR` has its first entry corrupted
/// (`rec_len` 0): STAT of `DIR` works (its blocks are not read), LIST of
/// it fails (`EIO`).
fn corrupt_dir_image(base: &Path, dir: &str) -> PathBuf {
    let src = base.join("src");
    std::fs::create_dir_all(src.join(dir)).unwrap();
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..3 {
        std::fs::write(src.join(format!("{dir}/f{i}")), b"in d\n").unwrap();
    }
    std::fs::write(src.join("sub/file"), b"in sub\n").unwrap();
    let img = base.join("bad.ext4");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output_within(LIMIT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("debugfs")
        .args(["-R", &format!("blocks /{dir}")])
        .arg(&img)
        .output_within(LIMIT);
    let blocks = String::from_utf8(o.stdout).unwrap();
    let block: u64 = blocks
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("debugfs gave no block for /{dir}: {blocks:?}"));
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    // Bytes 4-5 of the first entry: its record length.
    f.write_all_at(&[0, 0], block * 4096 + 4).unwrap();
    img
}

/// A descriptor number the shim once tracked as a served directory or
/// file, closed where the shim's `close` kept no books, is never taken for
/// the host descriptor the kernel hands out next under that number: after
/// an `opendir` whose LIST failed (the placeholder closed inside the
/// shim), after `fclose` of an `fdopen`ed directory descriptor (glibc's
/// internal close), and after `close_range` (followed by raw `dup2`
/// system calls the shim does not see, onto the same numbers; numbers the
/// test picks, so that no other descriptor of the process lies between).
#[test]
fn closed_placeholders_never_shadow_host_descriptors() {
    let d = tempfile::tempdir().unwrap();
    let img = corrupt_dir_image(d.path(), "d");
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
static char *m;
/* Whether `fd` is the host's /etc: fstat, openat, fchdir + getcwd. */
static void host_etc(const char *what, int fd) {
    struct stat a, b;
    char cwd[4096] = "";
    stat("/etc", &b);
    int same = fstat(fd, &a) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev;
    int f = openat(fd, "passwd", O_RDONLY);
    int rel = f >= 0;
    if (f >= 0) close(f);
    int ch = fchdir(fd) == 0 && getcwd(cwd, sizeof cwd) && strcmp(cwd, "/etc") == 0;
    if (chdir("/") != 0) perror("chdir");
    printf("%s fstat %d openat %d cwd %d (%s)\n", what, same, rel, ch, cwd);
}
int main(int argc, char **argv) {
    m = argv[1];
    char p[4096];
    snprintf(p, sizeof p, "%s/d", m);
    struct stat st;
    /* Connects to the server first, so the next free number is the probe's. */
    printf("stat d %d\n", stat(p, &st) == 0 && S_ISDIR(st.st_mode));
    int probe = open("/dev/null", O_RDONLY);
    close(probe);
    errno = 0;
    DIR *bad = opendir(p);
    printf("opendir %d %d\n", bad == NULL, errno == EIO);
    int fd = open("/etc", O_RDONLY | O_DIRECTORY);
    printf("reuse %d\n", fd == probe);
    host_etc("after-opendir", fd);
    close(fd);

    snprintf(p, sizeof p, "%s/sub", m);
    int dfd = open(p, O_RDONLY | O_DIRECTORY);
    FILE *f = fdopen(dfd, "r");
    printf("fdopen %d\n", f != NULL);
    if (f) fclose(f);
    fd = open("/etc", O_RDONLY | O_DIRECTORY);
    printf("reuse %d\n", fd == dfd);
    host_etc("after-fclose", fd);
    close(fd);

    dfd = open(p, O_RDONLY | O_DIRECTORY);
    snprintf(p, sizeof p, "%s/sub/file", m);
    int ffd = open(p, O_RDONLY);
    /* Two adjacent numbers whatever else this process holds: the served
     * directory at 200, the served file at 201. */
    int lo = 200, hi = 201;
    int moved = dup2(dfd, lo) == lo && dup2(ffd, hi) == hi;
    close(dfd);
    close(ffd);
    printf("close_range %d\n", moved ? close_range(lo, hi, 0) : -2);
    /* Raw system calls: the shim does not see these opens and dups. */
    int a = syscall(SYS_openat, AT_FDCWD, "/etc", O_RDONLY);
    int b = syscall(SYS_openat, AT_FDCWD, "/etc/passwd", O_RDONLY);
    int dir = syscall(SYS_dup2, a, lo), file = syscall(SYS_dup2, b, hi);
    printf("reuse %d\n", dir == lo && file == hi);
    host_etc("after-close_range", dir);
    char buf[5] = "";
    ssize_t r = read(file, buf, 4);
    printf("read %zd %d\n", r, r == 4 && memcmp(buf, "root", 4) == 0);
    return 0;
}
"#,
    );
    let o = ok(run_with(
        &["--image", img.to_str().unwrap()],
        &[exe.to_str().unwrap(), MOUNT],
    ));
    let want = "stat d 1\nopendir 1 1\nreuse 1\nafter-opendir fstat 1 openat 1 cwd 1 (/etc)\n\
                fdopen 1\nreuse 1\nafter-fclose fstat 1 openat 1 cwd 1 (/etc)\n\
                close_range 0\nreuse 1\nafter-close_range fstat 1 openat 1 cwd 1 (/etc)\n\
                read 4 1\n";
    assert_eq!(String::from_utf8_lossy(&o), want);
}

/// Server refusals become errnos by their protocol code, never by the
/// message (which names the path): `opendir` of a directory named
/// `E_NOT_FOUND` whose listing fails with E_IO (its first entry corrupted
/// in an ext4 image) fails with `EIO`, not `ENOENT`; `fdopendir` of a
/// served directory descriptor whose directory became a file on the host
/// (`--root`; LIST answers E_NOT_DIR) fails with `ENOTDIR`, not `EIO`.
#[test]
fn server_refusals_map_to_errno_by_code() {
    let (_d, exe) = compile(
        r#"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", argv[1], argv[2]);
    if (strcmp(argv[3], "opendir") == 0) {
        errno = 0;
        DIR *d = opendir(p);
        printf("opendir %d %s\n", d == NULL, strerror(errno));
        return 0;
    }
    int fd = open(p, O_RDONLY | O_DIRECTORY);
    printf("open %d\n", fd >= 0);
    /* The served directory becomes a file on the host. */
    if (rmdir(argv[3]) != 0) { perror("rmdir"); return 2; }
    int h = open(argv[3], O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (h < 0) { perror("create"); return 2; }
    close(h);
    errno = 0;
    DIR *d = fdopendir(fd);
    printf("fdopendir %d %s\n", d == NULL, strerror(errno));
    return 0;
}
"#,
    );
    let d = tempfile::tempdir().unwrap();
    let img = corrupt_dir_image(d.path(), "E_NOT_FOUND");
    let o = ok(run_with(
        &["--image", img.to_str().unwrap()],
        &[exe.to_str().unwrap(), MOUNT, "E_NOT_FOUND", "opendir"],
    ));
    assert_eq!(
        String::from_utf8_lossy(&o),
        "opendir 1 Input/output error\n"
    );

    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("gone")).unwrap();
    let host_dir = root.join("gone");
    let o = ok(run_with(
        &["--root", root.to_str().unwrap()],
        &[
            exe.to_str().unwrap(),
            MOUNT,
            "gone",
            host_dir.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        String::from_utf8_lossy(&o),
        "open 1\nfdopendir 1 Not a directory\n"
    );
}

/// `chdir` into and out of the prefix never reallocates `environ` (which
/// other threads' `getenv` may be reading): `SHADOWFD_RUN_CWD` is added
/// at load and only its value changes. The virtual working directory
/// still reaches a program exec'd with `execv` (glibc's internal
/// `execve`, through `environ`).
#[test]
fn chdir_never_reallocates_environ() {
    let (_d, exe) = compile(
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    char p[4096];
    char **before = environ;
    const char *v = getenv("SHADOWFD_RUN_CWD");
    printf("at start [%s]\n", v ? v : "(unset)");
    snprintf(p, sizeof p, "%s/sub", argv[1]);
    int a = chdir(p);
    printf("in %d [%s] same %d\n", a, getenv("SHADOWFD_RUN_CWD"), environ == before);
    int b = chdir("deeper");
    printf("deeper %d [%s] same %d\n", b, getenv("SHADOWFD_RUN_CWD"), environ == before);
    int c = chdir("/");
    printf("out %d [%s] same %d\n", c, getenv("SHADOWFD_RUN_CWD"), environ == before);
    if (chdir(p) != 0) return 2;
    fflush(stdout);
    char *args[] = {"cat", "file", NULL};
    execv("/bin/cat", args);
    perror("execv");
    return 3;
}
"#,
    );
    for serve in dir_serves() {
        let out = ok(run_dirs(&serve, &[exe.to_str().unwrap(), MOUNT]));
        let want = format!(
            "at start []\nin 0 [{MOUNT}/sub] same 1\ndeeper 0 [{MOUNT}/sub/deeper] same 1\n\
             out 0 [] same 1\nin sub\n"
        );
        assert_eq!(String::from_utf8_lossy(&out), want, "{serve:?}");
    }
}

// ---- the programs people run (issue 21) -----------------------------------

/// A tree of what people run programs on, and its ext4 image: a packed git
/// repository, text files, an xz file, a directory with a Makefile, a
/// shared library and a Python package (a C extension and a pure module).
struct ProgTree {
    _dir: tempfile::TempDir,
    src: PathBuf,
    img: PathBuf,
    /// A host program linked against `lib/libfoo.so` (no run path).
    usefoo: PathBuf,
    /// The python3 the extension was built for.
    python: String,
}

fn git(dir: &Path, args: &[&str]) -> Vec<u8> {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .envs(git_env())
        .output_within(LIMIT);
    ok(o)
}

/// Environment for git on the host and under `run` alike: no user or
/// system configuration, fixed identities and dates.
fn git_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ("GIT_AUTHOR_NAME", "t"),
        ("GIT_AUTHOR_EMAIL", "t@example.com"),
        ("GIT_COMMITTER_NAME", "t"),
        ("GIT_COMMITTER_EMAIL", "t@example.com"),
        ("GIT_AUTHOR_DATE", "2026-12-07T08:00:00Z"),
        ("GIT_COMMITTER_DATE", "2026-12-07T08:00:00Z"),
        ("GIT_PAGER", "cat"),
    ]
}

fn prog_tree() -> &'static ProgTree {
    static T: OnceLock<ProgTree> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for d in ["repo", "mk", "lib", "py"] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        // Lines in a scrambled order (sort has work to do), no zero byte.
        let lines: String = (0..20_000u64)
            .map(|i| format!("{:08x} line {i}\n", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32))
            .collect();
        std::fs::write(src.join("lines.txt"), &lines).unwrap();
        std::fs::write(src.join("odd.bin"), pattern(70_001, 31)).unwrap();
        let xz = Command::new("xz")
            .args(["-c", "-6"])
            .arg(src.join("lines.txt"))
            .output_within(LIMIT);
        std::fs::write(src.join("lines.txt.xz"), ok(xz)).unwrap();
        // A packed repository: three commits, then gc (packs and packed-refs).
        let repo = src.join("repo");
        git(&repo, &["init", "-q", "-b", "main"]);
        for i in 1..=3 {
            std::fs::write(repo.join(format!("f{i}.txt")), &lines[..i * 4000]).unwrap();
            std::fs::create_dir_all(repo.join("d")).unwrap();
            std::fs::write(repo.join("d/needle.c"), format!("int needle_{i};\n")).unwrap();
            git(&repo, &["add", "-A"]);
            git(&repo, &["commit", "-q", "-m", &format!("commit {i}")]);
        }
        git(&repo, &["gc", "-q"]);
        let packs = std::fs::read_dir(repo.join(".git/objects/pack"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "pack"))
            .count();
        assert_eq!(packs, 1, "git gc made no pack");
        // make: reads its Makefile with stdio, globs with its own dir cache.
        std::fs::write(src.join("mk/input.txt"), b"input line\n").unwrap();
        std::fs::write(src.join("mk/other.txt"), b"other\n").unwrap();
        std::fs::write(
            src.join("mk/Makefile"),
            "all: input.txt\n\t@cat $<\n\t@echo $(sort $(wildcard *.txt))\n\t@echo $(shell wc -l < input.txt)\n",
        )
        .unwrap();
        // A shared library and a host program that needs it.
        let (_c, libfoo) = compile_shared("int foo_answer(int x) { return x * 6; }\n", &[]);
        std::fs::copy(&libfoo, src.join("lib/libfoo.so")).unwrap();
        let main = dir.path().join("usefoo.c");
        std::fs::write(
            &main,
            "#include <stdio.h>\nint foo_answer(int);\nint main(void) { printf(\"answer %d\\n\", foo_answer(7)); return 0; }\n",
        )
        .unwrap();
        let usefoo = dir.path().join("usefoo");
        let o = Command::new("cc")
            .arg("-o")
            .arg(&usefoo)
            .arg(&main)
            .arg("-L")
            .arg(src.join("lib"))
            .arg("-lfoo")
            .output_within(LIMIT);
        ok(o);
        // A Python C extension and a pure module.
        let python = "python3".to_string();
        let cfg = ok(Command::new(&python)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['include']); print(sysconfig.get_config_var('EXT_SUFFIX'))",
            ])
            .output_within(LIMIT));
        let cfg = String::from_utf8(cfg).unwrap();
        let mut cfg = cfg.lines();
        let (inc, suffix) = (cfg.next().unwrap(), cfg.next().unwrap());
        assert!(
            Path::new(inc).join("Python.h").exists(),
            "{inc}/Python.h is missing: install python3-dev (.ci/run does)"
        );
        let (_c, ext) = compile_shared(
            r#"
#include <Python.h>
static PyObject *twice(PyObject *s, PyObject *a) { return PyLong_FromLong(2 * PyLong_AsLong(a)); }
static PyMethodDef M[] = {{"twice", twice, METH_O, ""}, {0}};
static struct PyModuleDef D = {PyModuleDef_HEAD_INIT, "shext", 0, -1, M};
PyMODINIT_FUNC PyInit_shext(void) { return PyModule_Create(&D); }
"#,
            &[&format!("-I{inc}")],
        );
        std::fs::copy(&ext, src.join(format!("py/shext{suffix}"))).unwrap();
        std::fs::write(
            src.join("py/shpure.py"),
            "def hello():\n    return 'pure hello from ' + __file__\n",
        )
        .unwrap();
        let img = dir.path().join("prog.ext4");
        common::mkfs_d(&src, &img, "64M");
        ProgTree {
            _dir: dir,
            src,
            img,
            usefoo,
            python,
        }
    })
}

/// Compiles C source into a shared library (with extra `cc` flags).
fn compile_shared(src: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("l.c");
    let so = dir.path().join("l.so");
    std::fs::write(&c, src).unwrap();
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1"])
        .args(flags)
        .arg("-o")
        .arg(&so)
        .arg(&c)
        .output_within(LIMIT);
    ok(o);
    (dir, so)
}

/// `shadowfd run --image PROG-IMAGE -- args...`
fn run_prog(args: &[&str]) -> Output {
    let img = prog_tree().img.display().to_string();
    run_with(&["--image", &img], args)
}

/// Runs `sh -c SCRIPT` on the host with `{}` standing for the host tree,
/// and under `run` with it standing for the mount; both must succeed and
/// print the same bytes, which are returned.
fn same_as_host(script: &str) -> Vec<u8> {
    let t = prog_tree();
    let host_script = script.replace("{}", t.src.to_str().unwrap());
    let o = Command::new("sh")
        .args(["-c", &host_script])
        .envs(git_env())
        .output_within(LIMIT);
    let want = ok(o);
    let env: Vec<String> = git_env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args: Vec<&str> = vec!["env"];
    args.extend(env.iter().map(String::as_str));
    let shadow_script = script.replace("{}", MOUNT);
    args.extend(["sh", "-c", &shadow_script]);
    let got = ok(run_prog(&args));
    assert!(
        got == want,
        "{script}: under run\n{}\non the host\n{}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    assert!(!want.is_empty(), "{script} printed nothing");
    want
}

/// git reads a packed repository through stdio streams whose `fileno()`
/// it `fstat`s (`.git/config`, packed-refs) and maps its pack and index.
#[test]
fn git_log_cat_file_grep_and_show_on_a_packed_repository() {
    let log = same_as_host("git -C {}/repo log --format='%H %s'");
    assert_eq!(String::from_utf8_lossy(&log).lines().count(), 3);
    let cat =
        same_as_host("git -C {}/repo cat-file -p HEAD && git -C {}/repo cat-file -p HEAD:f2.txt");
    assert!(String::from_utf8_lossy(&cat).contains("commit 3"));
    let grep = same_as_host("git -C {}/repo grep -n needle HEAD");
    assert!(String::from_utf8_lossy(&grep).contains("HEAD:d/needle.c:1:int needle_3;"));
    let show = same_as_host("git -C {}/repo show --stat HEAD~1");
    assert!(String::from_utf8_lossy(&show).contains("f2.txt"));
}

/// Programs that check access with `euidaccess`/`faccessat(AT_EACCESS)`,
/// skip with a seek on a stdio stream, and read standard input that the
/// shell redirected from a served file before exec.
#[test]
fn sort_test_od_wc_python_and_xz_like_the_host() {
    let sorted = same_as_host("sort {}/lines.txt");
    assert_eq!(
        sorted.len(),
        std::fs::read(prog_tree().src.join("lines.txt"))
            .unwrap()
            .len()
    );
    same_as_host(
        "/usr/bin/test -r {}/lines.txt && echo readable; /usr/bin/test -d {}/mk && echo dir; /usr/bin/test -e {}/none || echo missing",
    );
    same_as_host("od -A d -t x1 -j 65537 -N 64 {}/odd.bin");
    let wc = same_as_host("wc -l < {}/lines.txt");
    assert_eq!(String::from_utf8_lossy(&wc).trim(), "20000");
    same_as_host(
        "python3 -c 'import sys, hashlib; sys.stdin.buffer.read(7); print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())' < {}/odd.bin",
    );
    same_as_host("xz -dc {}/lines.txt.xz | sha256sum; xz -dc < {}/lines.txt.xz | tail -n 2");
    // A descriptor other than 0, opened by the shell and read after exec,
    // with its offset: `cat` gets the rest of the file after `head -c`'s
    // read in the shell itself (read(1) at a time, so nothing is skipped).
    same_as_host("exec 3< {}/odd.bin; read -r -n 5 x <&3; cat <&3 | sha256sum");
    // ... and their links name the served path.
    let link = ok(run_prog(&[
        "sh",
        "-c",
        &format!(
            "exec 3< {MOUNT}/odd.bin; readlink /proc/self/fd/3; readlink -f /dev/stdin < {MOUNT}/mk/input.txt"
        ),
    ]));
    assert_eq!(
        String::from_utf8_lossy(&link),
        format!("{MOUNT}/odd.bin\n{MOUNT}/mk/input.txt\n")
    );
    // bash defines getenv/setenv of its own: its shim still adopts the
    // descriptor at load and hands it to what it runs.
    same_as_host("bash -c 'true; head -c 20; echo' < {}/lines.txt");
    // `/dev/stdin`, `/dev/fd/N` and `/proc/self/fd/N` of a served
    // descriptor reopen the served file.
    same_as_host(
        "cat /dev/stdin < {}/lines.txt | sha256sum; exec 3< {}/odd.bin; \
         sha256sum /dev/fd/3 /proc/self/fd/3 | cut -c1-64; wc -l /dev/stdin < {}/lines.txt",
    );
}

/// make reads its Makefile (stdio), globs, and runs a shell that reads a
/// redirected served file.
#[test]
fn make_in_a_served_directory() {
    let out = same_as_host("make -s -C {}/mk --no-print-directory");
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("input line") && out.contains("input.txt other.txt"),
        "{out}"
    );
}

/// `diff -r` of a served tree against the host tree it was made from.
#[test]
fn diff_r_against_the_host_tree() {
    let t = prog_tree();
    let o = run_prog(&[
        "diff",
        "-r",
        "-x",
        "lost+found",
        MOUNT,
        t.src.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "diff -r found differences:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(o.stdout.is_empty());
}

/// Three more programs: awk, perl and md5sum (through a `cmd 3<` redirect
/// and `/dev/stdin`-free paths).
#[test]
fn awk_perl_and_md5sum_like_the_host() {
    same_as_host(
        "awk '{ n[substr($1, 1, 1)]++ } END { for (k in n) print k, n[k] }' {}/lines.txt | sort",
    );
    same_as_host("perl -ne 'print if /line 1999[0-9]$/' {}/lines.txt");
    same_as_host(
        "perl -e 'open(my $f, \"<\", shift) or die $!; binmode $f; seek($f, 4096, 0); read($f, my $b, 100); print unpack(\"H*\", $b), \"\\n\"' {}/odd.bin",
    );
    same_as_host("md5sum {}/odd.bin {}/lines.txt | sed 's|  .*/|  |'");
}

/// Shared libraries from the served tree, loaded by the dynamic linker
/// (LD_AUDIT): `ctypes.CDLL`, a Python C extension and a pure module on
/// `PYTHONPATH`, and a host program whose `DT_NEEDED` is found through
/// `LD_LIBRARY_PATH` (after a host directory that lacks it).
#[test]
fn shared_libraries_and_python_modules_from_the_image() {
    let t = prog_tree();
    let py = &t.python;
    let ctypes = format!(
        "{py} -c 'import ctypes; print(ctypes.CDLL(\"{{}}/lib/libfoo.so\").foo_answer(7))'"
    );
    assert_eq!(same_as_host(&ctypes), b"42\n");
    let ext = format!(
        "PYTHONPATH={{}}/py {py} -c 'import shext, shpure; print(shext.twice(21), shext.__file__.rsplit(\"/\", 1)[1]); print(shpure.hello().rsplit(\"/\", 1)[1])'"
    );
    let out = same_as_host(&ext);
    assert!(
        String::from_utf8_lossy(&out).starts_with("42 shext"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let usefoo = t.usefoo.display().to_string();
    let ldpath = format!("LD_LIBRARY_PATH=/nonexistent:/usr/lib:{{}}/lib {usefoo}");
    assert_eq!(same_as_host(&ldpath), b"answer 42\n");
    // Without the served directory the program cannot start: proof that
    // the library came from the image.
    let o = run_prog(&[&usefoo]);
    assert!(!o.status.success());
}

/// A library the server will not hand out whole (over the eager cap):
/// the load fails with a line that names `shadowfd run` and the reason.
#[test]
fn a_library_that_cannot_load_says_why() {
    let t = prog_tree();
    let img = t.img.display().to_string();
    let o = run_with(
        &["--image", &img, "--max-size", "4096"],
        &[
            &t.python,
            "-c",
            &format!("import ctypes; ctypes.CDLL('{MOUNT}/lib/libfoo.so')"),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("shadowfd run: the dynamic linker cannot load") && err.contains("eager cap"),
        "{err}"
    );
}

/// Unprivileged (uid nobody), a process gets only a user-mode-only
/// userfaultfd: the kernel's own touches of an unfilled page are not
/// served. `write(2)` of a served mapping to a pipe still works (the shim
/// makes the pages present first); the raw system call gets EFAULT, never
/// zeros.
#[test]
fn unprivileged_write_of_a_served_mapping_to_a_pipe() {
    let t = prog_tree();
    let (d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) { perror("open"); return 1; }
    char *p = mmap(0, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    long r = syscall(SYS_write, 2, p + st.st_size - 100, 10);
    fprintf(stderr, "\nraw write %ld errno %d\n", r, r < 0 ? errno : 0);
    size_t done = 0;
    while (done < (size_t)st.st_size) {
        ssize_t w = write(1, p + done, st.st_size - done);
        if (w < 0) { perror("write"); return 1; }
        done += w;
    }
    return 0;
}
"#,
    );
    // nobody must reach the program, the image and the shim.
    let pub_dir = tempfile::tempdir().unwrap();
    let img = pub_dir.path().join("prog.ext4");
    std::fs::copy(&t.img, &img).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (p, m) in [
        (pub_dir.path(), 0o755),
        (img.as_path(), 0o644),
        (d.path(), 0o755),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "run",
            "--image",
        ])
        .arg(&img)
        .args(["--mount", MOUNT, "--"])
        .arg(&exe)
        .arg(format!("{MOUNT}/lines.txt"))
        .env("SHADOWFD_PRELOAD", preload())
        .env_remove("SHADOWFD_MODE")
        .current_dir("/")
        .output_within(LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}\n{err}", o.status);
    assert!(
        o.stdout == std::fs::read(t.src.join("lines.txt")).unwrap(),
        "{err}"
    );
    let efault = err.contains(&format!("raw write -1 errno {}", libc_efault()));
    if !efault {
        // The kernel gave nobody a full userfaultfd (or none: the eager
        // fallback): the user-mode-only case is not reachable here.
        assert!(
            std::env::var_os("SHADOWFD_REQUIRE_LAZY").is_none(),
            "expected the raw write to fail with EFAULT (user-mode-only userfaultfd): {err}"
        );
        eprintln!(
            "SKIPPED the EFAULT check: nobody's userfaultfd serves kernel faults here: {err}"
        );
    }
}

fn libc_efault() -> i32 {
    14
}

/// The glibc functions that reach the file system with internal calls,
/// each on a served path from a C program (docs/run.md, "glibc functions
/// that take a path"): stdio streams with a descriptor, `freopen` of
/// `stdin`, the access checks by effective ids, `realpath` (plain and
/// fortified) and `canonicalize_file_name`, `get_current_dir_name`,
/// `statvfs`/`statfs`, `truncate`, `name_to_handle_at`, and descriptors
/// handed over by `execl`, `execlp`, `execle` (with its own environment),
/// `system`, `popen` and `posix_spawnp`.
#[test]
fn c_program_uses_glibc_path_functions() {
    let (_d, exe) = compile_with(
        r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    const char *m = argv[1];
    char p[4096];
    if (argc > 2) {
        /* A child: read 5 bytes of the inherited descriptor 3 (after the
           parent's 2) and descriptor 0. */
        char b[8] = {0};
        ssize_t n = read(3, b, 5);
        char c[8] = {0};
        fgets(c, 5, stdin);
        printf("%s child fd3 %zd [%s] stdin [%s]\n", argv[2], n, b, c);
        const char *e = getenv("SHADOWFD_TEST_ENV");
        if (e) printf("%s child env [%s]\n", argv[2], e);
        return 0;
    }
    snprintf(p, sizeof p, "%s/lines.txt", m);
    FILE *f = fopen(p, "r");
    struct stat st;
    int fd = fileno(f);
    int fr = fstat(fd, &st);
    printf("fileno %s fstat %d size %lld\n", fd >= 0 ? "ok" : "bad", fr, (long long)st.st_size);
    char *map = mmap(0, 4096, PROT_READ, MAP_PRIVATE, fileno(f), 0);
    printf("mmap-fileno %.8s\n", map == MAP_FAILED ? "FAILED" : map);
    fclose(f);
    int a1 = euidaccess(p, R_OK), a2 = eaccess(p, R_OK), a3 = faccessat(AT_FDCWD, p, R_OK, AT_EACCESS);
    int a4 = euidaccess(p, W_OK), e4 = errno;
    printf("euidaccess %d eaccess %d faccessat %d w %d/%d\n", a1, a2, a3, a4, e4);
    char rp[PATH_MAX];
    snprintf(p, sizeof p, "%s/mk/../lines.txt", m);
    char *r = realpath(p, rp);
    printf("realpath %s\n", r ? r : strerror(errno));
    char *c = canonicalize_file_name(p);
    printf("canonicalize %s\n", c ? c : strerror(errno));
    free(c);
    snprintf(p, sizeof p, "%s/none", m);
    printf("realpath-missing %s\n", realpath(p, rp) ? "found" : strerror(errno));
    snprintf(p, sizeof p, "%s/mk", m);
    if (chdir(p)) perror("chdir");
    char *cwd = get_current_dir_name();
    printf("cwd %s\n", cwd);
    free(cwd);
    struct statvfs sv;
    struct statfs sf;
    int v1 = statvfs(p, &sv), v2 = statfs(p, &sf);
    printf("statvfs %d rdonly %d statfs %d\n", v1, (sv.f_flag & ST_RDONLY) != 0, v2);
    int t1 = truncate("input.txt", 0);
    printf("truncate %d %s\n", t1, strerror(errno));
    struct { unsigned int bytes; int type; unsigned char h[128]; } fh = {128, 0, {0}};
    int mnt;
    int h1 = name_to_handle_at(AT_FDCWD, "input.txt", (void *)&fh, &mnt, 0);
    printf("name_to_handle_at %d %s\n", h1, strerror(errno));
    int sfd = open("input.txt", O_RDONLY);
    struct statvfs fsv;
    struct statfs fsf;
    int f1 = fstatvfs(sfd, &fsv), f2 = fstatfs(sfd, &fsf);
    printf("fstatvfs %d rdonly %d fstatfs %d type %lx\n", f1, (fsv.f_flag & ST_RDONLY) != 0, f2, (long)fsf.f_type);
    close(sfd);
    struct dirent **names;
    int nn = scandirat(AT_FDCWD, ".", &names, 0, alphasort);
    printf("scandirat %d", nn);
    for (int i = 0; i < nn; i++) { printf(" %s", names[i]->d_name); free(names[i]); }
    printf("\n");
    free(names);
    /* freopen of stdin: the stream reads the served file. */
    if (!freopen("other.txt", "r", stdin)) perror("freopen");
    char line[64] = {0};
    fgets(line, sizeof line, stdin);
    printf("freopen-stdin %s", line);
    /* Descriptors handed over: 3 (offset 2) and 0 (stdin, the other.txt). */
    snprintf(p, sizeof p, "%s/lines.txt", m);
    int three = open(p, O_RDONLY);
    if (three != 3 && dup2(three, 3) != 3) perror("dup2");
    char skip[20];
    read(3, skip, 20);
    lseek(0, 0, SEEK_SET);
    fflush(stdout);
    if (fork() == 0) { execl(argv[0], argv[0], m, "execl", (char *)0); _exit(99); }
    wait(0);
    lseek(0, 0, SEEK_SET);
    if (fork() == 0) { execlp(argv[0], argv[0], m, "execlp", (char *)0); _exit(99); }
    wait(0);
    lseek(0, 0, SEEK_SET);
    /* execle: an environment of its own (this one's, and one more). */
    size_t ne = 0;
    while (environ[ne]) ne++;
    char **envs = calloc(ne + 2, sizeof *envs);
    for (size_t i = 0; i < ne; i++) envs[i] = environ[i];
    envs[ne] = "SHADOWFD_TEST_ENV=from-execle";
    fflush(stdout);
    if (fork() == 0) { execle(argv[0], argv[0], m, "execle", (char *)0, envs); _exit(99); }
    wait(0);
    free(envs);
    lseek(0, 0, SEEK_SET);
    char cmd[5000];
    snprintf(cmd, sizeof cmd, "%s %s system", argv[0], m);
    fflush(stdout);
    system(cmd);
    lseek(0, 0, SEEK_SET);
    snprintf(cmd, sizeof cmd, "%s %s popen", argv[0], m);
    FILE *pp = popen(cmd, "r");
    char out[256] = {0};
    fgets(out, sizeof out, pp);
    pclose(pp);
    printf("%s", out);
    lseek(0, 0, SEEK_SET);
    pid_t pid;
    char *args[] = {argv[0], (char *)m, "posix_spawnp", 0};
    fflush(stdout);
    if (posix_spawnp(&pid, argv[0], 0, 0, args, environ) == 0) waitpid(pid, 0, 0);
    return 0;
}
"#,
        // So that `realpath` into a sized buffer becomes `__realpath_chk`.
        &["-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Wno-unused-result"],
    );
    let t = prog_tree();
    let o = run_prog(&[exe.to_str().unwrap(), MOUNT]);
    let out = String::from_utf8(ok(o)).unwrap();
    let lines = std::fs::read(t.src.join("lines.txt")).unwrap();
    let size = lines.len();
    let want = [
        format!("fileno ok fstat 0 size {size}"),
        format!("mmap-fileno {}", String::from_utf8_lossy(&lines[..8])),
        "euidaccess 0 eaccess 0 faccessat 0 w -1/30".to_string(),
        format!("realpath {MOUNT}/lines.txt"),
        format!("canonicalize {MOUNT}/lines.txt"),
        "realpath-missing No such file or directory".to_string(),
        format!("cwd {MOUNT}/mk"),
        "statvfs 0 rdonly 1 statfs 0".to_string(),
        "truncate -1 Read-only file system".to_string(),
        "name_to_handle_at -1 Operation not supported".to_string(),
        "fstatvfs 0 rdonly 1 fstatfs 0 type 53484446".to_string(),
        "scandirat 5 . .. Makefile input.txt other.txt".to_string(),
        "freopen-stdin other".to_string(),
    ];
    for w in &want {
        assert!(out.contains(w.as_str()), "missing {w:?} in\n{out}");
    }
    let five = String::from_utf8_lossy(&lines[20..25]).into_owned();
    for how in [
        "execl",
        "execlp",
        "execle",
        "system",
        "popen",
        "posix_spawnp",
    ] {
        let w = format!("{how} child fd3 5 [{five}] stdin [othe]");
        assert!(out.contains(&w), "missing {w:?} in\n{out}");
    }
    assert!(out.contains("execle child env [from-execle]"), "{out}");
    assert!(!out.contains("execl child env"), "{out}");
}

/// docs/run.md's lists of intercepted and not-intercepted functions match
/// the shim: the `intercepted` block names exactly the library's exported
/// functions, and nothing in the `not-intercepted` block is exported.
#[test]
fn docs_lists_match_the_shims_exported_symbols() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/run.md")).unwrap();
    let block = |tag: &str| -> std::collections::BTreeSet<String> {
        let start = doc
            .find(&format!("```{tag}\n"))
            .unwrap_or_else(|| panic!("docs/run.md has no ```{tag} block"));
        let body = &doc[start + tag.len() + 4..];
        let end = body.find("```").unwrap();
        body[..end].split_whitespace().map(str::to_string).collect()
    };
    let listed = block("intercepted");
    let not = block("not-intercepted");
    let o = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(preload())
        .output_within(LIMIT);
    let nm = String::from_utf8(ok(o)).unwrap();
    let exported: std::collections::BTreeSet<String> = nm
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().rev();
            let name = w.next()?;
            let kind = w.next()?;
            (kind == "T" || kind == "W").then(|| name.split('@').next().unwrap().to_string())
        })
        .collect();
    let missing: Vec<_> = exported.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&exported).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/run.md's intercepted list is out of date: exported but not listed {missing:?}; \
         listed but not exported {stale:?}"
    );
    let both: Vec<_> = not.intersection(&exported).collect();
    assert!(
        both.is_empty(),
        "listed as not intercepted but exported: {both:?}"
    );
    assert!(exported.len() > 100, "{nm}");
}

/// Many small files in one directory of an image (looked up through the
/// image's directory index): every file reads as on the host, a name the
/// directory lacks is missing, and `ls` lists them all.
#[test]
fn many_small_files_in_one_directory() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..3000u64 {
        let body = pattern(100 + (i as usize * 7) % 900, i + 1);
        std::fs::write(src.join(format!("d/f{i:05}.bin")), body).unwrap();
    }
    let img = d.path().join("small.ext4");
    common::mkfs_d(&src, &img, "64M");
    let script = "cd {}/d && ls | wc -l && ls | sort | xargs cat | sha256sum && \
                  cat f02999.bin f00000.bin | sha256sum && { cat nothere.bin 2>/dev/null || echo missing; }";
    let host = ok(Command::new("sh")
        .args(["-c", &script.replace("{}", src.to_str().unwrap())])
        .output_within(LIMIT));
    let img_s = img.display().to_string();
    let got = ok(run_with(
        &["--image", &img_s],
        &["sh", "-c", &script.replace("{}", MOUNT)],
    ));
    assert!(
        got == host,
        "{}\n{}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&host)
    );
    assert!(String::from_utf8_lossy(&host).contains("3000\n"));
}

/// python's `subprocess` (a `vfork` child that `dup2`s and closes before
/// it execs): the child reads the served file it got as standard input,
/// and the parent's own tables do not change under it (its standard input
/// stays the host pipe, its served file keeps its offset).
#[test]
fn python_subprocess_with_a_served_stdin() {
    same_as_host(
        r#"echo HOSTSTDIN | python3 -c '
import os, subprocess, sys
f = open(sys.argv[1] + "/lines.txt", "rb")
print(f.read(9))
with open(sys.argv[1] + "/odd.bin", "rb") as g:
    r = subprocess.run(["od", "-A", "d", "-t", "x1", "-N", "16"], stdin=g, capture_output=True)
    print(r.stdout.decode(), r.returncode)
subprocess.run(["true"])
print(f.read(9))
print("parent stdin", os.read(0, 20))
' {}"#,
    );
}

/// glibc's `nftw` and `ftw` on a served tree (the shim walks it: glibc's
/// own opens and reads directories with internal calls), compared with the
/// same walks of the host tree: every path with its kind, level and size,
/// pre-order and with `FTW_DEPTH`.
#[test]
fn nftw_and_ftw_walk_a_served_tree_like_the_host() {
    let (_d, exe) = compile(
        r#"
#define _GNU_SOURCE
#include <ftw.h>
#include <stdio.h>
#include <string.h>
static size_t root;
static int show(const char *p, const struct stat *st, int ty, struct FTW *w) {
    if (strstr(p, "lost+found")) return 0;
    /* The root's own name is the mount's or the host directory's. */
    printf("nftw %s %d %d %s %lld\n", p + root, ty, w->level, w->level ? p + w->base : ".",
           ty == FTW_F ? (long long)st->st_size : -1LL);
    return 0;
}
static int old(const char *p, const struct stat *st, int ty) {
    if (strstr(p, "lost+found")) return 0;
    printf("ftw %s %d\n", p + root, ty);
    return 0;
}
static int stop(const char *p, const struct stat *st, int ty, struct FTW *w) {
    return strstr(p, "Makefile") ? 7 : 0;
}
int main(int argc, char **argv) {
    root = strlen(argv[1]);
    if (nftw(argv[1], show, 8, FTW_PHYS)) return 1;
    if (nftw(argv[1], show, 8, FTW_PHYS | FTW_DEPTH)) return 1;
    if (ftw(argv[1], old, 8)) return 1;
    printf("stop %d\n", nftw(argv[1], stop, 8, 0));
    return 0;
}
"#,
    );
    let exe = exe.display().to_string();
    let out = same_as_host(&format!("{exe} {{}} | sort"));
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("nftw /mk/input.txt 0 2 input.txt 11"), "{out}");
    assert!(out.contains("nftw /mk 5 1 mk -1"), "{out}");
    assert!(out.contains("stop 7"), "{out}");
}

/// glibc's `fts_*` (which opens and reads directories with internal calls)
/// over a served tree, against the same program on the host tree: the
/// order (sorted by name), levels, kinds (pre- and post-order
/// directories, files), file sizes, `fts_children` of the root, `fts_set`
/// with `FTS_SKIP`; with `FTS_PHYSICAL | FTS_NOCHDIR` and with
/// `FTS_LOGICAL`; `fts64_*` through `_FILE_OFFSET_BITS=64`.
#[test]
fn c_program_walks_with_fts_like_the_host() {
    const SRC: &str = r#"
#include <sys/stat.h>
#include <fts.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
static int byname(const FTSENT **a, const FTSENT **b) {
    return strcmp((*a)->fts_name, (*b)->fts_name);
}
int main(int argc, char **argv) {
    size_t rl = strlen(argv[1]);
    int opts[2] = {FTS_PHYSICAL | FTS_NOCHDIR, FTS_LOGICAL};
    for (int k = 0; k < 2; k++) {
        char *roots[] = {argv[1], 0};
        FTS *f = fts_open(roots, opts[k], byname);
        if (!f) { printf("fts_open: %s\n", strerror(errno)); return 1; }
        FTSENT *e;
        int first = 1;
        while ((e = fts_read(f))) {
            if (!strcmp(e->fts_name, "lost+found") || !strcmp(e->fts_name, "deeper")) {
                fts_set(f, e, FTS_SKIP);
                if (!strcmp(e->fts_name, "lost+found")) continue;
            }
            /* A root's name is its last component: the mount's or the host's. */
            printf("%d %d [%s] %s", e->fts_level, e->fts_info, e->fts_path + rl,
                   e->fts_level ? e->fts_name : "(root)");
            if (e->fts_info == FTS_F) printf(" %lld", (long long)e->fts_statp->st_size);
            printf("\n");
            if (first) {
                int n = 0;
                for (FTSENT *c = fts_children(f, 0); c; c = c->fts_link)
                    if (strcmp(c->fts_name, "lost+found")) n++;
                printf("children %d\n", n);
                first = 0;
            }
        }
        printf("end errno %d close %d\n", errno, fts_close(f));
    }
    return 0;
}
"#;
    let t = dir_tree();
    for flags in [&["-O2"][..], &["-O2", "-D_FILE_OFFSET_BITS=64"][..]] {
        let (_d, exe) = compile_with(SRC, flags);
        let host = ok(Command::new(&exe).arg(&t.src).output_within(LIMIT));
        let host = String::from_utf8(host).unwrap();
        assert!(host.contains("with space é.txt"), "{host}");
        assert!(host.contains(" 6 [/sub] sub"), "post-order: {host}");
        for serve in dir_serves() {
            let got = ok(run_dirs(&serve, &[exe.to_str().unwrap(), MOUNT]));
            assert_eq!(String::from_utf8(got).unwrap(), host, "{serve:?} {flags:?}");
        }
    }
}

/// Random `pread`s of a large served file go through a mapping the shim
/// keeps (`mapread.rs` in the preload crate), not a FILL request each: 400
/// reads of 1 byte to 70,000 bytes at random offsets of big.bin, and one
/// across its end, are byte-exact against the host file, and cost a
/// handful of requests (the shim's `sendmsg` calls, counted with strace)
/// where FILL took one each.
#[test]
fn random_reads_of_a_large_file_go_through_a_mapping() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("strace.log");
    let script = format!(
        r#"
import os, random
random.seed(5)
fd = os.open("{big}", os.O_RDONLY)
h = open("{host}", "rb").read()
bad = 0
for i in range(400):
    n = random.choice([1, 100, 4096, 5000, 70000])
    off = random.randrange(0, len(h) - n)
    if os.pread(fd, n, off) != h[off:off + n]:
        bad += 1
if os.pread(fd, 10000, len(h) - 100) != h[-100:]:
    bad += 1
print("bad", bad, flush=True)
"#,
        big = shadow("big.bin"),
        host = host("big.bin").display(),
    );
    let o = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=sendmsg", "-o"])
        .arg(&log)
        .arg(BIN)
        .arg("run")
        .arg("--root")
        .arg(tree().dir.path())
        .args(["--mount", MOUNT, "--", "python3", "-c", &script])
        .env("SHADOWFD_PRELOAD", preload())
        .env_remove("SHADOWFD_MODE")
        .output_within(LIMIT);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("bad 0"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let sends = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("sendmsg("))
        .count();
    assert!(
        sends < 60,
        "{sends} requests for 401 random reads: they did not go through a mapping"
    );
}

/// The server going away while a command reads a large file at random
/// through the shim's mapping: a read of a page never filled fails with
/// EIO (the kernel's copy meets the poisoned page, and the read falls back
/// to FILL, which finds the server gone), never SIGBUS or zeros.
#[test]
fn random_reads_through_the_mapping_fail_with_eio_when_the_server_dies() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let (ready, go) = (d.path().join("ready"), d.path().join("go"));
    let mut server = serve_tree(&sock, None);
    let script = format!(
        r#"
import os, time
fd = os.open("{big}", os.O_RDONLY)
got = [os.pread(fd, 4096, off) for off in (1 << 20, 9 << 20, 3 << 20, 17 << 20)]
assert all(len(g) == 4096 and g != bytes(4096) for g in got)
open("{ready}", "w").close()
while not os.path.exists("{go}"):
    time.sleep(0.02)
try:
    b = os.pread(fd, 4096, 40 << 20)
    print("read", len(b), b == bytes(4096), flush=True)
except OSError as e:
    print("read errno", e.errno, flush=True)
"#,
        big = shadow("big.bin"),
        ready = ready.display(),
        go = go.display(),
    );
    let o = python_until_the_server_dies(&mut server, &sock, &script, &ready, &go, 200);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}: {out}", o.status);
    assert!(out.contains("read errno 5"), "{out}");
}
