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

/// Builds libshadowfd_preload.so next to the binary (same profile and
/// target directory): `cargo test` builds the binary but not a cdylib of
/// another package. A no-op when it is up to date.
fn preload() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let bin_dir = Path::new(BIN).parent().unwrap().to_path_buf();
        let target = bin_dir.parent().unwrap().to_path_buf();
        let profile = match bin_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev".to_string(),
            other => other.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "--quiet", "-p", "shadowfd-preload", "--profile"])
            .arg(&profile)
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .output()
            .unwrap_or_else(|e| panic!("running {cargo:?} build: {e}"));
        assert!(
            out.status.success(),
            "cargo build -p shadowfd-preload failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = bin_dir.join("libshadowfd_preload.so");
        assert!(lib.is_file(), "{} missing", lib.display());
        lib
    })
}

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

/// `shadowfd run --root TREE --mount MOUNT -- args...`
fn run(args: &[&str]) -> Output {
    run_with(&["--root", tree().dir.path().to_str().unwrap()], args)
}

fn run_with(serve: &[&str], args: &[&str]) -> Output {
    let lib = preload();
    let o = Command::new(BIN)
        .arg("run")
        .args(serve)
        .args(["--mount", MOUNT, "--"])
        .args(args)
        .env("SHADOWFD_PRELOAD", lib)
        .env_remove("SHADOWFD_MODE")
        .output()
        .unwrap();
    eprintln!(
        "run {args:?}: {}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn ok(o: Output) -> Vec<u8> {
    assert!(
        o.status.success(),
        "failed: {}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn cat_is_byte_exact() {
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

#[test]
fn sha256sum_matches_the_host() {
    let sh = |args: &[&str]| -> String {
        let o = Command::new("sha256sum").args(args).output().unwrap();
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
        .output()
        .unwrap();
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

/// A python3 that has numpy: `python3` on PATH, else /usr/bin/python3.
fn python_with_numpy() -> &'static str {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return p;
        }
    }
    panic!(
        "neither python3 on PATH nor /usr/bin/python3 can import numpy; \
         install it (apt-get install python3-numpy) to run the numpy.memmap test"
    );
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
            .output()
            .unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("p.c");
    let exe = dir.path().join("p");
    std::fs::write(&c, src).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .args(["-O1", "-Wall", "-Werror", "-o"])
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
        .output()
        .unwrap();
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
        .output()
        .unwrap();
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
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed for the --image test");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
    let o = Command::new("sqlite3").arg(&db).arg(make).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let query = "select count(*), sum(x), min(y), max(y) from t; \
                 select x from t where y = (select y from t where x = 123456);";
    let host = Command::new("sqlite3")
        .arg(&db)
        .arg(query)
        .output()
        .unwrap();
    assert!(host.status.success());
    let img = d.path().join("fs.img");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed for the --image test");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
    let log = std::fs::File::create(d.path().join("log")).unwrap();
    let mut server = Command::new(BIN)
        .args(["serve", "--socket", sock.to_str().unwrap(), "--root"])
        .arg(tree().dir.path())
        .stderr(log)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
        .output()
        .unwrap();
    let out = String::from_utf8(ok(o)).unwrap();
    assert!(out.contains("whole True"), "{out}");
    assert!(out.contains("offset True"), "{out}");
}

/// A descriptor carried across exec is unknown to the new image's shim: a
/// read of it fails loudly (EBADF), never zeros.
#[test]
fn descriptors_across_exec_fail_loudly() {
    let o = run(&[
        "sh",
        "-c",
        &format!("exec 3<{}; cat <&3", shadow("small.txt")),
    ]);
    assert!(!o.status.success());
    assert!(o.stdout.is_empty(), "{:?}", o.stdout);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Bad file descriptor"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The server going away under a running command: reads and opens fail
/// with EIO, and an untouched page of a lazy mapping raises SIGBUS (the
/// command's status is 128 + SIGBUS): never zeros.
#[test]
fn server_death_is_an_error_never_zeros() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let (ready, go) = (d.path().join("ready"), d.path().join("go"));
    let mut server = Command::new(BIN)
        .args(["serve", "--socket", sock.to_str().unwrap(), "--root"])
        .arg(tree().dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
    let child = Command::new(BIN)
        .args([
            "run",
            "--socket",
            sock.to_str().unwrap(),
            "--mount",
            MOUNT,
            "--",
        ])
        .args(["python3", "-c", &script])
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
    std::thread::sleep(std::time::Duration::from_millis(200));
    std::fs::write(&go, b"").unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{out}\n{}", String::from_utf8_lossy(&o.stderr));
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
    void *w = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    int ew = errno;
    void *fx = mmap(want, PG, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
    int ef = errno;
    printf("refused %d %d %d %d\n", w == MAP_FAILED, ew == EACCES, fx == MAP_FAILED, ef == EINVAL);
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
    assert!(out.contains("creat -1 1"), "{out}");
    assert!(out.contains("sendfile 300000 312345"), "{out}");
    assert!(std::fs::read(&out_file).unwrap() == tree().big[12345..312345]);
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
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::metadata(&npy).unwrap().len() > 512 << 20);
    let img = d.path().join("fs.img");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("600M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed for the --image test");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let on_host = Command::new(py)
        .args(["-c", IMAGE_PY_CHECKS])
        .arg(&src)
        .output()
        .unwrap();
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
            .output()
            .unwrap();
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
        let o = Command::new("sha256sum").arg(&p).output().unwrap();
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
