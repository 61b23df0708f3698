//! Security schemes from a bundle's API document, enforced before the Func
//! runs.
//!
//! Ingress -> Tron -> **Runner (here, before request validation and the
//! Func)**. [`AuthRules::compile`] reads the document's schemes
//! (`components.securitySchemes`, Swagger 2.0 `securityDefinitions`) and,
//! per operation (keyed `METHOD /template` like validation), the
//! requirement that applies: the operation's `security`, else the
//! document's; `security: []` opts an operation out. A requirement is a list
//! of alternatives (any one suffices), each a set of schemes (all must pass).
//!
//! [`Guard::new`] pairs each scheme with what the operator configured at
//! enable time ([`SchemeCredentials`]: secret names, read from the Runner's
//! secrets directory): accepted API keys, `user:password` lines, an HS256
//! key or a JWKS for JWTs (signature, `exp`, `nbf`, and `aud`/`iss` when
//! configured; scopes against the `scope`/`scp` claims). A scheme nothing is
//! configured for refuses every request (fail closed). [`Guard::check`]
//! answers who the caller is ([`Principal`], passed to the Func) or why not
//! ([`AuthFailure`]: 401 with `WWW-Authenticate`, or 403 for missing
//! scopes). Keys and passwords are compared by SHA-256 digest in constant
//! time.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use base64::Engine;
use funcatron_control::state::SchemeCredentials;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{BundleError, METHODS};

/// Where an API key travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyIn {
    Header,
    Query,
    Cookie,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    ApiKey {
        at: KeyIn,
        name: String,
    },
    Basic,
    /// `http` `bearer`, `oauth2`, `openIdConnect`: a JWT.
    Bearer,
    /// A type Funcatron cannot check (`mutualTLS`, unknown): refuses.
    Unsupported(String),
}

#[derive(Debug, Clone)]
struct Scheme {
    name: String,
    kind: Kind,
}

/// One alternative: schemes (by index) and the scopes each requires.
type Alternative = Vec<(usize, Vec<String>)>;

/// The schemes of a document and the requirement of each operation.
#[derive(Debug, Clone, Default)]
pub struct AuthRules {
    schemes: Vec<Scheme>,
    /// Route key -> alternatives; absent or empty: open.
    routes: HashMap<String, Vec<Alternative>>,
}

fn invalid(source: &Path, at: &str, why: impl std::fmt::Display) -> BundleError {
    BundleError::invalid(source, format!("{at}: {why}"))
}

fn pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl AuthRules {
    /// The rules of `doc` (`source` names it in errors). A requirement
    /// naming a scheme the document does not define is an error.
    pub fn compile(doc: &Value, source: &Path) -> Result<AuthRules, BundleError> {
        let mut rules = AuthRules::default();
        let defs = doc
            .pointer("/components/securitySchemes")
            .or_else(|| doc.get("securityDefinitions"));
        if let Some(defs) = defs.and_then(Value::as_object) {
            for (name, def) in defs {
                let def = resolve(doc, def);
                let at = format!("securitySchemes.{name}");
                rules.schemes.push(Scheme {
                    name: name.clone(),
                    kind: kind_of(def).map_err(|e| invalid(source, &at, e))?,
                });
            }
        }
        let global = match doc.get("security") {
            Some(req) => Some(rules.requirement(req, source, "/security")?),
            None => None,
        };
        let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
            return Ok(rules);
        };
        for (template, item) in paths {
            let Some(item) = item.as_object() else {
                continue;
            };
            for m in METHODS {
                let Some(op) = item.get(*m) else { continue };
                let at = format!("/paths/{}/{m}/security", pointer_escape(template));
                let req = match op.get("security") {
                    Some(req) => rules.requirement(req, source, &at)?,
                    None => global.clone().unwrap_or_default(),
                };
                if !req.is_empty() {
                    rules
                        .routes
                        .insert(crate::validate::route_key(m, template), req);
                }
            }
        }
        Ok(rules)
    }

    fn requirement(
        &self,
        req: &Value,
        source: &Path,
        at: &str,
    ) -> Result<Vec<Alternative>, BundleError> {
        let list = req
            .as_array()
            .ok_or_else(|| invalid(source, at, "must be a list of requirements"))?;
        let mut alternatives = Vec::new();
        for (i, alt) in list.iter().enumerate() {
            let alt = alt
                .as_object()
                .ok_or_else(|| invalid(source, &format!("{at}/{i}"), "must be a mapping"))?;
            if alt.is_empty() {
                // `{}` among the alternatives: anonymous access is allowed.
                return Ok(Vec::new());
            }
            let mut all = Vec::new();
            for (name, scopes) in alt {
                let idx = self
                    .schemes
                    .iter()
                    .position(|s| &s.name == name)
                    .ok_or_else(|| {
                        invalid(
                            source,
                            &format!("{at}/{i}"),
                            format!("names security scheme `{name}`, which is not defined"),
                        )
                    })?;
                let scopes = scopes
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                all.push((idx, scopes));
            }
            alternatives.push(all);
        }
        Ok(alternatives)
    }

    /// No operation requires anything.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The names of the schemes the document defines.
    pub fn scheme_names(&self) -> impl Iterator<Item = &str> {
        self.schemes.iter().map(|s| s.name.as_str())
    }

    /// The request headers (lower-case) that carry credentials for the
    /// operation `route` (`METHOD /template`): `authorization` for HTTP,
    /// OAuth 2 and OpenID Connect schemes, the header of `apiKey` ones.
    pub fn header_names(&self, route: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let schemes = self.routes.get(route).into_iter().flatten().flatten();
        for (idx, _) in schemes {
            let name = match &self.schemes[*idx].kind {
                Kind::ApiKey {
                    at: KeyIn::Header,
                    name,
                } => name.as_str(),
                Kind::Basic | Kind::Bearer => "authorization",
                Kind::ApiKey { .. } | Kind::Unsupported(_) => continue,
            };
            if !out.iter().any(|h| h == name) {
                out.push(name.to_owned());
            }
        }
        out
    }
}

/// A `$ref` within the document, followed (a few steps at most).
fn resolve<'d>(doc: &'d Value, mut v: &'d Value) -> &'d Value {
    for _ in 0..8 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) if r.starts_with('#') => match doc.pointer(&r[1..]) {
                Some(next) => v = next,
                None => return v,
            },
            _ => return v,
        }
    }
    v
}

fn kind_of(def: &Value) -> Result<Kind, String> {
    let ty = def.get("type").and_then(Value::as_str).unwrap_or_default();
    Ok(match ty {
        "apiKey" => {
            let name = def
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or("an apiKey scheme needs `name`")?;
            let at = match def.get("in").and_then(Value::as_str) {
                Some("header") => KeyIn::Header,
                Some("query") => KeyIn::Query,
                Some("cookie") => KeyIn::Cookie,
                other => return Err(format!("`in: {other:?}` is not header, query or cookie")),
            };
            Kind::ApiKey {
                at,
                name: if at == KeyIn::Header {
                    name.to_ascii_lowercase()
                } else {
                    name.to_owned()
                },
            }
        }
        "basic" => Kind::Basic,
        "http" => match def
            .get("scheme")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("basic") => Kind::Basic,
            Some("bearer") => Kind::Bearer,
            other => Kind::Unsupported(format!("http {}", other.unwrap_or("(no scheme)"))),
        },
        "oauth2" | "openIdConnect" => Kind::Bearer,
        other => Kind::Unsupported(other.to_owned()),
    })
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// 401 (no or bad credentials) or 403 (valid, but lacking a scope).
    pub status: u16,
    /// The challenge(s) for `WWW-Authenticate`.
    pub www_authenticate: String,
    /// Why, for the JSON answer (never echoes a credential).
    pub reason: String,
}

/// Who the caller is, as the Func is told.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Principal {
    /// The scheme that admitted the request.
    pub scheme: String,
    /// The user (basic), the JWT's `sub`, or `None` (API keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// A JWT's verified claims.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Value>,
}

/// What a request offers to be checked.
pub struct AuthInput<'a, H> {
    /// Header pairs, names lower-case.
    pub headers: &'a [(H, H)],
    /// The raw query string.
    pub query: &'a str,
}

/// A JWT key: its `kid` (if any), the key, the algorithms it verifies.
type JwtKey = (Option<String>, DecodingKey, Vec<Algorithm>);

enum Verifier {
    /// SHA-256 digests of the accepted values.
    Digests(Vec<[u8; 32]>),
    Jwt {
        keys: Vec<JwtKey>,
        audience: Option<String>,
        issuer: Option<String>,
    },
    /// Refuses, saying why.
    Refuse(String),
}

/// The rules with their credentials: what the Runner checks requests with.
pub struct Guard {
    rules: AuthRules,
    verifiers: Vec<Verifier>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("schemes", &self.rules.schemes.len())
            .field("routes", &self.rules.routes.len())
            .finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn lines(text: &str) -> Vec<[u8; 32]> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| digest(l.as_bytes()))
        .collect()
}

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

fn jwks_keys(text: &str) -> Result<Vec<JwtKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a JWKS key: {e}"))?;
        let algs = match jwk.common.key_algorithm {
            Some(a) => vec![a.to_string().parse().map_err(|e| format!("{a}: {e}"))?],
            None => match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => vec![
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                    vec![Algorithm::ES256, Algorithm::ES384]
                }
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => {
                    vec![Algorithm::EdDSA]
                }
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => HMAC.to_vec(),
                _ => return Err("a JWKS key of an unknown type without `alg`".into()),
            },
        };
        keys.push((jwk.common.key_id.clone(), key, algs));
    }
    Ok(keys)
}

impl Guard {
    /// Pair `rules` with the operator's `credentials`; `secret(name)` reads
    /// a secret's value. A configured secret that cannot be read or parsed
    /// is an error (the version cannot be served as configured); a scheme
    /// with nothing configured refuses its requests.
    pub fn new(
        rules: AuthRules,
        credentials: &BTreeMap<String, SchemeCredentials>,
        secret: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<Guard, String> {
        let mut verifiers = Vec::with_capacity(rules.schemes.len());
        for s in &rules.schemes {
            let v = match (&s.kind, credentials.get(&s.name)) {
                (Kind::Unsupported(ty), _) => Verifier::Refuse(format!(
                    "security scheme `{}` is of type {ty}, which Funcatron cannot check",
                    s.name
                )),
                (_, None) => Verifier::Refuse(format!(
                    "no credentials are configured for security scheme `{}`",
                    s.name
                )),
                (Kind::Bearer, Some(c)) => {
                    let mut keys = Vec::new();
                    if let Some(name) = &c.secret {
                        let k = secret(name)?;
                        let key = DecodingKey::from_secret(k.as_bytes())
                            .map_err(|e| format!("{name}: {e}"))?;
                        keys.push((None, key, HMAC.to_vec()));
                    }
                    if let Some(name) = &c.jwks_secret {
                        keys.extend(jwks_keys(&secret(name)?).map_err(|e| format!("{name}: {e}"))?);
                    }
                    if keys.is_empty() {
                        return Err(format!(
                            "auth.{}: a bearer scheme needs `secret` (HS256) or `jwks_secret`",
                            s.name
                        ));
                    }
                    Verifier::Jwt {
                        keys,
                        audience: c.audience.clone(),
                        issuer: c.issuer.clone(),
                    }
                }
                (_, Some(c)) => {
                    let name = c
                        .secret
                        .as_deref()
                        .ok_or_else(|| format!("auth.{}: `secret` is not set", s.name))?;
                    Verifier::Digests(lines(&secret(name)?))
                }
            };
            verifiers.push(v);
        }
        Ok(Guard { rules, verifiers })
    }

    /// Does any operation require anything?
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Does `route` require anything?
    pub fn guards(&self, route: &str) -> bool {
        self.rules.routes.contains_key(route)
    }

    /// Admit or refuse a request to `route` (`METHOD /template`): `Ok(None)`
    /// for an open operation.
    pub fn check<H: AsRef<str>>(
        &self,
        route: &str,
        input: &AuthInput<'_, H>,
    ) -> Result<Option<Principal>, AuthFailure> {
        let Some(alternatives) = self.rules.routes.get(route) else {
            return Ok(None);
        };
        let mut first_failure: Option<AuthFailure> = None;
        for alt in alternatives {
            match self.check_all(alt, input) {
                Ok(p) => return Ok(Some(p)),
                Err(f) => {
                    // A 403 (right caller, missing scope) says more than a 401.
                    if first_failure.as_ref().is_none_or(|e| e.status < f.status) {
                        first_failure = Some(f);
                    }
                }
            }
        }
        let mut f = first_failure.unwrap_or_else(|| AuthFailure {
            status: 401,
            www_authenticate: String::new(),
            reason: "authentication required".into(),
        });
        f.www_authenticate = self.challenges(alternatives);
        Err(f)
    }

    fn check_all<H: AsRef<str>>(
        &self,
        alt: &Alternative,
        input: &AuthInput<'_, H>,
    ) -> Result<Principal, AuthFailure> {
        let mut admitted: Option<Principal> = None;
        for (idx, scopes) in alt {
            let p = self.check_one(*idx, scopes, input)?;
            if admitted.as_ref().is_none_or(|a| a.claims.is_none()) {
                admitted = Some(p);
            }
        }
        admitted.ok_or_else(|| refuse(401, "authentication required"))
    }

    fn check_one<H: AsRef<str>>(
        &self,
        idx: usize,
        scopes: &[String],
        input: &AuthInput<'_, H>,
    ) -> Result<Principal, AuthFailure> {
        let scheme = &self.rules.schemes[idx];
        let principal = |subject, claims| Principal {
            scheme: scheme.name.clone(),
            subject,
            claims,
        };
        match (&self.verifiers[idx], &scheme.kind) {
            (Verifier::Refuse(why), _) => Err(refuse(401, why)),
            (Verifier::Digests(accepted), Kind::ApiKey { at, name }) => {
                let key = api_key(input, *at, name).ok_or_else(|| {
                    refuse(
                        401,
                        &format!("no API key `{name}` (scheme `{}`)", scheme.name),
                    )
                })?;
                accept(accepted, key.as_bytes())
                    .then(|| principal(None, None))
                    .ok_or_else(|| {
                        refuse(
                            401,
                            &format!("the API key is not accepted (scheme `{}`)", scheme.name),
                        )
                    })
            }
            (Verifier::Digests(accepted), _) => {
                let (user, pair) = basic(input).ok_or_else(|| {
                    refuse(
                        401,
                        &format!("no Basic credentials (scheme `{}`)", scheme.name),
                    )
                })?;
                accept(accepted, pair.as_bytes())
                    .then(|| principal(Some(user), None))
                    .ok_or_else(|| {
                        refuse(
                            401,
                            &format!(
                                "the user name or password is not accepted (scheme `{}`)",
                                scheme.name
                            ),
                        )
                    })
            }
            (
                Verifier::Jwt {
                    keys,
                    audience,
                    issuer,
                },
                _,
            ) => {
                let token = bearer(input).ok_or_else(|| {
                    refuse(401, &format!("no Bearer token (scheme `{}`)", scheme.name))
                })?;
                let claims = verify_jwt(token, keys, audience.as_deref(), issuer.as_deref())
                    .map_err(|why| refuse(401, &format!("the token is not accepted: {why}")))?;
                if let Some(missing) = missing_scope(&claims, scopes) {
                    return Err(refuse(403, &format!("the token lacks scope `{missing}`")));
                }
                let sub = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
                Ok(principal(sub, Some(claims)))
            }
        }
    }

    fn challenges(&self, alternatives: &[Alternative]) -> String {
        let mut out: Vec<String> = Vec::new();
        for (idx, _) in alternatives.iter().flatten() {
            let s = &self.rules.schemes[*idx];
            let c = match &s.kind {
                Kind::Basic => "Basic realm=\"funcatron\"".to_owned(),
                Kind::Bearer => "Bearer realm=\"funcatron\"".to_owned(),
                Kind::ApiKey { name, .. } => format!("ApiKey realm=\"funcatron\", name=\"{name}\""),
                Kind::Unsupported(_) => continue,
            };
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out.join(", ")
    }
}

fn refuse(status: u16, why: &str) -> AuthFailure {
    AuthFailure {
        status,
        www_authenticate: String::new(),
        reason: why.to_owned(),
    }
}

/// Is `offered` one of `accepted` (digest compared in constant time)?
fn accept(accepted: &[[u8; 32]], offered: &[u8]) -> bool {
    let d = digest(offered);
    accepted
        .iter()
        .fold(subtle::Choice::from(0), |any, a| any | a.ct_eq(&d))
        .into()
}

fn header<'a, H: AsRef<str>>(input: &'a AuthInput<'_, H>, name: &str) -> Option<&'a str> {
    input
        .headers
        .iter()
        .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

fn api_key<H: AsRef<str>>(input: &AuthInput<'_, H>, at: KeyIn, name: &str) -> Option<String> {
    match at {
        KeyIn::Header => header(input, name).map(str::to_owned),
        KeyIn::Query => form_urlencoded::parse(input.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned()),
        KeyIn::Cookie => input
            .headers
            .iter()
            .filter(|(k, _)| k.as_ref().eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.as_ref().split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned()),
    }
}

/// `Authorization: <scheme> <rest>`, the scheme case-insensitive.
fn authorization<'a, H: AsRef<str>>(input: &'a AuthInput<'_, H>, scheme: &str) -> Option<&'a str> {
    let v = header(input, "authorization")?.trim();
    let (s, rest) = v.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// The user and the `user:password` pair of a Basic header.
fn basic<H: AsRef<str>>(input: &AuthInput<'_, H>) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(authorization(input, "basic")?)
        .ok()?;
    let pair = String::from_utf8(raw).ok()?;
    let user = pair.split_once(':')?.0.to_owned();
    Some((user, pair))
}

fn bearer<'a, H: AsRef<str>>(input: &'a AuthInput<'_, H>) -> Option<&'a str> {
    authorization(input, "bearer").filter(|t| !t.is_empty())
}

fn verify_jwt(
    token: &str,
    keys: &[JwtKey],
    audience: Option<&str>,
    issuer: Option<&str>,
) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let candidates = keys.iter().filter(|(kid, _, algs)| {
        algs.contains(&header.alg)
            && match (kid, &header.kid) {
                (Some(k), Some(h)) => k == h,
                _ => true,
            }
    });
    let mut last = format!("no key for algorithm {:?}", header.alg);
    for (_, key, _) in candidates {
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        v.validate_nbf = true;
        match audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = issuer {
            v.set_issuer(&[i]);
        }
        match jsonwebtoken::decode::<Value>(token, key, &v) {
            Ok(data) => return Ok(data.claims),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// The first of `scopes` the claims do not grant (`scope`: space-separated,
/// or `scp`: a list or a string).
fn missing_scope<'s>(claims: &Value, scopes: &'s [String]) -> Option<&'s str> {
    let granted: Vec<&str> = ["scope", "scp"]
        .iter()
        .filter_map(|k| claims.get(*k))
        .flat_map(|v| match v {
            Value::String(s) => s.split_whitespace().collect::<Vec<_>>(),
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        })
        .collect();
    scopes
        .iter()
        .find(|s| !granted.contains(&s.as_str()))
        .map(String::as_str)
}
