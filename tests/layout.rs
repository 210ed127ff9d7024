//! The architecture, enforced: the protocol depends on nothing of ours, the
//! controller and the data plane on the protocol only, the data plane never
//! on the AWS SDK; and no crate has a cycle between its modules.
//!
//! Cargo already refuses an import of a crate that is not a dependency; this
//! test refuses the dependency itself, so that the rule cannot be undone by
//! one line in a `Cargo.toml`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn host() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Package name → the names of its normal (non-dev, non-build) dependencies,
/// as Cargo resolved them for this machine (other platforms' crates may not
/// be downloaded, and `--offline` must not need them).
fn resolved() -> &'static BTreeMap<String, BTreeSet<String>> {
    static GRAPH: OnceLock<BTreeMap<String, BTreeSet<String>>> = OnceLock::new();
    GRAPH.get_or_init(metadata)
}

fn metadata() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host()])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut graph = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| name_of[d["pkg"].as_str().unwrap()].to_owned())
            .collect();
        graph.insert(name_of[node["id"].as_str().unwrap()].to_owned(), deps);
    }
    graph
}

/// Everything `package` pulls in, itself excluded.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, package: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![package.to_owned()];
    while let Some(p) = todo.pop() {
        for d in &graph[&p] {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

fn ours(deps: &BTreeSet<String>) -> Vec<&String> {
    deps.iter().filter(|d| d.starts_with("signpost")).collect()
}

#[test]
fn the_protocol_depends_on_nothing_of_ours() {
    let graph = resolved();
    assert_eq!(
        ours(&closure(graph, "signpost-protocol")),
        Vec::<&String>::new()
    );
}

#[test]
fn the_controller_depends_on_the_protocol_only() {
    let graph = resolved();
    assert_eq!(
        ours(&closure(graph, "signpost-controller")),
        vec!["signpost-protocol"]
    );
}

#[test]
fn the_data_plane_depends_on_the_protocol_only_and_never_on_the_aws_sdk() {
    let graph = resolved();
    let deps = closure(graph, "signpost-router");
    assert_eq!(ours(&deps), vec!["signpost-protocol"]);
    let aws = aws_crates_in_build_of("signpost-router");
    assert!(aws.is_empty(), "the router build pulls in {aws:?}");
}

/// The AWS crates (the SDK and its aws-lc crypto library) in `package`'s
/// own build. `cargo tree -p` resolves features for that package alone, as
/// `cargo build -p` does; `cargo metadata` unifies the whole workspace's
/// features, where rustls's aws-lc-rs (the controller's) would show up in
/// the router's closure although the router's build never compiles it.
fn aws_crates_in_build_of(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--locked", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(repo())
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n.starts_with("aws-"))
        .collect();
    names.into_iter().collect()
}

#[test]
fn the_agents_are_data_plane_too_and_never_pull_in_the_aws_sdk() {
    let graph = resolved();
    let deps = closure(graph, "signpost-agents");
    assert_eq!(ours(&deps), vec!["signpost-protocol", "signpost-router"]);
    let aws = aws_crates_in_build_of("signpost-agents");
    assert!(aws.is_empty(), "the agents' build pulls in {aws:?}");
}

/// A crate's top-level modules and the other top-level modules each one
/// names (`crate::x`, or `super::x` from a top-level file). Test modules
/// are left out: a test may use anything.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    files(src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in all {
        let rel = path.strip_prefix(src).unwrap();
        let top_level = rel.components().count() == 1;
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let mut named = BTreeSet::new();
        let prefixes: &[&str] = if top_level {
            &["crate::", "super::"]
        } else {
            &["crate::"]
        };
        for prefix in prefixes {
            for (i, _) in code.match_indices(prefix) {
                let before = code[..i].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let rest = &code[i + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    named.insert(name);
                }
            }
        }
        graph.entry(module).or_default().extend(named);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for uses in graph.values_mut() {
        uses.retain(|m| modules.contains(m));
    }
    graph
}

/// A cycle through the graph, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in &graph[node] {
            if let Some(c) = visit(graph, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(graph, m, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_a_cycle_between_its_modules() {
    for krate in ["protocol", "controller", "router", "agents"] {
        let graph = module_graph(&repo().join("crates").join(krate).join("src"));
        assert!(!graph.is_empty() || krate == "protocol");
        if let Some(c) = cycle(&graph) {
            panic!("crates/{krate}: module cycle {}", c.join(" → "));
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let graph = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
}
