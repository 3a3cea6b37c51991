//! Python ctypes + numpy use the same libshadowfd.so: numpy.frombuffer over
//! a lazy mapping gives the sums numpy.fromfile gives of the source.

mod common;

use common::{lib_dir, modes, pattern, root, run_ok};
use std::process::Command;

/// A Python 3 with numpy: `python3` on PATH, else the system's
/// /usr/bin/python3 (where Debian's python3-numpy goes). .ci/run installs
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
         `apt-get install python3-numpy` (.ci/run does)"
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
