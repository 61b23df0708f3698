//! External `$ref`s: a bundle's document made self-contained.
//!
//! Bundle loading: read the document -> environment rewrites -> **this
//! module** -> routes ([`crate::openapi`]) -> request validation (the
//! Runner). A `$ref` to another file of the bundle (`schemas/pet.yaml`,
//! `common.json#/Error`, relative to the file it is written in) is
//! resolved once, here: each referenced file is parsed (YAML or JSON) and
//! copied whole into the document under [`REFS_KEY`] in `components`
//! (OpenAPI 3, whose Components Object allows extensions) or
//! `definitions` (Swagger 2.0), keyed by its path in the bundle, and the
//! `$ref` is rewritten to point there
//! (`#/components/x-funcatron-refs/schemas~1pet.yaml`); `$ref`s inside
//! that file are rewritten the same way, relative to it (its local
//! `#/...` ones too). A `$ref` back to the bundle's document becomes a
//! plain `#/...`. After this, every `$ref` in [`crate::Bundle::doc`] is
//! local and lies where schema `$ref`s into `components`/`definitions`
//! already resolve, so everything downstream resolves `#/...` only and
//! never reads a file.
//!
//! Refused, naming the file, line and `$ref`: URLs (nothing is fetched),
//! absolute paths, paths leaving the bundle (`..` past its root, or a
//! symbolic link out of it), dot files (they are not part of an
//! archive), missing files and fragments, and chains of `$ref`s that
//! only refer to each other and never reach a definition (`A -> B -> A`,
//! a file whose root refers to itself). A recursive schema (a `Tree`
//! whose `children` are `$ref: Tree`) is fine: it reaches a definition.
//! The work is bounded by [`RefLimits`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::locate::{escape_token, Problem, Source, Sources};
use crate::openapi::resolve_local;
use crate::BundleError;

/// The key the referenced files are copied under, in [`refs_home`].
pub const REFS_KEY: &str = "x-funcatron-refs";

/// Where [`REFS_KEY`] is in a document: `components` for OpenAPI 3,
/// `definitions` for Swagger 2.0.
pub fn refs_home(doc: &Value) -> &'static str {
    if doc.get("openapi").is_some() {
        "components"
    } else {
        "definitions"
    }
}

/// The JSON pointer of the referenced files in `doc`
/// (`/components/x-funcatron-refs`).
pub fn refs_pointer(doc: &Value) -> String {
    format!("/{}/{REFS_KEY}", refs_home(doc))
}

/// Bounds on the work external `$ref`s can cause.
#[derive(Debug, Clone, Copy)]
pub struct RefLimits {
    /// Most files referenced (besides the document itself).
    pub max_files: usize,
    /// Most bytes all referenced files may have together.
    pub max_bytes: u64,
    /// Longest chain of files referring to files.
    pub max_depth: usize,
    /// Most `$ref`s in the document and its files together.
    pub max_refs: usize,
}

impl Default for RefLimits {
    fn default() -> Self {
        RefLimits {
            max_files: 256,
            max_bytes: 16 * 1024 * 1024,
            max_depth: 32,
            max_refs: 100_000,
        }
    }
}

/// Longest chain of `$ref`s followed to find what one refers to.
const MAX_CHAIN: usize = 64;

/// Percent-decode `s`; `None` when it is not valid UTF-8 afterwards.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or_default() * 16 + hex(l).unwrap_or_default()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Does `r` start with a URI scheme (`http:`, `file:`, `urn:`)?
fn has_scheme(r: &str) -> bool {
    match r.find(':') {
        Some(i) if i > 0 => {
            let s = &r[..i];
            s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

/// `dir/rel` without `.` and `..`, or `None` if it climbs above the root.
fn join_inside(dir: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in dir.join(rel).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A file's key under [`REFS_KEY`]: its path in the bundle, with `/`.
fn key_of(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

struct Bundler {
    /// [`refs_pointer`] of the document.
    home: String,
    /// The bundle directory as given (files are named from it in errors).
    dir: PathBuf,
    /// The bundle directory, canonical.
    root: PathBuf,
    /// The bundle's document, canonical.
    spec: PathBuf,
    limits: RefLimits,
    sources: Sources,
    /// Referenced files, parsed and rewritten, by key.
    files: BTreeMap<String, Value>,
    /// Files still to read: key, path, how many files deep.
    queue: VecDeque<(String, PathBuf, usize)>,
    queued: HashSet<String>,
    bytes: u64,
    refs: usize,
    /// Each rewritten reference: where it is, what it was, what it became.
    rewritten: Vec<(String, String, String)>,
}

/// Make `doc` (the bundle's document `spec`, read from `text`, in the
/// bundle directory `dir`) self-contained; returns the files it is now
/// made of, for error messages.
pub(crate) fn bundle(
    dir: &Path,
    spec: &Path,
    doc: &mut Value,
    text: &str,
    limits: RefLimits,
) -> Result<Sources, BundleError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Io { path, source }
    };
    let root = dir.canonicalize().map_err(io(dir))?;
    let spec_canon = spec.canonicalize().map_err(io(spec))?;
    let home = refs_pointer(doc);
    let mut sources = Sources::single(spec, text);
    sources.refs_prefix.clone_from(&home);
    let mut b = Bundler {
        home,
        dir: dir.to_owned(),
        root,
        spec: spec_canon,
        limits,
        sources,
        files: BTreeMap::new(),
        queue: VecDeque::new(),
        queued: HashSet::new(),
        bytes: 0,
        refs: 0,
        rewritten: Vec::new(),
    };
    match doc.get(refs_home(doc)) {
        None | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(b.sources.error(Problem::new(
                format!("/{}", refs_home(doc)),
                format!("`{}` must be a mapping", refs_home(doc)),
            )))
        }
    }
    if doc.pointer(&b.home).is_some() {
        return Err(b.sources.error(Problem::new(
            b.home.clone(),
            "this key is reserved for the files `$ref`s bring in",
        )));
    }
    // The document's own directory, relative to the bundle.
    let spec_dir = spec
        .parent()
        .and_then(|p| p.strip_prefix(dir).ok())
        .map(Path::to_owned)
        .unwrap_or_default();
    let mut at = String::new();
    b.rewrite(doc, &spec_dir, None, 0, &mut at)
        .map_err(|p| b.sources.error(p))?;
    while let Some((key, path, depth)) = b.queue.pop_front() {
        let mut value = b.read(&key, &path)?;
        let file_dir = Path::new(&key)
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let mut at = b.root_of(&key);
        b.rewrite(&mut value, &file_dir, Some(&key), depth, &mut at)
            .map_err(|p| b.sources.error(p))?;
        b.files.insert(key, value);
    }
    let files = std::mem::take(&mut b.files);
    if !files.is_empty() {
        let home = refs_home(doc);
        if let Some(obj) = doc.as_object_mut() {
            let holder = obj.entry(home).or_insert_with(|| Value::Object(Map::new()));
            if let Some(holder) = holder.as_object_mut() {
                holder.insert(REFS_KEY.to_owned(), Value::Object(Map::from_iter(files)));
            }
        }
    }
    for (at, was, now) in &b.rewritten {
        if resolve_local(doc, now).is_none() {
            return Err(b.sources.error(Problem::new(
                at.clone(),
                format!("`$ref: {was}` does not resolve: no such place in that file"),
            )));
        }
    }
    check_cycles(doc, &b.home).map_err(|p| b.sources.error(p))?;
    Ok(b.sources)
}

impl Bundler {
    /// The pointer of a referenced file's root in the bundled document.
    fn root_of(&self, key: &str) -> String {
        format!("{}/{}", self.home, escape_token(key))
    }

    /// Read and parse one referenced file (at `path`, its canonical
    /// path; errors name it by its path in the bundle).
    fn read(&mut self, key: &str, path: &Path) -> Result<Value, BundleError> {
        let shown = self.dir.join(key);
        let io = |source| BundleError::Io {
            path: shown.clone(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        self.bytes = self.bytes.saturating_add(len);
        if self.bytes > self.limits.max_bytes {
            return Err(BundleError::invalid(
                &shown,
                format!(
                    "the files `$ref`s refer to are more than {} bytes together",
                    self.limits.max_bytes
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let value = crate::parse_doc(&shown, &text)?;
        self.sources.files.insert(
            key.to_owned(),
            Source {
                path: shown.clone(),
                text,
            },
        );
        Ok(value)
    }

    /// Rewrite every `$ref` in `v` (in the file `key`, `None` for the
    /// document, whose directory in the bundle is `dir`); `at` is `v`'s
    /// pointer in the bundled document.
    fn rewrite(
        &mut self,
        v: &mut Value,
        dir: &Path,
        key: Option<&str>,
        depth: usize,
        at: &mut String,
    ) -> Result<(), Problem> {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    self.refs += 1;
                    let ref_at = format!("{at}/$ref");
                    if self.refs > self.limits.max_refs {
                        return Err(Problem::new(
                            ref_at,
                            format!("more than {} `$ref`s", self.limits.max_refs),
                        ));
                    }
                    let was = r.clone();
                    if let Some(now) = self.target(&was, dir, key, depth, &ref_at)? {
                        self.rewritten.push((ref_at, was, now.clone()));
                        m.insert("$ref".to_owned(), Value::String(now));
                    }
                }
                for (k, child) in m.iter_mut() {
                    let len = at.len();
                    at.push('/');
                    at.push_str(&escape_token(k));
                    self.rewrite(child, dir, key, depth, at)?;
                    at.truncate(len);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter_mut().enumerate() {
                    let len = at.len();
                    at.push('/');
                    at.push_str(&i.to_string());
                    self.rewrite(child, dir, key, depth, at)?;
                    at.truncate(len);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What the reference `r` becomes (`None`: it stays as it is).
    fn target(
        &mut self,
        r: &str,
        dir: &Path,
        key: Option<&str>,
        depth: usize,
        at: &str,
    ) -> Result<Option<String>, Problem> {
        let refuse = |why: &str| Problem::new(at, format!("`$ref: {r}`: {why}"));
        let (file, fragment) = match r.find('#') {
            Some(i) => (&r[..i], &r[i..]),
            None => (r, "#"),
        };
        let pointer = &fragment[1..];
        if !pointer.is_empty() && !pointer.starts_with('/') && (key.is_some() || !file.is_empty()) {
            return Err(refuse(
                "a plain-name fragment (`#name`) works only in the bundle's document itself",
            ));
        }
        if file.is_empty() {
            return Ok(key.map(|k| format!("#{}{pointer}", self.root_of(k))));
        }
        if has_scheme(file) || file.starts_with("//") {
            return Err(refuse(
                "a URL: nothing is fetched; copy the file into the bundle and refer to it by a relative path",
            ));
        }
        let path = percent_decode(file)
            .filter(|p| !p.contains(['?', '\0']))
            .ok_or_else(|| refuse("not a file path"))?;
        if path.starts_with('/') || path.starts_with('\\') {
            return Err(refuse(
                "an absolute path: refer to files in the bundle by a path relative to this file",
            ));
        }
        let rel = join_inside(dir, &path).ok_or_else(|| refuse("the path leaves the bundle"))?;
        if rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        {
            return Err(refuse("dot files are not part of a bundle"));
        }
        let canon = self
            .root
            .join(&rel)
            .canonicalize()
            .map_err(|_| refuse(&format!("no file {} in the bundle", key_of(&rel))))?;
        let inside = canon
            .strip_prefix(&self.root)
            .map_err(|_| refuse("a symbolic link that leaves the bundle"))?
            .to_owned();
        if !canon.is_file() {
            return Err(refuse("not a file"));
        }
        if canon == self.spec {
            return Ok(Some(format!("#{pointer}")));
        }
        let target = key_of(&inside);
        if self.queued.insert(target.clone()) {
            if depth + 1 > self.limits.max_depth {
                return Err(refuse(&format!(
                    "files refer to files more than {} deep",
                    self.limits.max_depth
                )));
            }
            if self.queued.len() > self.limits.max_files {
                return Err(refuse(&format!(
                    "more than {} files are referred to",
                    self.limits.max_files
                )));
            }
            self.queue.push_back((target.clone(), canon, depth + 1));
        }
        Ok(Some(format!("#{}{pointer}", self.root_of(&target))))
    }
}

/// Every local `$ref` in `doc` eventually reaches something that is not
/// itself a `$ref` (or nothing: a dangling one is reported where it is
/// used); a loop of references that only refer to each other is refused.
pub(crate) fn check_cycles(doc: &Value, refs_prefix: &str) -> Result<(), Problem> {
    // Shown as written: `schemas/a.yaml#/x`, not where it was copied to.
    let shown = |r: &str| -> String {
        let copied = (!refs_prefix.is_empty())
            .then(|| {
                r.strip_prefix('#')?
                    .strip_prefix(refs_prefix)?
                    .strip_prefix('/')
            })
            .flatten();
        match copied {
            Some(rest) => {
                let (key, inner) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                let key = key.replace("~1", "/").replace("~0", "~");
                format!("{key}#{inner}")
            }
            None => r.to_owned(),
        }
    };
    let mut sites = Vec::new();
    collect_refs(doc, &mut String::new(), &mut sites);
    let mut settled: HashSet<String> = HashSet::new();
    for (at, r) in sites {
        let mut chain: Vec<String> = Vec::new();
        let mut cur = r;
        loop {
            if settled.contains(&cur) {
                break;
            }
            if chain.contains(&cur) {
                chain.push(cur);
                return Err(Problem::new(
                    at,
                    format!(
                        "`$ref`s refer to each other and never reach a definition: {}",
                        chain
                            .iter()
                            .map(|r| shown(r))
                            .collect::<Vec<_>>()
                            .join(" -> ")
                    ),
                ));
            }
            if chain.len() >= MAX_CHAIN {
                return Err(Problem::new(
                    at,
                    format!("a chain of more than {MAX_CHAIN} `$ref`s"),
                ));
            }
            chain.push(cur.clone());
            match resolve_local(doc, &cur)
                .and_then(|v| v.get("$ref"))
                .and_then(Value::as_str)
            {
                Some(next) if next.starts_with('#') => cur = next.to_owned(),
                _ => break,
            }
        }
        settled.extend(chain);
    }
    Ok(())
}

/// (pointer of the `$ref`, its value) for every local `$ref` in `v`.
fn collect_refs(v: &Value, at: &mut String, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                if r.starts_with('#') {
                    out.push((format!("{at}/$ref"), r.clone()));
                }
            }
            for (k, child) in m {
                let len = at.len();
                at.push('/');
                at.push_str(&escape_token(k));
                collect_refs(child, at, out);
                at.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let len = at.len();
                at.push('/');
                at.push_str(&i.to_string());
                collect_refs(child, at, out);
                at.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn helpers() {
        assert_eq!(percent_decode("my%20file.yaml").unwrap(), "my file.yaml");
        assert_eq!(percent_decode("100%").unwrap(), "100%");
        assert!(has_scheme("http://x") && has_scheme("urn:x") && has_scheme("file:a"));
        assert!(!has_scheme("a.yaml") && !has_scheme("./a:b.yaml") && !has_scheme(":x"));
        assert_eq!(
            join_inside(Path::new("a/b"), "../c.yaml").unwrap(),
            Path::new("a/c.yaml")
        );
        assert!(join_inside(Path::new("a"), "../../c.yaml").is_none());
    }

    #[test]
    fn alias_loops_are_refused_and_recursion_is_not() {
        let tree = json!({"components": {"schemas": {
            "Tree": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/components/schemas/Tree"}}}},
            "Alias": {"$ref": "#/components/schemas/Tree"},
        }}});
        assert!(check_cycles(&tree, "").is_ok());
        let looped = json!({"definitions": {
            "A": {"$ref": "#/definitions/B"},
            "B": {"$ref": "#/definitions/A", "description": "siblings do not help"},
        }});
        let p = check_cycles(&looped, "").unwrap_err();
        assert!(
            p.message.contains(
                "never reach a definition: #/definitions/B -> #/definitions/A -> #/definitions/B"
            ),
            "{}",
            p.message
        );
        assert_eq!(p.pointer, "/definitions/A/$ref");
        let own = json!({"$ref": "#"});
        assert!(check_cycles(&own, "").is_err());
        let files = json!({"components": {"x-funcatron-refs": {
            "a.yaml": {"$ref": "#/components/x-funcatron-refs/s~1b.yaml"},
            "s/b.yaml": {"$ref": "#/components/x-funcatron-refs/a.yaml"},
        }}});
        let p = check_cycles(&files, "/components/x-funcatron-refs").unwrap_err();
        assert!(
            p.message.ends_with("s/b.yaml# -> a.yaml# -> s/b.yaml#"),
            "{}",
            p.message
        );
    }
}
