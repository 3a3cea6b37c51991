//! Shadows of files inside ext2/ext3/ext4 images: real images made by
//! `mkfs.* -d` from trees built here, read back through the library (lazy
//! and eager engines, both access strategies) and the `shadowfd` binary, and
//! compared byte for byte with the originals.

use shadowfd::shadow::Field;
use shadowfd::source::{FileKind, ImageAccess, ImageSource, Source};
use shadowfd::{Config, Engine, Error, Mode, Share, Staleness};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// The mtime the tree's regular files get before mkfs copies them.
const TREE_MTIME: i64 = 1_234_567_890;

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn set_mtime(p: &Path, sec: i64) {
    let f = File::options().write(true).open(p).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(sec as u64);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// A sparse file of `size` bytes holding `islands` (offset, length) of
/// pattern data; holes everywhere else.
fn sparse(p: &Path, size: u64, islands: &[(u64, usize)]) {
    let f = File::create(p).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in islands.iter().enumerate() {
        f.write_all_at(&pattern(100 + i as u64, len), off).unwrap();
    }
}

/// The test tree: small, empty, odd-sized, big, nested, sparse, symlinked
/// files, a directory and a fifo.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("nested/deep/er")).unwrap();
    fs::create_dir_all(root.join("emptydir")).unwrap();
    fs::write(root.join("small.txt"), b"hello from inside an image\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("odd.bin"), pattern(1, 4097 + 1024 + 3)).unwrap();
    fs::write(root.join("big.bin"), pattern(2, 3 * MIB as usize + 123)).unwrap();
    fs::write(root.join("nested/deep/er/file.bin"), pattern(3, 200_000)).unwrap();
    // More than four islands: an extent tree deeper than the inode's root.
    sparse(
        &root.join("sparse.bin"),
        24 * MIB + 5,
        &[
            (0, 10_000),
            (MIB + 17, 70_000),
            (5 * MIB - 3, 4),
            (8 * MIB, MIB as usize),
            (12 * MIB + 4096, 8192),
            (16 * MIB + 100, 100),
            (20 * MIB, 65536),
            (24 * MIB, 5),
        ],
    );
    for f in [
        "small.txt",
        "empty",
        "odd.bin",
        "big.bin",
        "nested/deep/er/file.bin",
        "sparse.bin",
    ] {
        set_mtime(&root.join(f), TREE_MTIME);
    }
    symlink("nested/deep/er/file.bin", root.join("link-rel")).unwrap();
    symlink("/big.bin", root.join("nested/abs")).unwrap();
    symlink("../../small.txt", root.join("nested/deep/up")).unwrap();
    symlink("nested/deep", root.join("dirlink")).unwrap();
    symlink("loop-b", root.join("loop-a")).unwrap();
    symlink("loop-a", root.join("loop-b")).unwrap();
    symlink("nowhere", root.join("dangling")).unwrap();
    let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `fifo` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
}

/// Paths to read inside the image, and the host file each must equal.
const FILES: &[(&str, &str)] = &[
    ("/small.txt", "small.txt"),
    ("/empty", "empty"),
    ("/odd.bin", "odd.bin"),
    ("/big.bin", "big.bin"),
    ("/nested/deep/er/file.bin", "nested/deep/er/file.bin"),
    ("/sparse.bin", "sparse.bin"),
    ("/link-rel", "nested/deep/er/file.bin"),
    ("/nested/abs", "big.bin"),
    ("/nested/deep/up", "small.txt"),
    ("/dirlink/er/file.bin", "nested/deep/er/file.bin"),
    ("nested/deep/er/file.bin", "nested/deep/er/file.bin"),
    (
        "/nested/./deep/../deep/er//file.bin",
        "nested/deep/er/file.bin",
    ),
];

/// Filesystem flavours: extents (ext4) and block maps (ext2, ext3 with a
/// journal); 1 KiB, 4 KiB and 64 KiB blocks; bigalloc clusters.
const VARIANTS: &[(&str, &[&str])] = &[
    ("ext4-4k", &["mkfs.ext4", "-b", "4096"]),
    ("ext4-1k", &["mkfs.ext4", "-b", "1024"]),
    ("ext3-4k", &["mkfs.ext3", "-b", "4096"]),
    ("ext2-1k", &["mkfs.ext2", "-b", "1024"]),
    ("ext2-4k", &["mkfs.ext2", "-b", "4096"]),
    ("ext2-64k", &["mkfs.ext2", "-b", "65536"]),
    (
        "ext4-bigalloc",
        &[
            "mkfs.ext4",
            "-b",
            "4096",
            "-O",
            "bigalloc,metadata_csum_seed",
            "-C",
            "65536",
        ],
    ),
];

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `mkfs -q -F [extra] -d tree img size`.
fn mkfs(tool: &[&str], extra: &[&str], tree: &Path, img: &Path, size: &str) {
    run(Command::new(tool[0])
        .args(&tool[1..])
        .args(extra)
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(img)
        .arg(size));
}

/// `debugfs [-w] -R request img`; returns stdout.
fn debugfs(img: &Path, write: bool, request: &str) -> String {
    let mut c = Command::new("debugfs");
    if write {
        c.arg("-w");
    }
    let out = run(c.arg("-R").arg(request).arg(img));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Fixture {
    _dir: TempDir,
    tree: PathBuf,
    images: Vec<(&'static str, PathBuf)>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    make_tree(&tree);
    let images = VARIANTS
        .iter()
        .map(|&(name, tool)| {
            let img = dir.path().join(format!("{name}.img"));
            mkfs(tool, &[], &tree, &img, "64M");
            (name, img)
        })
        .collect();
    Fixture {
        _dir: dir,
        tree,
        images,
    }
}

fn engine(mode: Mode) -> Engine {
    Engine::new({
        let mut c = Config::default();
        c.mode = mode;
        c
    })
    .unwrap()
}

/// Reads all of `src` with `read_at` calls of an odd size.
fn read_all(src: &dyn Source, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < out.len() {
        let end = (off + 77_777).min(out.len());
        let n = src.read_at(&mut out[off..end], off as u64).unwrap();
        assert!(
            n > 0,
            "{}: read_at returned 0 at {off} of {size}",
            src.name()
        );
        off += n;
    }
    let mut probe = [0u8; 16];
    assert_eq!(
        src.read_at(&mut probe, size).unwrap(),
        0,
        "no bytes past the end"
    );
    out
}

/// Reads `len` bytes at `off` exactly.
fn read_exact(src: &dyn Source, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = src.read_at(&mut buf[done..], off + done as u64).unwrap();
        assert!(n > 0, "{}: short at {}", src.name(), off + done as u64);
        done += n;
    }
    buf
}

/// Offsets that cross block, run and hole edges, plus pseudo-random ones.
fn probe_points(size: u64) -> Vec<(u64, usize)> {
    let mut v = vec![
        (0, 1),
        (1023, 2),
        (4095, 4098),
        (MIB - 1, 3),
        (MIB + 16, 70_002),
    ];
    let r = pattern(7, 64 * 8);
    for c in r.chunks_exact(16) {
        let off = u64::from_le_bytes(c[..8].try_into().unwrap()) % size.max(1);
        let len = (u64::from_le_bytes(c[8..].try_into().unwrap()) % 300_000) as usize + 1;
        v.push((off, len));
    }
    v.into_iter()
        .filter(|&(o, _)| o < size)
        .map(|(o, l)| (o, l.min((size - o) as usize)))
        .collect()
}

#[test]
fn files_read_back_through_the_library() {
    let fx = fixture();
    let lazy = engine(Mode::Lazy);
    let eager = engine(Mode::Eager);
    for (variant, img) in &fx.images {
        for &(inner, host) in FILES {
            let what = format!("{variant} {inner}");
            let want = fs::read(fx.tree.join(host)).unwrap();
            let hm = fs::metadata(fx.tree.join(host)).unwrap();
            let src = ImageSource::open(img, inner).unwrap_or_else(|e| panic!("{what}: {e}"));
            let meta = src.metadata().unwrap();
            assert_eq!(meta.kind, FileKind::Regular, "{what}");
            assert_eq!(meta.size, want.len() as u64, "{what}");
            assert_eq!(
                meta.mtime.sec,
                hm.mtime(),
                "{what}: mtime comes from the inode"
            );
            assert_eq!(meta.inode, u64::from(src.inode_in_image()), "{what}");
            assert_eq!(read_all(&src, meta.size), want, "{what}: read_at");
            for (off, len) in probe_points(meta.size) {
                assert_eq!(
                    read_exact(&src, off, len),
                    &want[off as usize..off as usize + len],
                    "{what}: read_at({off}, {len})"
                );
            }
            if want.is_empty() {
                continue;
            }
            for (mode, eng) in [("lazy", &lazy), ("eager", &eager)] {
                let sh = eng
                    .open(ImageSource::open(img, inner).unwrap())
                    .unwrap_or_else(|e| panic!("{what} {mode}: {e}"));
                assert_eq!(sh.size(), want.len() as u64);
                let map = sh.map(Share::Private).unwrap();
                assert!(map[..] == want[..], "{what}: {mode} mapping differs");
                assert_eq!(sh.poisoned_pages(), vec![], "{what} {mode}");
                assert_eq!(
                    sh.staleness().unwrap(),
                    Staleness::Unchanged,
                    "{what} {mode}"
                );
            }
        }
    }
}

#[test]
fn block_maps_are_really_exercised() {
    // The images must hold what the other tests claim to cover: an extent
    // tree deeper than the inode (ext4) and double-indirect blocks (ext2 1K).
    let fx = fixture();
    let img = |v: &str| &fx.images.iter().find(|(n, _)| *n == v).unwrap().1;
    let stat = debugfs(img("ext4-4k"), false, "stat /sparse.bin");
    assert!(stat.contains("(ETB0)"), "no extent tree block:\n{stat}");
    let stat = debugfs(img("ext2-1k"), false, "stat /sparse.bin");
    assert!(stat.contains("(DIND)"), "no double-indirect block:\n{stat}");
    // Holes read as zeros and islands as data, through both map kinds.
    let want = fs::read(fx.tree.join("sparse.bin")).unwrap();
    for v in ["ext4-4k", "ext2-1k"] {
        let src = ImageSource::open(img(v), "/sparse.bin").unwrap();
        let ext = src.extents();
        assert!(ext.len() >= 8, "{v}: {ext:?}");
        let mapped: u64 = ext.iter().map(|e| e.2).sum();
        assert!(
            mapped < 2 * MIB + 512 * 1024,
            "{v}: holes were mapped: {mapped}"
        );
        assert_eq!(read_exact(&src, 2 * MIB, 4096), vec![0u8; 4096]);
        assert_eq!(read_all(&src, want.len() as u64), want);
    }
}

/// Where a file's blocks are whole pages (4 KiB and 64 KiB blocks) and it
/// is at least 1 MiB, the source offers one mapping of it (its runs of the
/// image mapped in place, holes as zero pages), which fills copy from:
/// every byte of it is the file's, holes included. 1 KiB blocks, and files
/// under 1 MiB, offer none (fills read them with `read_at`). A lazy shadow
/// over such a source reads back the same bytes.
#[test]
fn page_sized_blocks_offer_one_mapping_of_the_file() {
    let fx = fixture();
    let lazy = engine(Mode::Lazy);
    for (variant, img) in &fx.images {
        for (inner, host) in [("/sparse.bin", "sparse.bin"), ("/big.bin", "big.bin")] {
            let want = fs::read(fx.tree.join(host)).unwrap();
            let src = ImageSource::open(img, inner).unwrap();
            let page = shadowfd::page_size() as u64;
            let whole_pages = !variant.ends_with("-1k");
            match src.mapped() {
                Some(m) => {
                    assert!(
                        whole_pages,
                        "{variant}{inner}: a 1 KiB-block file was mapped"
                    );
                    assert_eq!(m.len(), (want.len() as u64).div_ceil(page) * page);
                    // SAFETY: the source's own read-only mapping, alive while
                    // `src` is; nothing writes it.
                    let got =
                        unsafe { std::slice::from_raw_parts(m.addr() as *const u8, want.len()) };
                    assert!(got == &want[..], "{variant}{inner}: the mapping differs");
                }
                None => assert!(
                    !whole_pages,
                    "{variant}{inner}: no mapping for a file of whole-page blocks"
                ),
            }
            let shadow = lazy.open(src).unwrap();
            let map = shadow.map(Share::Shared).unwrap();
            assert!(map[..] == want[..], "{variant}{inner}: the shadow differs");
        }
    }
    assert!(
        ImageSource::open(&fx.images[0].1, "/nested/deep/er/file.bin")
            .unwrap()
            .mapped()
            .is_none(),
        "a file under 1 MiB was mapped"
    );
}

#[test]
fn thread_access_reads_the_same_bytes() {
    let fx = fixture();
    let lazy = engine(Mode::Lazy);
    for (variant, img) in &fx.images {
        // ext4-view 1.0.0 cannot read block-mapped files with holes in their
        // indirect blocks, so the sparse file is read through extents only.
        let mut files = vec![
            ("/link-rel", "nested/deep/er/file.bin"),
            ("/odd.bin", "odd.bin"),
        ];
        if variant.starts_with("ext4") {
            files.push(("/sparse.bin", "sparse.bin"));
        }
        for (inner, host) in files {
            let want = fs::read(fx.tree.join(host)).unwrap();
            let t = ImageSource::open_with(img, inner, ImageAccess::Thread).unwrap();
            for (off, len) in probe_points(want.len() as u64) {
                assert_eq!(
                    read_exact(&t, off, len),
                    &want[off as usize..off as usize + len],
                    "{variant} {inner}: thread read_at({off}, {len})"
                );
            }
            let sh = lazy.open(t).unwrap();
            let map = sh.map(Share::Shared).unwrap();
            assert!(
                map[..] == want[..],
                "{variant} {inner}: thread-backed lazy mapping"
            );
        }
    }
}

/// Compares a mapping with a host file piece by piece (no second copy).
fn assert_same_as_file(map: &[u8], host: &Path, what: &str) {
    let f = File::open(host).unwrap();
    assert_eq!(
        map.len() as u64,
        f.metadata().unwrap().len(),
        "{what}: size"
    );
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut off = 0usize;
    while off < map.len() {
        let n = buf.len().min(map.len() - off);
        f.read_exact_at(&mut buf[..n], off as u64).unwrap();
        if map[off..off + n] != buf[..n] {
            let i = map[off..off + n]
                .iter()
                .zip(&buf[..n])
                .position(|(a, b)| a != b);
            panic!("{what}: differs at {}", off + i.unwrap());
        }
        off += n;
    }
}

#[test]
fn files_over_256_mib_lazy_and_eager() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let size = 300 * MIB + 1234;
    let host = tree.join("huge.bin");
    sparse(
        &host,
        size,
        &[
            (0, 100_000),
            (100 * MIB - 7, 300_000),
            (200 * MIB, 2 * MIB as usize),
            (299 * MIB + 5, 4096),
            (size - 1234, 1234),
        ],
    );
    assert!(
        fs::metadata(&host).unwrap().blocks() * 512 < 16 * MIB,
        "the host file is sparse"
    );
    for (name, tool) in [
        ("ext4-4k", &["mkfs.ext4", "-b", "4096"][..]),
        ("ext2-1k", &["mkfs.ext2", "-b", "1024"][..]),
    ] {
        let img = dir.path().join(format!("{name}.img"));
        mkfs(tool, &[], &tree, &img, "64M");
        assert!(
            fs::metadata(&img).unwrap().blocks() * 512 < 64 * MIB,
            "{name}: mkfs -d kept the file sparse"
        );
        if name == "ext2-1k" {
            let stat = debugfs(&img, false, "stat /huge.bin");
            assert!(
                stat.contains("(TIND)"),
                "{name}: no triple-indirect block:\n{stat}"
            );
        }
        let lazy = engine(Mode::Lazy);
        let sh = lazy
            .open(ImageSource::open(&img, "/huge.bin").unwrap())
            .unwrap();
        assert_eq!(sh.size(), size);
        assert_same_as_file(
            &sh.map(Share::Private).unwrap(),
            &host,
            &format!("{name} lazy"),
        );
        drop(sh);

        let capped = engine(Mode::Eager);
        let e = capped
            .open(ImageSource::open(&img, "/huge.bin").unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{name}: {e}");
        assert!(e.to_string().contains("--max-size"), "{e}");
        let eager = Engine::new({
            let mut c = Config::default();
            c.mode = Mode::Eager;
            c.max_size = 512 * MIB;
            c
        })
        .unwrap();
        let sh = eager
            .open(ImageSource::open(&img, "/huge.bin").unwrap())
            .unwrap();
        assert_same_as_file(
            &sh.map(Share::Private).unwrap(),
            &host,
            &format!("{name} eager"),
        );
    }
}

#[test]
fn files_over_4_gib_keep_their_high_size_bits() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let size = 5 * 1024 * MIB + 77;
    let islands = [
        (0, 4096),
        (4096 * MIB - 10, 20),
        (4500 * MIB, 65536),
        (size - 77, 77),
    ];
    let host = tree.join("over4g.bin");
    sparse(&host, size, &islands);
    let hf = File::open(&host).unwrap();
    let eng = engine(Mode::Lazy);
    for (name, tool) in [
        ("ext4-4k", &["mkfs.ext4", "-b", "4096"][..]),
        ("ext2-4k", &["mkfs.ext2", "-b", "4096"][..]),
    ] {
        let img = dir.path().join(format!("{name}.img"));
        mkfs(tool, &[], &tree, &img, "32M");
        let src = ImageSource::open(&img, "/over4g.bin").unwrap();
        assert_eq!(src.metadata().unwrap().size, size, "{name}");
        let sh = eng
            .open(ImageSource::open(&img, "/over4g.bin").unwrap())
            .unwrap();
        let map = sh.map(Share::Private).unwrap();
        for &(off, len) in &islands {
            // The island plus a page of hole on each side.
            let a = off.saturating_sub(4096);
            let b = (off + len as u64 + 4096).min(size);
            let mut want = vec![0u8; (b - a) as usize];
            hf.read_exact_at(&mut want, a).unwrap();
            assert_eq!(read_exact(&src, a, want.len()), want, "{name} read_at {a}");
            assert!(
                map[a as usize..b as usize] == want[..],
                "{name} mapping at {a}"
            );
        }
        assert!(
            sh.resident_bytes().unwrap() < 256 * MIB,
            "{name}: only touched pages filled"
        );
    }
}

#[test]
fn lookups_in_hash_indexed_directories() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("many")).unwrap();
    for i in 0..600u64 {
        fs::write(
            tree.join(format!("many/entry-with-a-long-name-{i:05}")),
            pattern(i, i as usize),
        )
        .unwrap();
    }
    for (name, tool) in [
        ("ext4-1k", &["mkfs.ext4", "-b", "1024"][..]),
        ("ext2-4k", &["mkfs.ext2", "-b", "4096"][..]),
    ] {
        let img = dir.path().join(format!("{name}.img"));
        mkfs(tool, &[], &tree, &img, "32M");
        // Rebuild the directory as an htree (hash-indexed) directory.
        let out = Command::new("e2fsck")
            .args(["-fyD"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.code().is_some_and(|c| c <= 1), "{out:?}");
        let dump = debugfs(&img, false, "htree_dump /many");
        assert!(
            dump.contains("Number of entries"),
            "{name}: /many is not indexed:\n{dump}"
        );
        for i in [0u64, 1, 299, 599] {
            let p = format!("/many/entry-with-a-long-name-{i:05}");
            let src = ImageSource::open(&img, &p).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(read_all(&src, i), pattern(i, i as usize), "{name} {p}");
        }
        let e = ImageSource::open(&img, "/many/entry-with-a-long-name-00600").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}

#[test]
fn unwritten_extents_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("junk"), vec![0xA5u8; MIB as usize]).unwrap();
    sparse(&tree.join("pre.bin"), MIB, &[(MIB - 4096, 4096)]);
    let img = dir.path().join("pre.img");
    mkfs(&["mkfs.ext4", "-b", "4096"], &[], &tree, &img, "16M");
    // Free the junk's blocks (their bytes stay), then preallocate blocks
    // 0..63 of pre.bin: unwritten extents over blocks full of 0xA5.
    debugfs(&img, true, "rm /junk");
    debugfs(&img, true, "fallocate /pre.bin 0 63");
    let stat = debugfs(&img, false, "stat /pre.bin");
    assert!(stat.contains("[u]"), "no unwritten extent:\n{stat}");
    let bmap = debugfs(&img, false, "bmap /pre.bin 0");
    let block: u64 = bmap.split_whitespace().next().unwrap().parse().unwrap();
    let mut raw = vec![0u8; 4096];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut raw, block * 4096)
        .unwrap();
    assert!(
        raw.iter().any(|&b| b != 0),
        "the preallocated block should hold stale bytes"
    );

    // (ImageAccess::Thread would return the stale 0xA5 bytes: ext4-view
    // 1.0.0 does not treat unwritten extents as holes.)
    let want = fs::read(tree.join("pre.bin")).unwrap();
    let src = ImageSource::open(&img, "/pre.bin").unwrap();
    assert!(
        read_all(&src, MIB) == want,
        "unwritten blocks must read as zeros"
    );
    let sh = engine(Mode::Lazy)
        .open(ImageSource::open(&img, "/pre.bin").unwrap())
        .unwrap();
    assert!(sh.map(Share::Private).unwrap()[..] == want[..]);
}

fn shadowfd(args: &[&str], img: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shadowfd"))
        .args(args)
        .arg("--image")
        .arg(img)
        .env_remove("SHADOWFD_MODE")
        .env_remove("SHADOWFD_MAX_SIZE")
        .output()
        .unwrap()
}

#[test]
fn cli_cat_and_map_read_files_in_images() {
    let fx = fixture();
    for (variant, img) in &fx.images {
        for &(inner, host) in &[
            ("/sparse.bin", "sparse.bin"),
            ("/link-rel", "nested/deep/er/file.bin"),
            ("/small.txt", "small.txt"),
            ("/odd.bin", "odd.bin"),
        ] {
            let want = fs::read(fx.tree.join(host)).unwrap();
            for mode in ["lazy", "eager"] {
                let out = shadowfd(&["cat", inner, "--mode", mode], img);
                assert!(
                    out.status.success(),
                    "{variant} {inner} {mode}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(out.stdout == want, "{variant} {inner} {mode}: bytes differ");
            }
        }
    }
    let img = &fx.images[0].1;
    let out = shadowfd(
        &[
            "map", "/big.bin", "--access", "seq", "--verify", "--json", "--mode", "lazy",
        ],
        img,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["verified"], serde_json::json!(true), "{j}");
    assert_eq!(j["size"], serde_json::json!(3 * MIB + 123), "{j}");
    assert_eq!(j["errors"], serde_json::json!(0), "{j}");
}

/// Runs the binary, expects failure, returns stderr.
fn cli_fails(args: &[&str], img: &Path) -> String {
    let out = shadowfd(args, img);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} --image {img:?} should fail"
    );
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    if args.contains(&"--json") {
        // With --json, the failure is on stdout too, as one JSON object.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e})"));
        assert!(v["error"].is_string(), "{args:?}: {v}");
    } else {
        assert!(out.stdout.is_empty(), "{args:?}: wrote to stdout");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("shadowfd: error: "), "{err}");
    err
}

fn assert_has(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{p:?} missing from: {text}");
    }
}

#[test]
fn cli_errors_name_the_image_the_path_and_the_fix() {
    let fx = fixture();
    let img = &fx.images[0].1;
    let i = img.display().to_string();
    let e = cli_fails(&["cat", "/nested/missing.txt"], img);
    assert_has(
        &e,
        &[
            &format!("{i}:/nested/missing.txt"),
            "no such file",
            "debugfs -R 'ls -l /nested'",
        ],
    );
    let e = cli_fails(&["cat", "/nested"], img);
    assert_has(
        &e,
        &[&format!("{i}:/nested"), "not a regular file (directory)"],
    );
    let e = cli_fails(&["cat", "/dirlink"], img);
    assert_has(&e, &[&format!("{i}:/dirlink"), "(directory)"]);
    let e = cli_fails(&["map", "/fifo", "--json"], img);
    assert_has(
        &e,
        &[&format!("{i}:/fifo"), "not a regular file (special file)"],
    );
    let e = cli_fails(&["cat", "/small.txt/x"], img);
    assert_has(&e, &[&format!("{i}:/small.txt/x"), "not a directory"]);
    let e = cli_fails(&["cat", "/loop-a"], img);
    assert_has(
        &e,
        &[&format!("{i}:/loop-a"), "too many levels of symbolic links"],
    );
    let e = cli_fails(&["cat", "/dangling"], img);
    assert_has(&e, &[&format!("{i}:/dangling"), "no such file"]);

    // Not an image at all.
    let e = cli_fails(&["cat", "/x"], &fx.tree.join("big.bin"));
    assert_has(
        &e,
        &[
            "big.bin: not an ext2/ext3/ext4 filesystem image",
            "magic",
            "mkfs.ext4",
        ],
    );
    let e = cli_fails(&["cat", "/x"], &fx.tree.join("small.txt"));
    assert_has(&e, &["small.txt: not an ext2/ext3/ext4", "too small"]);
    let e = cli_fails(&["cat", "/x"], &fx.tree.join("nested"));
    assert_has(&e, &["nested: not a regular file or block device"]);
    let e = cli_fails(&["cat", "/x"], &fx.tree.join("no-such.img"));
    assert_has(
        &e,
        &["no-such.img: cannot open the image file", "No such file"],
    );
}

#[test]
fn library_errors_have_kinds_and_messages() {
    let fx = fixture();
    let img = &fx.images[3].1;
    let i = img.display().to_string();
    let e = ImageSource::open(img, "/missing").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.location(), format!("{i}:/missing"));
    assert!(
        e.to_string()
            .starts_with(&format!("{i}:/missing: no such file")),
        "{e}"
    );
    let io: std::io::Error = e.into();
    assert_eq!(io.kind(), ErrorKind::NotFound);
    assert_eq!(
        ImageSource::open(img, "/small.txt/x").unwrap_err().kind(),
        ErrorKind::NotADirectory
    );
    let e = ImageSource::open(fx.tree.join("odd.bin"), "/x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidData);

    // Directories and special files open, with the right kind; the engine
    // refuses them.
    let eng = engine(Mode::Lazy);
    for (p, kind) in [
        ("/emptydir", FileKind::Directory),
        ("/", FileKind::Directory),
        ("/fifo", FileKind::Other),
    ] {
        let src = ImageSource::open(img, p).unwrap();
        assert_eq!(src.metadata().unwrap().kind, kind, "{p}");
        let e = eng.open(src).unwrap_err();
        assert!(matches!(e, Error::NotRegular { .. }), "{p}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{i}:{p} is not a regular file")),
            "{e}"
        );
    }
}

#[test]
fn unsupported_images_are_refused_with_the_feature_named() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    make_tree(&tree);

    let img = dir.path().join("inline.img");
    mkfs(&["mkfs.ext4"], &["-O", "inline_data"], &tree, &img, "16M");
    let e = cli_fails(&["cat", "/small.txt"], &img);
    assert_has(
        &e,
        &[
            "inline.img: ",
            "features shadowfd cannot read: inline_data",
            "debugfs -R 'dump /small.txt OUT'",
        ],
    );
    assert_eq!(
        ImageSource::open(&img, "/small.txt").unwrap_err().kind(),
        ErrorKind::Unsupported
    );

    let img = dir.path().join("nofiletype.img");
    mkfs(&["mkfs.ext2"], &["-O", "^filetype"], &tree, &img, "16M");
    let e = cli_fails(&["cat", "/small.txt"], &img);
    assert_has(
        &e,
        &["nofiletype.img: the filesystem is not supported", "debugfs"],
    );

    // fscrypt: the per-file flag set on a real file of an encrypt-enabled image.
    let img = dir.path().join("crypt.img");
    mkfs(&["mkfs.ext4"], &["-O", "encrypt"], &tree, &img, "16M");
    debugfs(&img, true, "sif /big.bin flags 0x80800");
    let e = cli_fails(&["cat", "/big.bin"], &img);
    assert_has(&e, &["crypt.img:/big.bin: ", "encrypted (fscrypt)"]);
    // Its neighbours still read.
    let out = shadowfd(&["cat", "/small.txt"], &img);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"hello from inside an image\n");

    // A journal that needs recovery: refused until the advised command ran.
    let img = dir.path().join("dirty.img");
    mkfs(&["mkfs.ext4"], &[], &tree, &img, "16M");
    debugfs(&img, true, "feature needs_recovery");
    let e = cli_fails(&["cat", "/small.txt"], &img);
    let fix = format!("e2fsck -y -E journal_only {}", img.display());
    assert_has(&e, &["journal needs recovery", &fix]);
    run(Command::new("e2fsck")
        .args(["-y", "-E", "journal_only"])
        .arg(&img));
    let out = shadowfd(&["cat", "/small.txt"], &img);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn inode_number(img: &Path, p: &str) -> u64 {
    let stat = debugfs(img, false, &format!("stat {p}"));
    let rest = stat.split("Inode: ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn staleness_follows_the_inode_and_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    make_tree(&tree);
    let img = dir.path().join("s.img");
    mkfs(&["mkfs.ext4", "-b", "4096"], &[], &tree, &img, "32M");
    set_mtime(&img, 1_700_000_000);
    let im = fs::metadata(&img).unwrap();

    let small = ImageSource::open(&img, "/small.txt").unwrap();
    let big = ImageSource::open(&img, "/nested/abs").unwrap();
    let deep = ImageSource::open(&img, "/link-rel").unwrap();
    let m = small.metadata().unwrap();
    assert_eq!(m.inode, inode_number(&img, "/small.txt"));
    assert_eq!(
        big.metadata().unwrap().inode,
        inode_number(&img, "/big.bin")
    );
    assert_eq!(small.image_identity(), (im.dev(), im.ino()));
    assert_eq!(
        m.device,
        big.metadata().unwrap().device,
        "one image, one device identity"
    );
    assert_eq!(m.mtime.sec, TREE_MTIME);
    // ctime: the later of the inode's ctime (mkfs time) and the image's mtime.
    assert!(m.ctime.sec >= 1_700_000_000, "{m:?}");
    assert_eq!(small.metadata().unwrap(), m, "metadata is stable");

    let eng = engine(Mode::Lazy);
    let sh_small = eng
        .open(ImageSource::open(&img, "/small.txt").unwrap())
        .unwrap();
    let sh_big = eng
        .open(ImageSource::open(&img, "/big.bin").unwrap())
        .unwrap();
    assert_eq!(sh_small.staleness().unwrap(), Staleness::Unchanged);

    // The image's own mtime moving counts as a change (ctime).
    set_mtime(&img, 2_000_000_000);
    assert_eq!(
        sh_small.staleness().unwrap(),
        Staleness::Changed(vec![Field::Ctime])
    );
    assert_eq!(small.metadata().unwrap().ctime.sec, 2_000_000_000);

    // The inode changing inside the image.
    debugfs(&img, true, "sif /small.txt size 3");
    let now = small.metadata().unwrap();
    assert_eq!(now.size, 3);
    match sh_small.staleness().unwrap() {
        Staleness::Changed(f) => assert!(f.contains(&Field::Size), "{f:?}"),
        s => panic!("{s:?}"),
    }

    // The path now names another inode: gone.
    debugfs(&img, true, "unlink /big.bin");
    debugfs(&img, true, "ln /odd.bin /big.bin");
    assert_eq!(sh_big.staleness().unwrap(), Staleness::Gone);
    assert_eq!(
        big.metadata().unwrap_err().kind(),
        ErrorKind::NotFound,
        "through the symlink too"
    );
    // The path no longer resolves: gone.
    debugfs(&img, true, "rm /nested/deep/er/file.bin");
    let e = deep.metadata().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("no longer in the image"), "{e}");

    // The image replaced by another file (rename over it): gone.
    let copy = dir.path().join("copy.img");
    fs::copy(&img, &copy).unwrap();
    fs::rename(&copy, &img).unwrap();
    assert_eq!(small.metadata().unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(sh_small.staleness().unwrap(), Staleness::Gone);

    // The image deleted: gone.
    let again = ImageSource::open(&img, "/small.txt").unwrap();
    assert!(again.metadata().is_ok());
    fs::remove_file(&img).unwrap();
    let e = again.metadata().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("was deleted"), "{e}");
}

/// Not a test of behaviour: the access-strategy figures quoted in
/// docs/images.md. Run with
/// `cargo test --release --test image -- --ignored --nocapture access_strategy_figures`.
#[test]
#[ignore]
fn access_strategy_figures() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let size = 256 * MIB;
    {
        let f = File::create(tree.join("data.bin")).unwrap();
        let chunk = pattern(9, 8 * MIB as usize);
        for i in 0..size / (8 * MIB) {
            f.write_all_at(&chunk, i * 8 * MIB).unwrap();
        }
    }
    let img = dir.path().join("a.img");
    mkfs(&["mkfs.ext4", "-b", "4096"], &[], &tree, &img, "400M");
    let host = tree.join("data.bin");
    let chunk = 256 * 1024usize;
    let n = (size / chunk as u64) as usize;
    let order: Vec<u64> = {
        let r = pattern(11, n * 8);
        let mut v: Vec<u64> = (0..n as u64).collect();
        for i in (1..n).rev() {
            let j = (u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap()) % (i as u64 + 1))
                as usize;
            v.swap(i, j);
        }
        v
    };
    type MakeSource<'a> = Box<dyn Fn() -> Box<dyn Source> + 'a>;
    let sources: Vec<(&str, MakeSource)> = vec![
        (
            "host file",
            Box::new(|| Box::new(shadowfd::FileSource::open(&host).unwrap())),
        ),
        (
            "image direct",
            Box::new(|| Box::new(ImageSource::open(&img, "/data.bin").unwrap())),
        ),
        (
            "image thread",
            Box::new(|| {
                Box::new(ImageSource::open_with(&img, "/data.bin", ImageAccess::Thread).unwrap())
            }),
        ),
    ];
    // Same footing for both files: written back, dropped from the page cache,
    // then read back in large reads (so both get the same folio sizes).
    for p in [&img, &host] {
        let f = File::open(p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: posix_fadvise only takes the descriptor and a range.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        let _ = fs::read(p).unwrap();
    }
    // Each figure is the best of ROUNDS runs, the sources interleaved, so
    // that load from elsewhere on the machine hurts all of them alike.
    const ROUNDS: usize = 5;
    let tests = [
        "read_at seq, 1 thread",
        "read_at random, 1 thread",
        "read_at seq, 2 threads",
        "lazy map + touch, seq",
    ];
    let mut best = vec![[0f64; 4]; sources.len()];
    let mut sums = Vec::new();
    for _ in 0..ROUNDS {
        for (k, (_, make)) in sources.iter().enumerate() {
            let src = make();
            for (t_i, seq) in [(0, true), (1, false)] {
                let chunks: Vec<u64> = if seq {
                    (0..n as u64).collect()
                } else {
                    order[..n / 4].to_vec()
                };
                let bytes = (chunks.len() * chunk) as f64;
                let t = Instant::now();
                for c in chunks {
                    let got = read_exact(&*src, c * chunk as u64, chunk);
                    sums.push(got[0]);
                }
                best[k][t_i] = best[k][t_i].max(bytes / t.elapsed().as_secs_f64() / 1e6);
            }
            let t = Instant::now();
            std::thread::scope(|sc| {
                for w in 0..2u64 {
                    let src = &src;
                    sc.spawn(move || {
                        for c in (w..n as u64).step_by(2) {
                            let _ = read_exact(&**src, c * chunk as u64, chunk);
                        }
                    });
                }
            });
            best[k][2] = best[k][2].max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
            let eng = engine(Mode::Lazy);
            let t = Instant::now();
            let sh = eng.open(make()).unwrap();
            let map = sh.map(Share::Private).unwrap();
            let mut sum = 0u8;
            for p in map.chunks(4096) {
                sum = sum.wrapping_add(p[0]);
            }
            best[k][3] = best[k][3].max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
            sums.push(sum);
        }
    }
    std::hint::black_box(&sums);
    println!(
        "{size} bytes, 256 KiB reads, page cache warm; best of {ROUNDS}; MB/s (ratio to host)"
    );
    for (t_i, t) in tests.iter().enumerate() {
        let host = best[0][t_i];
        let row: Vec<String> = sources
            .iter()
            .enumerate()
            .map(|(k, (name, _))| {
                format!("{name}: {:.0} ({:.2}x)", best[k][t_i], best[k][t_i] / host)
            })
            .collect();
        println!("{t:26} {}", row.join("  "));
    }
}

/// A temp dir holding a tree `t` with one file `f` of `len` seeded bytes.
fn one_file_tree(seed: u64, len: usize) -> (TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let data = pattern(seed, len);
    std::fs::write(tree.join("f"), &data).unwrap();
    (dir, tree, data)
}

/// Crafted and damaged images get a clean, quick error: a map that loops back
/// on itself, and an image cut short. 1 KiB blocks with bigalloc read right.
#[test]
fn crafted_maps_and_truncated_images_are_refused_quickly() {
    // 300 KiB with 1 KiB blocks: direct, single and double indirect blocks.
    let (dir, tree, data) = one_file_tree(77, 300 << 10);

    // Double-indirect block whose first pointer points back at itself.
    let img = dir.path().join("loop.img");
    mkfs(&["mkfs.ext2"], &["-b", "1024"], &tree, &img, "8M");
    let stat = debugfs(&img, false, "stat /f");
    let dind: u64 = stat
        .split("(DIND):")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no DIND block in: {stat}"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&(dind as u32).to_le_bytes(), dind * 1024)
            .unwrap();
    }
    let t = std::time::Instant::now();
    let err = cli_fails(&["cat", "/f"], &img);
    assert_has(&err, &["corrupt", "used twice", "e2fsck"]);
    assert!(t.elapsed() < std::time::Duration::from_secs(10));

    // An image shorter than its superblock says.
    let img = dir.path().join("short.img");
    mkfs(&["mkfs.ext4"], &[], &tree, &img, "8M");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let err = cli_fails(&["cat", "/f"], &img);
    assert_has(&err, &["truncated"]);

    // 1 KiB blocks with bigalloc: the descriptor table is at byte 2048
    // although s_first_data_block is 0.
    let img = dir.path().join("bigalloc1k.img");
    mkfs(
        &["mkfs.ext4"],
        &["-b", "1024", "-O", "bigalloc", "-C", "16384"],
        &tree,
        &img,
        "64M",
    );
    let out = shadowfd(&["cat", "/f"], &img);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "bigalloc 1 KiB image read back differently"
    );
}

/// An image that no longer holds a readable filesystem (cut short, as a
/// half-copied image is) reports its shadows as gone, not as an error.
#[test]
fn staleness_says_gone_when_the_image_stops_parsing() {
    let (dir, tree, data) = one_file_tree(78, 64 << 10);
    let img = dir.path().join("i.img");
    mkfs(&["mkfs.ext4"], &[], &tree, &img, "8M");
    let src = shadowfd::source::ImageSource::open(&img, "/f").unwrap();
    let shadow = engine(Mode::Eager).open(src).unwrap();
    assert_eq!(shadow.staleness().unwrap(), shadowfd::Staleness::Unchanged);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    assert_eq!(shadow.staleness().unwrap(), shadowfd::Staleness::Gone);
    // The snapshot keeps its bytes.
    let map = shadow.map(shadowfd::Share::Private).unwrap();
    assert!(map[..] == data[..]);
}

/// Writes `bytes` into the image at byte `at`.
fn poke(img: &Path, at: u64, bytes: &[u8]) {
    File::options()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

/// Reads `n` bytes of the image at byte `at`.
fn peek(img: &Path, at: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    File::open(img).unwrap().read_exact_at(&mut b, at).unwrap();
    b
}

/// Whether `e2fsck -fn` finds the image clean (exit 0).
fn e2fsck_clean(img: &Path) -> bool {
    Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .unwrap()
        .status
        .success()
}

/// Repairs `img` with `e2fsck -fy`, then `shadowfd cat PATH` must give
/// `want` again.
fn repair_then_read(img: &Path, path: &str, want: &[u8]) {
    let _ = Command::new("e2fsck").arg("-fy").arg(img).output().unwrap();
    assert!(e2fsck_clean(img), "e2fsck -fy should have repaired it");
    let out = shadowfd(&["cat", path], img);
    assert!(
        out.status.success() && out.stdout == want,
        "after repair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tree holding `/frag`, 9 islands of data 256 KiB apart (an extent tree
/// with a leaf block), and `/two`, two islands (both extents in the inode).
fn extent_tree() -> (TempDir, PathBuf, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("t");
    fs::create_dir(&tree).unwrap();
    let islands: Vec<(u64, usize)> = (0..9).map(|i| (i * 256 * 1024, 20_000)).collect();
    sparse(&tree.join("frag"), 9 * 256 * 1024, &islands);
    sparse(&tree.join("two"), 40_960, &[(0, 8192), (16_384, 8192)]);
    let frag = fs::read(tree.join("frag")).unwrap();
    let two = fs::read(tree.join("two")).unwrap();
    (dir, tree, frag, two)
}

/// An extent leaf block (not in the inode) whose checksum no longer matches
/// under `metadata_csum` used to be read anyway: a flipped length bit that
/// made an extent unwritten gave exit 0 with zeros where the file has data.
/// e2fsck flags it; so does shadowfd now, naming the inode and the block.
#[test]
fn extent_blocks_failing_their_checksum_are_refused() {
    let (dir, tree, frag, _) = extent_tree();
    let img = dir.path().join("csum.img");
    mkfs(&["mkfs.ext4", "-b", "4096"], &[], &tree, &img, "16M");
    let stat = debugfs(&img, false, "stat /frag");
    assert!(stat.contains("(ETB0):"), "no extent block:\n{stat}");
    let etb: u64 = stat
        .split("(ETB0):")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let ino = inode_number(&img, "/frag");
    let out = shadowfd(&["cat", "/frag"], &img);
    assert!(out.status.success() && out.stdout == frag, "intact image");

    // The first leaf entry's ee_len (bytes 16..18 of the block) gets the
    // unwritten bit: the extent now reads as zeros unless the block's
    // checksum is checked.
    let len_at = etb * 4096 + 12 + 4;
    let len = u16::from_le_bytes(peek(&img, len_at, 2).try_into().unwrap());
    poke(&img, len_at, &(len | 0x8000).to_le_bytes());
    assert!(!e2fsck_clean(&img), "e2fsck should flag the extent block");
    for mode in ["eager", "lazy"] {
        let err = cli_fails(&["cat", "--mode", mode, "/frag"], &img);
        assert_has(
            &err,
            &[
                &format!("inode {ino}"),
                &format!("extent block {etb}"),
                "checksum",
                "Run e2fsck",
            ],
        );
    }
    let e = ImageSource::open(&img, "/frag").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");

    // The checksum covers the inode's generation: a changed generation
    // fails it too, and once e2fsck has rewritten the checksum the file
    // reads exactly again.
    poke(&img, len_at, &len.to_le_bytes());
    assert!(e2fsck_clean(&img));
    debugfs(&img, true, "sif /frag generation 0x5eed1234");
    let err = cli_fails(&["cat", "/frag"], &img);
    assert_has(&err, &[&format!("extent block {etb}"), "checksum"]);
    repair_then_read(&img, "/frag", &frag);
}

/// An unwritten extent that overlaps the next one used to be skipped as a
/// hole: the blocks the next extent maps came out as zeros, exit 0. Extents
/// that overlap, written or not, are refused now.
#[test]
fn overlapping_extents_are_refused_written_or_not() {
    let (dir, tree, _, two) = extent_tree();
    for unwritten in [true, false] {
        // No metadata_csum: the inode can be edited without its checksum.
        let img = dir.path().join(format!("overlap-{unwritten}.img"));
        mkfs(
            &["mkfs.ext4", "-b", "4096"],
            &["-O", "^metadata_csum"],
            &tree,
            &img,
            "16M",
        );
        let out = shadowfd(&["cat", "/two"], &img);
        assert!(out.status.success() && out.stdout == two, "intact image");
        let inode_at = inode_offset(&img, "/two");
        // i_block at 0x28: a 12-byte header, then extents of 12 bytes:
        // (0, 2 blocks) and (4, 2 blocks). The first now covers 0..5.
        let first_len = inode_at + 0x28 + 12 + 4;
        assert_eq!(
            peek(&img, first_len, 2),
            2u16.to_le_bytes(),
            "inode at {inode_at}"
        );
        let len: u16 = if unwritten { 0x8000 + 5 } else { 5 };
        poke(&img, first_len, &len.to_le_bytes());
        assert!(!e2fsck_clean(&img), "e2fsck should flag the overlap");
        let ino = inode_number(&img, "/two");
        let err = cli_fails(&["cat", "/two"], &img);
        assert_has(
            &err,
            &[
                &format!("inode {ino}"),
                "overlaps",
                "logical block 4",
                "Run e2fsck",
            ],
        );
        if unwritten {
            assert_has(&err, &["unwritten extent"]);
        }
    }
}

/// A symlink to a path with a 300-byte component is valid (the kernel
/// resolves it to ENAMETOOLONG); it used to be reported as a corrupt
/// filesystem. Now the path is blamed, and the image called fine.
#[test]
fn a_symlink_with_an_overlong_component_is_not_corruption() {
    let (dir, tree, data) = one_file_tree(79, 5000);
    let long = "a".repeat(300);
    symlink(format!("/{long}"), tree.join("inline-ish")).unwrap();
    symlink(format!("{long}/f"), tree.join("rel")).unwrap();
    symlink("f", tree.join("ok")).unwrap();
    let img = dir.path().join("sym.img");
    mkfs(&["mkfs.ext4"], &[], &tree, &img, "8M");
    assert!(e2fsck_clean(&img));
    for link in ["/inline-ish", "/rel"] {
        let err = cli_fails(&["cat", link], &img);
        assert_has(
            &err,
            &[
                &format!("{}:{link}", img.display()),
                "300 bytes",
                "255",
                "File name too long",
                "The image is fine",
            ],
        );
        assert!(!err.contains("corrupt"), "{err}");
        let e = ImageSource::open(&img, link).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    let out = shadowfd(&["cat", "/ok"], &img);
    assert!(out.status.success() && out.stdout == data);
}

/// One image the fuzz test mutates: its pristine bytes, the files in it
/// and their contents, and the blocks worth mutating.
struct FuzzBase {
    name: &'static str,
    bytes: Vec<u8>,
    block: usize,
    /// Non-zero blocks that hold no file data: superblock, descriptors,
    /// bitmaps, inodes, directories, extent blocks, the journal's header...
    meta_blocks: Vec<usize>,
}

/// `(path, contents)` of the files the fuzz test reads.
fn fuzz_files(tree: &Path) -> Vec<(&'static str, Vec<u8>)> {
    ["/small.txt", "/frag", "/d/nested.bin", "/link"]
        .into_iter()
        .map(|p| (p, fs::read(tree.join(&p[1..])).unwrap()))
        .collect()
}

fn fuzz_base(name: &'static str, mkfs_args: &[&str], tree: &Path, dir: &Path) -> FuzzBase {
    let img = dir.join(format!("{name}.img"));
    mkfs(&["mkfs.ext4"], mkfs_args, tree, &img, "8M");
    let bytes = fs::read(&img).unwrap();
    let block: usize = if mkfs_args.contains(&"1024") {
        1024
    } else {
        4096
    };
    let mut data = std::collections::HashSet::new();
    for p in ["/small.txt", "/frag", "/d/nested.bin"] {
        let stat = debugfs(&img, false, &format!("stat {p}"));
        let etbs: Vec<usize> = stat
            .split("(ETB")
            .skip(1)
            .filter_map(|s| {
                s.split_once("):")?
                    .1
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
            })
            .filter_map(|s| s.parse().ok())
            .collect();
        for b in debugfs(&img, false, &format!("blocks {p}")).split_whitespace() {
            let b: usize = b.parse().unwrap();
            if !etbs.contains(&b) {
                data.insert(b);
            }
        }
    }
    let meta_blocks = (0..bytes.len() / block)
        .filter(|b| !data.contains(b))
        .filter(|&b| bytes[b * block..(b + 1) * block].iter().any(|&x| x != 0))
        .collect();
    FuzzBase {
        name,
        bytes,
        block,
        meta_blocks,
    }
}

/// What reading `path` from the image gave.
enum Got {
    Bytes(Vec<u8>),
    Error(String),
    Panic(String),
}

/// Opens `path` in `img` and reads it whole (at most `cap` bytes) through
/// the library, in-process; a panic is caught and reported.
fn fuzz_read(img: &Path, path: &str, cap: u64) -> Got {
    let r = std::panic::catch_unwind(|| -> Result<Vec<u8>, String> {
        let src = ImageSource::open(img, path).map_err(|e| e.to_string())?;
        let size = src.metadata().map_err(|e| e.to_string())?.size;
        let mut out = vec![0u8; size.min(cap) as usize];
        let mut off = 0;
        while off < out.len() {
            let end = (off + 65_536).min(out.len());
            match src.read_at(&mut out[off..end], off as u64) {
                Ok(0) => return Err(format!("read_at: end of data at {off} of {size}")),
                Ok(n) => off += n,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(out)
    });
    match r {
        Ok(Ok(b)) => Got::Bytes(b),
        Ok(Err(e)) => Got::Error(e),
        Err(p) => Got::Panic(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    }
}

/// What `debugfs -R 'cat PATH'` prints, at most `cap` bytes.
fn debugfs_cat(img: &Path, path: &str, cap: usize) -> Vec<u8> {
    use std::io::Read;
    let mut child = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .take(cap as u64)
        .read_to_end(&mut out)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    out
}

/// Seeded mutations of real images (bytes flipped or overwritten in their
/// metadata blocks), each read back through the library. Every case must
/// end in one of: the original bytes; a clean error (a message, no panic);
/// or, when e2fsck -fn finds nothing wrong with the mutated image, exactly
/// what debugfs reads. `FUZZ_SEED` picks another sequence, `FUZZ_CASES`
/// another count (default 400).
#[test]
fn fuzzed_images_give_exact_bytes_a_clean_error_or_what_debugfs_reads() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x12_2024);
    let cases: usize = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("t");
    fs::create_dir_all(tree.join("d")).unwrap();
    fs::write(
        tree.join("small.txt"),
        b"a small file inside a fuzzed image\n",
    )
    .unwrap();
    let islands: Vec<(u64, usize)> = (0..9).map(|i| (i * 64 * 1024 + 100, 5000)).collect();
    sparse(&tree.join("frag"), 9 * 64 * 1024, &islands);
    fs::write(tree.join("d/nested.bin"), pattern(9, 70_000)).unwrap();
    symlink("d/nested.bin", tree.join("link")).unwrap();
    let files = fuzz_files(&tree);
    let bases = [
        fuzz_base("ext4-4k", &["-b", "4096"], &tree, dir.path()),
        fuzz_base("ext4-1k", &["-b", "1024"], &tree, dir.path()),
    ];
    const CAP: u64 = 64 << 20;

    let (tx, rx) = std::sync::mpsc::channel();
    let work = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let mut rng = seed;
        let mut next = move || {
            rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut tally = [0usize; 3]; // exact, clean error, agrees with debugfs
        let mut failures = Vec::new();
        let started = std::time::Instant::now();
        for case in 0..cases {
            let base = &bases[case % bases.len()];
            let mut bytes = base.bytes.clone();
            let mut what = Vec::new();
            for _ in 0..1 + next() % 3 {
                let b = base.meta_blocks[(next() % base.meta_blocks.len() as u64) as usize];
                // Headers and early entries matter most: half the hits land
                // in a block's first 256 bytes.
                let span = if next() % 2 == 0 { 256 } else { base.block };
                let at = b * base.block + (next() % span as u64) as usize;
                let old = bytes[at];
                bytes[at] = if next() % 2 == 0 {
                    old ^ (1 << (next() % 8))
                } else {
                    next() as u8
                };
                what.push(format!(
                    "byte {at} (block {b}) {old:#04x}->{:#04x}",
                    bytes[at]
                ));
            }
            let img = work.join(format!("case-{}.img", base.name));
            fs::write(&img, &bytes).unwrap();
            let mut fsck: Option<bool> = None;
            for (path, want) in &files {
                let verdict = match fuzz_read(&img, path, CAP) {
                    Got::Bytes(b) if b == *want => {
                        tally[0] += 1;
                        continue;
                    }
                    Got::Error(e) if !e.trim().is_empty() => {
                        tally[1] += 1;
                        continue;
                    }
                    Got::Error(_) => "an empty error message".to_string(),
                    Got::Panic(p) => format!("a panic: {p}"),
                    Got::Bytes(b) => {
                        let clean = *fsck.get_or_insert_with(|| e2fsck_clean(&img));
                        if clean && debugfs_cat(&img, path, CAP as usize) == b {
                            tally[2] += 1;
                            continue;
                        }
                        let at = b.iter().zip(want).position(|(x, y)| x != y);
                        format!(
                            "{} bytes differing from the file at {at:?} (file {} bytes); \
                             e2fsck -fn {}",
                            b.len(),
                            want.len(),
                            if clean {
                                "finds nothing, but debugfs reads otherwise"
                            } else {
                                "finds errors"
                            }
                        )
                    }
                };
                let keep = work.join(format!("failed-{case}.img"));
                let _ = fs::copy(&img, &keep);
                failures.push(format!(
                    "case {case} ({}; {}): {path}: {verdict}",
                    base.name,
                    what.join(", ")
                ));
            }
        }
        eprintln!(
            "fuzz seed {seed:#x}: {cases} cases ({} reads) in {:.1} s: {} exact, {} clean \
             errors, {} equal to debugfs on an image e2fsck finds clean, {} failures",
            cases * files.len(),
            started.elapsed().as_secs_f64(),
            tally[0],
            tally[1],
            tally[2],
            failures.len()
        );
        let _ = tx.send(failures);
    });
    let failures = rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("the fuzz loop hung (no result after 300 s)");
    assert!(
        failures.is_empty(),
        "seed {seed:#x}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Under `metadata_csum` shadowfd's own reader verifies every inode it
/// reads, as ext4-view and the kernel do: an inode whose bytes no longer
/// match its checksum (here its mtime, which changes no size or block) is
/// refused naming the inode and the checksum, where e2fsck flags it too;
/// the files around it still read exactly, and once e2fsck has repaired
/// it the file reads again.
#[test]
fn inodes_failing_their_checksum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("t");
    fs::create_dir(&tree).unwrap();
    let a: Vec<u8> = (0..5000u32).map(|i| (i * 131 % 251) as u8).collect();
    let b: Vec<u8> = (0..7000u32).map(|i| (i * 17 % 253) as u8).collect();
    fs::write(tree.join("a"), &a).unwrap();
    fs::write(tree.join("b"), &b).unwrap();
    let img = dir.path().join("csum.img");
    mkfs(&["mkfs.ext4", "-b", "4096"], &[], &tree, &img, "16M");
    let out = shadowfd(&["cat", "/a"], &img);
    assert!(out.status.success() && out.stdout == a, "intact image");
    let inode_at = inode_offset(&img, "/a");
    let ino = inode_number(&img, "/a");
    // i_mtime at 0x10: one bit flipped.
    let mtime = peek(&img, inode_at + 0x10, 1)[0];
    poke(&img, inode_at + 0x10, &[mtime ^ 0x40]);
    assert!(!e2fsck_clean(&img), "e2fsck should flag the inode");
    for mode in ["eager", "lazy"] {
        let err = cli_fails(&["cat", "--mode", mode, "/a"], &img);
        assert_has(&err, &[&format!("inode {ino}"), "checksum", "Run e2fsck"]);
    }
    let e = ImageSource::open(&img, "/a").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    let out = shadowfd(&["cat", "/b"], &img);
    assert!(out.status.success() && out.stdout == b, "the other file");
    repair_then_read(&img, "/a", &a);
}

/// Where the inode of `path` lies in the image file (4 KiB blocks), as
/// `debugfs`'s `imap` says.
fn inode_offset(img: &Path, path: &str) -> u64 {
    let imap = debugfs(img, false, &format!("imap {path}"));
    let num = |after: &str| -> u64 {
        let s = imap.split(after).nth(1).unwrap().trim_start();
        let s = s
            .split(|c: char| c.is_whitespace() || c == ',')
            .next()
            .unwrap();
        match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => s.parse().unwrap(),
        }
    };
    num("located at block") * 4096 + num("offset")
}
