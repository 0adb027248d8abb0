//! The crate's dependencies run one way: model <- exit <- generate <- pipeline <- (eval,
//! train, serve) <- cli, with `task`, `data` and the utilities at the bottom. This walks
//! `src/`, reads every `crate::<module>` (and `super::` path) outside comments, and fails
//! naming file:line for an edge the table below does not allow, and for an import cycle
//! between the files of one module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may use. Anything not listed is refused, so
/// a new module has to be placed here.
const ALLOWED: &[(&str, &[&str])] = &[
    // The bottom: the network, the exit rules and where the defaults live.
    ("model", &[]),
    ("exit", &[]),
    ("paths", &[]),
    // What a training run records for the other commands (the loss, train_state.json).
    ("run_meta", &[]),
    // Tasks: prompts, labels, thresholds per task (thresholds are MuE exit policies).
    ("task", &["exit"]),
    // Benchmark, TSV, images, tokenizer and the prompts' token layout.
    ("data", &["task"]),
    ("generate", &["model", "exit"]),
    ("pipeline", &["model", "exit", "generate", "data", "task"]),
    (
        "eval",
        &[
            "model", "exit", "generate", "pipeline", "data", "task", "paths", "run_meta",
        ],
    ),
    (
        "train",
        &[
            "model", "exit", "generate", "pipeline", "data", "task", "paths", "run_meta",
        ],
    ),
    (
        "serve",
        &[
            "model", "exit", "generate", "pipeline", "data", "task", "paths",
        ],
    ),
    (
        "cli",
        &[
            "model", "exit", "generate", "pipeline", "data", "task", "paths", "eval", "train",
            "serve",
        ],
    ),
];

/// Edges that break the table today, each removed by another part of this issue.
const KNOWN_EDGES: &[(&str, &str)] = &[];

/// File cycles inside a module that exist today, each removed by another part of this issue.
/// (`data/benchmark.rs <-> data/tsv.rs` went with the label enum's move to `task`.)
const KNOWN_CYCLES: &[(&str, &str)] = &[];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under `src/`: `src/eval/report.rs` -> [eval, report],
/// `src/eval/mod.rs` -> [eval], `src/task.rs` -> [task].
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a line without its `//` comment (doc comments included).
fn code(line: &str) -> &str {
    line.find("//").map_or(line, |i| &line[..i])
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every path a file names: (line, absolute module path). `crate::a::b` gives [a, b];
/// `crate::{a::x, b}` gives [a, x] and [b]; `super::x` is resolved against the file's
/// module (only before `#[cfg(test)]`, where `super` would name the file itself).
fn references(text: &str, module: &[String]) -> Vec<(usize, Vec<String>)> {
    references_split(text, module)
        .into_iter()
        .map(|(l, p, _)| (l, p))
        .collect()
}

/// [`references`], each with whether it is in the file's tests (after `#[cfg(test)]`).
fn references_split(text: &str, module: &[String]) -> Vec<(usize, Vec<String>, bool)> {
    let mut out = Vec::new();
    let mut in_tests = false;
    // A `use crate::{` group may span lines: the text after `crate::{` until its `}`.
    let mut group: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim_start().starts_with("#[cfg(test)]") {
            in_tests = true;
        }
        let c = code(line);
        if let Some((_, acc)) = group.as_mut() {
            acc.push_str(c);
            if group_closed(acc) {
                let (start, acc) = group.take().unwrap();
                push_group(&acc, start, in_tests, &mut out);
            }
            continue;
        }
        let mut rest = c;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            if let Some(g) = after.strip_prefix('{') {
                if group_closed(g) {
                    push_group(g, line_no, in_tests, &mut out);
                } else {
                    group = Some((line_no, g.to_string()));
                }
            } else {
                let path: Vec<String> = after
                    .split("::")
                    .map(ident)
                    .take_while(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                if !path.is_empty() {
                    out.push((line_no, path, in_tests));
                }
            }
            rest = after;
        }
        if in_tests {
            continue;
        }
        let mut rest = c;
        while let Some(i) = rest.find("super::") {
            // Only a path's start: not the `super` inside `crate::x::super::y`.
            let before = &rest[..i];
            let mut base = module[..module.len().saturating_sub(1)].to_vec();
            let mut after = &rest[i + "super::".len()..];
            while let Some(a) = after.strip_prefix("super::") {
                base.pop();
                after = a;
            }
            if !before.ends_with("::") {
                let id = ident(after);
                if !id.is_empty() {
                    base.push(id.to_string());
                    out.push((line_no, base, false));
                }
            }
            rest = after;
        }
    }
    out
}

/// Whether a group's text (after its `{`) holds its closing `}`.
fn group_closed(g: &str) -> bool {
    let mut depth = 0;
    for ch in g.chars() {
        match ch {
            '{' => depth += 1,
            '}' if depth == 0 => return true,
            '}' => depth -= 1,
            _ => {}
        }
    }
    false
}

/// The first segment (and second, if a path) of each item of a `{a::x, b, c::{..}}` group.
fn push_group(g: &str, line: usize, test: bool, out: &mut Vec<(usize, Vec<String>, bool)>) {
    let mut depth = 0;
    let mut item = String::new();
    for ch in g.chars() {
        match ch {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                push_item(&item, line, test, out);
                item.clear();
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            item.push(ch);
        }
    }
    push_item(&item, line, test, out);
}

fn push_item(item: &str, line: usize, test: bool, out: &mut Vec<(usize, Vec<String>, bool)>) {
    let path: Vec<String> = item
        .trim()
        .split("::")
        .map(|s| ident(s.trim()))
        .take_while(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if !path.is_empty() {
        out.push((line, path, test));
    }
}

struct Crate {
    /// (file relative to src/, line, from module, to module)
    module_edges: Vec<(String, usize, String, String)>,
    /// Files of one module that name each other outside their tests (a test may compare
    /// with a sibling): (from, line, to), paths relative to src/.
    file_edges: Vec<(String, usize, String)>,
    modules: BTreeSet<String>,
}

fn scan(src: &Path) -> Crate {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    files.sort();
    let rels: BTreeSet<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    let mut c = Crate {
        module_edges: Vec::new(),
        file_edges: Vec::new(),
        modules: BTreeSet::new(),
    };
    for rel in &rels {
        if rel == "lib.rs" || rel == "main.rs" {
            continue;
        }
        let module = module_path(rel);
        let top = module[0].clone();
        c.modules.insert(top.clone());
        let text = std::fs::read_to_string(src.join(rel)).unwrap();
        for (line, path, test) in references_split(&text, &module) {
            if path[0] != top {
                c.module_edges
                    .push((rel.clone(), line, top.clone(), path[0].clone()));
            } else if !test {
                // The file of the same module that the path names, longest match first
                // (`crate::data::tsv::VeRow`, `super::tsv` -> data/tsv.rs).
                let target = (2..=path.len()).rev().find_map(|k| {
                    let stem = path[..k].join("/");
                    [format!("{stem}.rs"), format!("{stem}/mod.rs")]
                        .into_iter()
                        .find(|f| rels.contains(f))
                });
                if let Some(t) = target.filter(|t| t != rel) {
                    c.file_edges.push((rel.clone(), line, t));
                }
            }
        }
    }
    c
}

fn allowed(from: &str) -> Option<&'static [&'static str]> {
    ALLOWED.iter().find(|(m, _)| *m == from).map(|(_, a)| *a)
}

#[test]
fn dependencies_follow_the_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let c = scan(&src);
    // The walk found the crate: a parser that sees nothing would pass anything.
    assert!(
        c.module_edges.len() > 50,
        "only {} edges found",
        c.module_edges.len()
    );
    let mut bad = Vec::new();
    for m in &c.modules {
        if allowed(m).is_none() {
            bad.push(format!(
                "src/{m}: module not placed in tests/layout.rs's ALLOWED table"
            ));
        }
    }
    for (file, line, from, to) in &c.module_edges {
        let Some(ok) = allowed(from) else { continue };
        let known = KNOWN_EDGES.iter().any(|(f, t)| f == file && t == to);
        if !ok.contains(&to.as_str()) && !known {
            let why = if to == "cli" {
                "only src/cli and src/main.rs may use crate::cli".to_string()
            } else {
                format!("{from} may use only {ok:?}")
            };
            bad.push(format!("src/{file}:{line}: {from} -> {to} ({why})"));
        }
    }
    assert!(
        bad.is_empty(),
        "dependencies against the table:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_import_cycles_between_files_of_a_module() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let c = scan(&src);
    let mut graph: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for (from, line, to) in &c.file_edges {
        graph.entry(from).or_default().entry(to).or_insert(*line);
    }
    // Every edge a -> b that lies on a cycle: b reaches a.
    let reaches = |start: &str, goal: &str| {
        let mut stack = vec![start];
        let mut seen = BTreeSet::new();
        while let Some(n) = stack.pop() {
            if n == goal {
                return true;
            }
            if seen.insert(n) {
                stack.extend(graph.get(n).into_iter().flat_map(|m| m.keys().copied()));
            }
        }
        false
    };
    let known = |a: &str, b: &str| {
        KNOWN_CYCLES
            .iter()
            .any(|(x, y)| (*x == a && *y == b) || (*x == b && *y == a))
    };
    let mut bad = Vec::new();
    for (from, tos) in &graph {
        for (to, line) in tos {
            if reaches(to, from) && !known(from, to) {
                bad.push(format!(
                    "src/{from}:{line}: uses src/{to}, which leads back to it"
                ));
            }
        }
    }
    assert!(bad.is_empty(), "import cycles:\n{}", bad.join("\n"));
}

#[test]
fn the_scanner_reads_paths_groups_and_super() {
    let m = |s: &str| module_path(s);
    let text = "use crate::cli::Task; // crate::serve in a comment\n\
                use crate::{model::Model,\n    exit::{A, B}};\n\
                use super::tsv::Row;\n\
                #[cfg(test)]\nmod tests { use super::*; use crate::train::x; }\n";
    let refs = references(text, &m("data/benchmark.rs"));
    let got: Vec<(usize, String)> = refs.iter().map(|(l, p)| (*l, p.join("::"))).collect();
    assert_eq!(
        got,
        vec![
            (1, "cli::Task".to_string()),
            (2, "model::Model".to_string()),
            (2, "exit".to_string()),
            (4, "data::tsv".to_string()),
            (6, "train::x".to_string()),
        ]
    );
    assert_eq!(m("eval/mod.rs"), vec!["eval"]);
    assert_eq!(
        references("x = super::y;", &m("eval/mod.rs"))[0].1,
        vec!["y".to_string()]
    );
}
