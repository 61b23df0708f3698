//! Func bundles, the unit users write and upload.
//!
//! user's directory or uploaded archive -> **bundle loading** -> the Tron's
//! route table (bases, operations) and the Runner (runtime, handler,
//! document for validation). A bundle is a directory holding a Swagger
//! 2.0 or OpenAPI 3.0/3.1 document and the Func's code. What runtime and
//! handler to use is declared in the document's `x-funcatron` extension
//! or in a `funcatron.yaml` beside it (which wins).
//!
//! [`Bundle::load`] is the one loader: `funcatron bundle build/show`,
//! `dev`, uploads, the Tron and the Runner all load bundles through it,
//! so they never disagree. It reads the document (`locate` names the
//! line and column of what is wrong), applies the environment's rewrite
//! rules, makes the document self-contained ([`refs`]: other files'
//! `$ref`s copied in), and reads its servers ([`servers`]) and
//! operations ([`openapi`]).
//!
//! Every failure names the file and the field at fault.

#![warn(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod archive;
pub mod auth;
pub mod cors;
mod locate;
pub mod openapi;
pub mod refs;
pub mod servers;
pub mod store;
pub mod triggers;
pub mod validate;

pub use openapi::{default_handler_name, parse_api, ApiDoc, Operation, SpecVersion};
pub use refs::{refs_pointer, RefLimits, REFS_KEY};
pub use servers::Base;

use serde::Deserialize;
use serde_json::Value;

/// Documents a bundle may hold, in the order they are looked for.
pub const SPEC_FILES: &[&str] = &[
    "openapi.yaml",
    "openapi.yml",
    "openapi.json",
    "swagger.yaml",
    "swagger.yml",
    "swagger.json",
];

/// The HTTP methods an operation can have, as Swagger spells them.
pub const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Why a bundle was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A document is not valid YAML/JSON or not a valid Swagger/OpenAPI document.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// [`BundleError::Invalid`] at a known place in the file.
    #[error("{path}:{line}:{column}: {message}")]
    Located {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the field (a JSON pointer for the
        /// document's fields).
        message: String,
    },
}

impl BundleError {
    fn invalid(path: &Path, message: impl Into<String>) -> Self {
        BundleError::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// The runtimes a bundle can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Lua 5.4, in-process in the Runner.
    Lua,
    /// Any executable, one process per invocation: the body on stdin, the
    /// answer on stdout (OpenFaaS classic watchdog, tinyFaaS `binary`).
    Exec,
    /// Python 3 in long-lived worker processes.
    Python,
    /// JavaScript on Node.js in long-lived worker processes.
    Node,
    /// Java (compiled with the machine's `javac`) in long-lived JVMs.
    Java,
}

impl RuntimeKind {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lua" | "lua5.4" | "lua54" => Some(RuntimeKind::Lua),
            "exec" | "binary" => Some(RuntimeKind::Exec),
            "python" | "python3" => Some(RuntimeKind::Python),
            "node" | "nodejs" | "javascript" | "js" => Some(RuntimeKind::Node),
            "java" => Some(RuntimeKind::Java),
            _ => None,
        }
    }

    fn default_handler(self, style: Style) -> &'static str {
        match (self, style) {
            (RuntimeKind::Lua, _) => "main.lua",
            (RuntimeKind::Exec, _) => "fn.sh",
            (RuntimeKind::Python, Style::TinyFaas) => "fn.py",
            (RuntimeKind::Python, Style::Native) => "main.py",
            (RuntimeKind::Node, Style::TinyFaas) => ".",
            (RuntimeKind::Node, Style::Native) => "main.js",
            (RuntimeKind::Java, _) => "src",
        }
    }

    /// Whether the handler names a directory (Java sources, a Node package).
    fn handler_is_dir(self, handler: &str) -> bool {
        match self {
            RuntimeKind::Java => true,
            RuntimeKind::Node => !handler.ends_with(".js") && !handler.ends_with(".cjs"),
            _ => false,
        }
    }

    /// The name used in manifests and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Lua => "lua",
            RuntimeKind::Exec => "exec",
            RuntimeKind::Python => "python",
            RuntimeKind::Node => "nodejs",
            RuntimeKind::Java => "java",
        }
    }
}

/// How a Func is called: Funcatron's own contract, or a tinyFaaS function
/// folder run unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    /// One handler per `operationId`, called with a request object.
    #[default]
    Native,
    /// tinyFaaS: Python `fn(body, headers)` / `fn(body)`; Node.js an
    /// Express-style `(req, res)` module named `fn`; `fn.sh` on stdin/stdout.
    TinyFaas,
}

/// A loaded, validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The Func's name; its queue is named after it.
    pub name: String,
    /// The bundle directory.
    pub dir: PathBuf,
    /// The Swagger/OpenAPI document inside it.
    pub spec_file: PathBuf,
    /// Which specification the document follows (`None` for tinyFaaS
    /// folders without one).
    pub spec_version: Option<SpecVersion>,
    /// The primary host: the first server's, its variables at their
    /// defaults; `None` for any host (`*` or no host in the document).
    /// For display and for calling the Func (invoke, replay); routing
    /// uses [`Bundle::bases`].
    pub host: Option<String>,
    /// The primary base path (the first server's, at its defaults),
    /// normalised: starts with `/`, no trailing `/` (`/` alone for root).
    pub base_path: String,
    /// Every base the document's operations are served on: each server,
    /// each enum value of its variables (see [`servers`]); the primary's
    /// first. Operations with their own servers have their own
    /// ([`Operation::bases`]).
    pub bases: Vec<Base>,
    /// The operations, sorted by path template, each path's methods in
    /// [`METHODS`] order.
    pub operations: Vec<Operation>,
    /// Runtime to run the code in.
    pub runtime: RuntimeKind,
    /// Handler file, relative to `dir`.
    pub handler: PathBuf,
    /// Per-invocation time limit in milliseconds, if the bundle sets one.
    pub timeout_ms: Option<u64>,
    /// Memory limit for the Func's state in bytes, if the bundle sets one.
    pub memory_bytes: Option<usize>,
    /// Exec runtime: the command to run, argv, relative to the bundle
    /// (default: `sh <handler>` for `.sh` handlers, else `./<handler>`).
    pub command: Vec<String>,
    /// How the Func is called.
    pub style: Style,
    /// Environment variables declared in the bundle, passed to the Func.
    pub env: BTreeMap<String, String>,
    /// Names of secrets the Func needs; their values are supplied where the
    /// Runner runs (see the Runner's `--secrets-dir`), never in the bundle.
    pub secrets: Vec<String>,
    /// Validate requests against the document before the Func runs.
    pub validate: bool,
    /// Check `format`s (`int32`, `date-time`, `uuid`, ...) in request and
    /// response checks (`check_formats: false` makes them annotations).
    pub check_formats: bool,
    /// Check the Func's answers against the document's `responses` and
    /// report mismatches: the `check_responses` setting the Func was
    /// enabled with (an operator's choice, like `debug`; false after
    /// [`Bundle::load`]). `funcatron dev` checks every Func's answers.
    pub check_responses: bool,
    /// Worker processes per Runner (Python, Node.js, Java), if set.
    pub concurrency: Option<usize>,
    /// Answer failures with their full detail rather than a generic
    /// message: the `debug` setting the Func was enabled with (an
    /// operator's choice, so not a field of the bundle's own; false after
    /// [`Bundle::load`]).
    pub debug: bool,
    /// What the document's security schemes are checked against (the
    /// `auth` setting the Func was enabled with; empty after
    /// [`Bundle::load`], so every secured operation refuses requests until
    /// the operator configures it). See [`auth`].
    pub auth: BTreeMap<String, funcatron_control::state::SchemeCredentials>,
    /// Which web pages may call the Func (the `cors` setting it was
    /// enabled with; `None` after [`Bundle::load`]). See [`cors`].
    pub cors: Option<funcatron_control::state::CorsSettings>,
    /// How its asynchronous calls are retried, aged and bounded: the
    /// document's `x-funcatron: {async: ...}` with the enable-time
    /// `async` setting over it. See [`funcatron_control::calls`].
    pub async_policy: funcatron_control::calls::AsyncPolicy,
    /// The Func may be a stage of a chain (`x-funcatron: {chain: true}`;
    /// `docs/flows.md`). Off by default: a chain reaches a Func's routes
    /// from the chain endpoint, which the Func must agree to.
    pub chainable: bool,
    /// The document-store collections its Func may use, and how
    /// (`x-funcatron: {store: {orders: [read, write]}}`, [`store`]).
    pub store_access: BTreeMap<String, Vec<store::StoreOp>>,
    /// Collections it defines when they are missing (`collections`:
    /// name -> `{schema, read, write}`, [`store`]).
    pub collections: BTreeMap<String, Value>,
    /// The parsed API document (`Null` for tinyFaaS folders without one),
    /// self-contained: the files its `$ref`s named are copied in under
    /// [`refs_pointer`] and every `$ref` is local (`#/...`); path items that
    /// were `$ref`s are replaced by what they refer to.
    pub doc: Arc<Value>,
    /// Content version: the first 12 hex digits of the SHA-256 over the
    /// bundle's files (see [`content_digest`]). Each version has its own
    /// queue, so a switch never mixes versions.
    pub version: String,
}

/// SHA-256 over a bundle directory's regular files, in path order: for each,
/// its relative path, a NUL, its length (8 bytes, big-endian) and its bytes.
/// Dot files and directories (`.git`, editor swap files) are left out, as
/// `funcatron bundle build` leaves them out of archives.
pub fn content_digest(dir: &Path) -> Result<[u8; 32], BundleError> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    walk(dir, dir, &mut files, false)?;
    let mut h = Sha256::new();
    for (rel, path) in files {
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Io { path, source })?;
        h.update(rel.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().into())
}

/// The regular files of a bundle as (relative path with `/`, full path),
/// sorted; dot entries skipped, symlinks refused (what goes into an archive).
pub fn bundle_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), BundleError> {
    walk(root, dir, out, true)
}

/// [`bundle_files`]; `refuse_links` false skips symbolic links instead (a
/// local directory's version: the Lua sandbox still refuses links that
/// leave the bundle).
fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
    refuse_links: bool,
) -> Result<(), BundleError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Io { path, source }
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        let ft = e.file_type().map_err(io(&path))?;
        if ft.is_symlink() {
            if refuse_links {
                return Err(BundleError::invalid(
                    &path,
                    "symbolic links are not allowed in a bundle",
                ));
            }
        } else if ft.is_dir() {
            walk(root, &path, out, refuse_links)?;
        } else if ft.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, path));
        }
    }
    Ok(())
}

/// Hex of the first `n` bytes.
pub fn hex_prefix(digest: &[u8], n: usize) -> String {
    digest.iter().take(n).map(|b| format!("{b:02x}")).collect()
}

/// `x-funcatron` in the document or `funcatron.yaml` beside it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: Option<String>,
    runtime: Option<String>,
    handler: Option<String>,
    spec: Option<String>,
    timeout_ms: Option<u64>,
    memory_mb: Option<usize>,
    command: Option<Vec<String>>,
    style: Option<String>,
    env: Option<BTreeMap<String, String>>,
    secrets: Option<Vec<String>>,
    validate: Option<bool>,
    check_formats: Option<bool>,
    concurrency: Option<usize>,
    environments: Option<BTreeMap<String, Vec<Rewrite>>>,
    default_handler: Option<String>,
    #[serde(rename = "async")]
    async_policy: Option<funcatron_control::calls::AsyncPolicy>,
    chain: Option<bool>,
    store: Option<BTreeMap<String, Vec<store::StoreOp>>>,
    collections: Option<BTreeMap<String, Value>>,
}

/// One staging rewrite: in the document field at `field` (a JSON pointer
/// such as `/servers/0/url`, or a top-level name such as `host`), replace
/// every match of the regular expression `match` with `replace` (`$1`
/// refers to groups).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Where: a JSON pointer or a top-level field name.
    pub field: String,
    /// What: a regular expression.
    #[serde(rename = "match")]
    pub pattern: String,
    /// With what.
    pub replace: String,
}

/// Apply `rules` to `doc`; a rule naming a field that is missing or not a
/// string, or a bad expression, is an error naming the rule.
fn rewrite(
    doc: &mut Value,
    rules: &[Rewrite],
    spec: &Path,
    source: &Path,
    env: &str,
) -> Result<(), BundleError> {
    for (i, r) in rules.iter().enumerate() {
        let at = format!("environments.{env}[{i}]");
        let re = regex::Regex::new(&r.pattern)
            .map_err(|e| BundleError::invalid(source, format!("{at}.match: {e}")))?;
        let pointer = if r.field.starts_with('/') {
            r.field.clone()
        } else {
            format!("/{}", r.field)
        };
        let target = doc.pointer_mut(&pointer).ok_or_else(|| {
            BundleError::invalid(
                spec,
                format!("{at}: field `{}` is not in the document", r.field),
            )
        })?;
        let Value::String(text) = target else {
            return Err(BundleError::invalid(
                spec,
                format!("{at}: field `{}` is not a string", r.field),
            ));
        };
        *text = re.replace_all(text, r.replace.as_str()).into_owned();
    }
    Ok(())
}

impl Manifest {
    fn overlay(self, over: Manifest) -> Manifest {
        Manifest {
            style: over.style.or(self.style),
            env: over.env.or(self.env),
            secrets: over.secrets.or(self.secrets),
            validate: over.validate.or(self.validate),
            check_formats: over.check_formats.or(self.check_formats),
            concurrency: over.concurrency.or(self.concurrency),
            environments: over.environments.or(self.environments),
            default_handler: over.default_handler.or(self.default_handler),
            async_policy: over.async_policy.or(self.async_policy),
            chain: over.chain.or(self.chain),
            store: over.store.or(self.store),
            collections: over.collections.or(self.collections),
            name: over.name.or(self.name),
            runtime: over.runtime.or(self.runtime),
            handler: over.handler.or(self.handler),
            spec: over.spec.or(self.spec),
            timeout_ms: over.timeout_ms.or(self.timeout_ms),
            memory_mb: over.memory_mb.or(self.memory_mb),
            command: over.command.or(self.command),
        }
    }
}

fn read(path: &Path) -> Result<String, BundleError> {
    std::fs::read_to_string(path).map_err(|source| BundleError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Parse YAML or JSON text; a syntax error names its line and column.
fn parse_doc(path: &Path, text: &str) -> Result<Value, BundleError> {
    serde_yaml_ng::from_str::<Value>(text)
        .map_err(|e| locate::yaml_error(path, "not valid YAML or JSON: ", &e))
}

/// Names a Func may have: they become queue names and URL-safe labels.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        // `.` and `..` name directories, not Funcs.
        && !name.bytes().all(|b| b == b'.')
}

/// Is `key` usable as an `env` key or a secret name: letters, digits and
/// `_`, not `FUNCATRON_*` (a secret name also names a file under the
/// secrets directory, so nothing else may pass).
pub fn valid_var_name(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.starts_with("FUNCATRON_")
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A tinyFaaS function folder (no API document): its runtime from the
/// file it holds.
fn detect_tinyfaas(dir: &Path) -> Option<RuntimeKind> {
    if dir.join("fn.py").is_file() {
        Some(RuntimeKind::Python)
    } else if dir.join("package.json").is_file() {
        Some(RuntimeKind::Node)
    } else if dir.join("fn.sh").is_file() {
        Some(RuntimeKind::Exec)
    } else {
        None
    }
}

/// The route of a Func without an API document, as tinyFaaS and OpenFaaS
/// give it: every method on `/<name>`, operation `fn`.
fn synthesized_api(name: &str) -> ApiDoc {
    let base = Base {
        host: None,
        path: format!("/{name}"),
    };
    ApiDoc {
        // Not used: a bundle without a document has no `spec_version`.
        version: SpecVersion::OpenApi31,
        host: None,
        base_path: base.path.clone(),
        bases: vec![base],
        operations: METHODS
            .iter()
            .map(|m| Operation {
                method: m.to_ascii_uppercase(),
                path: "/".to_owned(),
                operation_id: "fn".to_owned(),
                has_operation_id: true,
                bases: None,
                direct: false,
                triggers: Vec::new(),
            })
            .collect(),
    }
}

impl Bundle {
    /// This bundle with the settings it was enabled with applied (they
    /// override the bundle's own).
    pub fn with_settings(&self, settings: &funcatron_control::state::FuncSettings) -> Bundle {
        let mut b = self.clone();
        b.env.extend(settings.env.clone());
        for s in &settings.secrets {
            if !b.secrets.contains(s) {
                b.secrets.push(s.clone());
            }
        }
        if settings.concurrency.is_some() {
            b.concurrency = settings.concurrency;
        }
        if settings.timeout_ms.is_some() {
            b.timeout_ms = settings.timeout_ms;
        }
        if let Some(mb) = settings.memory_mb {
            b.memory_bytes = Some(mb * 1024 * 1024);
        }
        if let Some(debug) = settings.debug {
            b.debug = debug;
        }
        if let Some(check) = settings.check_responses {
            b.check_responses = check;
        }
        b.auth = settings.auth.clone();
        b.cors = settings.cors.clone();
        if let Some(over) = &settings.async_policy {
            b.async_policy = b.async_policy.merged(over);
        }
        b
    }

    /// Load and validate the bundle in `dir`, its document as written.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        Bundle::load_in(dir, None)
    }

    /// The manifest in `funcatron.yaml` (empty without one), whether there
    /// is one, and its path.
    fn file_manifest(dir: &Path) -> Result<(Manifest, bool, PathBuf), BundleError> {
        let path = dir.join("funcatron.yaml");
        if !path.is_file() {
            return Ok((Manifest::default(), false, path));
        }
        let text = read(&path)?;
        let m = serde_yaml_ng::from_str::<Manifest>(&text)
            .map_err(|e| locate::yaml_error(&path, "", &e))?;
        Ok((m, true, path))
    }

    /// Load the bundle in `dir` for a deployment environment: the
    /// document's fields are rewritten by the bundle's `environments`
    /// rules for `environment` (see [`Rewrite`]) before routes are read.
    pub fn load_in(dir: &Path, environment: Option<&str>) -> Result<Bundle, BundleError> {
        let (file_manifest, has_manifest, manifest_path) = Bundle::file_manifest(dir)?;
        let spec_file = match &file_manifest.spec {
            Some(s) => Some(inside(dir, s, &manifest_path, "spec")?),
            None => SPEC_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file()),
        };
        let detected = match &spec_file {
            Some(_) => None,
            None => detect_tinyfaas(dir),
        };
        if spec_file.is_none() && detected.is_none() && file_manifest.runtime.is_none() {
            return Err(BundleError::invalid(
                dir,
                format!(
                    "no API document: expected one of {} (or a tinyFaaS function folder: fn.py, package.json or fn.sh)",
                    SPEC_FILES.join(", ")
                ),
            ));
        }
        let (text, doc, doc_manifest) = match &spec_file {
            Some(f) => read_document(f)?,
            None => (String::new(), Value::Null, Manifest::default()),
        };
        let (mut m, source) = match (has_manifest, &spec_file) {
            (true, _) => (doc_manifest.overlay(file_manifest), manifest_path.clone()),
            (false, Some(f)) => (doc_manifest, f.clone()),
            (false, None) => (doc_manifest, dir.to_owned()),
        };
        let environments = m.environments.take().unwrap_or_default();
        let rules = environment.and_then(|e| environments.get(e).map(|r| (e, r.as_slice())));
        let (doc, api) = match &spec_file {
            Some(f) => {
                let (doc, api) = load_document(dir, f, &text, doc, rules, &source)?;
                (doc, Some(api))
            }
            None => (doc, None),
        };
        let name = name_of(m.name.take(), dir, &source)?;
        let runtime = runtime_of(m.runtime.take(), detected, &source)?;
        let style = style_of(m.style.as_deref(), spec_file.is_some(), &source)?;
        let handler_name = m
            .handler
            .take()
            .unwrap_or_else(|| runtime.default_handler(style).to_owned());
        check_handler(dir, runtime, &handler_name, &source)?;
        let command = exec_command(runtime, m.command.take(), &handler_name, &source)?;
        let env = m.env.take().unwrap_or_default();
        let secrets = m.secrets.take().unwrap_or_default();
        check_env_names(&env, &secrets, &source)?;
        check_concurrency(m.concurrency, &source)?;
        let async_policy = m.async_policy.take().unwrap_or_default();
        async_policy
            .resolved()
            .map_err(|e| BundleError::invalid(&source, format!("field `async`: {e}")))?;
        let store_access = m.store.take().unwrap_or_default();
        let collections = m.collections.take().unwrap_or_default();
        store::check(&store_access, &collections).map_err(|e| BundleError::invalid(&source, e))?;
        let spec_version = api.as_ref().map(|a| a.version);
        let mut api = api.unwrap_or_else(|| synthesized_api(&name));
        default_handlers(&mut api, m.default_handler.take(), &source)?;
        let spec_or_dir = spec_file.as_deref().unwrap_or(dir);
        if api.operations.is_empty() {
            return Err(BundleError::invalid(
                spec_or_dir,
                "no operations to route: the document has no `paths` (OpenAPI 3.1 `webhooks` are requests a Func sends, not ones it serves)",
            ));
        }
        check_reserved(&api, spec_or_dir)?;
        Ok(Bundle {
            name,
            dir: dir.to_owned(),
            spec_file: spec_file.unwrap_or_else(|| dir.to_owned()),
            spec_version,
            host: api.host,
            base_path: api.base_path,
            bases: api.bases,
            operations: api.operations,
            runtime,
            handler: PathBuf::from(handler_name),
            timeout_ms: m.timeout_ms,
            memory_bytes: m.memory_mb.map(|mb| mb * 1024 * 1024),
            command,
            style,
            env,
            secrets,
            validate: m.validate.unwrap_or(true),
            check_formats: m.check_formats.unwrap_or(true),
            check_responses: false,
            concurrency: m.concurrency,
            debug: false,
            auth: BTreeMap::new(),
            cors: None,
            async_policy,
            chainable: m.chain.unwrap_or(false),
            store_access,
            collections,
            doc: Arc::new(doc),
            version: hex_prefix(&content_digest(dir)?, 6),
        })
    }

    /// Load every bundle directly under `root` (each subdirectory is one),
    /// or `root` itself when it is a bundle. A broken bundle does not stop
    /// the others: its error is returned beside them.
    pub fn load_all(root: &Path) -> (Vec<Bundle>, Vec<BundleError>) {
        Bundle::load_all_in(root, None)
    }

    /// [`Bundle::load_all`] for a deployment environment (see [`Bundle::load_in`]).
    pub fn load_all_in(root: &Path, environment: Option<&str>) -> (Vec<Bundle>, Vec<BundleError>) {
        if root.join("funcatron.yaml").is_file()
            || SPEC_FILES.iter().any(|f| root.join(f).is_file())
            || detect_tinyfaas(root).is_some()
        {
            return match Bundle::load_in(root, environment) {
                Ok(b) => (vec![b], vec![]),
                Err(e) => (vec![], vec![e]),
            };
        }
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(source) => {
                return (
                    vec![],
                    vec![BundleError::Io {
                        path: root.to_owned(),
                        source,
                    }],
                )
            }
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for d in dirs {
            match Bundle::load_in(&d, environment) {
                Ok(b) => ok.push(b),
                Err(e) => errors.push(e),
            }
        }
        (ok, errors)
    }
}

/// Resolve a relative file named in a manifest, refusing anything outside `dir`.
fn inside(dir: &Path, rel: &str, source: &Path, field: &str) -> Result<PathBuf, BundleError> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(BundleError::invalid(
            source,
            format!("field `{field}`: {rel:?} must be a relative path inside the bundle"),
        ));
    }
    Ok(dir.join(p))
}

/// The API document in `f` (its text and value) and the `x-funcatron`
/// manifest inside it; errors name the line and column.
fn read_document(f: &Path) -> Result<(String, Value, Manifest), BundleError> {
    let text = read(f)?;
    let doc = parse_doc(f, &text)?;
    let m = match doc.get("x-funcatron") {
        Some(_) => locate::deserialize_at::<Manifest>(&text, "/x-funcatron")
            .map_err(|e| locate::yaml_error(f, "", &e))?
            .unwrap_or_default(),
        None => Manifest::default(),
    };
    Ok((text, doc, m))
}

/// The document of bundle `dir` in `f`, read from `text` as `doc`:
/// rewritten for the environment, made self-contained ([`refs`]), read
/// for routing ([`openapi`]), and its path items inlined.
fn load_document(
    dir: &Path,
    f: &Path,
    text: &str,
    mut doc: Value,
    rules: Option<(&str, &[Rewrite])>,
    source: &Path,
) -> Result<(Value, ApiDoc), BundleError> {
    if let Some((env, rules)) = rules {
        rewrite(&mut doc, rules, f, source, env)?;
    }
    let sources = refs::bundle(dir, f, &mut doc, text, RefLimits::default())?;
    let api = openapi::api_from_value(&doc, &sources)?;
    openapi::inline_path_items(&mut doc);
    Ok((doc, api))
}

/// The Func's name: the manifest's, else the directory's.
fn name_of(named: Option<String>, dir: &Path, source: &Path) -> Result<String, BundleError> {
    let name = match named {
        Some(n) => n,
        None => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default(),
    };
    if !valid_name(&name) {
        return Err(BundleError::invalid(
            source,
            format!("field `name`: {name:?} is not a valid Func name (letters, digits, - _ .)"),
        ));
    }
    Ok(name)
}

/// Operations without an `operationId` are handled by the bundle's
/// `default_handler` when it sets one (else they keep
/// [`default_handler_name`]).
fn default_handlers(
    api: &mut ApiDoc,
    default: Option<String>,
    source: &Path,
) -> Result<(), BundleError> {
    let Some(default) = default else {
        return Ok(());
    };
    if !openapi::is_identifier(&default) {
        return Err(BundleError::invalid(
            source,
            format!("field `default_handler`: {default:?} is not an identifier (letters, digits and _, not starting with a digit)"),
        ));
    }
    for op in api.operations.iter_mut().filter(|o| !o.has_operation_id) {
        op.operation_id.clone_from(&default);
    }
    Ok(())
}

/// The runtime a manifest names, or the one a tinyFaaS folder implies.
fn runtime_of(
    named: Option<String>,
    detected: Option<RuntimeKind>,
    source: &Path,
) -> Result<RuntimeKind, BundleError> {
    match (named, detected) {
        (Some(r), _) => RuntimeKind::parse(&r).ok_or_else(|| {
            BundleError::invalid(
                source,
                format!(
                    "field `runtime`: unknown runtime {r:?} (known: lua, python, nodejs, java, exec)"
                ),
            )
        }),
        (None, Some(k)) => Ok(k),
        (None, None) => Err(BundleError::invalid(
            source,
            "field `runtime` is missing (x-funcatron.runtime or funcatron.yaml)",
        )),
    }
}

/// The calling style a manifest names (tinyFaaS without a document).
fn style_of(named: Option<&str>, has_spec: bool, source: &Path) -> Result<Style, BundleError> {
    match named {
        None if !has_spec => Ok(Style::TinyFaas),
        None | Some("native") | Some("funcatron") => Ok(Style::Native),
        Some("tinyfaas") => Ok(Style::TinyFaas),
        Some(other) => Err(BundleError::invalid(
            source,
            format!("field `style`: unknown style {other:?} (known: native, tinyfaas)"),
        )),
    }
}

/// The handler file (or directory) exists inside the bundle.
fn check_handler(
    dir: &Path,
    runtime: RuntimeKind,
    handler_name: &str,
    source: &Path,
) -> Result<(), BundleError> {
    let handler_path = if handler_name == "." {
        dir.to_owned()
    } else {
        inside(dir, handler_name, source, "handler")?
    };
    let exists = if runtime.handler_is_dir(handler_name) {
        handler_path.is_dir()
    } else {
        handler_path.is_file()
    };
    if !exists {
        return Err(BundleError::invalid(
            source,
            format!("field `handler`: {handler_name:?} does not exist in the bundle"),
        ));
    }
    Ok(())
}

/// No operation claims a path Funcatron reserves for itself
/// ([`funcatron_control::names::RESERVED_PREFIXES`]) on any of its bases:
/// the literal start of base path + path, up to its first template or
/// variable, decides.
fn check_reserved(api: &ApiDoc, source: &Path) -> Result<(), BundleError> {
    for op in &api.operations {
        for base in op.bases_in(&api.bases) {
            let full = format!(
                "{}/{}",
                base.path.trim_end_matches('/'),
                op.path.trim_start_matches('/')
            );
            let literal = full.split('{').next().unwrap_or_default();
            let literal = literal.trim_end_matches('/');
            if let Some(prefix) = funcatron_control::names::reserved_prefix(literal) {
                return Err(BundleError::invalid(
                    source,
                    format!(
                        "operation `{}` ({} {full}): paths under {prefix}/ are reserved for Funcatron",
                        op.operation_id, op.method
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// What an exec Func runs: its `command`, else its handler.
fn exec_command(
    runtime: RuntimeKind,
    command: Option<Vec<String>>,
    handler_name: &str,
    source: &Path,
) -> Result<Vec<String>, BundleError> {
    Ok(match (runtime, command) {
        (RuntimeKind::Exec, Some(c)) if c.is_empty() => {
            return Err(BundleError::invalid(source, "field `command`: empty"));
        }
        (RuntimeKind::Exec, Some(c)) => c,
        (RuntimeKind::Exec, None) if handler_name.ends_with(".sh") => {
            vec!["sh".to_owned(), handler_name.to_owned()]
        }
        (RuntimeKind::Exec, None) => vec![format!("./{handler_name}")],
        (_, _) => Vec::new(),
    })
}

/// `concurrency`, if set, is at least 1.
fn check_concurrency(concurrency: Option<usize>, source: &Path) -> Result<(), BundleError> {
    if concurrency == Some(0) {
        return Err(BundleError::invalid(
            source,
            "field `concurrency`: must be at least 1",
        ));
    }
    Ok(())
}

/// `env` and `secrets` names are usable variable names.
fn check_env_names(
    env: &BTreeMap<String, String>,
    secrets: &[String],
    source: &Path,
) -> Result<(), BundleError> {
    for key in env.keys().chain(secrets.iter()) {
        if !valid_var_name(key) {
            return Err(BundleError::invalid(
                source,
                format!(
                    "field `env`/`secrets`: {key:?} is not a usable variable name (letters, digits, _; not FUNCATRON_*)"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_without_operation_id_get_a_default_name() {
        let doc = "swagger: '2.0'\npaths:\n  /a/{id}:\n    get: {}\n    put: {operationId: ''}\n    post: {operationId: a}\n";
        let api = parse_api(Path::new("s.yaml"), doc).unwrap();
        let ids: Vec<(&str, bool)> = api
            .operations
            .iter()
            .map(|o| (o.operation_id.as_str(), o.has_operation_id))
            .collect();
        assert_eq!(ids, [("get_a_id", false), ("put_a_id", false), ("a", true)]);
    }

    #[test]
    fn malformed_documents_are_clear_errors() {
        for (doc, needle) in [
            ("{{{", "not valid YAML"),
            ("a: [1\nb: 2", "x.yaml:2:"),
            ("swagger: '1.2'\npaths: {}", "not supported"),
            ("openapi: 4.0.0\npaths: {}", "not supported"),
            ("hello: world", "neither"),
            ("- a\n- b", "not a mapping"),
            (
                "openapi: 3.0.0\ninfo: 7\npaths: {}",
                "x.yaml:2:7: /info: `info` must be a mapping",
            ),
            (
                "swagger: '2.0'\npaths: 3",
                "x.yaml:2:8: /paths: `paths` must be a mapping",
            ),
            ("swagger: '2.0'\n", "`paths` is missing"),
        ] {
            let err = parse_api(Path::new("x.yaml"), doc).unwrap_err().to_string();
            assert!(err.contains(needle), "{doc:?}: {err}");
        }
    }

    #[test]
    fn bundle_manifest_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("swagger.yaml"),
            "swagger: '2.0'\nx-funcatron: {runtime: cobol}\npaths:\n  /a:\n    get: {operationId: a}\n",
        )
        .unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("runtime") && err.contains("cobol"), "{err}");
        std::fs::write(
            dir.path().join("funcatron.yaml"),
            "runtime: lua\nhandler: ../../etc/passwd\n",
        )
        .unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("handler") && err.contains("inside the bundle"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("funcatron.yaml"),
            "runtime: lua\nhandler: nope.lua\n",
        )
        .unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
        std::fs::write(
            dir.path().join("funcatron.yaml"),
            "runtime: lua\nname: my-func\ntimeout_ms: 250\n",
        )
        .unwrap();
        let b = Bundle::load(dir.path()).unwrap();
        assert_eq!(b.name, "my-func");
        assert_eq!(b.timeout_ms, Some(250));
        assert_eq!(b.host, None);
        assert_eq!(b.base_path, "/");
    }

    #[test]
    fn bundles_cannot_claim_reserved_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
        std::fs::write(dir.path().join("funcatron.yaml"), "runtime: lua\n").unwrap();
        for (base, path) in [
            ("/_funcatron", "/x"),
            ("/", "/_funcatron/health"),
            ("/_funcatron/", "/{any}"),
        ] {
            std::fs::write(
                dir.path().join("swagger.yaml"),
                format!("swagger: '2.0'\nbasePath: {base}\npaths:\n  {path}:\n    get: {{operationId: a}}\n"),
            )
            .unwrap();
            let err = Bundle::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("reserved"), "{base} {path}: {err}");
        }
        std::fs::write(
            dir.path().join("swagger.yaml"),
            "swagger: '2.0'\nbasePath: /_funcatronic\npaths:\n  /{x}:\n    get: {operationId: a}\n",
        )
        .unwrap();
        let b = Bundle::load(dir.path()).unwrap();
        assert_eq!(b.base_path, "/_funcatronic");
        // A Func without a document is routed at /<name>.
        let named = dir.path().join("_funcatron");
        std::fs::create_dir(&named).unwrap();
        std::fs::write(named.join("fn.sh"), "echo hi").unwrap();
        let err = Bundle::load(&named).unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
    }
}
