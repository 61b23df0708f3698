//! Pipelines (flows): the document an operation declares
//! (`x-funcatron-flow`, validated when its bundle loads) and the state of
//! a running flow, which travels in the envelope ([`FlowState`], 1.3).
//!
//! Ingress -> the flow operation's Runner (starts it) -> each `apply`
//! step's Func queue (via a Tron) -> that Func's Runner (continues it:
//! runs the `modify` and `callback` steps after the Func's answer, waits
//! for `parallel` branches, forwards to the next `apply`) -> ... -> the
//! Runner that finishes replies to the ingress. `docs/flows.md` is the
//! user's description; the engine is `funcatron-runner`'s `flow` module.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A pipeline: its steps in order, and what runs when a step fails and
/// at the end whatever happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// The steps, run in order; the current data passes from each to the
    /// next.
    pub steps: Vec<Step>,
    /// Runs when a step fails, given the failure as its data; its answer
    /// becomes the body of the failed flow's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Box<Step>>,
    /// Runs last, success or failure, given `{"ok", "status"}` as its
    /// data; what it answers is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finally: Option<Box<Step>>,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Call a Func with the data as the request body; its answer is the
    /// new data.
    Apply(Apply),
    /// A Lua transform of the data, sandboxed like a Lua Func: the chunk
    /// sees `data` (a string), `content_type`, `get(k)`, `set(k, v)` and
    /// `json`, and returns the new data (a table is encoded as JSON; `nil`
    /// keeps the data).
    Modify(String),
    /// POST the data to a URL; the data is unchanged.
    Callback(Callback),
    /// Call several Funcs at once with the data; their answers, joined
    /// into a JSON array (a list of branches) or object (named branches),
    /// are the new data.
    Parallel(Parallel),
}

/// An `apply` step: which Func and how to call it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    /// The Func.
    pub func: String,
    /// The method (default `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The path below the Func's base path (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Headers added to (or replacing) the caller's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The query string's parameters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    /// `sync` (the default). `async` phases are not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// A `callback` step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callback {
    /// Where the data is POSTed (`http` or `https`).
    pub url: String,
    /// Headers sent with it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Query parameters added to the URL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
}

/// The branches of a `parallel` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Parallel {
    /// Joined into a JSON array, in this order.
    List(Vec<Apply>),
    /// Joined into a JSON object under these names.
    Named(BTreeMap<String, Apply>),
}

impl Apply {
    /// `mode: async`: this step starts (or continues) the flow's
    /// asynchronous phase.
    pub fn is_async(&self) -> bool {
        self.mode.as_deref() == Some("async")
    }
}

impl Parallel {
    /// The branches, with their names for an object join.
    pub fn branches(&self) -> Vec<(Option<&str>, &Apply)> {
        match self {
            Parallel::List(l) => l.iter().map(|a| (None, a)).collect(),
            Parallel::Named(m) => m.iter().map(|(k, a)| (Some(k.as_str()), a)).collect(),
        }
    }
}

/// Most branches one `parallel` step may have.
pub const MAX_BRANCHES: usize = 32;
/// Most steps in one flow (its `on_failure` and `finally` included).
pub const MAX_STEPS: usize = 64;

impl FlowSpec {
    /// Check what serde cannot: step counts, names and modes. The message
    /// names the step (`steps[2]`, `on_failure`).
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("steps: a flow needs at least one step".into());
        }
        if self.steps.len() + 2 > MAX_STEPS {
            return Err(format!(
                "steps: at most {} (with on_failure and finally, {MAX_STEPS} in all)",
                MAX_STEPS - 2
            ));
        }
        let named = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("steps[{i}]"), s))
            .chain(
                self.on_failure
                    .iter()
                    .map(|s| ("on_failure".to_owned(), &**s)),
            )
            .chain(self.finally.iter().map(|s| ("finally".to_owned(), &**s)));
        for (at, step) in named {
            check_step(step).map_err(|e| format!("{at}: {e}"))?;
            let in_steps = at.starts_with("steps");
            let async_here = match step {
                Step::Apply(a) => !in_steps && a.is_async(),
                Step::Parallel(p) => p.branches().iter().any(|(_, a)| a.is_async()),
                _ => false,
            };
            if async_here {
                return Err(format!(
                    "{at}: mode async is for apply steps in steps (a parallel branch, \
                     on_failure and finally run in the phase they are in)"
                ));
            }
        }
        Ok(())
    }
}

fn check_step(step: &Step) -> Result<(), String> {
    match step {
        Step::Apply(a) => check_apply(a),
        Step::Modify(src) if src.trim().is_empty() => Err("modify: empty Lua chunk".into()),
        Step::Modify(_) => Ok(()),
        Step::Callback(c) if !(c.url.starts_with("http://") || c.url.starts_with("https://")) => {
            Err(format!("callback: url {:?} is not http(s)", c.url))
        }
        Step::Callback(_) => Ok(()),
        Step::Parallel(p) => {
            let b = p.branches();
            if b.is_empty() || b.len() > MAX_BRANCHES {
                return Err(format!("parallel: 1 to {MAX_BRANCHES} branches"));
            }
            b.iter().try_for_each(|(_, a)| check_apply(a))
        }
    }
}

fn check_apply(a: &Apply) -> Result<(), String> {
    if a.func.is_empty()
        || !a
            .func
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("apply: {:?} is not a Func name", a.func));
    }
    if a.path.as_deref().is_some_and(|p| !p.starts_with('/')) {
        return Err("apply: path must start with /".into());
    }
    match a.mode.as_deref() {
        None | Some("sync") => Ok(()),
        Some("async") => Ok(()),
        Some(m) => Err(format!("apply: mode {m:?} is not sync or async")),
    }
}

/// Which part of a flow is running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The steps.
    #[default]
    Steps,
    /// `on_failure`.
    OnFailure,
    /// `finally`.
    Finally,
}

/// An answer held while `on_failure` or `finally` runs: what the caller
/// gets once they are done.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// Its status.
    pub status: u16,
    /// Its content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Its body (UTF-8, or base64 when `body_base64`).
    #[serde(default)]
    pub body: String,
    /// `body` is base64.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_base64: bool,
}

/// A running flow, in the envelope of the request its current `apply`
/// step makes. Signed ([`FlowState::sig`]) by the Runner that wrote it;
/// a Runner refuses a state whose signature does not verify.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowState<'a> {
    /// `<func>/<operationId>` of the flow's operation (for logs).
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// The document.
    pub spec: Option<FlowSpec>,
    /// The running part.
    #[serde(default)]
    pub phase: Phase,
    /// The step whose `apply` this request is (in `phase`).
    pub at: u32,
    /// Values `modify` steps `set`.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// The answer held for the caller (while `on_failure` or `finally`
    /// runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// The run time of each step done so far, in ms, by step label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<(String, f64)>,
    /// `set` values kept in the state store instead of here (too large
    /// to travel inline): name -> store key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refs: BTreeMap<String, String>,
    /// Every store key this flow wrote: deleted when it ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stored: Vec<String>,
    /// Set when a step of the asynchronous phase ran out of attempts
    /// (why): `on_failure` and `finally` run, then the call is
    /// dead-lettered instead of failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead: Option<String>,
    /// HMAC-SHA256 (hex) over [`FlowState::signed_bytes`].
    #[serde(borrow, default)]
    pub sig: Cow<'a, str>,
}

impl FlowState<'_> {
    /// The same state, owning its strings.
    pub fn to_owned_state(&self) -> FlowState<'static> {
        FlowState {
            name: Cow::Owned(self.name.to_string()),
            spec: self.spec.clone(),
            phase: self.phase,
            at: self.at,
            vars: self.vars.clone(),
            held: self.held.clone(),
            timings: self.timings.clone(),
            refs: self.refs.clone(),
            stored: self.stored.clone(),
            dead: self.dead.clone(),
            sig: Cow::Owned(self.sig.to_string()),
        }
    }

    /// What the signature covers: the request id and every field but the
    /// signature, in a fixed encoding.
    pub fn signed_bytes(&self, request_id: &str) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.sig = Cow::Borrowed("");
        let mut out = request_id.as_bytes().to_vec();
        out.push(0);
        out.extend(serde_json::to_vec(&unsigned).unwrap_or_default());
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_step_kind_reads_from_its_document_form() {
        let spec: FlowSpec = serde_json::from_value(serde_json::json!({
            "steps": [
                {"modify": "return data"},
                {"apply": {"func": "sed", "query": {"e": "s/a/b/"}, "method": "PUT", "path": "/x"}},
                {"parallel": [{"func": "a"}, {"func": "b"}]},
                {"parallel": {"x": {"func": "a"}}},
                {"callback": {"url": "https://example.com/hook", "headers": {"k": "v"}}},
            ],
            "on_failure": {"modify": "return data"},
            "finally": {"callback": {"url": "http://example.com/done"}},
        }))
        .unwrap();
        spec.check().unwrap();
        assert!(matches!(&spec.steps[2], Step::Parallel(Parallel::List(l)) if l.len() == 2));
        assert!(
            matches!(&spec.steps[3], Step::Parallel(Parallel::Named(m)) if m.contains_key("x"))
        );
        let again: FlowSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }
}
