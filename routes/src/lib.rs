//! The route table: (host, base path) -> Func, then (path template,
//! method) -> operation, with path parameters.
//!
//! ingress (**edge routing**) or Tron (**route table**) -> Func queue.
//! A Tron routes the requests on `funcatron.requests` with it; ingresses
//! build the same table from the Trons' broadcasts
//! (`funcatron_control::admission`) and route at the edge, straight onto
//! the Func's queue, so both decide alike and mark the outcome alike
//! ([`Route::headers`]).
//! Built from bundles ([`FuncSpec::of`]) or their broadcast parts: one
//! entry per base a bundle is served on (every server and enum value of
//! its document, and the bases of operations with their own servers;
//! see `funcatron_bundle::servers`), holding the operations served there.
//! A request tries the entries most specific first (`pattern::Rank`:
//! more base-path segments, then more literal base-path text, then a
//! named host before a host with variables before any host); the first
//! whose host and base path match and that has a template matching the
//! rest of the path wins. Within an entry, templates with more literal
//! text win (`/pets/mine` before `/pets/{id}`). Two bundles whose bases
//! are equally specific and can match the same request conflict: the
//! table refuses them ([`RouteTable::build`]), or [`servable`] leaves both
//! out with the reason.
//!
//! The table is a self-contained, immutable value (rebuild and swap to
//! change it); a lookup allocates only the path parameters it returns.

#![warn(clippy::too_many_lines)]

pub mod chain;
mod pattern;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use funcatron_bundle::{Base, Bundle, Operation};
use funcatron_control::admission::{
    AdmissionBase, AdmissionOperation, EdgeMatcher, EdgePath, FuncAdmission,
};
use funcatron_control::{headers, names};
use pattern::{BasePattern, Rank, RequestHost};
use percent_encoding::percent_decode_str;
use regex::Regex;

/// A route table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Two bundles claim bases that are equally specific and can match
    /// the same request (the same host and base path, or patterns that
    /// overlap); the message names both bundles, their documents and the
    /// bases.
    #[error("{0}")]
    Conflict(String),
    /// Two bundles have the same name (and so the same queue).
    #[error("two bundles are named `{name}`: {first} and {second}")]
    DuplicateName {
        /// The name.
        name: String,
        /// One bundle's document.
        first: String,
        /// The other's.
        second: String,
    },
    /// A path template cannot be compiled.
    #[error("{file}: paths.{template}: {message}")]
    BadTemplate {
        /// The document.
        file: String,
        /// The template.
        template: String,
        /// What is wrong.
        message: TemplateError,
    },
}

/// Where a request goes.
#[derive(Debug, PartialEq)]
pub enum RouteOutcome<'t> {
    /// A Func operation.
    Found(Route<'t>),
    /// No Func serves this host and path.
    NotFound,
    /// The path exists but not for this method; the methods that do.
    MethodNotAllowed(Vec<&'t str>),
    /// An `OPTIONS` on a path that exists but declares no `options`
    /// operation: a CORS preflight for its Func to answer
    /// (`funcatron_bundle::cors`); the route (method `OPTIONS`, no
    /// handler) and the path's methods.
    Preflight(Route<'t>, Vec<&'t str>),
}

/// A routed request.
#[derive(Debug, PartialEq)]
pub struct Route<'t> {
    /// The Func (bundle) name.
    pub func: &'t str,
    /// Its queue.
    pub queue: &'t str,
    /// Its queue of asynchronous calls.
    pub async_queue: &'t str,
    /// The bundle version the queue belongs to.
    pub version: &'t str,
    /// The operation's handler (its `operationId` or default name).
    pub operation_id: &'t str,
    /// The operation's upper-case method, as the table holds it.
    pub method: &'t str,
    /// The operation's path template, the document's `paths` key
    /// (relative to the base path). With [`Route::method`] the
    /// operation's key: `x-funcatron-route` is `METHOD /template`.
    pub template: &'t str,
    /// Path parameters, percent-decoded.
    pub params: Vec<(&'t str, String)>,
    /// The Func's position in the table ([`RouteTable::func_infos`], and
    /// the admission entries it was built from).
    pub index: usize,
    /// The operation is direct (`x-funcatron-direct`): its requests go in
    /// direct mode.
    pub direct: bool,
    /// The path's methods and handlers.
    allow: &'t [(String, String)],
}

impl Route<'_> {
    /// The broker message headers that carry this routing outcome to the
    /// Runner (`funcatron_control::headers`): Func, operation, route key,
    /// path parameters, when it was routed, and for a preflight
    /// (`preflight`: the path's methods) the methods. The one function
    /// the Tron and an ingress routing at the edge both use.
    pub fn headers(&self, preflight: Option<String>) -> Vec<(String, String)> {
        let mut hdrs = Vec::with_capacity(6);
        if let Some(allow) = preflight {
            hdrs.push((headers::PREFLIGHT.to_owned(), allow));
        }
        hdrs.push((headers::FUNC.to_owned(), self.func.to_owned()));
        hdrs.push((
            headers::DISPATCHED_MS.to_owned(),
            format!("{:.3}", funcatron_envelope::now_ms()),
        ));
        hdrs.push((headers::OPERATION.to_owned(), self.operation_id.to_owned()));
        hdrs.push((
            headers::ROUTE.to_owned(),
            funcatron_bundle::validate::route_key(self.method, self.template),
        ));
        if !self.params.is_empty() {
            let obj: serde_json::Map<String, serde_json::Value> = self
                .params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone())))
                .collect();
            hdrs.push((
                headers::PATH_PARAMS.to_owned(),
                serde_json::Value::Object(obj).to_string(),
            ));
        }
        hdrs
    }
}

/// Why a path template does not compile.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// `{` without `}`.
    #[error("unclosed `{{` in path template")]
    Unclosed,
    /// `{}` or `{a{b}`.
    #[error("bad parameter name {0:?}")]
    BadName(String),
    /// The regular expression built from it.
    #[error(transparent)]
    Regex(#[from] regex::Error),
}

fn compile(template: &str) -> Result<(Regex, Vec<String>, usize), TemplateError> {
    let mut pattern = String::from("^");
    let mut names = Vec::new();
    let mut literal_len = 0;
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let lit = &rest[..open];
        literal_len += lit.len();
        pattern.push_str(&regex::escape(lit));
        let close = rest[open..].find('}').ok_or(TemplateError::Unclosed)? + open;
        let name = &rest[open + 1..close];
        if name.is_empty() || name.contains('{') {
            return Err(TemplateError::BadName(name.to_owned()));
        }
        names.push(name.to_owned());
        pattern.push_str("([^/]+)");
        rest = &rest[close + 1..];
    }
    literal_len += rest.len();
    pattern.push_str(&regex::escape(rest));
    pattern.push('$');
    let regex = Regex::new(&pattern)?;
    Ok((regex, names, literal_len))
}

/// What the table needs of one Func. Borrowed from a [`Bundle`]
/// ([`FuncSpec::of`]) on a Tron, from an admission broadcast on an
/// ingress ([`RouteTable::from_admission`]).
#[derive(Debug, Clone)]
pub struct FuncSpec<'a> {
    /// The Func (bundle) name.
    pub name: &'a str,
    /// The bundle version (content digest) its queues are named after.
    pub version: &'a str,
    /// Its document, named in conflict errors.
    pub doc: Cow<'a, str>,
    /// The primary host (`None`: any): where `/function/<name>/...`
    /// calls go.
    pub host: Option<&'a str>,
    /// The primary base path, normalised: the prefix of those calls.
    pub base_path: &'a str,
    /// The document's bases.
    pub bases: &'a [Base],
    /// The operations (only method, path and bases route; the handler
    /// name is the operation to invoke).
    pub operations: &'a [Operation],
    /// Its async policy says only async calls with a callback are taken.
    pub async_only: bool,
    /// Its async policy's limit of waiting async calls.
    pub max_queued: Option<u64>,
    /// It may be a stage of a chain.
    pub chainable: bool,
}

impl<'a> FuncSpec<'a> {
    /// The spec of a loaded bundle.
    pub fn of(b: &'a Bundle) -> FuncSpec<'a> {
        FuncSpec {
            name: &b.name,
            version: &b.version,
            doc: Cow::Owned(b.spec_file.display().to_string()),
            host: b.host.as_deref(),
            base_path: &b.base_path,
            bases: &b.bases,
            operations: &b.operations,
            async_only: b.async_policy.async_only.unwrap_or(false),
            max_queued: b.async_policy.max_queued,
            chainable: b.chainable,
        }
    }
}

/// One Func of a table: its queues and what admission needs.
#[derive(Debug)]
pub struct FuncInfo {
    func: Arc<str>,
    queue: String,
    async_queue: String,
    version: String,
    /// The Func as an admission entry (`full` false): what a Tron
    /// broadcasts of it, with its queue's state filled in.
    admission: FuncAdmission,
}

impl FuncInfo {
    /// The Func's name.
    pub fn name(&self) -> &str {
        &self.func
    }

    /// Its queue of asynchronous calls.
    pub fn async_queue(&self) -> &str {
        &self.async_queue
    }

    /// Its admission entry, not full.
    pub fn admission(&self) -> &FuncAdmission {
        &self.admission
    }
}

fn admission_of(spec: &FuncSpec<'_>) -> FuncAdmission {
    let base = |b: &Base| AdmissionBase {
        host: b.host.clone(),
        path: b.path.clone(),
    };
    FuncAdmission {
        func: spec.name.to_owned(),
        version: spec.version.to_owned(),
        host: spec.host.map(str::to_owned),
        base_path: spec.base_path.to_owned(),
        bases: spec.bases.iter().map(base).collect(),
        operations: spec
            .operations
            .iter()
            .map(|op| AdmissionOperation {
                method: op.method.clone(),
                path: op.path.clone(),
                operation_id: op.operation_id.clone(),
                bases: op.bases.as_ref().map(|bs| bs.iter().map(base).collect()),
                direct: op.direct,
            })
            .collect(),
        async_only: spec.async_only,
        max_queued: spec.max_queued,
        full: false,
        cold: false,
        chainable: spec.chainable,
    }
}

/// One bundle on one base: the operations served there.
#[derive(Debug)]
struct Entry {
    /// Index into [`RouteTable::funcs`] (and the bundle list built from).
    func: usize,
    base: BasePattern,
    rank: Rank,
    paths: Vec<PathRoute>,
}

#[derive(Debug)]
struct PathRoute {
    template: String,
    regex: Regex,
    names: Vec<String>,
    /// Literal characters in the template: more is more specific.
    literal_len: usize,
    /// (upper-case method, handler).
    methods: Vec<(String, String)>,
    /// The methods whose operations are direct.
    direct: Vec<String>,
}

/// An immutable route table; rebuild and swap to change it.
#[derive(Debug, Default)]
pub struct RouteTable {
    funcs: Vec<FuncInfo>,
    /// Most specific first.
    entries: Vec<Entry>,
    /// The registry revision it was built for (0: none).
    revision: u64,
}

type Compiled = (Regex, Vec<String>, usize);

/// The entries of Func `b` (number `func`), one per base.
fn bundle_entries(func: usize, b: &FuncSpec<'_>) -> Result<Vec<Entry>, RouteError> {
    let mut order: Vec<(&Base, Vec<&Operation>)> = Vec::new();
    let mut index: HashMap<&Base, usize> = HashMap::new();
    for op in b.operations {
        for base in op.bases_in(b.bases) {
            let i = *index.entry(base).or_insert_with(|| {
                order.push((base, Vec::new()));
                order.len() - 1
            });
            order[i].1.push(op);
        }
    }
    let mut templates: HashMap<&str, Compiled> = HashMap::new();
    let mut entries = Vec::with_capacity(order.len());
    for (base, ops) in order {
        let mut paths: Vec<PathRoute> = Vec::new();
        for op in ops {
            let method = (op.method.clone(), op.operation_id.clone());
            let direct = op.direct.then(|| op.method.clone());
            if let Some(p) = paths.iter_mut().find(|p| p.template == op.path) {
                p.methods.push(method);
                p.direct.extend(direct);
                continue;
            }
            let (regex, names, literal_len) = match templates.get(op.path.as_str()) {
                Some(c) => c.clone(),
                None => {
                    let c = compile(&op.path).map_err(|message| RouteError::BadTemplate {
                        file: b.doc.to_string(),
                        template: op.path.clone(),
                        message,
                    })?;
                    templates.insert(&op.path, c.clone());
                    c
                }
            };
            paths.push(PathRoute {
                template: op.path.clone(),
                regex,
                names,
                literal_len,
                methods: vec![method],
                direct: direct.into_iter().collect(),
            });
        }
        paths.sort_by_key(|p| std::cmp::Reverse(p.literal_len));
        let base = BasePattern::compile(base);
        entries.push(Entry {
            func,
            rank: base.rank(),
            base,
            paths,
        });
    }
    Ok(entries)
}

/// Pairs of entries (indices) of different bundles that conflict: equally
/// specific bases that one request can match.
fn conflicts(entries: &[Entry]) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|i| entries[*i].rank);
    let mut out = Vec::new();
    for group in order.chunk_by(|a, b| entries[*a].rank == entries[*b].rank) {
        for (k, &a) in group.iter().enumerate() {
            for &b in &group[k + 1..] {
                let (ea, eb) = (&entries[a], &entries[b]);
                if ea.func != eb.func && ea.base.overlaps(&eb.base) {
                    out.push((a.min(b), a.max(b)));
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// The conflict between entries `a` and `b`, naming both bundles.
fn conflict(bundles: &[FuncSpec<'_>], a: &Entry, b: &Entry) -> RouteError {
    let (x, y) = (&bundles[a.func], &bundles[b.func]);
    let (bx, by) = (&a.base.shown, &b.base.shown);
    let claim = if bx == by {
        let (host, path) = bx.split_once('/').unwrap_or((bx, ""));
        format!("both claim host `{host}` basePath `/{path}`")
    } else {
        format!("claim bases `{bx}` and `{by}`, which can match the same requests and are equally specific")
    };
    RouteError::Conflict(format!(
        "bundles `{}` ({}) and `{}` ({}) {claim}",
        x.name, x.doc, y.name, y.doc,
    ))
}

fn duplicate(a: &FuncSpec<'_>, b: &FuncSpec<'_>) -> RouteError {
    RouteError::DuplicateName {
        name: b.name.to_owned(),
        first: a.doc.to_string(),
        second: b.doc.to_string(),
    }
}

/// The bundles of `bundles` that can be served together, and why each of
/// the others cannot: a bundle that shares its name with another, or
/// whose bases conflict with another's, is left out with that other (both
/// of the pair, each error naming both); one whose templates do not
/// compile is left out alone. What is kept builds a [`RouteTable`].
pub fn servable(bundles: Vec<Bundle>) -> (Vec<Bundle>, Vec<RouteError>) {
    let specs: Vec<FuncSpec<'_>> = bundles.iter().map(FuncSpec::of).collect();
    let mut errors = Vec::new();
    let refused = refusals(&specs, &mut errors);
    drop(specs);
    let kept = bundles
        .into_iter()
        .zip(refused)
        .filter_map(|(b, r)| (!r).then_some(b))
        .collect();
    (kept, errors)
}

/// Which of `bundles` [`servable`] leaves out, with why in `errors`.
fn refusals(bundles: &[FuncSpec<'_>], errors: &mut Vec<RouteError>) -> Vec<bool> {
    let mut refused = vec![false; bundles.len()];
    for (i, b) in bundles.iter().enumerate() {
        if let Some(j) = bundles[..i].iter().position(|o| o.name == b.name) {
            errors.push(duplicate(&bundles[j], b));
            refused[i] = true;
            refused[j] = true;
        }
    }
    let mut entries = Vec::new();
    for (i, b) in bundles.iter().enumerate() {
        if refused[i] {
            continue;
        }
        match bundle_entries(i, b) {
            Ok(e) => entries.extend(e),
            Err(e) => {
                errors.push(e);
                refused[i] = true;
            }
        }
    }
    let mut reported = Vec::new();
    for (a, b) in conflicts(&entries) {
        let (ea, eb) = (&entries[a], &entries[b]);
        let pair = (ea.func.min(eb.func), ea.func.max(eb.func));
        if !reported.contains(&pair) {
            reported.push(pair);
            errors.push(conflict(bundles, ea, eb));
        }
        refused[ea.func] = true;
        refused[eb.func] = true;
    }
    refused
}

impl RouteTable {
    /// Build from bundles, refusing the first conflict (see [`servable`]
    /// to leave conflicting bundles out instead).
    pub fn build(bundles: &[Bundle]) -> Result<RouteTable, RouteError> {
        let specs: Vec<FuncSpec<'_>> = bundles.iter().map(FuncSpec::of).collect();
        RouteTable::build_specs(&specs)
    }

    /// The table of the Funcs in an admission broadcast: the same
    /// entries, in the same order, as the Tron that sent it routes with.
    pub fn from_admission(funcs: &[FuncAdmission]) -> Result<RouteTable, RouteError> {
        let base = |b: &AdmissionBase| Base {
            host: b.host.clone(),
            path: b.path.clone(),
        };
        let owned: Vec<(Vec<Base>, Vec<Operation>)> = funcs
            .iter()
            .map(|f| {
                let ops = f.operations.iter().map(|op| Operation {
                    method: op.method.clone(),
                    path: op.path.clone(),
                    operation_id: op.operation_id.clone(),
                    has_operation_id: !op.operation_id.is_empty(),
                    bases: op.bases.as_ref().map(|bs| bs.iter().map(base).collect()),
                    direct: op.direct,
                    triggers: Vec::new(),
                });
                (f.bases.iter().map(base).collect(), ops.collect())
            })
            .collect();
        let specs: Vec<FuncSpec<'_>> = funcs
            .iter()
            .zip(&owned)
            .map(|(f, (bases, operations))| FuncSpec {
                name: &f.func,
                version: &f.version,
                doc: Cow::Owned(format!("the admission entry of {}", f.func)),
                host: f.host.as_deref(),
                base_path: &f.base_path,
                bases,
                operations,
                async_only: f.async_only,
                max_queued: f.max_queued,
                chainable: f.chainable,
            })
            .collect();
        RouteTable::build_specs(&specs)
    }

    /// Build from Func specs, refusing the first conflict.
    pub fn build_specs(bundles: &[FuncSpec<'_>]) -> Result<RouteTable, RouteError> {
        for (i, b) in bundles.iter().enumerate() {
            if let Some(other) = bundles[..i].iter().find(|o| o.name == b.name) {
                return Err(duplicate(other, b));
            }
        }
        let mut funcs = Vec::with_capacity(bundles.len());
        let mut entries = Vec::new();
        for (i, b) in bundles.iter().enumerate() {
            entries.extend(bundle_entries(i, b)?);
            funcs.push(FuncInfo {
                func: Arc::from(b.name),
                queue: names::func_queue(b.name, b.version),
                async_queue: names::func_async_queue(b.name, b.version),
                version: b.version.to_owned(),
                admission: admission_of(b),
            });
        }
        if let Some((a, b)) = conflicts(&entries).first() {
            return Err(conflict(bundles, &entries[*a], &entries[*b]));
        }
        // Stable: equally specific entries keep the bundles' order.
        entries.sort_by_key(|e| std::cmp::Reverse(e.rank));
        Ok(RouteTable {
            funcs,
            entries,
            revision: 0,
        })
    }

    /// The table, marked as built for registry revision `revision`.
    pub fn at_revision(mut self, revision: u64) -> RouteTable {
        self.revision = revision;
        self
    }

    /// The registry revision the table was built for (0: none).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The table as a flat list of regular-expression matchers, in the
    /// order [`RouteTable::route`] tries its entries: what the nginx Lua
    /// ingress routes by, so it never parses a document itself.
    pub fn matchers(&self) -> Vec<EdgeMatcher> {
        self.entries
            .iter()
            .map(|e| {
                let (host, base) = e.base.regexes();
                EdgeMatcher {
                    func: e.func,
                    host,
                    base,
                    paths: e
                        .paths
                        .iter()
                        .map(|p| EdgePath {
                            regex: p.regex.as_str().to_owned(),
                            names: p.names.clone(),
                            template: p.template.clone(),
                            methods: p.methods.clone(),
                            direct: p.direct.clone(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// The Funcs in the table and their queues, each once.
    pub fn funcs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.funcs.iter().map(|f| (&*f.func, f.queue.as_str()))
    }

    /// Every Func of the table, each once, in the order it was built from.
    pub fn func_infos(&self) -> &[FuncInfo] {
        &self.funcs
    }

    /// The Funcs' queues of asynchronous calls, each once.
    pub fn async_queues(&self) -> impl Iterator<Item = &str> {
        self.funcs.iter().map(|f| f.async_queue.as_str())
    }

    /// Route one request. `path` is the raw (percent-encoded) path without query.
    ///
    /// The first entry with a template matching the path decides the
    /// Func; when that template lacks the method, the Func's other
    /// entries (its other bases) may still serve it, else the answer is
    /// 405 with the first match's methods.
    pub fn route(&self, host: &str, method: &str, path: &str) -> RouteOutcome<'_> {
        self.route_in(None, host, method, path)
    }

    /// Route a call that names its Func (`/function/<func>/<rest>` on an
    /// ingress): `rest` below the Func's primary base path, on its
    /// primary host, among that Func's entries only. `None`: the table
    /// has no such Func.
    pub fn route_func(&self, func: &str, method: &str, rest: &str) -> Option<RouteOutcome<'_>> {
        let i = self.funcs.iter().position(|f| &*f.func == func)?;
        let a = &self.funcs[i].admission;
        let path = match (a.base_path.as_str(), rest) {
            ("/", "") => Cow::Borrowed("/"),
            ("/", _) => Cow::Borrowed(rest),
            (base, _) => Cow::Owned(format!("{base}{rest}")),
        };
        let host = a.host.as_deref().unwrap_or("");
        Some(self.route_in(Some(i), host, method, &path))
    }

    /// [`RouteTable::route`] among the entries of Func `only`, or of all.
    fn route_in(
        &self,
        only: Option<usize>,
        host: &str,
        method: &str,
        path: &str,
    ) -> RouteOutcome<'_> {
        let host = RequestHost::new(host);
        // The first template that matched without the method: its Func,
        // and (for a preflight) the route it would answer.
        let mut denied: Option<(usize, Route<'_>)> = None;
        for e in &self.entries {
            if denied.as_ref().is_some_and(|(f, _)| *f != e.func)
                || only.is_some_and(|f| f != e.func)
            {
                continue;
            }
            let Some(rest) = e.base.under(&host, path) else {
                continue;
            };
            for p in &e.paths {
                let Some(caps) = p.regex.captures(rest) else {
                    continue;
                };
                let found = p
                    .methods
                    .iter()
                    .find(|(m, _)| m.eq_ignore_ascii_case(method));
                let Some((m, op)) = found else {
                    if denied.is_none() {
                        let mut at = self.route_of(e, p, "OPTIONS", "", &caps);
                        if !method.eq_ignore_ascii_case("OPTIONS") {
                            at.params.clear();
                        }
                        denied = Some((e.func, at));
                    }
                    break;
                };
                return RouteOutcome::Found(self.route_of(e, p, m, op, &caps));
            }
        }
        match denied {
            Some((_, at)) if method.eq_ignore_ascii_case("OPTIONS") => {
                let allow = self.allow_of(&at);
                RouteOutcome::Preflight(at, allow)
            }
            Some((_, at)) => RouteOutcome::MethodNotAllowed(self.allow_of(&at)),
            None => RouteOutcome::NotFound,
        }
    }

    fn route_of<'t>(
        &'t self,
        e: &'t Entry,
        p: &'t PathRoute,
        method: &'t str,
        op: &'t str,
        caps: &regex::Captures<'_>,
    ) -> Route<'t> {
        let params = p
            .names
            .iter()
            .zip(caps.iter().skip(1))
            .map(|(n, c)| {
                let raw = c.map(|m| m.as_str()).unwrap_or_default();
                (
                    n.as_str(),
                    percent_decode_str(raw).decode_utf8_lossy().into_owned(),
                )
            })
            .collect();
        let f = &self.funcs[e.func];
        Route {
            func: &f.func,
            queue: &f.queue,
            async_queue: &f.async_queue,
            version: &f.version,
            operation_id: op,
            method,
            template: &p.template,
            params,
            index: e.func,
            direct: p.direct.iter().any(|m| m == method),
            allow: &p.methods,
        }
    }

    /// The methods of a route's path.
    fn allow_of<'t>(&self, at: &Route<'t>) -> Vec<&'t str> {
        at.allow.iter().map(|(m, _)| m.as_str()).collect()
    }
}
