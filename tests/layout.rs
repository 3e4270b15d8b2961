//! The source tree keeps the shape the README describes: data flows one way through the
//! daemon's rooms (source -> model -> compiler -> entries -> datapath -> metrics, driven by the
//! daemon), each file is one concern of readable size, and functions read as the steps they do.
//! These checks read the sources as text (rustfmt-formatted: `cargo xtask test` checks that
//! first), so a change that breaks the shape fails here, not in review.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest function allowed (lines from `fn` to its closing brace), outside the eBPF parser.
const MAX_FN_LINES: usize = 120;
/// Longest file allowed, not counting its `#[cfg(test)]` module; test files are exempt.
const MAX_FILE_LINES: usize = 600;

/// What each room of netpol-daemon may import (`crate::<room>`), besides itself. The model is
/// the shared vocabulary; every other room sees only the rooms upstream of it.
fn allowed_imports() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("model", &[][..]),
        ("source", &["model"][..]),
        ("compiler", &["model"][..]),
        ("entries", &["compiler", "model"][..]),
        ("datapath", &["entries", "compiler", "model"][..]),
        ("metrics", &["datapath", "entries", "compiler", "model"][..]),
        ("daemon", &["source", "model", "compiler", "entries", "datapath", "metrics"][..]),
        ("cli", &["daemon", "source", "model", "compiler", "entries", "datapath", "metrics"][..]),
    ])
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's lines up to its test module (by convention the last item of a file).
fn non_test_lines(text: &str) -> Vec<&str> {
    text.lines().take_while(|l| l.trim() != "#[cfg(test)]").collect()
}

fn is_test_file(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "tests.rs") || p.components().any(|c| c.as_os_str() == "tests")
}

/// The room of a file of netpol-daemon/src: its first path component (`compiler/build.rs` ->
/// `compiler`, `entries.rs` -> `entries`).
fn room_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("non-empty").as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// Every room named by a `crate::<room>` path in `lines`.
fn rooms_referenced(lines: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in lines {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = tail;
        }
        // `use crate::{a, b}` groups.
        if let Some(group) = code.trim_start().strip_prefix("use crate::{") {
            for item in group.split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != "self" {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn rooms_import_only_from_upstream() {
    let src = repo().join("netpol-daemon/src");
    let allowed = allowed_imports();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut faults = Vec::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let room = room_of(&src, f);
        // The library root, the binaries and the test kit may use every room.
        if ["lib", "main", "bin", "testkit"].contains(&room.as_str()) {
            continue;
        }
        let Some(ok) = allowed.get(room.as_str()) else {
            faults.push(format!("{}: room `{room}` is not in the layering table", f.display()));
            continue;
        };
        let text = std::fs::read_to_string(f).expect("readable");
        for used in rooms_referenced(&non_test_lines(&text)) {
            if used != room && !ok.contains(&used.as_str()) {
                faults.push(format!("{}: `{room}` imports `crate::{used}` (allowed: {ok:?})", f.display()));
            }
        }
    }
    assert!(faults.is_empty(), "imports against the flow:\n{}", faults.join("\n"));
}

#[test]
fn the_layering_table_has_no_cycle() {
    // Each room may only name rooms listed before it in this order: a topological order exists.
    let order = ["model", "source", "compiler", "entries", "datapath", "metrics", "daemon", "cli"];
    let allowed = allowed_imports();
    for (i, room) in order.iter().enumerate() {
        for dep in allowed[room] {
            let j = order.iter().position(|r| r == dep).expect("known room");
            assert!(j < i, "{room} may import {dep}, which is not upstream of it");
        }
    }
    assert_eq!(allowed.len(), order.len());
}

#[test]
fn files_stay_one_concern_in_size() {
    let mut files = Vec::new();
    for dir in ["netpol-daemon/src", "netpol-common/src", "netpol-ebpf/src", "xtask/src"] {
        rust_files(&repo().join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| !is_test_file(f))
        .filter_map(|f| {
            let n = non_test_lines(&std::fs::read_to_string(f).expect("readable")).len();
            (n > MAX_FILE_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_FILE_LINES} lines (tests excepted):\n{}", long.join("\n"));
}

/// Functions of `text` longer than `max` lines: (line, name, length). A function runs from its
/// `fn` line to the first line that is its closing brace at the same indentation.
fn long_functions(text: &str, max: usize) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let Some(at) = body.find("fn ") else { continue };
        let head = &body[..at];
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "const" | "async" | "unsafe" | "extern" | "\"C\"") || w.starts_with("pub("));
        if !is_fn || body.ends_with(';') || body.ends_with('}') {
            continue;
        }
        let name: String = body[at + 3..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let closing = format!("{indent}}}");
        let Some(end) = lines[i + 1..].iter().position(|l| *l == closing) else { continue };
        let len = end + 2;
        if len > max {
            out.push((i + 1, name, len));
        }
    }
    out
}

#[test]
fn functions_read_as_steps() {
    let mut files = Vec::new();
    for dir in ["netpol-daemon/src", "netpol-common/src", "netpol-ebpf/src", "xtask/src", "tests"] {
        rust_files(&repo().join(dir), &mut files);
    }
    let mut faults = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable");
        for (line, name, len) in long_functions(&text, MAX_FN_LINES) {
            // The eBPF packet parser is one bounded walk the verifier checks as a whole.
            if f.ends_with("netpol-ebpf/src/parse.rs") && name == "parse" {
                continue;
            }
            faults.push(format!("{}:{line}: fn {name} is {len} lines", f.display()));
        }
    }
    assert!(faults.is_empty(), "functions over {MAX_FN_LINES} lines:\n{}", faults.join("\n"));
}

#[test]
fn the_checks_see_what_they_check() {
    // The instruments themselves: a long function, an import against the flow.
    let long = format!("fn big() {{\n{}}}\n    pub fn small() {{\n        x\n    }}\n", "    a;\n".repeat(MAX_FN_LINES));
    assert_eq!(long_functions(&long, MAX_FN_LINES), vec![(1, "big".to_string(), MAX_FN_LINES + 2)]);
    let refs = rooms_referenced(&["use crate::{model::Cluster, datapath};", "let x = crate::compiler::f(); // crate::daemon"]);
    assert_eq!(refs, ["compiler", "datapath", "model"].iter().map(|s| s.to_string()).collect());
}
