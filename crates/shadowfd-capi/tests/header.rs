//! include/shadowfd.h is what cbindgen makes of the sources, and compiles
//! cleanly as C99 and as C++.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generate() -> String {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(crate_dir).join("cbindgen.toml"))
        .expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn header_is_fresh() {
    let path = root().join("include/shadowfd.h");
    let fresh = generate();
    if std::env::var_os("SHADOWFD_BLESS_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "include/shadowfd.h differs from what cbindgen makes of crates/shadowfd-capi/src; \
         regenerate it with `SHADOWFD_BLESS_HEADER=1 cargo test -p shadowfd-capi --test header` \
         and commit it"
    );
}

fn compile_header(compiler: &str, args: &[&str], ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join(format!("h.{ext}"));
    std::fs::write(
        &src,
        "#include <shadowfd.h>\n#include <shadowfd.h>\nint main(void) { return shadowfd_last_error() != 0; }\n",
    )
    .unwrap();
    let inc = root().join("include");
    let out = Command::new(compiler)
        .args(args)
        .arg("-I")
        .arg(&inc)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(dir.path().join("h.o"))
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        out.status.success(),
        "{compiler} {args:?} on shadowfd.h failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_c99() {
    compile_header(
        "cc",
        &["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"],
        "c",
    );
}

#[test]
fn header_compiles_as_cxx() {
    compile_header(
        "c++",
        &["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"],
        "cc",
    );
}
