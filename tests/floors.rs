//! The floors stay intact: every module imports only from floors below its
//! own (model → contract → state → backends → engine → commands), a backend
//! never reaches into another backend, and no modules import each other in
//! a circle. Reads the `crate::` and `super::` paths of every file in src/.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors by the first segment of a module path.
fn floor(module: &str) -> u8 {
    match module.split("::").next().unwrap_or("") {
        "model" => 1,
        "contract" => 2,
        "state" => 3,
        "backends" => 4,
        "engine" => 5,
        "commands" => 6,
        // The crate root and the binary stand above everything.
        _ => 7,
    }
}

fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts.join("::")
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

/// `a::{b, c::{d}}` → `a::b`, `a::c::d` (the text after `crate::`).
fn expand(path: &str) -> Vec<String> {
    let path = path.trim();
    let Some(open) = path.find('{') else { return vec![path.to_string()] };
    let prefix = &path[..open];
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for ch in inner.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    parts.push(cur);
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty() && *p != "self")
        .flat_map(|p| expand(&format!("{prefix}{p}")))
        .chain(if inner.split(',').any(|p| p.trim() == "self") { Some(prefix.trim_end_matches("::").to_string()) } else { None })
        .collect()
}

/// The paths a file names, as (line, absolute module path text).
fn paths_named(module: &str, text: &str) -> Vec<(usize, String)> {
    let parent = |m: &str| m.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default();
    // `super` of a/b/c.rs (module a::b::c) is a::b; of a/b/mod.rs (module a::b) it is a.
    let mut out = Vec::new();
    let mut statement = String::new();
    let mut start = 0;
    // Inline modules (`mod tests {`) open inside the file: their `super` is
    // the file's own module. Brace depths at which each one opened.
    let (mut depth, mut inline): (i64, Vec<i64>) = (0, Vec::new());
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let opens_inline = code.split_whitespace().skip_while(|w| w.starts_with("pub")).next() == Some("mod") && code.ends_with('{');
        if opens_inline {
            inline.push(depth);
        }
        depth += code.matches('{').count() as i64 - code.matches('}').count() as i64;
        if inline.last().is_some_and(|d| depth <= *d) {
            inline.pop();
        }
        let sup = if inline.is_empty() || opens_inline { parent(module) } else { module.to_string() };
        // A `use` statement may span lines: read it whole.
        if statement.is_empty() && (code.starts_with("use ") || code.starts_with("pub use ") || code.starts_with("pub(crate) use ")) {
            start = i + 1;
        }
        if start > 0 {
            statement.push_str(code);
            statement.push(' ');
            if code.contains(';') {
                let body = statement.split_once("use ").map(|(_, b)| b.trim().trim_end_matches(';').trim()).unwrap_or("");
                let body = body.split(';').next().unwrap_or("").trim();
                if let Some(rest) = body.strip_prefix("crate::") {
                    out.extend(expand(rest).into_iter().map(|p| (start, p)));
                } else if let Some(rest) = body.strip_prefix("super::") {
                    out.extend(expand(rest).into_iter().map(|p| (start, join(&sup, &p))));
                }
                statement.clear();
                start = 0;
            }
            continue;
        }
        for (prefix, base) in [("crate::", String::new()), ("super::", sup.clone())] {
            let mut rest = line;
            while let Some(at) = rest.find(prefix) {
                let before = rest[..at].chars().last();
                let tail = &rest[at + prefix.len()..];
                let len = tail.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(tail.len());
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    out.push((i + 1, join(&base, tail[..len].trim_end_matches(':'))));
                }
                rest = &tail[len..];
            }
        }
    }
    out
}

/// `base::p`, with every `super` in `p` taking one segment off.
fn join(base: &str, p: &str) -> String {
    let mut segs: Vec<&str> = base.split("::").filter(|s| !s.is_empty()).collect();
    let mut rest = p;
    while let Some(r) = rest.strip_prefix("super::") {
        segs.pop();
        rest = r;
    }
    segs.push(rest);
    segs.join("::")
}

/// The longest known module a path starts with.
fn resolve(known: &BTreeSet<String>, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|m| known.contains(m))
}

struct Findings {
    climbs: Vec<String>,
    circles: Vec<Vec<String>>,
}

fn check(src: &Path) -> Findings {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let known: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut climbs = Vec::new();
    for f in &files {
        let module = module_of(src, f);
        let text = std::fs::read_to_string(f).unwrap();
        for (line, path) in paths_named(&module, &text) {
            let Some(target) = resolve(&known, &path) else { continue };
            if target == module {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target.clone());
            let shown = format!("{}:{line}: {module} (floor {}) imports {path} (floor {})", f.display(), floor(&module), floor(&target));
            if floor(&target) > floor(&module) {
                climbs.push(shown);
            } else if floor(&module) == 4 && floor(&target) == 4 {
                // A backend knows its own folder only: not another backend,
                // not the opener in backends/mod.rs that knows them all.
                let own = module.split("::").nth(1);
                if own.is_none() || target.split("::").nth(1) != own {
                    climbs.push(format!("{shown}: one backend reaches into another"));
                }
            }
        }
    }
    Findings { climbs, circles: circles(&edges) }
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.edges.get(v) {
            for w in ws {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T { edges, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn every_import_goes_down_and_none_go_round() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let f = check(&src);
    assert!(f.climbs.is_empty(), "imports that climb a floor (see docs/architecture.md):\n{}", f.climbs.join("\n"));
    assert!(f.circles.is_empty(), "modules that import each other in a circle: {:?}", f.circles);
}

/// The check itself sees a climb, a sideways reach and a circle.
#[test]
fn the_check_catches_what_it_guards() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |p: &str, text: &str| {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("model/mod.rs", "pub mod plan;\n");
    write("model/plan.rs", "// crate::engine in a comment is fine\nuse crate::engine::run;\n");
    write("engine/mod.rs", "use crate::model::plan::Key;\npub fn run() {}\n");
    write("backends/a/mod.rs", "fn f() { crate::backends::b::x(); }\n");
    write("backends/b/mod.rs", "use super::super::contract::{\n    Source,\n};\npub fn x() {}\n");
    write("contract/mod.rs", "pub trait Source {}\n");
    write("state/one.rs", "use crate::state::two::X;\n");
    write("state/two.rs", "pub struct X;\nfn g() { let _ = crate::state::one::f; }\n");
    let f = check(src);
    let text = f.climbs.join("\n");
    assert!(text.contains("model::plan (floor 1) imports engine::run (floor 5)"), "{text}");
    assert!(text.contains("backends::a (floor 4) imports backends::b::x (floor 4): one backend reaches into another"), "{text}");
    assert_eq!(f.climbs.len(), 2, "{text}");
    assert!(f.circles.contains(&vec!["state::one".to_string(), "state::two".to_string()]), "{:?}", f.circles);
    assert!(f.circles.iter().any(|c| c.contains(&"engine".to_string()) && c.contains(&"model::plan".to_string())), "{:?}", f.circles);
}
