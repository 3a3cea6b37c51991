//! examples/c builds with warnings as errors, against the shared and the
//! static library, and runs.

mod common;

use common::{compile_c, lib_dir, modes, root, run_ok};
use std::process::Command;

fn example(name: &str) -> std::path::PathBuf {
    root().join("examples/c").join(format!("{name}.c"))
}

#[test]
fn callback_example_runs_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("callback");
    compile_c(&[example("callback")], &exe, &[]);
    for mode in modes() {
        let out = Command::new(&exe)
            .env("SHADOWFD_MODE", mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("mode: {mode}")), "{text}");
        assert!(
            text.contains("(matches)") && text.contains("release:"),
            "{text}"
        );
    }
}

#[test]
fn callback_example_links_statically() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("callback-static");
    let out = Command::new(common::cc())
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(example("callback"))
        .arg("-o")
        .arg(&exe)
        .arg(lib_dir().join("libshadowfd.a"))
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing from libshadowfd.so is needed at run time.
    let ldd = Command::new("ldd").arg(&exe).output().unwrap();
    assert!(!String::from_utf8_lossy(&ldd.stdout).contains("libshadowfd"));
    let o = run_ok(&exe, &["100000"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("(matches)"));
}

#[test]
fn sandbox_example_maps_elf_segments_fixed_and_registers_them() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("sandbox");
    compile_c(&[example("sandbox")], &exe, &[]);
    let so = lib_dir().join("libshadowfd.so");
    for elf in [None, Some(so.to_str().unwrap())] {
        let args: Vec<&str> = elf.into_iter().collect();
        let o = run_ok(&exe, &args);
        let text = String::from_utf8_lossy(&o.stdout);
        let segments = text.matches("bytes match").count();
        assert!(segments >= 2, "{text}");
        assert!(!text.contains("DIFFER"), "{text}");
    }
}
