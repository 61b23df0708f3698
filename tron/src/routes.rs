//! The route table: (host, basePath) -> Func, then (path template, method)
//! -> `operationId` with path parameters.
//!
//! Funcs are tried longest basePath first, a named host before the wildcard
//! at equal length; within a Func, templates with more literal text win
//! (`/pets/mine` before `/pets/{id}`).

use std::sync::Arc;

use funcatron_bundle::Bundle;
use funcatron_control::names;
use percent_encoding::percent_decode_str;
use regex::Regex;

/// A route table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Two bundles claim the same host + basePath; the message names both
    /// bundles, their documents, the host and the basePath.
    #[error("{0}")]
    Conflict(String),
    /// Two bundles have the same name (and so the same queue).
    #[error("two bundles are named `{0}`")]
    DuplicateName(String),
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
}

/// A routed request.
#[derive(Debug, PartialEq)]
pub struct Route<'t> {
    /// The Func (bundle) name.
    pub func: &'t str,
    /// Its queue.
    pub queue: &'t str,
    /// The bundle version the queue belongs to.
    pub version: &'t str,
    /// The operation to invoke.
    pub operation_id: &'t str,
    /// Path parameters, percent-decoded.
    pub params: Vec<(&'t str, String)>,
}

#[derive(Debug)]
struct FuncRoutes {
    func: Arc<str>,
    queue: String,
    version: String,
    host: Option<String>,
    base_path: String,
    paths: Vec<PathRoute>,
}

#[derive(Debug)]
struct PathRoute {
    template: String,
    regex: Regex,
    names: Vec<String>,
    /// Literal characters in the template: more is more specific.
    literal_len: usize,
    methods: Vec<(String, String)>,
}

/// An immutable route table; rebuild and swap to change it.
#[derive(Debug, Default)]
pub struct RouteTable {
    funcs: Vec<FuncRoutes>,
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

fn host_matches(route_host: &Option<String>, request_host: &str) -> bool {
    match route_host {
        None => true,
        Some(h) => {
            h.eq_ignore_ascii_case(request_host)
                || request_host.rsplit_once(':').is_some_and(|(name, port)| {
                    port.bytes().all(|b| b.is_ascii_digit()) && h.eq_ignore_ascii_case(name)
                })
        }
    }
}

/// The part of `path` under `base`, or `None` if `path` is not under it.
fn under<'p>(base: &str, path: &'p str) -> Option<&'p str> {
    if base == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(base)?;
    if rest.is_empty() {
        Some("/")
    } else if rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

impl RouteTable {
    /// Build from bundles, refusing conflicts.
    pub fn build(bundles: &[Bundle]) -> Result<RouteTable, RouteError> {
        let mut funcs: Vec<FuncRoutes> = Vec::with_capacity(bundles.len());
        for (i, b) in bundles.iter().enumerate() {
            for other in &bundles[..i] {
                if other.name == b.name {
                    return Err(RouteError::DuplicateName(b.name.clone()));
                }
                if other.host == b.host && other.base_path == b.base_path {
                    return Err(RouteError::Conflict(format!(
                        "bundles `{}` ({}) and `{}` ({}) both claim host `{}` basePath `{}`",
                        other.name,
                        other.spec_file.display(),
                        b.name,
                        b.spec_file.display(),
                        b.host.as_deref().unwrap_or("*"),
                        b.base_path
                    )));
                }
            }
            let mut paths: Vec<PathRoute> = Vec::new();
            for op in &b.operations {
                if let Some(p) = paths.iter_mut().find(|p| p.template == op.path) {
                    p.methods.push((op.method.clone(), op.operation_id.clone()));
                    continue;
                }
                let (regex, names, literal_len) =
                    compile(&op.path).map_err(|message| RouteError::BadTemplate {
                        file: b.spec_file.display().to_string(),
                        template: op.path.clone(),
                        message,
                    })?;
                paths.push(PathRoute {
                    template: op.path.clone(),
                    regex,
                    names,
                    literal_len,
                    methods: vec![(op.method.clone(), op.operation_id.clone())],
                });
            }
            paths.sort_by_key(|p| std::cmp::Reverse(p.literal_len));
            funcs.push(FuncRoutes {
                func: Arc::from(b.name.as_str()),
                queue: names::func_queue(&b.name, &b.version),
                version: b.version.clone(),
                host: b.host.clone(),
                base_path: b.base_path.clone(),
                paths,
            });
        }
        funcs.sort_by(|a, b| {
            b.base_path
                .len()
                .cmp(&a.base_path.len())
                .then_with(|| b.host.is_some().cmp(&a.host.is_some()))
        });
        Ok(RouteTable { funcs })
    }

    /// The Funcs in the table and their queues.
    pub fn funcs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.funcs.iter().map(|f| (&*f.func, f.queue.as_str()))
    }

    /// Route one request. `path` is the raw (percent-encoded) path without query.
    pub fn route(&self, host: &str, method: &str, path: &str) -> RouteOutcome<'_> {
        for f in &self.funcs {
            if !host_matches(&f.host, host) {
                continue;
            }
            let Some(rest) = under(&f.base_path, path) else {
                continue;
            };
            for p in &f.paths {
                let Some(caps) = p.regex.captures(rest) else {
                    continue;
                };
                let Some((_, op)) = p
                    .methods
                    .iter()
                    .find(|(m, _)| m.eq_ignore_ascii_case(method))
                else {
                    return RouteOutcome::MethodNotAllowed(
                        p.methods.iter().map(|(m, _)| m.as_str()).collect(),
                    );
                };
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
                return RouteOutcome::Found(Route {
                    func: &f.func,
                    queue: &f.queue,
                    version: &f.version,
                    operation_id: op,
                    params,
                });
            }
        }
        RouteOutcome::NotFound
    }
}
