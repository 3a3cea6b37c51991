//! The library's layering, checked against its source: the single source of
//! truth for which module may import which (docs/design.md shows the table
//! below, and this test checks that it does).
//!
//! Every path in `crates/shadowfd/src` that starts with `crate::` or climbs
//! out of its top-level module with `super::` is resolved to the top-level
//! module it names (a name the crate root re-exports, such as `crate::Error`,
//! counts as the module it comes from). A module may use only modules on a
//! lower layer, never one on its own layer or above. Within one top-level
//! module, its files may not import each other in a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first, with the top-level modules on each. Every
/// module of the crate must be listed. The crate root's own items
/// (`page_size`) may be used from anywhere.
const LAYERS: &[(&str, &[&str])] = &[
    ("leaf", &["codes", "file_kind", "object_error"]),
    ("error", &["error", "stats"]),
    ("raw", &["sys", "harden"]),
    ("configuration", &["config"]),
    ("input", &["source", "workset"]),
    ("fault service", &["fault"]),
    ("shadows", &["eager", "shadow"]),
    ("engine", &["engine"]),
    ("other processes", &["remote"]),
];

/// The table as docs/design.md must show it, top layer first.
fn rendered() -> String {
    let mut out = String::from("```\n");
    for (i, (name, modules)) in LAYERS.iter().enumerate().rev() {
        out += &format!("{i}  {name:<16} {}\n", modules.join(", "));
    }
    out += "```\n";
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `fault/service.rs` is `[fault, service]`,
/// `fault/mod.rs` is `[fault]`, `lib.rs` is `[]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The source with comments blanked out (line, doc and block comments;
/// string literals are left as they are).
fn strip_comments(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Every path the code names from `start`: for `crate::a::B` that is
/// `[a, B]`; a group `crate::{a::B, c}` gives one path per member.
fn paths_after(code: &str, start: usize) -> Vec<Vec<String>> {
    let b = code.as_bytes();
    let mut i = start;
    let mut path = Vec::new();
    loop {
        if i < b.len() && b[i] == b'{' {
            // A group: split its members at top-level commas.
            let mut depth = 0;
            let mut j = i;
            let mut member_start = i + 1;
            let mut out = Vec::new();
            while j < b.len() {
                match b[j] {
                    b'{' => depth += 1,
                    b'}' | b',' if depth == 1 => {
                        let member = code[member_start..j].trim();
                        if !member.is_empty() {
                            let off = member_start + code[member_start..j].find(member).unwrap();
                            for mut p in paths_after(code, off) {
                                let mut full = path.clone();
                                full.append(&mut p);
                                out.push(full);
                            }
                        }
                        member_start = j + 1;
                        if b[j] == b'}' {
                            break;
                        }
                    }
                    b'}' => depth -= 1,
                    _ => {}
                }
                j += 1;
            }
            return out;
        }
        let s = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if s == i {
            return vec![path];
        }
        path.push(code[s..i].to_string());
        if code[i..].starts_with("::") {
            i += 2;
        } else {
            return vec![path];
        }
    }
}

/// The crate-absolute paths a file names: `crate::…`, and `super::…`
/// resolved against the file's module path. `self::` stays inside.
fn absolute_paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    for kw in ["crate::", "super::"] {
        for (at, _) in code.match_indices(kw) {
            if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$' || b[at - 1] == b':') {
                continue; // `$crate::`, or the tail of a longer path
            }
            if code[..at].trim_end().ends_with("in") && code[..at].trim_end().ends_with("(in") {
                continue; // `pub(in crate::x)`: visibility, not a dependency
            }
            let (base, rest): (Vec<String>, usize) = if kw == "crate::" {
                (Vec::new(), at + kw.len())
            } else {
                let mut base = module.to_vec();
                let mut i = at;
                while code[i..].starts_with("super::") {
                    base.pop();
                    i += "super::".len();
                }
                (base, i)
            };
            for p in paths_after(code, rest) {
                let mut full = base.clone();
                full.extend(p);
                out.push(full);
            }
        }
    }
    out
}

/// Names the crate root re-exports (`pub use engine::{Engine, …}`), mapped to
/// the module they come from.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (at, _) in lib.match_indices("pub use ") {
        let start = at + "pub use ".len();
        for p in paths_after(lib, start) {
            if let (Some(first), Some(last)) = (p.first(), p.last()) {
                map.insert(last.clone(), first.clone());
            }
        }
    }
    map
}

struct Crate {
    /// file (relative to src) -> (module path, absolute paths it names)
    files: BTreeMap<PathBuf, (Vec<String>, Vec<Vec<String>>)>,
    reexports: BTreeMap<String, String>,
    modules: BTreeSet<String>,
}

fn load() -> Crate {
    let src = src_dir();
    let mut all = Vec::new();
    rust_files(&src, &mut all);
    let mut files = BTreeMap::new();
    let mut modules = BTreeSet::new();
    for f in all {
        let rel = f.strip_prefix(&src).unwrap().to_path_buf();
        let module = module_path(&rel);
        if let Some(top) = module.first() {
            modules.insert(top.clone());
        }
        let code = strip_comments(&std::fs::read_to_string(&f).unwrap());
        let paths = absolute_paths(&code, &module);
        files.insert(rel, (module, paths));
    }
    let lib = strip_comments(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    Crate {
        files,
        reexports: root_reexports(&lib),
        modules,
    }
}

/// The top-level module a crate-absolute path lands in, or `None` for an
/// item of the crate root itself.
fn target_module(c: &Crate, path: &[String]) -> Option<String> {
    let first = path.first()?;
    if c.modules.contains(first) {
        Some(first.clone())
    } else {
        c.reexports.get(first).cloned()
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// One line (file, from, to, the path) for every import that breaks the
/// layering.
fn violations(c: &Crate) -> Vec<String> {
    let mut bad = Vec::new();
    for (file, (module, paths)) in &c.files {
        let Some(from) = module.first() else {
            continue; // lib.rs declares and re-exports every module
        };
        let from_layer = layer_of(from).unwrap();
        for p in paths {
            let Some(to) = target_module(c, p) else {
                continue;
            };
            if &to == from {
                continue;
            }
            let to_layer = layer_of(&to).unwrap();
            if to_layer >= from_layer {
                bad.push(format!(
                    "{}: `{from}` (layer {from_layer}, {}) uses `crate::{}` (`{to}`, layer {to_layer}, {})",
                    file.display(),
                    LAYERS[from_layer].0,
                    p.join("::"),
                    LAYERS[to_layer].0,
                ));
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

#[test]
fn every_module_is_on_a_layer() {
    let c = load();
    let missing: Vec<_> = c.modules.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "modules not in LAYERS (crates/shadowfd/tests/layering.rs): {missing:?}; \
         put each on a layer, and update the table in docs/design.md"
    );
    for (_, ms) in LAYERS {
        for m in *ms {
            assert!(
                c.modules.contains(*m),
                "LAYERS names `{m}`, which is not a module of the crate"
            );
        }
    }
}

#[test]
fn imports_go_only_down() {
    let c = load();
    let bad = violations(&c);
    assert!(
        bad.is_empty(),
        "imports against the layering (each module may use only lower layers; \
         crates/shadowfd/tests/layering.rs, docs/design.md):\n{}",
        bad.join("\n")
    );
}

/// The files of one top-level module as a graph (file module path -> the
/// sibling module paths it names), searched for a cycle.
#[test]
fn files_within_a_module_do_not_import_each_other_in_a_cycle() {
    let c = load();
    let known: BTreeSet<Vec<String>> = c.files.values().map(|(m, _)| m.clone()).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, paths) in c.files.values() {
        if module.len() < 2 {
            continue; // a folder's mod.rs declares its files; top-level files have no siblings
        }
        for p in paths {
            // The longest known module the path starts with.
            let target = (1..=p.len())
                .rev()
                .map(|n| p[..n].to_vec())
                .find(|m| known.contains(m));
            let Some(t) = target else { continue };
            let sibling = t.len() >= 2
                && t.first() == module.first()
                && !module.starts_with(&t)
                && !t.starts_with(module);
            if sibling {
                edges.entry(module.clone()).or_default().insert(t);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        match state.get(n) {
            Some(1) => {
                let at = stack.iter().position(|s| s == n).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(n.clone());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if let Some(cycle) = visit(n, &edges, &mut state, &mut Vec::new()) {
            let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            panic!(
                "files import each other in a cycle: {}; one of them should own what both use",
                names.join(" -> ")
            );
        }
    }
}

#[test]
fn design_md_shows_this_table() {
    let design = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/design.md");
    let text = std::fs::read_to_string(&design).unwrap();
    let want = rendered();
    assert!(
        text.contains(&want),
        "docs/design.md must show the layering this test checks; put this block in its \
         \"Layers\" section:\n{want}"
    );
}

/// The checker itself: a back edge is found, a downward one is not, and
/// groups, `super::` and root re-exports are resolved.
#[test]
fn the_checker_finds_back_edges() {
    let module = vec!["sys".to_string(), "uffd".to_string()];
    let code = "use crate::{error::Error, shadow::Shadow as S};\n\
                use super::super::remote::wire;\n\
                fn f() -> crate::Engine { crate::page_size(); todo!() }\n\
                pub(in crate::sys) fn g() {}\n";
    let paths = absolute_paths(&strip_comments(code), &module);
    let lib = "pub use engine::{Engine, OpenOptions};\npub fn page_size() {}";
    let mut files = BTreeMap::new();
    files.insert(PathBuf::from("sys/uffd.rs"), (module, paths));
    let c = Crate {
        files,
        reexports: root_reexports(lib),
        modules: ["sys", "error", "shadow", "remote", "engine"]
            .into_iter()
            .map(String::from)
            .collect(),
    };
    let bad = violations(&c);
    let named: Vec<bool> = [
        "crate::shadow::Shadow",
        "crate::remote::wire",
        "crate::Engine",
    ]
    .iter()
    .map(|p| bad.iter().any(|b| b.contains(&format!("`{p}`"))))
    .collect();
    assert_eq!(named, [true, true, true], "{bad:#?}");
    assert_eq!(bad.len(), 3, "only the three upward uses: {bad:#?}");
}
