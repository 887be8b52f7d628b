//! The house rules of the source tree, checked by a unit test (so CI runs
//! them): no import circles between the top-level modules of the daemon
//! and of the datapath, and the config model imports nothing above it.
//!
//! A module's dependencies are the `crate::NAME` paths in its files
//! (grouped `use crate::{a, b::c}` included), test modules left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Top-level module -> the top-level modules it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The graph of the crate whose sources are under `src`. `lib.rs`,
/// `main.rs` and `bin/` only declare and start things: left out.
pub fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut g = Graph::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                if !path.ends_with("bin") && !path.ends_with("tests") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("below src");
            let top = rel
                .components()
                .next()
                .map(|c| {
                    c.as_os_str()
                        .to_string_lossy()
                        .trim_end_matches(".rs")
                        .to_string()
                })
                .unwrap_or_default();
            if matches!(top.as_str(), "lib" | "main") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let deps = g.entry(top.clone()).or_default();
            deps.extend(names(&without_tests(&text)));
            deps.remove(&top);
        }
    }
    Ok(g)
}

/// The text up to the first `#[cfg(test)]` module (kept at the end of a
/// file by convention).
fn without_tests(text: &str) -> String {
    match text.find("#[cfg(test)]\nmod ") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

/// The top-level modules named by `crate::` paths in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first segment of each item.
            let mut depth = 0;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            out.insert(first_segment(&item));
        } else {
            out.insert(first_segment(rest));
        }
    }
    out.remove("");
    out
}

fn first_segment(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Every circle of the graph, each once, as the modules along it.
pub fn circles(g: &Graph) -> Vec<Vec<String>> {
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for start in g.keys() {
        // Depth-first from `start`, closing only circles back to it whose
        // other members sort after it (each circle found once).
        let mut path = vec![start.clone()];
        walk(g, start, &mut path, &mut found);
    }
    found.into_iter().collect()
}

fn walk(g: &Graph, start: &str, path: &mut Vec<String>, found: &mut BTreeSet<Vec<String>>) {
    let here = path.last().expect("non-empty").clone();
    for next in g.get(&here).into_iter().flatten() {
        if next == start {
            found.insert(path.clone());
        } else if next.as_str() > start && !path.contains(next) {
            path.push(next.clone());
            walk(g, start, path, found);
            path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        crate::workspace_root().to_path_buf()
    }

    #[test]
    fn paths_and_groups_are_read() {
        let n = names("use crate::{a, b::{c, d}, e::f};\nlet x = crate::g::h();");
        let want: BTreeSet<String> = ["a", "b", "e", "g"].map(String::from).into();
        assert_eq!(n, want);
        let mut g = Graph::new();
        g.entry("x".into()).or_default().insert("y".into());
        g.entry("y".into()).or_default().insert("z".into());
        g.entry("z".into()).or_default().insert("x".into());
        assert_eq!(circles(&g), vec![vec!["x", "y", "z"]]);
    }

    #[test]
    fn the_daemon_has_no_import_circles() {
        let g = graph(&root().join("kvnet-userspace/src")).unwrap();
        assert!(
            g.contains_key("switch") && g.contains_key("config"),
            "{g:?}"
        );
        assert_eq!(circles(&g), Vec::<Vec<String>>::new(), "{g:#?}");
    }

    #[test]
    fn the_config_model_imports_nothing_above_it() {
        let g = graph(&root().join("kvnet-userspace/src")).unwrap();
        let above = ["switch", "daemon", "datapath", "dhcp", "dns", "cli"];
        let bad: Vec<&String> = g["config"]
            .iter()
            .filter(|d| above.contains(&d.as_str()))
            .collect();
        assert!(bad.is_empty(), "config imports {bad:?}");
    }

    #[test]
    fn the_datapath_has_no_import_circles() {
        let g = graph(&root().join("kvnet-ebpf/src")).unwrap();
        assert!(g.contains_key("nat") && g.contains_key("maps"), "{g:?}");
        assert_eq!(circles(&g), Vec::<Vec<String>>::new(), "{g:#?}");
    }
}
