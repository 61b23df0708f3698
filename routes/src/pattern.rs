//! Host and base-path patterns: a bundle's [`Base`] compiled for the route
//! table.
//!
//! A base's host is a list of labels (and an optional port), its path a
//! list of segments; each label or segment is literal text or holds
//! variables (`{name}`), each matching one or more characters within
//! that label or segment. Matching allocates nothing: the request's host
//! and path are walked in place. Two patterns *overlap* when some request
//! matches both (decided exactly, on the patterns alone), and their
//! [`Rank`] says which the table tries first; equal ranks that overlap
//! are a conflict.

use funcatron_bundle::Base;

/// One label or segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Literal text (lower-case for hosts).
    Lit(String),
    /// Text and variables: `Some(text)` literal, `None` one variable.
    Glob(Vec<Option<String>>),
}

impl Piece {
    fn parse(text: &str, lower: bool) -> Piece {
        let text = if lower {
            text.to_ascii_lowercase()
        } else {
            text.to_owned()
        };
        if !text.contains('{') {
            return Piece::Lit(text);
        }
        let mut parts = Vec::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Some(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').map_or(rest.len(), |c| c + open + 1);
            parts.push(None);
            rest = &rest[close.min(rest.len())..];
        }
        if !rest.is_empty() {
            parts.push(Some(rest.to_owned()));
        }
        Piece::Glob(parts)
    }

    /// A regular expression (PCRE and `regex` alike) matching what this
    /// piece matches, a variable as `var` (one or more characters of
    /// that class).
    fn regex(&self, var: &str) -> String {
        match self {
            Piece::Lit(l) => regex::escape(l),
            Piece::Glob(parts) => parts
                .iter()
                .map(|p| match p {
                    Some(l) => regex::escape(l),
                    None => var.to_owned(),
                })
                .collect(),
        }
    }

    fn literal_len(&self) -> usize {
        match self {
            Piece::Lit(l) => l.len(),
            Piece::Glob(parts) => parts.iter().flatten().map(String::len).sum(),
        }
    }

    fn matches(&self, text: &str, fold_case: bool) -> bool {
        match self {
            Piece::Lit(l) if fold_case => l.eq_ignore_ascii_case(text),
            Piece::Lit(l) => l == text,
            Piece::Glob(parts) => glob_matches(parts, text.as_bytes(), fold_case),
        }
    }

    /// The piece as tokens: literal bytes, `Any` (one byte) and `Star`
    /// (any run), for [`intersects`].
    fn tokens(&self, fold_case: bool) -> Vec<Tok> {
        let byte = |b: u8| Tok::Byte(if fold_case { b.to_ascii_lowercase() } else { b });
        let mut out = Vec::new();
        match self {
            Piece::Lit(l) => out.extend(l.bytes().map(byte)),
            Piece::Glob(parts) => {
                for p in parts {
                    match p {
                        Some(l) => out.extend(l.bytes().map(byte)),
                        None => out.extend([Tok::Any, Tok::Star]),
                    }
                }
            }
        }
        out
    }
}

fn eq_bytes(a: &[u8], b: &[u8], fold_case: bool) -> bool {
    if fold_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// Where `needle` first occurs in `hay` at or after `from`.
fn find_from(hay: &[u8], needle: &[u8], from: usize, fold_case: bool) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    (from..=hay.len() - needle.len())
        .find(|&i| eq_bytes(&hay[i..i + needle.len()], needle, fold_case))
}

/// Literal parts and variables (each one or more bytes) against `text`:
/// the first literal is a prefix, the last a suffix, the ones between
/// found leftmost in order (which is exact when variables match any run).
fn glob_matches(parts: &[Option<String>], text: &[u8], fold_case: bool) -> bool {
    let mut pos = 0;
    // Variables since the last literal: each needs a byte.
    let mut gap = 0;
    let last = parts.len().saturating_sub(1);
    for (i, p) in parts.iter().enumerate() {
        let Some(lit) = p else {
            gap += 1;
            continue;
        };
        let lit = lit.as_bytes();
        let from = pos + gap;
        if i == last && gap > 0 {
            // The last literal ends the text.
            return text.len() >= from + lit.len()
                && eq_bytes(&text[text.len() - lit.len()..], lit, fold_case);
        }
        let at = if gap > 0 {
            match find_from(text, lit, from, fold_case) {
                Some(at) => at,
                None => return false,
            }
        } else if text.len() >= pos + lit.len()
            && eq_bytes(&text[pos..pos + lit.len()], lit, fold_case)
        {
            pos
        } else {
            return false;
        };
        pos = at + lit.len();
        gap = 0;
    }
    if gap > 0 {
        text.len() >= pos + gap
    } else {
        text.len() == pos
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Byte(u8),
    Any,
    Star,
}

/// Is there a string both token lists match?
fn intersects(a: &[Tok], b: &[Tok]) -> bool {
    let (n, m) = (a.len(), b.len());
    // reach[i][j]: a[i..] and b[j..] can match a common suffix.
    let mut reach = vec![vec![false; m + 1]; n + 1];
    for i in (0..=n).rev() {
        for j in (0..=m).rev() {
            reach[i][j] = match (a.get(i), b.get(j)) {
                (None, None) => true,
                (Some(Tok::Star), _) if reach[i + 1][j] => true,
                (_, Some(Tok::Star)) if reach[i][j + 1] => true,
                (Some(Tok::Star), Some(_)) => reach[i][j + 1],
                (Some(_), Some(Tok::Star)) => reach[i + 1][j],
                (Some(x), Some(y)) => {
                    let same = match (x, y) {
                        (Tok::Byte(p), Tok::Byte(q)) => p == q,
                        _ => true,
                    };
                    same && reach[i + 1][j + 1]
                }
                _ => false,
            };
        }
    }
    reach[0][0]
}

fn pieces_overlap(a: &[Piece], b: &[Piece], fold_case: bool) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(p, q)| intersects(&p.tokens(fold_case), &q.tokens(fold_case)))
}

/// A compiled host: labels and an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPattern {
    /// Without variables: the whole name, lower-case (the fast path).
    literal: Option<String>,
    labels: Vec<Piece>,
    port: Option<Piece>,
}

impl HostPattern {
    fn parse(host: &str) -> HostPattern {
        let (name, port) = split_port(host);
        HostPattern {
            literal: (!name.contains('{')).then(|| name.to_ascii_lowercase()),
            labels: name.split('.').map(|l| Piece::parse(l, true)).collect(),
            port: port.map(|p| Piece::parse(p, true)),
        }
    }

    fn matches(&self, name: &str, labels: usize, port: Option<&str>) -> bool {
        match (&self.port, port) {
            (None, _) => {}
            (Some(p), Some(port)) if p.matches(port, true) => {}
            (Some(_), _) => return false,
        }
        if let Some(l) = &self.literal {
            return l.eq_ignore_ascii_case(name);
        }
        labels == self.labels.len()
            && self
                .labels
                .iter()
                .zip(name.split('.'))
                .all(|(p, l)| p.matches(l, true))
    }

    /// A regular expression matching the request hosts (`name[:port]`,
    /// compared case-insensitively) this pattern matches.
    pub(crate) fn regex(&self) -> String {
        let labels: Vec<String> = self.labels.iter().map(|l| l.regex("[^.]+")).collect();
        let port = match &self.port {
            None => "(?::[0-9]+)?".to_owned(),
            Some(p) => format!(":{}", p.regex("[0-9]+")),
        };
        format!("^{}{port}$", labels.join("\\."))
    }

    fn overlaps(&self, other: &HostPattern) -> bool {
        let ports = match (&self.port, &other.port) {
            (Some(a), Some(b)) => intersects(&a.tokens(true), &b.tokens(true)),
            // A host without a port matches every port.
            _ => true,
        };
        ports && pieces_overlap(&self.labels, &other.labels, true)
    }
}

/// `name:port` when the part after the last `:` is a port (digits or a
/// variable), else the whole text as the name.
fn split_port(host: &str) -> (&str, Option<&str>) {
    match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(':')
                && !port.is_empty()
                && port
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"{}_-".contains(&b))
                && (port.bytes().all(|b| b.is_ascii_digit()) || port.contains('{')) =>
        {
            (name, Some(port))
        }
        _ => (host, None),
    }
}

/// A request's host as matched: name, its label count, port.
pub(crate) struct RequestHost<'r> {
    name: &'r str,
    labels: usize,
    port: Option<&'r str>,
}

impl<'r> RequestHost<'r> {
    pub(crate) fn new(host: &'r str) -> RequestHost<'r> {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                (name, Some(port))
            }
            _ => (host, None),
        };
        RequestHost {
            name,
            labels: name.bytes().filter(|b| *b == b'.').count() + 1,
            port,
        }
    }
}

/// A compiled base: which hosts and which path prefix.
#[derive(Debug, Clone)]
pub(crate) struct BasePattern {
    /// `None`: any host.
    host: Option<HostPattern>,
    /// Without variables: the normalised path (the fast path).
    literal_path: Option<String>,
    segments: Vec<Piece>,
    /// The base as the bundle wrote it, for messages.
    pub(crate) shown: String,
}

/// Which of two overlapping bases the table tries first: more path
/// segments, then more literal path text, then a named host before one
/// with variables before any host, then more literal host text. Equal
/// ranks that overlap cannot be ordered: a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    segments: usize,
    path_literal: usize,
    host_class: u8,
    host_literal: usize,
}

impl BasePattern {
    pub(crate) fn compile(base: &Base) -> BasePattern {
        let segments: Vec<Piece> = base
            .path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| Piece::parse(s, false))
            .collect();
        BasePattern {
            host: base.host.as_deref().map(HostPattern::parse),
            literal_path: (!base.path.contains('{')).then(|| base.path.clone()),
            segments,
            shown: base.to_string(),
        }
    }

    pub(crate) fn rank(&self) -> Rank {
        let (host_class, host_literal) = match &self.host {
            None => (0, 0),
            Some(h) => {
                let literal = h.labels.iter().map(Piece::literal_len).sum::<usize>()
                    + h.labels.len()
                    + h.port.as_ref().map_or(0, |p| p.literal_len() + 1);
                let class = if h.literal.is_some() && !matches!(h.port, Some(Piece::Glob(_))) {
                    2
                } else {
                    1
                };
                (class, literal)
            }
        };
        Rank {
            segments: self.segments.len(),
            path_literal: self.segments.iter().map(Piece::literal_len).sum(),
            host_class,
            host_literal,
        }
    }

    /// Regular expressions of the hosts (see [`HostPattern::regex`];
    /// `None`: any host) and of the paths under this base (`None`: every
    /// path, the base is `/`), whose first group is the part under the
    /// base (`/` when it is empty): what [`BasePattern::under`] decides,
    /// for an ingress that matches with another regex engine (nginx Lua).
    pub(crate) fn regexes(&self) -> (Option<String>, Option<String>) {
        let host = self.host.as_ref().map(HostPattern::regex);
        let path = match &self.literal_path {
            Some(base) if base == "/" => None,
            Some(base) => Some(format!("^{}(/.*)?$", regex::escape(base))),
            None => {
                let segs: String = self
                    .segments
                    .iter()
                    .map(|p| format!("/{}", p.regex("[^/]+")))
                    .collect();
                Some(format!("^{segs}(/.*)?$"))
            }
        };
        (host, path)
    }

    /// Can one request match both?
    pub(crate) fn overlaps(&self, other: &BasePattern) -> bool {
        let hosts = match (&self.host, &other.host) {
            (Some(a), Some(b)) => a.overlaps(b),
            _ => true,
        };
        hosts && pieces_overlap(&self.segments, &other.segments, false)
    }

    /// The part of `path` under this base (`/` when it is the base
    /// itself), if `host` and `path` are this base's.
    pub(crate) fn under<'p>(&self, host: &RequestHost<'_>, path: &'p str) -> Option<&'p str> {
        if let Some(h) = &self.host {
            if !h.matches(host.name, host.labels, host.port) {
                return None;
            }
        }
        let rest = match &self.literal_path {
            Some(base) if base == "/" => return Some(path),
            Some(base) => path.strip_prefix(base.as_str())?,
            None => self.strip_segments(path)?,
        };
        if rest.is_empty() {
            Some("/")
        } else if rest.starts_with('/') {
            Some(rest)
        } else {
            None
        }
    }

    fn strip_segments<'p>(&self, path: &'p str) -> Option<&'p str> {
        let mut rest = path;
        for piece in &self.segments {
            let after = rest.strip_prefix('/')?;
            let end = after.find('/').unwrap_or(after.len());
            if !piece.matches(&after[..end], false) {
                return None;
            }
            rest = &after[end..];
        }
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn base(host: Option<&str>, path: &str) -> BasePattern {
        BasePattern::compile(&Base {
            host: host.map(str::to_owned),
            path: path.to_owned(),
        })
    }

    fn under<'p>(b: &BasePattern, host: &str, path: &'p str) -> Option<&'p str> {
        b.under(&RequestHost::new(host), path)
    }

    #[test]
    fn globs_match_within_one_label_or_segment() {
        let g = |t: &str| match Piece::parse(t, false) {
            Piece::Glob(p) => p,
            Piece::Lit(_) => panic!("{t} is literal"),
        };
        for (pat, text, want) in [
            ("{a}", "x", true),
            ("{a}", "", false),
            ("v{n}", "v1", true),
            ("v{n}", "v", false),
            ("{a}-api", "eu-api", true),
            ("{a}-api", "-api", false),
            ("{a}{b}", "xy", true),
            ("{a}{b}", "x", false),
            ("{a}x{b}x", "axbxax", true),
            ("{a}x{b}x", "axx", false),
            ("p{a}q{b}r", "pzqzr", true),
            ("p{a}q{b}r", "pqr", false),
            ("ab{x}", "ab", false),
            ("ab{x}", "abc", true),
        ] {
            assert_eq!(
                glob_matches(&g(pat), text.as_bytes(), false),
                want,
                "{pat} {text}"
            );
        }
    }

    #[test]
    fn bases_match_hosts_ports_and_path_prefixes() {
        let b = base(Some("{tenant}.example.com"), "/{stage}/api");
        assert_eq!(
            under(&b, "acme.example.com", "/prod/api/pets"),
            Some("/pets")
        );
        assert_eq!(under(&b, "ACME.Example.com:8443", "/prod/api"), Some("/"));
        assert_eq!(under(&b, "example.com", "/prod/api"), None);
        assert_eq!(under(&b, "a.b.example.com", "/prod/api"), None);
        assert_eq!(under(&b, "acme.example.com", "/prod/apix"), None);
        assert_eq!(under(&b, "acme.example.com", "//api"), None);
        let p = base(Some("localhost:{port}"), "/");
        assert_eq!(under(&p, "localhost:8080", "/x"), Some("/x"));
        assert_eq!(under(&p, "localhost", "/x"), None);
        let fixed = base(Some("x.io:8080"), "/v1");
        assert_eq!(under(&fixed, "x.io:8080", "/v1/a"), Some("/a"));
        assert_eq!(under(&fixed, "x.io:9090", "/v1/a"), None);
        assert_eq!(under(&fixed, "x.io", "/v1/a"), None);
        let any = base(None, "/v1");
        assert_eq!(under(&any, "whatever", "/v1"), Some("/"));
        assert_eq!(under(&any, "whatever", "/v10"), None);
    }

    #[test]
    fn overlap_and_rank_decide_conflicts() {
        let a = base(Some("{t}.x.io"), "/v1");
        let b = base(Some("api.{r}.io"), "/v1");
        let c = base(Some("api.x.io"), "/v1");
        let d = base(None, "/{v}");
        assert!(a.overlaps(&b) && a.overlaps(&c) && a.overlaps(&d));
        assert!(!base(Some("a.io"), "/v1").overlaps(&base(Some("b.io"), "/v1")));
        assert!(!base(None, "/v1").overlaps(&base(None, "/v2")));
        assert!(!base(None, "/v1").overlaps(&base(None, "/v1/x")));
        assert!(base(None, "/v{n}").overlaps(&base(None, "/{m}1")));
        assert!(!base(None, "/v{n}").overlaps(&base(None, "/w{m}")));
        assert!(!base(None, "/V1").overlaps(&base(None, "/v1")));
        assert!(base(Some("A.io"), "/").overlaps(&base(Some("a.io"), "/")));
        assert!(c.rank() > a.rank());
        assert!(base(None, "/v1/x").rank() > base(Some("a.io"), "/v1").rank());
        assert!(base(None, "/v1").rank() > d.rank());
        assert_eq!(base(None, "/v1").rank(), base(None, "/v2").rank());
        let p1 = base(Some("h.io:{p}"), "/");
        let p2 = base(Some("h.io:8080"), "/");
        assert!(p1.overlaps(&p2) && p2.rank() > p1.rank());
    }
}
