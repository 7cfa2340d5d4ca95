//! The README is the front door, and what it says about the code is checked:
//!
//! - its Layout section lists the workspace's crates, what each owns (the
//!   crate's `description`) and its dependencies on the others, exactly as
//!   `cargo metadata` has them, in an order where dependencies point one way;
//! - its method table is what `fusion methods --markdown` prints from the
//!   methods' declared parameters, and the parameter reference of
//!   `docs/merging.md` is what `merger::methods::catalog::reference` prints;
//! - every relative link of the README and of `docs/*.md` reaches a file,
//!   and every `#anchor` a heading of that file.
//!
//! `UPDATE_README=1 cargo test --test readme` rewrites the generated
//! sections (Layout from `cargo metadata`, the method table and the
//! parameter reference from the declarations).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A workspace crate: name, description, workspace crates it depends on
/// (normal and build dependencies; dev-dependencies do not shape layers).
struct Crate {
    name: String,
    description: String,
    deps: BTreeSet<String>,
    binary: Option<String>,
}

fn workspace() -> Vec<Crate> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let mut crates: Vec<Crate> = packages
        .iter()
        .filter(|p| !p["manifest_path"].as_str().unwrap().contains("/fuzz/"))
        .map(|p| Crate {
            name: p["name"].as_str().unwrap().to_string(),
            description: p["description"].as_str().unwrap_or("").to_string(),
            deps: p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().unwrap().to_string())
                .filter(|n| names.contains(n))
                .collect(),
            binary: p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(|t| t["name"].as_str().unwrap().to_string()),
        })
        .collect();
    // Layers: a crate after everything it depends on, then by name.
    let mut ordered: Vec<Crate> = Vec::new();
    while !crates.is_empty() {
        let placed: BTreeSet<String> = ordered.iter().map(|c| c.name.clone()).collect();
        let mut ready: Vec<usize> = (0..crates.len())
            .filter(|&i| crates[i].deps.iter().all(|d| placed.contains(d)))
            .collect();
        assert!(
            !ready.is_empty(),
            "the workspace's crates depend on each other in a cycle"
        );
        ready.sort_by_key(|&i| (crates[i].deps.len(), crates[i].name.clone()));
        let i = ready[0];
        ordered.push(crates.remove(i));
    }
    ordered
}

/// The Layout section as generated from `cargo metadata`.
fn layout() -> String {
    let crates = workspace();
    let mut s = String::from(
        "Crates by layer, each depending only on crates above it (`cargo metadata`; \
         dev-dependencies aside):\n\n| crate | owns | depends on |\n|---|---|---|\n",
    );
    for c in &crates {
        let name = match &c.binary {
            Some(b) => format!("`{}` (the `{b}` binary)", c.name),
            None => format!("`{}`", c.name),
        };
        let deps: Vec<String> = crates
            .iter()
            .filter(|d| c.deps.contains(&d.name))
            .map(|d| format!("`{}`", d.name))
            .collect();
        let deps = if deps.is_empty() {
            "—".to_string()
        } else {
            deps.join(", ")
        };
        s.push_str(&format!("| {name} | {} | {deps} |\n", c.description));
    }
    s
}

/// Checks (or with `UPDATE_README` rewrites) the text between `<!-- NAME:begin -->`
/// and `<!-- NAME:end -->` in `file` against `want`.
fn generated_section(file: &str, name: &str, want: &str) {
    let path = root().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let a = text
        .find(&begin)
        .unwrap_or_else(|| panic!("{file} has the {begin} marker"));
    let b = text
        .find(&end)
        .unwrap_or_else(|| panic!("{file} has the {end} marker"));
    let current = &text[a + begin.len()..b];
    let want = format!("\n{want}");
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}{begin}{want}{}", &text[..a], &text[b..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert_eq!(
        current, want,
        "the {name} section of {file} is stale: run `UPDATE_README=1 cargo test --release --test readme`"
    );
}

#[test]
fn layout_section_matches_cargo_metadata() {
    let want = layout();
    for c in ["runtime", "merger", "evaluator", "zoo", "gateway"] {
        assert!(
            want.contains(&format!("| `{c}` |")),
            "{c} is a workspace crate"
        );
    }
    generated_section("README.md", "layout", &want);
}

#[test]
fn method_table_is_generated_from_the_declarations() {
    let out = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["methods", "--markdown"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table, merger::methods::catalog::markdown());
    for m in merger::methods::REGISTRY {
        assert!(table.contains(&format!("| `{}`", m.name)), "{}", m.name);
    }
    generated_section("README.md", "methods", &table);
}

#[test]
fn parameter_reference_is_generated_from_the_declarations() {
    generated_section(
        "docs/merging.md",
        "params",
        &merger::methods::catalog::reference(),
    );
}

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation
/// other than `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fence = false;
    let mut out = BTreeSet::new();
    for l in text.lines() {
        if l.starts_with("```") {
            fence = !fence;
        }
        if !fence && l.starts_with('#') {
            out.insert(slug(l.trim_start_matches('#')));
        }
    }
    out
}

/// `[text](target)` links outside code, relative ones only.
fn links(text: &str) -> Vec<String> {
    let mut fence = false;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with("```") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        let mut rest = l;
        while let Some(i) = rest.find("](") {
            let tail = &rest[i + 2..];
            let Some(j) = tail.find(')') else { break };
            let target = &tail[..j];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push(target.to_string());
            }
            rest = &tail[j..];
        }
    }
    out
}

#[test]
fn relative_links_of_the_readme_and_docs_resolve() {
    let mut files: Vec<PathBuf> = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    let mut headings: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for link in links(&text) {
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if file.is_empty() {
                f.clone()
            } else {
                f.parent().unwrap().join(file)
            };
            assert!(
                target.exists(),
                "{}: link `{link}` points to a missing file",
                f.display()
            );
            if let Some(a) = anchor {
                let set = headings
                    .entry(target.clone())
                    .or_insert_with(|| anchors(&std::fs::read_to_string(&target).unwrap()));
                assert!(
                    set.contains(a),
                    "{}: link `{link}`: no heading with anchor `{a}` in {}",
                    f.display(),
                    target.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} links found");
}
