//! Chains of Funcs (`sed e=s/hate/love/ | to-upper`): the expression
//! grammar and its resolution against a route table.
//!
//! Client -> ingress `POST /_funcatron/chain` -> **the router resolves the
//! chain here** (the ingress at the edge, or a Tron when the ingress has no
//! current table or is the nginx one) -> stage 0's Func queue -> Runner ->
//! stage 1's Func queue -> ... -> the last stage's Runner replies. Every
//! stage is resolved once, up front, to its queue and routing outcome
//! ([`funcatron_envelope::ChainStage`]), so the Runners forward without a
//! route table and a chain naming an unknown Func, an operation that is not
//! there or a Func that did not opt in is refused before anything runs.
//!
//! Grammar (`docs/flows.md`): stages separated by `|`; a stage is a Func
//! name, then optionally an upper-case method and/or a path below the
//! Func's base path, then `key=value` options, which reach the stage's Func
//! as its query string. Words split on whitespace; `'...'` and `"..."`
//! quote (`\` escapes in double quotes and outside quotes), so a `|` or a
//! space inside quotes is part of the word.

use std::borrow::Cow;

use funcatron_control::headers;
use funcatron_envelope::ChainStage;

use crate::{RouteOutcome, RouteTable};

/// The ingress path of the chain endpoint.
pub const CHAIN_PATH: &str = "/_funcatron/chain";
/// The HTTP request header that carries the expression (or the query
/// parameter [`CHAIN_QUERY`]).
pub const CHAIN_HEADER: &str = "x-funcatron-chain";
/// The query parameter that carries the expression.
pub const CHAIN_QUERY: &str = "chain";
/// Most stages in one chain.
pub const MAX_STAGES: usize = 32;
/// Longest expression, in bytes.
pub const MAX_EXPRESSION: usize = 8 * 1024;

/// The methods a stage may name.
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// One stage as written: its Func, the operation it names (if any) and
/// its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    /// The Func's name.
    pub func: String,
    /// An upper-case method, when the stage names one.
    pub method: Option<String>,
    /// A path below the Func's base path (starting with `/`), when named.
    pub path: Option<String>,
    /// `key=value` options, in order: the stage's query string.
    pub options: Vec<(String, String)>,
}

/// Why a chain cannot run. Every variant names the stage (from 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The expression does not parse.
    #[error("chain expression: {0}")]
    Syntax(String),
    /// No enabled Func has this name.
    #[error("stage {stage}: no enabled Func is named {func:?}")]
    UnknownFunc {
        /// Which stage.
        stage: usize,
        /// The name it gave.
        func: String,
    },
    /// The Func did not opt in to chains.
    #[error("stage {stage}: Func {func:?} cannot be called in a chain (its bundle does not say `chain: true`)")]
    NotChainable {
        /// Which stage.
        stage: usize,
        /// The Func.
        func: String,
    },
    /// The stage names no operation the Func has, or could mean several.
    #[error("stage {stage}: {message}")]
    Operation {
        /// Which stage.
        stage: usize,
        /// What is wrong, with the Func's operations to choose from.
        message: String,
    },
}

impl ChainError {
    /// The HTTP status a client is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ChainError::Syntax(_) | ChainError::Operation { .. } => 400,
            ChainError::UnknownFunc { .. } => 404,
            ChainError::NotChainable { .. } => 403,
        }
    }

    /// The JSON error code.
    pub fn code(&self) -> &'static str {
        match self {
            ChainError::Syntax(_) => "chain_syntax",
            ChainError::UnknownFunc { .. } => "unknown_func",
            ChainError::NotChainable { .. } => "chain_not_allowed",
            ChainError::Operation { .. } => "chain_operation",
        }
    }
}

/// The expression of a chain request: its [`CHAIN_HEADER`], else the
/// [`CHAIN_QUERY`] parameter of its query string.
pub fn expression(header: Option<&str>, query: Option<&str>) -> Result<String, ChainError> {
    if let Some(h) = header {
        return Ok(h.to_owned());
    }
    query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == CHAIN_QUERY)
                .map(|(_, v)| v.into_owned())
        })
        .ok_or_else(|| {
            ChainError::Syntax(format!(
                "no expression: send it in the {CHAIN_HEADER} header or the {CHAIN_QUERY} query parameter"
            ))
        })
}

/// A word or a stage separator.
#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Pipe,
}

/// Split `expr` into words and `|`s (shell-like quoting, no expansion).
fn tokens(expr: &str) -> Result<Vec<Token>, ChainError> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    out.push(Token::Word(w));
                }
            }
            '|' => {
                if let Some(w) = word.take() {
                    out.push(Token::Word(w));
                }
                out.push(Token::Pipe);
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(ChainError::Syntax("unclosed ' quote".into())),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => w.push(c),
                            None => return Err(ChainError::Syntax("unclosed \" quote".into())),
                        },
                        Some(c) => w.push(c),
                        None => return Err(ChainError::Syntax("unclosed \" quote".into())),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(ChainError::Syntax("a trailing \\ escapes nothing".into())),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        out.push(Token::Word(w));
    }
    Ok(out)
}

/// Is `name` a Func name (as bundle names are)?
fn is_func_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parse a chain expression into its stages.
pub fn parse(expr: &str) -> Result<Vec<StageSpec>, ChainError> {
    if expr.len() > MAX_EXPRESSION {
        return Err(ChainError::Syntax(format!(
            "longer than {MAX_EXPRESSION} bytes"
        )));
    }
    let mut stages: Vec<Vec<String>> = vec![Vec::new()];
    for t in tokens(expr)? {
        match t {
            Token::Word(w) => {
                if let Some(s) = stages.last_mut() {
                    s.push(w);
                }
            }
            Token::Pipe => stages.push(Vec::new()),
        }
    }
    if stages.len() > MAX_STAGES {
        return Err(ChainError::Syntax(format!(
            "{} stages; at most {MAX_STAGES}",
            stages.len()
        )));
    }
    stages
        .into_iter()
        .enumerate()
        .map(|(i, words)| stage(i, words))
        .collect()
}

/// One stage's words: `func [METHOD] [/path] [key=value ...]`.
fn stage(i: usize, words: Vec<String>) -> Result<StageSpec, ChainError> {
    let mut words = words.into_iter().peekable();
    let Some(func) = words.next() else {
        return Err(ChainError::Syntax(format!("stage {i} is empty")));
    };
    if !is_func_name(&func) {
        return Err(ChainError::Syntax(format!(
            "stage {i}: {func:?} is not a Func name"
        )));
    }
    let method = words
        .next_if(|w| METHODS.contains(&w.as_str()))
        .map(|m| m.to_owned());
    let path = words.next_if(|w| w.starts_with('/'));
    let mut options = Vec::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => options.push((k.to_owned(), v.to_owned())),
            _ => {
                return Err(ChainError::Syntax(format!(
                    "stage {i} ({func}): {w:?} is not an option (key=value); a method or path comes right after the Func's name"
                )))
            }
        }
    }
    Ok(StageSpec {
        func,
        method,
        path,
        options,
    })
}

/// The broker message headers a stage's request goes with: its routing
/// outcome and `x-funcatron-chain`.
pub fn message_headers(stage: &ChainStage<'_>) -> Vec<(String, String)> {
    let mut hdrs: Vec<(String, String)> = stage
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    hdrs.push((headers::CHAIN.to_owned(), "1".to_owned()));
    hdrs
}

impl RouteTable {
    /// Resolve parsed stages to where each goes: its Func's queue, the
    /// operation it calls and that routing outcome's message headers.
    /// `host`: the caller's Host, for a Func served on any host.
    ///
    /// Which operation a stage calls: the method and path it names; with
    /// a path but no method, `POST` if the path has it, else the path's
    /// only method; with neither, the Func's `POST /` operation, else its
    /// only operation. Anything else is an error listing the choices.
    pub fn resolve_chain(
        &self,
        stages: &[StageSpec],
        host: &str,
    ) -> Result<Vec<ChainStage<'static>>, ChainError> {
        stages
            .iter()
            .enumerate()
            .map(|(i, s)| self.resolve_stage(i, s, host))
            .collect()
    }

    fn resolve_stage(
        &self,
        i: usize,
        s: &StageSpec,
        host: &str,
    ) -> Result<ChainStage<'static>, ChainError> {
        let Some(info) = self.funcs.iter().find(|f| *f.func == *s.func) else {
            return Err(ChainError::UnknownFunc {
                stage: i,
                func: s.func.clone(),
            });
        };
        let a = &info.admission;
        if !a.chainable {
            return Err(ChainError::NotChainable {
                stage: i,
                func: s.func.clone(),
            });
        }
        let choices = || {
            a.operations
                .iter()
                .map(|o| format!("{} {}", o.method, o.path))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let op_error = |message: String| ChainError::Operation { stage: i, message };
        let (method, rest) = match (&s.method, &s.path) {
            (Some(m), Some(p)) => (m.clone(), p.clone()),
            (m, Some(p)) => {
                let m = m.clone().unwrap_or_else(|| "POST".into());
                match self.route_func(&s.func, &m, p) {
                    Some(RouteOutcome::MethodNotAllowed(allow)) if allow.len() == 1 => {
                        (allow[0].to_owned(), p.clone())
                    }
                    _ => (m, p.clone()),
                }
            }
            (m, None) => {
                let fits = |o: &&funcatron_control::admission::AdmissionOperation| {
                    m.as_deref().is_none_or(|m| o.method == m)
                };
                let root = a
                    .operations
                    .iter()
                    .filter(fits)
                    .find(|o| o.path == "/" && (m.is_some() || o.method == "POST"));
                let only: Vec<_> = a.operations.iter().filter(fits).collect();
                match (root, only.as_slice()) {
                    (Some(o), _) | (None, &[o]) => (o.method.clone(), o.path.clone()),
                    _ => {
                        return Err(op_error(format!(
                            "{} has no {} / operation and more than one other; name one of: {}",
                            s.func,
                            m.as_deref().unwrap_or("POST"),
                            choices()
                        )))
                    }
                }
            }
        };
        if rest.contains('{') {
            return Err(op_error(format!(
                "{} {rest} of {} needs its path parameters filled in: name the path (`{} {} /...`)",
                method, s.func, s.func, method
            )));
        }
        let route = match self.route_func(&s.func, &method, &rest) {
            Some(RouteOutcome::Found(r)) => r,
            _ => {
                return Err(op_error(format!(
                    "{} has no operation {method} {rest}; its operations: {}",
                    s.func,
                    choices()
                )))
            }
        };
        if route.direct {
            return Err(op_error(format!(
                "{method} {rest} of {} is a direct operation, which a chain cannot call",
                s.func
            )));
        }
        let path = match (a.base_path.as_str(), rest.as_str()) {
            ("/", r) => r.to_owned(),
            (base, r) => format!("{base}{r}"),
        };
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(s.options.iter())
            .finish();
        Ok(ChainStage {
            func: Cow::Owned(s.func.clone()),
            queue: Cow::Owned(route.queue.to_owned()),
            method: Cow::Owned(route.method.to_owned()),
            host: Cow::Owned(a.host.clone().unwrap_or_else(|| host.to_owned())),
            path: Cow::Owned(path),
            query: Cow::Owned(query),
            headers: route
                .headers(None)
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
                .collect(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use funcatron_control::admission::{AdmissionBase, AdmissionOperation, FuncAdmission};

    use super::*;

    fn spec(
        func: &str,
        method: Option<&str>,
        path: Option<&str>,
        opts: &[(&str, &str)],
    ) -> StageSpec {
        StageSpec {
            func: func.into(),
            method: method.map(Into::into),
            path: path.map(Into::into),
            options: opts
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn the_btrfaas_walkthrough_parses() {
        assert_eq!(
            parse("sed e=s/hate/love/ | to-upper").unwrap(),
            vec![
                spec("sed", None, None, &[("e", "s/hate/love/")]),
                spec("to-upper", None, None, &[])
            ]
        );
        assert_eq!(parse("echo-lua|echo-python").unwrap().len(), 2);
    }

    #[test]
    fn quotes_keep_pipes_and_spaces_inside_an_option() {
        assert_eq!(
            parse(r#"sed 'e=s/a|b/c d/' | tr "x=say \"hi\"" y=a\ b"#).unwrap(),
            vec![
                spec("sed", None, None, &[("e", "s/a|b/c d/")]),
                spec("tr", None, None, &[("x", "say \"hi\""), ("y", "a b")])
            ]
        );
    }

    #[test]
    fn a_method_and_path_name_the_operation() {
        assert_eq!(
            parse("items PUT /items/7 note=x").unwrap(),
            vec![spec(
                "items",
                Some("PUT"),
                Some("/items/7"),
                &[("note", "x")]
            )]
        );
        assert_eq!(
            parse("items /items").unwrap(),
            vec![spec("items", None, Some("/items"), &[])]
        );
    }

    fn func(name: &str, chainable: bool, ops: &[(&str, &str)]) -> FuncAdmission {
        FuncAdmission {
            func: name.into(),
            version: "v1".into(),
            base_path: format!("/{name}"),
            bases: vec![AdmissionBase {
                host: None,
                path: format!("/{name}"),
            }],
            operations: ops
                .iter()
                .map(|(m, p)| AdmissionOperation {
                    method: (*m).into(),
                    path: (*p).into(),
                    operation_id: format!("{}{}", m.to_lowercase(), p.replace('/', "_")),
                    bases: None,
                    direct: false,
                })
                .collect(),
            chainable,
            ..FuncAdmission::default()
        }
    }

    fn table() -> RouteTable {
        RouteTable::from_admission(&[
            func("up", true, &[("POST", "/"), ("GET", "/")]),
            func("one", true, &[("PUT", "/only")]),
            func(
                "many",
                true,
                &[("GET", "/a"), ("POST", "/b"), ("GET", "/items/{id}")],
            ),
            func("closed", false, &[("POST", "/")]),
        ])
        .unwrap()
    }

    fn resolve(expr: &str) -> Result<Vec<ChainStage<'static>>, ChainError> {
        table().resolve_chain(&parse(expr)?, "example.com")
    }

    #[test]
    fn stages_resolve_to_their_queue_operation_and_options() {
        let s = resolve("up k=v&w x=1 | one | many /items/42").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((&*s[0].method, &*s[0].path), ("POST", "/up/"));
        assert_eq!(s[0].query, "k=v%26w&x=1");
        assert_eq!(s[0].host, "example.com");
        assert!(s[0].queue.contains("up"), "{}", s[0].queue);
        assert!(s[0]
            .headers
            .iter()
            .any(|(k, v)| k == funcatron_control::headers::OPERATION && v == "post_"));
        assert_eq!((&*s[1].method, &*s[1].path), ("PUT", "/one/only"));
        assert_eq!((&*s[2].method, &*s[2].path), ("GET", "/many/items/42"));
        assert!(s[2]
            .headers
            .iter()
            .any(|(k, v)| k == funcatron_control::headers::PATH_PARAMS && v.contains("42")));
        let got = resolve("up GET").unwrap();
        assert_eq!(&*got[0].method, "GET");
    }

    #[test]
    fn stages_that_cannot_run_are_refused_naming_the_stage() {
        let e = resolve("up | nope").unwrap_err();
        assert_eq!((e.status(), e.code()), (404, "unknown_func"));
        assert!(e.to_string().contains("stage 1"), "{e}");
        let e = resolve("up | closed").unwrap_err();
        assert_eq!((e.status(), e.code()), (403, "chain_not_allowed"));
        let e = resolve("many").unwrap_err();
        assert_eq!(e.code(), "chain_operation");
        assert!(e.to_string().contains("GET /a, POST /b"), "{e}");
        let e = resolve("many GET /nowhere").unwrap_err();
        assert!(e.to_string().contains("no operation GET /nowhere"), "{e}");
        let e = resolve("one GET").unwrap_err();
        assert_eq!(e.code(), "chain_operation");
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (expr, needle) in [
            ("", "stage 0 is empty"),
            ("a | | b", "stage 1 is empty"),
            ("a |", "stage 1 is empty"),
            ("a 'x", "unclosed ' quote"),
            ("a \"x", "unclosed \" quote"),
            ("a b", "\"b\" is not an option"),
            ("a/b", "not a Func name"),
            ("a x=1 /p", "not an option"),
        ] {
            let e = parse(expr).unwrap_err();
            assert!(e.to_string().contains(needle), "{expr:?}: {e}");
            assert_eq!(e.status(), 400);
        }
        let long = vec!["a"; MAX_STAGES + 1].join("|");
        assert!(parse(&long).unwrap_err().to_string().contains("stages"));
        assert!(parse(&"a".repeat(MAX_EXPRESSION + 1)).is_err());
    }
}
