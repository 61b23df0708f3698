//! Cross-origin access from browsers (CORS), from a Func's `cors` setting
//! and its API document.
//!
//! Ingress -> Tron -> **Runner (here, before security and validation)**.
//! A browser asks before a cross-origin call that is not "simple" with a
//! preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
//! The Tron sends an `OPTIONS` on a path the document has, but for which it
//! declares no `options` operation, to the Func's queue as a preflight
//! (`x-funcatron-preflight` names the path's methods); the Runner answers it
//! with [`Cors::preflight`] without running the Func, or, for a Func without
//! `cors`, 405 as for any undeclared method. Every other answer to a
//! request from an allowed origin, the Func's or an error, carries
//! [`Cors::answer_headers`]; the Func's own `access-control-*` headers are
//! replaced.
//!
//! Allowed request headers are, unless the setting lists them, the ones the
//! document declares for the operation asked about: its header parameters
//! and the headers its security schemes read (`Authorization`, an `apiKey`
//! header), plus `Content-Type` and the CORS-safelisted ones. A preflight
//! that asks for more, for another method or from another origin is
//! refused (403 with the reason), so the browser does not send the call.

use std::collections::HashMap;

use funcatron_control::state::CorsSettings;

/// Headers a page may always send (the Fetch standard's CORS-safelisted
/// request headers, and `Content-Type` whatever its value).
const SAFELISTED: &[&str] = &[
    "accept",
    "accept-language",
    "content-language",
    "content-type",
];

/// Why a `cors` setting cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorsError {
    /// `origins` is empty.
    #[error("cors: `origins` is empty; name the pages' origins (https://app.example.com) or `*`")]
    NoOrigins,
    /// An origin that is not `scheme://host[:port]`.
    #[error("cors: origin {0:?} is not `*` or scheme://host[:port] (no path, no trailing slash)")]
    BadOrigin(String),
    /// `*` with `credentials`: any site could read answers made with its
    /// visitors' cookies.
    #[error("cors: `{0}` cannot be combined with `credentials` (any web site could act with its visitors' cookies); list the origins or headers instead")]
    WildcardWithCredentials(&'static str),
    /// A header name that is not a token.
    #[error("cors: {0:?} is not a header name")]
    BadHeader(String),
}

/// Why a preflight is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Exact(String),
    /// `https://*.example.com[:port]`: scheme and what follows the
    /// wildcard label.
    Subdomain {
        scheme: String,
        rest: String,
    },
}

impl Origin {
    fn parse(o: &str) -> Result<Origin, CorsError> {
        let bad = || CorsError::BadOrigin(o.to_owned());
        let lower = o.to_ascii_lowercase();
        let (scheme, authority) = lower.split_once("://").ok_or_else(bad)?;
        let scheme_ok = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        let authority_ok = !authority.is_empty()
            && authority
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]*".contains(c));
        if !scheme_ok || !authority_ok {
            return Err(bad());
        }
        match authority.strip_prefix("*.") {
            Some(rest) if !rest.is_empty() && !rest.contains('*') => Ok(Origin::Subdomain {
                scheme: format!("{scheme}://"),
                rest: format!(".{rest}"),
            }),
            Some(_) => Err(bad()),
            None if authority.contains('*') => Err(bad()),
            None => Ok(Origin::Exact(lower)),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            Origin::Exact(o) => o.eq_ignore_ascii_case(origin),
            Origin::Subdomain { scheme, rest } => {
                let origin = origin.to_ascii_lowercase();
                let Some(authority) = origin.strip_prefix(scheme.as_str()) else {
                    return false;
                };
                // One label or more before `rest`, none of them empty.
                authority
                    .strip_suffix(rest.as_str())
                    .is_some_and(|label| !label.is_empty() && !label.ends_with('.'))
            }
        }
    }
}

#[derive(Debug, Clone)]
enum AllowHeaders {
    Any,
    Listed(Vec<String>),
    /// The document's, per route ([`Cors::declare`]).
    Declared,
}

/// A Func's CORS policy, checked and ready.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<Origin>,
    any_origin: bool,
    headers: AllowHeaders,
    declared: HashMap<String, Vec<String>>,
    expose: Option<String>,
    credentials: bool,
    max_age: Option<String>,
}

fn header_name(h: &str) -> Result<String, CorsError> {
    let ok = !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(CorsError::BadHeader(h.to_owned()))
    }
}

impl Cors {
    /// Check a `cors` setting.
    pub fn new(s: &CorsSettings) -> Result<Cors, CorsError> {
        if s.origins.is_empty() {
            return Err(CorsError::NoOrigins);
        }
        let any_origin = s.origins.iter().any(|o| o == "*");
        if any_origin && s.credentials {
            return Err(CorsError::WildcardWithCredentials("origins: *"));
        }
        let origins = s
            .origins
            .iter()
            .filter(|o| *o != "*")
            .map(|o| Origin::parse(o))
            .collect::<Result<_, _>>()?;
        let headers = match &s.headers {
            None => AllowHeaders::Declared,
            Some(list) if list.iter().any(|h| h == "*") => {
                if s.credentials {
                    return Err(CorsError::WildcardWithCredentials("headers: *"));
                }
                AllowHeaders::Any
            }
            Some(list) => AllowHeaders::Listed(
                list.iter()
                    .map(|h| header_name(h))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let expose = s
            .expose
            .iter()
            .map(|h| header_name(h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Cors {
            origins,
            any_origin,
            headers,
            declared: HashMap::new(),
            expose: (!expose.is_empty()).then(|| expose.join(", ")),
            credentials: s.credentials,
            max_age: s.max_age_s.map(|s| s.to_string()),
        })
    }

    /// The request headers the document declares for the operation
    /// `route` (`METHOD /template`), allowed when the setting lists none.
    pub fn declare(&mut self, route: String, headers: impl IntoIterator<Item = String>) {
        let list = self.declared.entry(route).or_default();
        for h in headers {
            let h = h.to_ascii_lowercase();
            if !list.contains(&h) {
                list.push(h);
            }
        }
    }

    /// May a page from `origin` call the Func?
    pub fn allows(&self, origin: &str) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.matches(origin))
    }

    /// The `Access-Control-Allow-Origin` value, and whether it depends on
    /// the request's `Origin` (then `Vary: Origin` is due).
    fn allow_origin<'o>(&self, origin: &'o str) -> (&'o str, bool) {
        if self.any_origin && !self.credentials {
            ("*", false)
        } else {
            (origin, true)
        }
    }

    /// The headers an answer to a request from `origin` carries (none
    /// for a request without `Origin`; only `Vary: Origin` for an origin
    /// not allowed, so caches keep the answers apart).
    pub fn answer_headers(&self, origin: Option<&str>) -> Vec<(&'static str, String)> {
        let Some(origin) = origin else {
            return if self.any_origin && !self.credentials {
                Vec::new()
            } else {
                vec![("vary", "Origin".to_owned())]
            };
        };
        if !self.allows(origin) {
            return vec![("vary", "Origin".to_owned())];
        }
        let (allow, varies) = self.allow_origin(origin);
        let mut out = vec![("access-control-allow-origin", allow.to_owned())];
        if varies {
            out.push(("vary", "Origin".to_owned()));
        }
        if self.credentials {
            out.push(("access-control-allow-credentials", "true".to_owned()));
        }
        if let Some(e) = &self.expose {
            out.push(("access-control-expose-headers", e.clone()));
        }
        out
    }

    /// Answer a preflight: from `origin`, for `method` with the request
    /// headers `requested` (`Access-Control-Request-Headers`, comma
    /// separated), on a path whose methods are `allow` (`GET, POST`) and
    /// whose operations are keyed `METHOD template`.
    pub fn preflight(
        &self,
        origin: &str,
        method: &str,
        requested: &str,
        allow: &str,
        template: &str,
    ) -> Result<Vec<(&'static str, String)>, Refused> {
        if !self.allows(origin) {
            return Err(Refused(format!(
                "origin {origin:?} may not call this Func (its cors setting does not list it)"
            )));
        }
        let method = method.trim();
        if !allow
            .split(',')
            .any(|m| m.trim().eq_ignore_ascii_case(method))
        {
            return Err(Refused(format!(
                "method {method:?} is not served on this path; served: {allow}"
            )));
        }
        let route = crate::validate::route_key(method, template);
        let requested: Vec<&str> = requested
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        let refused: Vec<&str> = requested
            .iter()
            .copied()
            .filter(|h| !self.header_allowed(&route, h))
            .collect();
        if !refused.is_empty() {
            return Err(Refused(format!(
                "request headers {} are not allowed for {route}; allowed: {}",
                refused.join(", "),
                self.allowed_list(&route)
            )));
        }
        let (allow_origin, varies) = self.allow_origin(origin);
        let mut out = vec![
            ("access-control-allow-origin", allow_origin.to_owned()),
            ("access-control-allow-methods", allow.to_owned()),
        ];
        if !requested.is_empty() {
            out.push(("access-control-allow-headers", requested.join(", ")));
        }
        if self.credentials {
            out.push(("access-control-allow-credentials", "true".to_owned()));
        }
        if let Some(age) = &self.max_age {
            out.push(("access-control-max-age", age.clone()));
        }
        let vary = if varies {
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        } else {
            "Access-Control-Request-Method, Access-Control-Request-Headers"
        };
        out.push(("vary", vary.to_owned()));
        Ok(out)
    }

    fn header_allowed(&self, route: &str, h: &str) -> bool {
        if SAFELISTED.iter().any(|s| s.eq_ignore_ascii_case(h)) {
            return true;
        }
        let list = match &self.headers {
            AllowHeaders::Any => return true,
            AllowHeaders::Listed(l) => l,
            AllowHeaders::Declared => match self.declared.get(route) {
                Some(l) => l,
                None => return false,
            },
        };
        list.iter().any(|a| a.eq_ignore_ascii_case(h))
    }

    fn allowed_list(&self, route: &str) -> String {
        let extra: &[String] = match &self.headers {
            AllowHeaders::Any => return "any".to_owned(),
            AllowHeaders::Listed(l) => l,
            AllowHeaders::Declared => self.declared.get(route).map_or(&[], Vec::as_slice),
        };
        SAFELISTED
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings(origins: &[&str]) -> CorsSettings {
        CorsSettings {
            origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            ..CorsSettings::default()
        }
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let c = Cors::new(&settings(&[
            "https://app.example.com",
            "https://*.example.org:8443",
        ]))
        .unwrap();
        assert!(c.allows("https://app.example.com"));
        assert!(c.allows("HTTPS://APP.example.com"));
        assert!(!c.allows("http://app.example.com"));
        assert!(!c.allows("https://app.example.com.evil.test"));
        assert!(c.allows("https://a.example.org:8443"));
        assert!(c.allows("https://a.b.example.org:8443"));
        assert!(!c.allows("https://example.org:8443"));
        assert!(!c.allows("https://a.example.org"));
        assert!(!c.allows("https://evilexample.org:8443"));
        assert!(!c.allows("null"));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert_eq!(Cors::new(&settings(&[])).unwrap_err(), CorsError::NoOrigins);
        for bad in [
            "app.example.com",
            "https://a.example.com/",
            "https://*",
            "https://a.*.com",
        ] {
            assert!(
                matches!(Cors::new(&settings(&[bad])), Err(CorsError::BadOrigin(_))),
                "{bad}"
            );
        }
        let mut s = settings(&["*"]);
        s.credentials = true;
        assert!(matches!(
            Cors::new(&s),
            Err(CorsError::WildcardWithCredentials(_))
        ));
        let mut s = settings(&["https://a.test"]);
        s.headers = Some(vec!["x ok".into()]);
        assert!(matches!(Cors::new(&s), Err(CorsError::BadHeader(_))));
    }

    #[test]
    fn answers_carry_the_origin_only_when_allowed() {
        let mut s = settings(&["https://app.test"]);
        s.credentials = true;
        s.expose = vec!["X-Request-Id".into()];
        let c = Cors::new(&s).unwrap();
        let h = c.answer_headers(Some("https://app.test"));
        assert!(h.contains(&("access-control-allow-origin", "https://app.test".into())));
        assert!(h.contains(&("access-control-allow-credentials", "true".into())));
        assert!(h.contains(&("access-control-expose-headers", "x-request-id".into())));
        assert_eq!(
            c.answer_headers(Some("https://other.test")),
            vec![("vary", "Origin".to_owned())]
        );
        let any = Cors::new(&settings(&["*"])).unwrap();
        assert_eq!(
            any.answer_headers(Some("https://x.test")),
            vec![("access-control-allow-origin", "*".to_owned())]
        );
        assert!(any.answer_headers(None).is_empty());
    }

    #[test]
    fn preflights_allow_the_documents_headers_and_methods() {
        let mut c = Cors::new(&settings(&["https://app.test"])).unwrap();
        c.declare("POST /pets".into(), ["X-Api-Key".to_owned()]);
        let ok = c
            .preflight(
                "https://app.test",
                "POST",
                "content-type, x-api-key",
                "GET, POST",
                "/pets",
            )
            .unwrap();
        assert!(ok.contains(&("access-control-allow-methods", "GET, POST".into())));
        assert!(ok.contains(&(
            "access-control-allow-headers",
            "content-type, x-api-key".into()
        )));
        let e = c
            .preflight("https://app.test", "GET", "x-api-key", "GET, POST", "/pets")
            .unwrap_err();
        assert!(e.0.contains("x-api-key"), "{e:?}");
        let e = c
            .preflight("https://app.test", "DELETE", "", "GET, POST", "/pets")
            .unwrap_err();
        assert!(e.0.contains("DELETE"), "{e:?}");
        assert!(c
            .preflight("https://evil.test", "GET", "", "GET, POST", "/pets")
            .is_err());
    }
}
