//! The C ABI from C: tests/c/abi_test.c compiled with the system `cc`
//! against include/shadowfd.h and libshadowfd.so, one case per test.

mod common;

use common::{compile_c, modes, pattern, root, run_ok};
use std::path::PathBuf;
use std::sync::OnceLock;

const PAGE: usize = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    /// 13 pages and a bit, ending mid-page.
    file: PathBuf,
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("abi_test");
        let src = root().join("crates/shadowfd-capi/tests/c/abi_test.c");
        compile_c(&[src], &exe, &[]);
        let file = dir.path().join("data.bin");
        std::fs::write(&file, pattern(13 * PAGE + 1234, 7)).unwrap();
        Fixture {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            exe,
            file,
        }
    })
}

fn case(name: &str, mode: &str) {
    let f = fixture();
    let file = f.file.to_str().unwrap();
    let dir = f.dir.to_str().unwrap();
    run_ok(&f.exe, &[name, file, mode, dir]);
}

fn each_mode(name: &str) {
    for mode in modes() {
        case(name, mode);
    }
}

fn lazy_only(name: &str) {
    if modes().contains(&"lazy") {
        case(name, "lazy");
    }
}

#[test]
fn workset_config_records_then_replays() {
    each_mode("workset");
}

#[test]
fn callback_source_matches_the_file() {
    each_mode("callback");
}

#[test]
fn callback_eio_is_sigbus_at_exactly_that_page() {
    lazy_only("eio");
}

#[test]
fn callback_early_end_is_sigbus_at_exactly_that_page() {
    lazy_only("eof");
}

#[test]
fn callback_eio_fails_an_eager_open() {
    case("eio-eager", "eager");
}

#[test]
fn serialized_callback_is_never_entered_twice_at_once() {
    lazy_only("serialized");
}

#[test]
fn maps_from_several_threads_with_their_own_last_error() {
    each_mode("threads");
}

#[test]
fn offset_len_and_fixed_maps() {
    each_mode("maps");
}

#[test]
fn register_a_caller_made_mapping() {
    each_mode("register");
}

#[test]
fn fill_then_read() {
    each_mode("fill-read");
}

#[test]
fn materialize_then_plain_mmap_in_a_child() {
    each_mode("materialize");
}

#[test]
fn error_paths_give_negative_errno_and_a_message() {
    each_mode("errors");
}
