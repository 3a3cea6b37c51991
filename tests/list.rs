//! Protocol version 4's STAT and LIST against a real server: a `--root`
//! tree on the host (with symlinks in and out of it) and an ext4 image made
//! from it with `mkfs.ext4 -d`, through `shadowfd::remote::Client`.

mod common;

use shadowfd::remote::{Client, ClientOptions, PathKind, Server, ServerOptions, Tree};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

/// A tree: `big/` with 2500 files (several LIST pages), `a/b/c/deep.txt`,
/// `empty/`, a name with spaces and UTF-8, and symlinks: one to a file and
/// one to a directory inside the tree (listed as what they lead to), one
/// out of the tree, one absolute and one dangling (left out). `secret`
/// lies beside the root, outside it.
fn make_tree(base: &Path) -> std::path::PathBuf {
    let root = base.join("root");
    std::fs::create_dir_all(root.join("big")).unwrap();
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(base.join("secret"), b"outside").unwrap();
    for i in 0..2500 {
        std::fs::write(
            root.join(format!("big/file-{i:05}-{}", "x".repeat(40))),
            b"",
        )
        .unwrap();
    }
    std::fs::write(root.join("a/b/c/deep.txt"), b"deep").unwrap();
    std::fs::write(root.join("a/één en twee.txt"), b"utf8").unwrap();
    std::os::unix::fs::symlink("b/c/deep.txt", root.join("a/to-deep")).unwrap();
    std::os::unix::fs::symlink("b", root.join("a/to-b")).unwrap();
    std::os::unix::fs::symlink("../../secret", root.join("a/out")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("a/abs")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("a/dangling")).unwrap();
    root
}

fn connect(tree: Tree) -> Client {
    let server = Server::new(
        common::engine(shadowfd::Mode::Lazy),
        tree,
        ServerOptions::default(),
    )
    .expect("server");
    let (a, b) = UnixStream::pair().unwrap();
    server.handle(a).unwrap();
    let opts = ClientOptions {
        userfaultfd: false,
        ..ClientOptions::default()
    };
    Client::from_stream(b, opts).expect("client")
}

fn names(c: &Client, path: &str) -> BTreeMap<String, PathKind> {
    c.list(path)
        .unwrap_or_else(|e| panic!("LIST {path:?}: {e}"))
        .into_iter()
        .map(|e| {
            let kind = match e.kind {
                shadowfd::remote::wire::KIND_DIR => PathKind::Dir,
                shadowfd::remote::wire::KIND_FILE => PathKind::File,
                k => panic!("LIST gave kind {k}"),
            };
            (String::from_utf8(e.name).unwrap(), kind)
        })
        .collect()
}

fn refused(r: shadowfd::Result<impl std::fmt::Debug>, code: &str) {
    let e = r.expect_err("must be refused").to_string();
    assert!(e.contains(code), "expected {code}, got: {e}");
}

/// What both trees must list.
fn check_common(c: &Client, symlinks_in_tree: bool) {
    let top = names(c, "/");
    let want: BTreeMap<String, PathKind> = [
        ("a", PathKind::Dir),
        ("big", PathKind::Dir),
        ("empty", PathKind::Dir),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect();
    assert_eq!(top.iter().filter(|(n, _)| *n != "lost+found").count(), 3);
    for (n, k) in &want {
        assert_eq!(top.get(n), Some(k), "{n}");
    }
    assert!(names(c, "empty").is_empty());
    let a = names(c, "a");
    let mut want_a = vec![
        ("b".to_string(), PathKind::Dir),
        ("één en twee.txt".to_string(), PathKind::File),
    ];
    if symlinks_in_tree {
        want_a.push(("to-b".into(), PathKind::Dir));
        want_a.push(("to-deep".into(), PathKind::File));
    }
    let want_a: BTreeMap<_, _> = want_a.into_iter().collect();
    assert_eq!(
        a, want_a,
        "symlinks out of the tree and dangling ones are left out"
    );
    assert_eq!(names(c, "/a/b/c").len(), 1);
    assert_eq!(names(c, "a/./b/../b/c").len(), 1);

    // Several pages, each within the limits, together the whole directory.
    let mut cursor = 0;
    let mut pages = 0;
    let mut all = Vec::new();
    loop {
        let (e, next, end) = c.list_page("big", cursor).unwrap();
        assert!(e.len() <= shadowfd::remote::wire::LIST_MAX_ENTRIES);
        all.extend(e.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
        pages += 1;
        if end {
            break;
        }
        cursor = next;
    }
    assert!(pages >= 3, "2500 entries in {pages} page(s)");
    all.sort();
    let want: Vec<String> = (0..2500)
        .map(|i| format!("file-{i:05}-{}", "x".repeat(40)))
        .collect();
    assert_eq!(all, want);

    let s = c.stat("a/b/c/deep.txt").unwrap();
    assert_eq!((s.kind, s.size), (PathKind::File, 4));
    let d = c.stat("/a/b").unwrap();
    assert_eq!(d.kind, PathKind::Dir);
    assert_eq!(c.stat("").unwrap().kind, PathKind::Dir);
    // STAT agrees with OPEN on a file's identity.
    let f = c.open("a/b/c/deep.txt").unwrap();
    assert_eq!((f.identity().0, f.identity().1), (s.device, s.inode));
    // And LIST with STAT on an entry's inode.
    let deep = c.list("a/b/c").unwrap();
    assert_eq!(deep[0].inode, s.inode);

    refused(c.stat("missing"), "E_NOT_FOUND");
    refused(c.list("missing"), "E_NOT_FOUND");
    refused(c.list("a/b/c/deep.txt"), "E_NOT_DIR");
    refused(c.list("a\0b"), "E_PROTOCOL");
    // The session goes on after refusals.
    assert_eq!(names(c, "/a/b/c").len(), 1);
}

#[test]
fn list_and_stat_a_root_tree_confined() {
    let base = tempfile::tempdir().unwrap();
    let root = make_tree(base.path());
    let c = connect(Tree::Root(root.clone()));
    check_common(&c, true);
    // Host identity, as stat(2) says.
    let m = std::fs::metadata(root.join("a/b")).unwrap();
    let s = c.stat("a/b").unwrap();
    assert_eq!((s.device, s.inode, s.nlink), (m.dev(), m.ino(), m.nlink()));
    // Nothing leaves the root: `..`, symlinks out of it, absolute ones.
    for bad in ["..", "../", "a/../..", "a/out", "a/abs"] {
        refused(c.stat(bad), "E_ESCAPE");
        refused(c.list(bad), "E_ESCAPE");
    }
    refused(c.list("a/dangling"), "E_NOT_FOUND");
    // A cursor no reply gave is refused, not trusted.
    refused(c.list_page("a", u64::MAX), "E_RANGE");
}

/// (Re)makes the 64 MiB ext4 image `img` holding the tree at `root`.
fn mkfs_ext4(root: &Path, img: &Path) {
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(root)
        .arg(img)
        .arg("64M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed for the --image test");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn list_and_stat_an_ext4_image() {
    let base = tempfile::tempdir().unwrap();
    let root = make_tree(base.path());
    let img = base.path().join("tree.ext4");
    mkfs_ext4(&root, &img);
    let c = connect(Tree::Image(img.clone()));
    check_common(&c, true);
    // Inside an image `..` stops at its root and symlinks stay in it: the
    // link out of the tree leads nowhere there and is left out.
    assert_eq!(names(&c, "..").len(), names(&c, "/").len());
    refused(c.stat("a/out"), "E_NOT_FOUND");
    // A cursor no reply gave is refused, not trusted: past the end, or
    // inside an entry.
    refused(c.list_page("a", u64::MAX), "E_RANGE");
    refused(c.list_page("a", 5), "E_RANGE");
    let (_, next, end) = c.list_page("big", 0).unwrap();
    assert!(!end);
    refused(c.list_page("big", next + 3), "E_RANGE");
    assert!(!c.list_page("big", next).unwrap().0.is_empty());

    // What a listing taught the server is forgotten once the image changes.
    assert_eq!(c.list("a/b/c").unwrap().len(), 1);
    assert_eq!(c.stat("a/b/c/deep.txt").unwrap().size, 4);
    std::fs::write(root.join("a/b/c/deep.txt"), b"deeper now").unwrap();
    mkfs_ext4(&root, &img);
    assert_eq!(c.stat("a/b/c/deep.txt").unwrap().size, 10);
}

/// The server's resident memory (`VmRSS`) in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A client that LISTs one directory of 1024 entries under 150 spellings
/// padded with `./` (0.9 to 1.2 KB each) cannot grow a `shadowfd serve
/// --image` by more than a few MiB: what the server remembers of a
/// listing is keyed by the canonical path and capped in bytes. (Keyed by
/// the spelling, 63 such LISTs grew it from 7.9 MB to 173 MB.) A path over
/// 4096 bytes is refused with E_RANGE.
#[test]
fn padded_list_paths_cannot_grow_an_image_server() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..1024 {
        std::fs::write(src.join(format!("d/entry-{i:04}")), b"").unwrap();
    }
    let img = base.path().join("d.ext4");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed for the --image test");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sock = base.path().join("s.sock");
    /// Kills the server however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Kill(
        Command::new(env!("CARGO_BIN_EXE_shadowfd"))
            .args(["serve", "--socket", sock.to_str().unwrap(), "--image"])
            .arg(&img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = server.0.id();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let opts = ClientOptions {
        userfaultfd: false,
        ..ClientOptions::default()
    };
    let c = Client::from_stream(UnixStream::connect(&sock).unwrap(), opts).unwrap();
    // Warm up: the image loaded, one listing remembered.
    assert_eq!(c.list("d").unwrap().len(), 1024);
    assert_eq!(c.stat("d/entry-0007").unwrap().kind, PathKind::File);
    let before = rss_kib(pid);
    for k in 0..150 {
        let path = format!("/{}d", "./".repeat(450 + k));
        assert_eq!(c.list(&path).unwrap().len(), 1024, "{}", path.len());
    }
    // What was learned still serves a STAT by its plain spelling.
    assert_eq!(c.stat("/./d/entry-1023").unwrap().kind, PathKind::File);
    let after = rss_kib(pid);
    let long = format!("/{}d", "./".repeat(2100));
    let refusal = c.list(&long).map(|_| ());
    drop(server);
    let grown = after.saturating_sub(before);
    eprintln!("server VmRSS {before} KiB -> {after} KiB");
    assert!(
        grown < 16 << 10,
        "the server grew by {grown} KiB ({before} -> {after} KiB)"
    );
    let e = refusal.expect_err("a path over 4096 bytes").to_string();
    assert!(
        e.contains("E_RANGE") && e.contains("the limit is 4096 bytes"),
        "{e}"
    );
}
