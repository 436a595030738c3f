//! The layers of `src/` only look down (ARCHITECTURE.md, "Layers"): every
//! `crate::module` a file names, outside comments and unit tests, is in its
//! own layer or below it, and the modules' import graph has no cycle. A
//! change that makes a room call into a session, or the store into the hub,
//! fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top to bottom. A module may use modules of its own layer and below.
const LAYERS: &[(&str, &[&str])] = &[
    ("composition", &["server", "config"]),
    ("transports", &["http", "net"]),
    ("session", &["session"]),
    ("hub", &["hub"]),
    ("pipeline", &["pipeline"]),
    ("rooms", &["room"]),
    ("delivery", &["delivery"]),
    ("store", &["store"]),
    ("base", &["auth", "metrics", "logs", "idmap", "codec", "proto", "time"]),
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|(_, mods)| mods.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer: add it to LAYERS and to ARCHITECTURE.md"))
}

/// The top-level modules that `code` names as `crate::x` or in
/// `crate::{x, y::z}`, with comment lines left out.
fn referenced(code: &str) -> BTreeSet<String> {
    let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => top_level_items(group),
            None => vec![rest],
        };
        for name in names {
            let module: String = name.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !module.is_empty() && module != "self" {
                out.insert(module);
            }
        }
    }
    out
}

/// The items of an import group (`a::{b, c}, d}` → `a::{b, c}`, `d`), up to
/// the brace that closes it; nested groups stay inside their item.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(group[start..i].trim());
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(group[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(group[start..].trim());
    items
}

/// Module → the modules it uses, over every file of `src/` (the crate root
/// and the binary are the top and may use anything).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs");
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may build their fixtures from any layer.
            let code = text.split("#[cfg(test)]").next().unwrap();
            let uses = g.entry(top.to_string()).or_default();
            uses.extend(referenced(code).into_iter().filter(|m| m != top));
        }
    }
    g
}

#[test]
fn every_module_uses_only_its_own_layer_and_those_below() {
    let g = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(g.contains_key("session") && g.contains_key("room"), "read the source tree");
    let mut upward = Vec::new();
    for (from, uses) in &g {
        for to in uses {
            if layer_of(to) < layer_of(from) {
                upward.push(format!("{from} ({}) uses {to} ({})", LAYERS[layer_of(from)].0, LAYERS[layer_of(to)].0));
            }
        }
    }
    assert!(upward.is_empty(), "imports that look up:\n{}", upward.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // Depth-first search with the path so far, so a cycle is named.
    fn visit<'a>(
        g: &'a BTreeMap<String, BTreeSet<String>>,
        at: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(i) = path.iter().position(|m| *m == at) {
            panic!("import cycle: {} -> {at}", path[i..].join(" -> "));
        }
        if !done.insert(at) {
            return;
        }
        path.push(at);
        for next in g.get(at).into_iter().flatten() {
            visit(g, next, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        visit(&g, m, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_check_sees_grouped_and_plain_imports_and_skips_comments() {
    let code = "use crate::{hub::Hub, room};\nuse crate::store::Store;\n// crate::session in a comment\n\
                let t = crate::time::now_ms();\nuse crate::{delivery::{Frame, Run}, pipeline};\n";
    let found: Vec<String> = referenced(code).into_iter().collect();
    assert_eq!(found, ["delivery", "hub", "pipeline", "room", "store", "time"]);
}
