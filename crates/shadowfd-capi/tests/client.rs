//! The client functions from C: tests/c/client_test.c, compiled with the
//! system `cc` against include/shadowfd.h and libshadowfd.so, talking to a
//! real `shadowfd serve --socket S --root DIR` (the `shadowfd` binary of
//! the same profile). One server per test, SIGKILLed at the end.

mod common;

use common::{Server, compile_c, modes, pattern, root, run_ok};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const PAGE: usize = 4096;

/// The compiled C program.
fn exe() -> &'static Path {
    static EXE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &EXE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("client_test");
        let src = root().join("crates/shadowfd-capi/tests/c/client_test.c");
        compile_c(&[src], &exe, &[]);
        (dir, exe)
    })
    .1
}

/// A served tree: `data.bin` (`len` bytes of a pattern), `sub/` and a
/// symlink `escape` pointing out of it; the socket next to it.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new(len: usize) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("data.bin"), pattern(len, 11)).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        Tree { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn file(&self) -> PathBuf {
        self.root().join("data.bin")
    }
    fn sock(&self) -> PathBuf {
        self.dir.path().join("s.sock")
    }
}

/// Runs the C case against `server`, printing the server's output too on
/// failure.
fn run(case: &str, tree: &Tree, server: &Server, more: &[&str]) {
    let sock = tree.sock();
    let file = tree.file();
    let pid = server.pid();
    let mut args = vec![
        case,
        sock.to_str().unwrap(),
        file.to_str().unwrap(),
        "data.bin",
        &pid,
    ];
    args.extend_from_slice(more);
    let exe = exe();
    let r = std::panic::catch_unwind(|| run_ok(exe, &args));
    if let Err(e) = r {
        eprintln!("{}", server.output());
        std::panic::resume_unwind(e);
    }
}

/// The client's own mode: lazy where this process can make a userfaultfd.
fn client_mode() -> &'static str {
    if modes().contains(&"lazy") {
        "lazy"
    } else {
        "eager"
    }
}

#[test]
fn client_maps_reads_fills_and_names_refusals() {
    // Lazy and eager servers; the file ends mid-page.
    for mode in modes() {
        let tree = Tree::new(37 * PAGE + 123);
        let server = Server::start(&tree.root(), &tree.sock(), &["--mode", mode]);
        run("basic", &tree, &server, &[client_mode()]);
    }
}

#[test]
fn server_sigkill_gives_sigbus_not_a_hang() {
    if !modes().contains(&"lazy") {
        return;
    }
    // No readahead and small chunks: the last page is never filled by the
    // touch of page 0.
    let tree = Tree::new(4 << 20);
    let server = Server::start(
        &tree.root(),
        &tree.sock(),
        &["--mode", "lazy", "--readahead", "0", "--chunk", "64K"],
    );
    run("killed", &tree, &server, &[]);
}

#[test]
fn client_falls_back_to_sealed_descriptors_where_userfaultfd_is_denied() {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return;
    }
    for mode in modes() {
        let tree = Tree::new(21 * PAGE + 5);
        let server = Server::start(&tree.root(), &tree.sock(), &["--mode", mode]);
        run("denied", &tree, &server, &[]);
    }
}

#[test]
fn threads_share_one_client() {
    for mode in modes() {
        let tree = Tree::new(29 * PAGE + 77);
        let server = Server::start(&tree.root(), &tree.sock(), &["--mode", mode]);
        run("threads", &tree, &server, &[]);
    }
}

#[test]
fn without_userfaultfd_a_file_over_the_eager_cap_is_efbig() {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return;
    }
    for mode in modes() {
        let tree = Tree::new(3 * PAGE);
        std::fs::write(tree.root().join("big.bin"), pattern(512 << 10, 3)).unwrap();
        let server = Server::start(
            &tree.root(),
            &tree.sock(),
            &["--mode", mode, "--max-size", "256K"],
        );
        run("too-large", &tree, &server, &["big.bin"]);
    }
}
