//! Python ctypes + numpy use the same libshadowfd.so: numpy.frombuffer over
//! a lazy mapping gives the sums numpy.fromfile gives of the source.

mod common;

use common::{lib_dir, modes, pattern, root, run_ok};
use std::process::Command;

/// A Python 3 with numpy: `python3` on PATH, else the system's
/// /usr/bin/python3 (where Debian's python3-numpy goes). scripts/test installs
/// numpy; a machine without it fails here instead of skipping.
fn python_with_numpy() -> String {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return py.to_string();
        }
    }
    panic!(
        "no python3 with numpy found (tried python3 and /usr/bin/python3); install it with \
         `apt-get install python3-numpy` (scripts/test does, as root)"
    );
}

#[test]
fn numpy_over_a_mapping_matches_numpy_fromfile() {
    let py = python_with_numpy();
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB and a bit, so the mapping ends mid-page.
    let file = dir.path().join("data.bin");
    std::fs::write(&file, pattern((8 << 20) + 3000, 11)).unwrap();
    let so = lib_dir().join("libshadowfd.so");
    let script = root().join("crates/shadowfd-capi/tests/py/numpy_sums.py");
    for mode in modes() {
        run_ok(
            std::path::Path::new(&py),
            &[
                script.to_str().unwrap(),
                so.to_str().unwrap(),
                file.to_str().unwrap(),
                mode,
            ],
        );
    }
}

/// The example of docs/c-api.md, "Python callbacks and the GIL", taken from
/// the page and run as it stands: a ctypes callback source read through a
/// lazy mapping by numpy after `shadowfd_fill`, and through
/// `ctypes.memmove`, without deadlocking on the GIL. A hang (the deadlock
/// the page warns of) fails after 120 s instead of waiting for ever.
#[test]
fn the_gil_example_in_c_api_md_runs() {
    let py = python_with_numpy();
    let page = std::fs::read_to_string(root().join("docs/c-api.md")).unwrap();
    let section = page
        .split("### Python callbacks and the GIL")
        .nth(1)
        .expect("docs/c-api.md has a \"Python callbacks and the GIL\" section");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the section has a ```python example");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("example.py");
    std::fs::write(&script, code).unwrap();
    let so = lib_dir().join("libshadowfd.so");
    for mode in modes() {
        let mut child = Command::new(&py)
            .arg(&script)
            .arg(&so)
            .arg(mode)
            .env_remove("SHADOWFD_MODE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > std::time::Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{mode}: the example of docs/c-api.md hung for 120 s (the GIL deadlock?)");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{mode}: {}\n{out}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            out.contains(&format!("ok: {mode}: 4194304 bytes from a Python callback")),
            "{mode}: {out}"
        );
    }
}
