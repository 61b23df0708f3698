//! The route and admission table the Trons push to every ingress: what an
//! ingress needs to route a request at the edge and to refuse a call
//! before queueing it.
//!
//! Tron (broadcasts) -> **ingress (routes and admits by it)** -> the
//! Func version's queue -> Runner. Every Tron broadcasts, on
//! [`crate::names::ADMISSION_TOPIC`], its routed Funcs with their bases
//! and operations (the ingress builds the same route table from them,
//! `funcatron_routes::RouteTable::from_admission`, and matches requests
//! as the Tron would), their async policy's `async_only`, whether their
//! async queue holds `max_queued` calls or more (`full`), and whether
//! they have no Runner (`cold`: the ingress wakes the autoscaler on a
//! request for one). The table carries the registry revision it was built
//! from (`revision`); an ingress that has heard of a newer registry state
//! on the control topic, or holds no current table, sends requests to
//! `funcatron.requests` and a Tron routes them. Sent at once when the
//! routes change, when the admission state changes, and every
//! [`RESEND_MS`] anyway; a table older than its `ttl_ms` is dropped, so
//! an ingress whose Trons went away neither routes nor refuses on old
//! news.
//!
//! Requests routed at the edge never pass a Tron, so each ingress counts
//! them per Func and broadcasts the counts ([`EdgeDemand`], on
//! [`crate::names::DEMAND_TOPIC`]) for the autoscalers.

use serde::{Deserialize, Serialize};

/// How often a Tron sends its table even when nothing changed.
pub const RESEND_MS: u64 = 2_000;
/// How long a table stands without a newer one.
pub const TTL_MS: u64 = 3 * RESEND_MS;

/// One Tron's admission table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdmissionTable {
    /// Which Tron sent it (for logs).
    pub tron: String,
    /// When it was sent (Unix ms).
    pub sent_ms: u64,
    /// How long it stands without a newer one, ms.
    pub ttl_ms: u64,
    /// The registry revision (`funcatron_control::state::ClusterState`)
    /// the Tron's routes were built from; 0 with no registry.
    #[serde(default)]
    pub revision: u64,
    /// The Funcs the Tron routes to, in its route table's order.
    pub funcs: Vec<FuncAdmission>,
    /// The same routes as a flat list of matchers, most specific first,
    /// for an ingress that does not build the route table itself (the
    /// nginx Lua ingress): `funcatron_routes::RouteTable::matchers`.
    #[serde(default)]
    pub matchers: Vec<EdgeMatcher>,
}

/// One Func on one base, as regular expressions (PCRE and Rust's `regex`
/// read them alike). An ingress tries the matchers in order: the first
/// whose host and base match and that has a path matching the rest of
/// the request's raw path decides the Func; when that path lacks the
/// method, later matchers of the same Func may still serve it, else the
/// answer is 405 with that path's methods (an `OPTIONS` is a preflight).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeMatcher {
    /// The Func, by position in [`AdmissionTable::funcs`].
    pub func: usize,
    /// Matches the request's `Host` (`name[:port]`), compared
    /// case-insensitively; `None`: any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Matches the raw path of a request under this base; its first group
    /// is the rest (absent or empty: `/`). `None`: the base is `/`, the
    /// whole path is the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The base's paths, the most literal text first.
    pub paths: Vec<EdgePath>,
}

/// One path template of an [`EdgeMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgePath {
    /// Matches the rest of the path; group `i` is parameter `names[i]`
    /// (percent-encoded: the ingress decodes it).
    pub regex: String,
    /// The parameters' names.
    pub names: Vec<String>,
    /// The document's path template (for `x-funcatron-route`).
    pub template: String,
    /// (upper-case method, handler), in the document's order.
    pub methods: Vec<(String, String)>,
    /// The methods whose operations are direct (`x-funcatron-direct`):
    /// their requests go in direct mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub direct: Vec<String>,
}

/// One Func of an [`AdmissionTable`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FuncAdmission {
    /// The Func's name.
    pub func: String,
    /// The enabled version (bundle digest).
    pub version: String,
    /// Its primary host (`None`: any), where `/function/<func>/` goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Its primary base path.
    pub base_path: String,
    /// The document's bases.
    pub bases: Vec<AdmissionBase>,
    /// Its operations: what the route table matches.
    pub operations: Vec<AdmissionOperation>,
    /// Its async policy's `async_only`: sync calls and async calls
    /// without a callback URL are refused.
    #[serde(default)]
    pub async_only: bool,
    /// Its async policy's `max_queued`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u64>,
    /// Its async queue holds `max_queued` calls or more: new async calls
    /// get 429.
    #[serde(default)]
    pub full: bool,
    /// It has no Runner now: a request for it wakes the autoscaler (the
    /// ingress reports its demand at once).
    #[serde(default)]
    pub cold: bool,
    /// The Func may be a stage of a chain (its bundle's `chain: true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chainable: bool,
}

/// A base: host (`None`: any) and base path, as
/// `funcatron_bundle::servers::Base` holds them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdmissionBase {
    /// Lower-case host, variables as `{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Normalised base path.
    pub path: String,
}

/// An operation as routing sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdmissionOperation {
    /// Upper-case method.
    pub method: String,
    /// Path template relative to the base path.
    pub path: String,
    /// Its handler (the `operationId` or its default name), which the
    /// Runner invokes.
    #[serde(default)]
    pub operation_id: String,
    /// Its own bases, when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bases: Option<Vec<AdmissionBase>>,
    /// A direct operation (`x-funcatron-direct`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
}

/// How often an ingress reports the requests it routed at the edge.
pub const DEMAND_EVERY_MS: u64 = 200;

/// What one ingress routed at the edge since its last report: requests
/// per Func. Trons add the counts to their demand (the autoscaler's
/// arrival rates) and wake the autoscaler for a cold Func. A report with
/// no counts asks the Trons to send their table now (an ingress sends one
/// when it starts hearing tables, so it need not wait for a resend).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeDemand {
    /// Which ingress (for logs).
    pub ingress: String,
    /// (Func, requests since the last report), only Funcs with some.
    pub counts: Vec<(String, u64)>,
}

/// Does a queue of `ready` waiting calls leave no room under `max_queued`?
pub fn is_full(max_queued: Option<u64>, ready: u64) -> bool {
    max_queued.is_some_and(|m| ready >= m)
}

/// `Retry-After` of a 429 `queue_full`, seconds: about when the Trons
/// have read the queue again.
pub const RETRY_AFTER_S: &str = "1";

/// Why a call is refused before it is queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// 400 or 429.
    pub status: u16,
    /// The JSON error code.
    pub code: &'static str,
    /// What the client reads.
    pub message: String,
}

/// What `f`'s policy says of a call (`is_async` or not, with a callback
/// URL or not): `None` to admit it. The one rule both the embedded
/// ingress (by the broadcast table) and a Tron queueing calls for the
/// nginx ingress (by its own table) apply.
pub fn refusal(f: &FuncAdmission, is_async: bool, callback: bool) -> Option<Refusal> {
    let refuse = |status, code, message: String| {
        Some(Refusal {
            status,
            code,
            message,
        })
    };
    match is_async {
        false if f.async_only => refuse(
            400,
            "async_only",
            format!("Func {} takes only asynchronous calls with a callback (Prefer: respond-async and X-Callback-Url)", f.func),
        ),
        true if f.async_only && !callback => refuse(
            400,
            "callback_required",
            format!("Func {} takes asynchronous calls only with an X-Callback-Url", f.func),
        ),
        true if f.full => refuse(
            429,
            "queue_full",
            format!(
                "Func {} already has {} asynchronous calls waiting; retry later",
                f.func,
                f.max_queued.unwrap_or_default()
            ),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_at_the_limit_and_never_without_one() {
        assert!(!is_full(None, u64::MAX));
        assert!(!is_full(Some(3), 2));
        assert!(is_full(Some(3), 3));
        assert!(is_full(Some(0), 0));
    }

    #[test]
    fn a_table_round_trips() {
        let t = AdmissionTable {
            tron: "t1".into(),
            sent_ms: 1,
            ttl_ms: TTL_MS,
            revision: 7,
            matchers: vec![EdgeMatcher {
                func: 0,
                host: None,
                base: Some("^/f(/.*)?$".into()),
                paths: vec![EdgePath {
                    regex: "^/$".into(),
                    names: vec![],
                    template: "/".into(),
                    methods: vec![("GET".into(), "root".into())],
                    direct: vec![],
                }],
            }],
            funcs: vec![FuncAdmission {
                func: "f".into(),
                base_path: "/f".into(),
                bases: vec![AdmissionBase {
                    host: None,
                    path: "/f".into(),
                }],
                operations: vec![AdmissionOperation {
                    method: "GET".into(),
                    path: "/".into(),
                    operation_id: "root".into(),
                    bases: None,
                    direct: false,
                }],
                full: true,
                cold: true,
                ..FuncAdmission::default()
            }],
        };
        let back: AdmissionTable =
            serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
