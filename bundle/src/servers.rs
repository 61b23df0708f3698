//! Where a document's operations are served: its servers as [`Base`]s.
//!
//! Bundle loading -> **bases** -> the Tron's route table, which compiles
//! each base into a matcher (`tron/src/routes.rs`). A base is a host
//! (or any host) and a base path; either may hold server variables
//! written `{name}`, each matching any text within its one host label,
//! port or path segment.
//!
//! - OpenAPI 3: every entry of `servers` (the document's, or a path
//!   item's or an operation's, which replace it for their operations).
//!   A variable with an `enum` gives one base per value (its `default`
//!   too); one without an `enum` stays a variable, unless its default
//!   spans more than its place (a `.` or `:` in a host label, a `/` in a
//!   path segment) or is empty: then only the default is served. A
//!   variable that is the whole host (`https://{host}/v1`) matches any
//!   host. A relative URL (`/v1`, `v1`, `./v1`) is served on any host.
//! - Swagger 2.0: `host` (any host without one) and `basePath`; `schemes`
//!   do not change routing.
//!
//! Host names are lower-case, the scheme's default port (`:80` for
//! http, `:443` for https) is dropped, and a base path is normalised: it
//! starts with `/`, has no empty, `.` or `..` segments and no trailing
//! `/` (`/` alone for the root).

use std::fmt;

use serde_json::Value;

use crate::locate::Problem;

/// Most bases one bundle may have: its servers, and every operation's
/// own, with enum values multiplied out.
pub const MAX_BASES: usize = 256;

/// One place a bundle's operations are served.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Base {
    /// Lower-case host, with `:port` when the server names a port other
    /// than its scheme's default; `None` for any host. `{name}` is a
    /// variable: any text within one label (or the port).
    pub host: Option<String>,
    /// Normalised base path (see the module docs); `{name}` is a
    /// variable: any text within one segment.
    pub path: String,
}

impl Base {
    /// Any host, the root path: a document without servers.
    pub fn root() -> Base {
        Base {
            host: None,
            path: "/".to_owned(),
        }
    }

    /// Does the host or the path hold a variable?
    pub fn has_variables(&self) -> bool {
        self.path.contains('{') || self.host.as_deref().is_some_and(|h| h.contains('{'))
    }
}

impl fmt::Display for Base {
    /// `api.example.com/v1`, `*/v1` for any host.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path == "/" { "" } else { &self.path };
        write!(f, "{}{path}", self.host.as_deref().unwrap_or("*"))?;
        if path.is_empty() {
            f.write_str("/")?;
        }
        Ok(())
    }
}

/// Normalise a base path (see the module docs).
pub fn normalise_path(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    if out.is_empty() {
        "/".to_owned()
    } else {
        format!("/{}", out.join("/"))
    }
}

/// One server variable.
struct Var {
    name: String,
    default: String,
    /// The `enum`, default first; `None` for any value.
    values: Option<Vec<String>>,
}

/// A server URL template in pieces.
enum Tok {
    Lit(String),
    Var(usize),
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn check_value(text: &str, pointer: &str) -> Result<(), Problem> {
    if text.contains(['{', '}']) {
        return Err(Problem::new(pointer, "a value may not contain `{` or `}`"));
    }
    Ok(())
}

fn variables(v: Option<&Value>, pointer: &str) -> Result<Vec<Var>, Problem> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let map = v
        .as_object()
        .ok_or_else(|| Problem::new(pointer, "`variables` must be a mapping"))?;
    let mut out = Vec::new();
    for (name, var) in map {
        let at = format!("{pointer}/{}", crate::locate::escape_token(name));
        let var = var
            .as_object()
            .ok_or_else(|| Problem::new(&at, "a server variable must be a mapping"))?;
        let default = var
            .get("default")
            .and_then(scalar_text)
            .ok_or_else(|| Problem::new(&at, "a server variable needs a `default` (a string)"))?;
        check_value(&default, &format!("{at}/default"))?;
        let values = match var.get("enum") {
            None => None,
            Some(Value::Array(list)) if !list.is_empty() => {
                let mut values = vec![default.clone()];
                for (i, item) in list.iter().enumerate() {
                    let text = scalar_text(item).ok_or_else(|| {
                        Problem::new(format!("{at}/enum/{i}"), "an enum value must be a string")
                    })?;
                    check_value(&text, &format!("{at}/enum/{i}"))?;
                    if !values.contains(&text) {
                        values.push(text);
                    }
                }
                Some(values)
            }
            Some(_) => {
                return Err(Problem::new(
                    format!("{at}/enum"),
                    "`enum` must be a list of at least one value",
                ))
            }
        };
        out.push(Var {
            name: name.clone(),
            default,
            values,
        });
    }
    Ok(out)
}

fn tokenize(url: &str, vars: &[Var], pointer: &str) -> Result<Vec<Tok>, Problem> {
    let mut out = Vec::new();
    let mut rest = url;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            out.push(Tok::Lit(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find('}')
            .map(|c| c + open)
            .ok_or_else(|| Problem::new(pointer, "unclosed `{` in the server URL"))?;
        let name = &rest[open + 1..close];
        let i = vars.iter().position(|v| v.name == name).ok_or_else(|| {
            Problem::new(
                pointer,
                format!("`{{{name}}}` is not declared in the server's `variables`"),
            )
        })?;
        out.push(Tok::Var(i));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(Problem::new(pointer, "`}` without `{` in the server URL"));
    }
    if !rest.is_empty() {
        out.push(Tok::Lit(rest.to_owned()));
    }
    Ok(out)
}

/// How a variable is written into a base: its marker, `{name}` with only
/// characters that cannot split a label or segment.
fn marker(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "{var}".to_owned()
    } else {
        format!("{{{clean}}}")
    }
}

/// The URL with enum variables at `choice`, variables in `wild` as
/// markers and the others at their defaults.
fn expand(tokens: &[Tok], vars: &[Var], choice: &[usize], wild: &[bool]) -> String {
    let mut s = String::new();
    for t in tokens {
        match t {
            Tok::Lit(l) => s.push_str(l),
            Tok::Var(i) if wild[*i] => s.push_str(&marker(&vars[*i].name)),
            Tok::Var(i) => match &vars[*i].values {
                Some(values) => s.push_str(&values[choice[*i]]),
                None => s.push_str(&vars[*i].default),
            },
        }
    }
    s
}

/// Scheme, authority and path of a URL (query and fragment dropped).
fn split_url(url: &str) -> (Option<&str>, Option<&str>, &str) {
    fn authority_path(rest: &str) -> (Option<&str>, &str) {
        match rest.find('/') {
            Some(i) => (Some(&rest[..i]), &rest[i..]),
            None => (Some(rest), ""),
        }
    }
    let url = url.split(['?', '#']).next().unwrap_or_default();
    if let Some(i) = url.find("://") {
        if !url[..i].contains('/') {
            let (a, p) = authority_path(&url[i + 3..]);
            return (Some(&url[..i]), a, p);
        }
    }
    if let Some(rest) = url.strip_prefix("//") {
        let (a, p) = authority_path(rest);
        return (None, a, p);
    }
    (None, None, url)
}

/// The host pattern of an authority, `None` for any host.
fn host_of(scheme: Option<&str>, authority: &str) -> Result<Option<String>, String> {
    let a = authority.rsplit('@').next().unwrap_or_default().trim();
    let single_marker = a.starts_with('{') && a.ends_with('}') && a.matches('{').count() == 1;
    if a.is_empty() || a == "*" || single_marker {
        return Ok(None);
    }
    let mut host = a.to_ascii_lowercase();
    let default_port = match scheme.map(str::to_ascii_lowercase).as_deref() {
        Some("http") | Some("ws") => Some(":80"),
        Some("https") | Some("wss") => Some(":443"),
        _ => None,
    };
    if let Some(port) = default_port {
        if let Some(h) = host.strip_suffix(port) {
            host = h.to_owned();
        }
    }
    let allowed = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '{' | '}')
    };
    if let Some(bad) = host.chars().find(|c| !allowed(*c)) {
        return Err(format!("{bad:?} is not allowed in a host name"));
    }
    Ok(Some(host))
}

/// Give up on variables whose default does not fit their place: they are
/// served at their default only.
fn settle_wild(tokens: &[Tok], vars: &[Var], choice: &[usize], wild: &mut [bool]) {
    loop {
        let url = expand(tokens, vars, choice, wild);
        let (_, authority, path) = split_url(&url);
        let mut changed = false;
        for (i, var) in vars.iter().enumerate() {
            if !wild[i] {
                continue;
            }
            let m = marker(&var.name);
            let d = &var.default;
            let fits = match authority {
                Some(a) if a.contains(&m) => {
                    a == m || !(d.is_empty() || d.contains(['.', ':', '/', '@']))
                }
                _ if path.contains(&m) => !(d.is_empty() || d.contains('/')),
                // In the scheme (or nowhere): it does not matter.
                _ => true,
            };
            if !fits {
                wild[i] = false;
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// The base of one expanded URL.
fn base_of(url: &str, pointer: &str) -> Result<Base, Problem> {
    let (scheme, authority, path) = split_url(url);
    let host = match authority {
        None => None,
        Some(a) => host_of(scheme, a).map_err(|m| Problem::new(pointer, m))?,
    };
    Ok(Base {
        host,
        path: normalise_path(path),
    })
}

/// Every choice of enum values, the defaults first.
fn choices(vars: &[Var], pointer: &str) -> Result<Vec<Vec<usize>>, Problem> {
    let mut out = vec![vec![0; vars.len()]];
    for (i, v) in vars.iter().enumerate() {
        let n = v.values.as_ref().map_or(1, Vec::len);
        if n == 1 {
            continue;
        }
        if out.len().saturating_mul(n) > MAX_BASES {
            return Err(Problem::new(
                pointer,
                format!("the variables' enum values give more than {MAX_BASES} bases"),
            ));
        }
        let mut next = Vec::with_capacity(out.len() * n);
        for c in &out {
            for k in 0..n {
                let mut c = c.clone();
                c[i] = k;
                next.push(c);
            }
        }
        out = next;
    }
    Ok(out)
}

/// The bases of one OpenAPI server object at `pointer`, and its primary
/// base (every variable at its default).
fn server(v: &Value, pointer: &str) -> Result<(Vec<Base>, Base), Problem> {
    let obj = v
        .as_object()
        .ok_or_else(|| Problem::new(pointer, "a server must be a mapping"))?;
    let url_at = format!("{pointer}/url");
    let url = obj
        .get("url")
        .ok_or_else(|| Problem::new(pointer, "a server needs a `url`"))?
        .as_str()
        .ok_or_else(|| Problem::new(&url_at, "`url` must be a string"))?;
    let vars = variables(obj.get("variables"), &format!("{pointer}/variables"))?;
    let tokens = tokenize(url, &vars, &url_at)?;
    let none = vec![false; vars.len()];
    let defaults = vec![0; vars.len()];
    let primary = base_of(&expand(&tokens, &vars, &defaults, &none), &url_at)?;
    let mut bases: Vec<Base> = Vec::new();
    for choice in choices(&vars, pointer)? {
        let mut wild: Vec<bool> = vars.iter().map(|v| v.values.is_none()).collect();
        settle_wild(&tokens, &vars, &choice, &mut wild);
        let base = base_of(&expand(&tokens, &vars, &choice, &wild), &url_at)?;
        if !bases.contains(&base) {
            bases.push(base);
        }
    }
    Ok((bases, primary))
}

/// The bases of an OpenAPI `servers` list at `pointer` and its primary
/// base (the first server at its defaults); `None` when the list is empty.
pub(crate) fn servers(list: &Value, pointer: &str) -> Result<Option<(Vec<Base>, Base)>, Problem> {
    let list = list
        .as_array()
        .ok_or_else(|| Problem::new(pointer, "`servers` must be a list"))?;
    let mut bases: Vec<Base> = Vec::new();
    let mut primary = None;
    for (i, s) in list.iter().enumerate() {
        let (more, p) = server(s, &format!("{pointer}/{i}"))?;
        primary.get_or_insert(p);
        for b in more {
            if !bases.contains(&b) {
                bases.push(b);
            }
        }
        if bases.len() > MAX_BASES {
            return Err(Problem::new(
                pointer,
                format!("more than {MAX_BASES} bases (servers times enum values)"),
            ));
        }
    }
    Ok(primary.map(|p| (bases, p)))
}

/// A Swagger 2.0 document's base: `host` and `basePath`.
pub(crate) fn swagger2(doc: &Value) -> Result<Base, Problem> {
    let text = |key: &str| -> Result<Option<&str>, Problem> {
        match doc.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.contains(['{', '}']) => Err(Problem::new(
                format!("/{key}"),
                "Swagger 2.0 has no server variables: `{` and `}` are not allowed",
            )),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Problem::new(format!("/{key}"), "must be a string")),
        }
    };
    let host = match text("host")? {
        None => None,
        Some(h) if h.contains('/') => {
            return Err(Problem::new(
                "/host",
                "`host` is a host name and port only, without scheme or path",
            ))
        }
        Some(h) => host_of(None, h).map_err(|m| Problem::new("/host", m))?,
    };
    let path = normalise_path(text("basePath")?.unwrap_or("/"));
    match doc.get("schemes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            if let Some(i) = a.iter().position(|s| !s.is_string()) {
                return Err(Problem::new(
                    format!("/schemes/{i}"),
                    "a scheme must be a string",
                ));
            }
        }
        Some(_) => return Err(Problem::new("/schemes", "`schemes` must be a list")),
    }
    Ok(Base { host, path })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn bases(list: Value) -> (Vec<String>, String) {
        let (b, p) = servers(&list, "/servers").unwrap().unwrap();
        (b.iter().map(Base::to_string).collect(), p.to_string())
    }

    #[test]
    fn urls_split_into_host_and_base_path() {
        for (url, want) in [
            ("http://Api.Example.com:8080/v1/", "api.example.com:8080/v1"),
            ("https://x.io:443/a//b/./c/../d", "x.io/a/b/d"),
            ("http://x.io:80", "x.io/"),
            ("https://x.io", "x.io/"),
            ("/v2", "*/v2"),
            ("v2", "*/v2"),
            ("./v2/", "*/v2"),
            ("", "*/"),
            (".", "*/"),
            ("//cdn.example.com/api", "cdn.example.com/api"),
            ("https://user@x.io/api?x=1#frag", "x.io/api"),
        ] {
            assert_eq!(bases(json!([{ "url": url }])).0, vec![want], "{url}");
        }
    }

    #[test]
    fn every_server_and_every_enum_value_is_a_base() {
        let (b, primary) = bases(json!([
            {"url": "https://{region}.api.example.com/{version}", "variables": {
                "region": {"default": "eu", "enum": ["us", "eu"]},
                "version": {"default": "v1", "enum": ["v1", "v2"]}}},
            {"url": "http://localhost:{port}/base", "variables": {"port": {"default": 8080}}},
            {"url": "https://eu.api.example.com/v1"},
        ]));
        assert_eq!(
            b,
            [
                "eu.api.example.com/v1",
                "eu.api.example.com/v2",
                "us.api.example.com/v1",
                "us.api.example.com/v2",
                "localhost:{port}/base",
            ]
        );
        assert_eq!(primary, "eu.api.example.com/v1");
    }

    #[test]
    fn variables_without_enum_match_in_their_place_or_fall_back_to_the_default() {
        let (b, primary) = bases(json!([
            {"url": "{scheme}://{tenant}.example.com/{stage}/api", "variables": {
                "scheme": {"default": "https"}, "tenant": {"default": "acme"},
                "stage": {"default": "prod"}}},
            {"url": "https://{host}/v1", "variables": {"host": {"default": "localhost:8080"}}},
            {"url": "{base}/pets", "variables": {"base": {"default": "https://x.io/api"}}},
            {"url": "https://{sub}.y.io/{path}", "variables": {
                "sub": {"default": "a.b"}, "path": {"default": "v1/beta"}}},
            {"url": "/v{major}", "variables": {"major": {"default": ""}}},
        ]));
        assert_eq!(
            b,
            [
                "{tenant}.example.com/{stage}/api",
                "*/v1",
                "x.io/api/pets",
                "a.b.y.io/v1/beta",
                "*/v",
            ]
        );
        assert_eq!(primary, "acme.example.com/prod/api");
    }

    #[test]
    fn bad_servers_are_named() {
        for (list, pointer, needle) in [
            (json!({"url": "/"}), "/servers", "must be a list"),
            (json!([{"url": 3}]), "/servers/0/url", "must be a string"),
            (json!([{}]), "/servers/0", "needs a `url`"),
            (json!([{"url": "/{x}"}]), "/servers/0/url", "not declared"),
            (json!([{"url": "/{x"}]), "/servers/0/url", "unclosed"),
            (
                json!([{"url": "/{x}", "variables": {"x": {}}}]),
                "/servers/0/variables/x",
                "`default`",
            ),
            (
                json!([{"url": "/{x}", "variables": {"x": {"default": "a", "enum": []}}}]),
                "/servers/0/variables/x/enum",
                "at least one",
            ),
            (
                json!([{"url": "/{x}", "variables": {"x": {"default": "{y}"}}}]),
                "/servers/0/variables/x/default",
                "`{`",
            ),
            (
                json!([{"url": "https://a b/"}]),
                "/servers/0/url",
                "not allowed",
            ),
        ] {
            let p = servers(&list, "/servers").unwrap_err();
            assert_eq!(p.pointer, pointer, "{list}");
            assert!(p.message.contains(needle), "{list}: {}", p.message);
        }
        let many: serde_json::Map<String, Value> = (0..9)
            .map(|i| (format!("v{i}"), json!({"default": "a", "enum": ["a", "b"]})))
            .collect();
        let url: String = (0..9).map(|i| format!("/{{v{i}}}")).collect();
        let p = servers(&json!([{"url": url, "variables": many}]), "/servers").unwrap_err();
        assert!(p.message.contains("more than"), "{}", p.message);
    }

    #[test]
    fn swagger2_host_and_base_path() {
        let b = swagger2(&json!({"host": "Petstore.Swagger.io", "basePath": "/v2/"})).unwrap();
        assert_eq!(b.to_string(), "petstore.swagger.io/v2");
        assert_eq!(swagger2(&json!({"host": "*"})).unwrap(), Base::root());
        for (doc, pointer) in [
            (json!({"host": 7}), "/host"),
            (json!({"host": "http://x.io"}), "/host"),
            (json!({"basePath": "/{v}"}), "/basePath"),
            (json!({"schemes": "https"}), "/schemes"),
            (json!({"schemes": [1]}), "/schemes/0"),
        ] {
            assert_eq!(swagger2(&doc).unwrap_err().pointer, pointer, "{doc}");
        }
    }
}
