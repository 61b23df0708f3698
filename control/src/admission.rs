//! The admission table: what an ingress needs to refuse an async call
//! before queueing it.
//!
//! **ingress (admits)** -> `funcatron.requests` -> Tron -> the Func's
//! async queue. An ingress does not know which Func a request is for, so
//! every Tron broadcasts, on [`crate::names::ADMISSION_TOPIC`], its
//! routed Funcs with their bases and operations (the ingress builds the
//! same route table from them and matches requests as the Tron will),
//! their async policy's `async_only`, and whether their async queue holds
//! `max_queued` calls or more (`full`). Sent when it changes and every
//! [`RESEND_MS`]; a table older than its `ttl_ms` is dropped, so an
//! ingress whose Trons went away admits everything again rather than
//! refusing on old news.

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
    /// The Funcs the Tron routes to, in its route table's order.
    pub funcs: Vec<FuncAdmission>,
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
    /// Its own bases, when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bases: Option<Vec<AdmissionBase>>,
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
            funcs: vec![FuncAdmission {
                func: "f".into(),
                base_path: "/f".into(),
                bases: vec![AdmissionBase {
                    host: None,
                    path: "/f".into(),
                }],
                full: true,
                ..FuncAdmission::default()
            }],
        };
        let back: AdmissionTable =
            serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
