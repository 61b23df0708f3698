//! The registry's state: which version of each Func is enabled, with what
//! settings, and what was uploaded and enabled before.
//!
//! Trons keep it (persisted in their store) and broadcast it on the
//! broker's control topic; Runners follow it. A state replaces another when
//! its `(revision, origin)` is greater, so every Tron and Runner converges
//! on the same one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Settings given to a Func when it is enabled; they override the bundle's
/// (`funcatron_bundle::Bundle::with_settings`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FuncSettings {
    /// Environment variables (merged over the bundle's `env`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Secret names (added to the bundle's); values come from each Runner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Worker processes per Runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub concurrency: Option<usize>,
    /// Per-invocation time limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub timeout_ms: Option<u64>,
    /// Memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub memory_mb: Option<usize>,
    /// Fewest Runners (for the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_runners: Option<u32>,
    /// Most Runners (for the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runners: Option<u32>,
    /// Requests one Runner should handle at once (for the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0))]
    pub target_concurrency: Option<f64>,
    /// How long demand must stay lower before Runners are removed, in
    /// milliseconds (for the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay_ms: Option<u64>,
    /// Answer this Func's failures with their full detail (tracebacks,
    /// file paths, stderr, build output); by default clients get a generic
    /// message and the detail is in the Func's log. For debugging, not for
    /// production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<bool>,
    /// Check this Func's answers against its document's `responses`
    /// (status codes, content types, body schemas) and report mismatches
    /// (the Runner's log, the Func's log, `runner_response_mismatches_total`);
    /// answers are never changed. Always on in `funcatron dev`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_responses: Option<bool>,
    /// What the document's security schemes are checked against, by
    /// scheme name (`components.securitySchemes` / `securityDefinitions`).
    /// A scheme without an entry refuses every request (fail closed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub auth: BTreeMap<String, SchemeCredentials>,
    /// Cross-origin (browser) access to this Func's routes; `None`: none
    /// (no CORS headers, preflights answered 405 like any undeclared
    /// method). See `funcatron_bundle::cors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSettings>,
    /// Overrides of the bundle's async policy (retries, backoff, maximum
    /// age, limits), field by field. See [`crate::calls::AsyncPolicy`].
    #[serde(rename = "async", default, skip_serializing_if = "Option::is_none")]
    pub async_policy: Option<crate::calls::AsyncPolicy>,
}

/// Which web pages may call a Func from a browser (CORS). Preflights are
/// answered by the Runner from this and the API document, without running
/// the Func; answers to allowed origins carry the CORS headers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Allowed origins: exact (`https://app.example.com`), with a
    /// wildcard first label (`https://*.example.com`), or `*` for any
    /// (not with `credentials`).
    pub origins: Vec<String>,
    /// Request headers a page may send, beyond the CORS-safelisted ones;
    /// `None`: the ones the document declares for the operation (its
    /// header parameters, the headers of its security schemes) and
    /// `Content-Type`. `*` allows any (not with `credentials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
    /// Answer headers a page may read, beyond the safelisted ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<String>,
    /// Let pages send cookies and HTTP authentication
    /// (`Access-Control-Allow-Credentials: true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub credentials: bool,
    /// How long a browser may cache a preflight's answer, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
}

/// The credentials one security scheme is checked against. Values never
/// travel in the state: they are secrets, named here and read by each
/// Runner from its secrets directory like the Func's other secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SchemeCredentials {
    /// The secret holding what requests are checked against: `apiKey`:
    /// the accepted keys, one per line; `http` `basic`: `user:password`
    /// lines; `http` `bearer` (and `oauth2`, `openIdConnect`): the HS256
    /// key of its JWTs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Bearer schemes: the secret holding a JWKS (JSON) whose keys verify
    /// RS256/RS384/RS512/PS256/ES256/ES384/EdDSA JWTs (chosen by `kid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret: Option<String>,
    /// Bearer schemes: the `aud` a JWT must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Bearer schemes: the `iss` a JWT must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// An uploaded version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Upload {
    /// SHA-256 of the archive.
    pub sha: String,
    /// The bundle's content version (its queue suffix).
    pub version: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// Archive size.
    pub bytes: u64,
}

/// One enable/disable/rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// When (Unix ms).
    pub at_ms: u64,
    /// `enable`, `disable` or `rollback`.
    pub action: String,
    /// The version enabled (none for `disable`).
    pub sha: Option<String>,
}

/// One Func in the registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FuncState {
    /// The enabled version (archive SHA-256), if any.
    pub enabled: Option<String>,
    /// Settings of the enabled version.
    #[serde(default)]
    pub settings: FuncSettings,
    /// Every uploaded version, oldest first.
    #[serde(default)]
    pub uploads: Vec<Upload>,
    /// Enables, disables and rollbacks, oldest first.
    #[serde(default)]
    pub history: Vec<Event>,
}

/// A capture of a Func's request/response pairs, while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capture {
    /// Names this capture (records carry it).
    pub id: String,
    /// Fraction of requests captured, 0 to 1.
    pub sample: f64,
    /// Stop at this time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// Stop after this many pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Header names (lower-case) whose values are replaced by `[redacted]`
    /// at capture time, in requests and responses.
    pub redact: Vec<String>,
    /// Query parameter names (any case) whose values are replaced by
    /// `[redacted]` at capture time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_query: Vec<String>,
    /// JSON body field names (any case, at any depth) whose values are
    /// replaced by `"[redacted]"` at capture time, in requests and
    /// responses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_json_fields: Vec<String>,
}

/// The `schema` of a capture record (one JSON line per request/response
/// pair in a capture file; `funcatron replay` reads them).
pub const CAPTURE_SCHEMA: &str = "funcatron.capture/1";

/// Header names redacted unless a capture says otherwise.
pub const DEFAULT_REDACT: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// Query parameter names redacted unless the operator says otherwise
/// (`--redact-query`).
pub const DEFAULT_REDACT_QUERY: &[&str] = &[
    "token",
    "access_token",
    "id_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
    "client_secret",
    "signature",
    "sig",
];

/// JSON body field names redacted unless the operator says otherwise
/// (`--redact-json-field`).
pub const DEFAULT_REDACT_JSON_FIELDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
];

/// A Func's log level on every Runner, for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLevel {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// Back to the default at this time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
}

/// The whole registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterState {
    /// Bumped on every change.
    pub revision: u64,
    /// The Tron that made this revision.
    pub origin: String,
    /// By Func name.
    pub funcs: BTreeMap<String, FuncState>,
    /// Captures running, by Func name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub captures: BTreeMap<String, Capture>,
    /// Log levels set, by Func name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub log_levels: BTreeMap<String, LogLevel>,
}

impl ClusterState {
    /// Does `other` replace this state?
    pub fn older_than(&self, other: &ClusterState) -> bool {
        (other.revision, other.origin.as_str()) > (self.revision, self.origin.as_str())
    }

    /// Enabled (name, sha, settings), by name.
    pub fn enabled(&self) -> impl Iterator<Item = (&str, &str, &FuncSettings)> {
        self.funcs.iter().filter_map(|(n, f)| {
            f.enabled
                .as_deref()
                .map(|sha| (n.as_str(), sha, &f.settings))
        })
    }
}

/// A message on the control topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Control {
    /// The sender's state; `fetch` is where its bundle archives can be
    /// downloaded (`{fetch}/v1/bundles/{sha}`).
    State {
        /// The state.
        state: ClusterState,
        /// The sender's management API base URL.
        fetch: String,
    },
    /// A newcomer asks every Tron to broadcast its state.
    Hello,
}

/// One Func on one Runner: cumulative counters (rates come from deltas).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FuncLoad {
    /// Requests being handled now.
    pub in_flight: u64,
    /// Requests handled since the Runner started.
    pub served: u64,
    /// Milliseconds spent handling them.
    pub busy_ms: f64,
}

/// A Runner's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunnerStats {
    /// Which Runner.
    pub runner: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// By Func.
    pub funcs: BTreeMap<String, FuncLoad>,
}
