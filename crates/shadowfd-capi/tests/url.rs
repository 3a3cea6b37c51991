//! `shadowfd_open_url` from C, against a SeaweedFS gateway started for this
//! test binary (the object tests' support, tests/object/weed.rs).

mod common;
#[allow(dead_code)]
#[path = "../../../tests/object/weed.rs"]
mod weed;

use common::{compile_c, modes, pattern, root, run_ok};

#[test]
fn open_url_maps_an_object_byte_exact_and_names_the_fix_for_bad_urls() {
    let w = match weed::Weed::start() {
        Ok(w) => w,
        Err(e) if weed::required() => panic!("SeaweedFS is required here (CI) but {e}"),
        Err(e) => return eprintln!("SKIP: {e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("url_test");
    compile_c(
        &[root().join("crates/shadowfd-capi/tests/c/url_test.c")],
        &exe,
        &[],
    );
    let data = pattern(3 << 20, 9);
    let file = dir.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    w.put("capi/data.bin", &data);
    let url = format!("s3://{}/capi/data.bin", weed::BUCKET);
    let missing = format!("s3://{}/capi/missing.bin", weed::BUCKET);
    for mode in modes() {
        // The C program reads the AWS variables from its environment.
        for (k, v) in w.env(w.s3_port) {
            // SAFETY: this binary's only test, on its only thread that
            // reads the environment, before the child is spawned.
            unsafe { std::env::set_var(k, v) };
        }
        run_ok(&exe, &[&url, file.to_str().unwrap(), mode, &missing]);
    }
}
