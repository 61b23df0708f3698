//! What the Runner reports beside answers: captured request/response pairs,
//! Func log lines, per-Func log levels.
//!
//! Runner -> `funcatron.capture` / `funcatron.logs` topics -> Trons with a
//! store (which write captures to files and keep recent log lines for
//! `funcatron logs`). Settings come from the registry state the Runner
//! follows ([`crate::follow`]). Nothing here is on the answer's critical
//! path: a capture is taken after the reply is published, and both
//! captures and log lines go through a bounded channel to one publishing
//! task (dropped, and counted, when the broker cannot keep up).

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use bytes::Bytes;
use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_bundle::state::{Capture, LogLevel, CAPTURE_TOPIC, LOGS_TOPIC};
use serde_json::{json, Value};

/// The publisher, process-wide (one Runner per process).
struct Observe {
    tx: tokio::sync::mpsc::Sender<(&'static str, Vec<u8>)>,
    runner: String,
}

static OBSERVE: OnceLock<Observe> = OnceLock::new();

/// Captures running, by Func (set by the follower, which may start first).
static CAPTURES: std::sync::LazyLock<RwLock<HashMap<String, Capture>>> =
    std::sync::LazyLock::new(RwLock::default);

/// Called with the per-Func log levels whenever they change (the binary
/// reloads its log filter).
pub type LevelHook = Box<dyn Fn(&HashMap<String, String>) + Send + Sync>;
static LEVEL_HOOK: OnceLock<LevelHook> = OnceLock::new();

/// Install the hook that applies per-Func log levels.
pub fn on_log_levels(hook: LevelHook) {
    let _ = LEVEL_HOOK.set(hook);
}

/// Start publishing captures and log lines on `broker` (once per process).
pub fn start(broker: &AnyBroker) {
    if OBSERVE.get().is_some() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(&'static str, Vec<u8>)>(4096);
    let o = Observe {
        tx,
        runner: format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".into()),
            std::process::id()
        ),
    };
    if OBSERVE.set(o).is_err() {
        return;
    }
    let broker = broker.clone();
    tokio::spawn(async move {
        while let Some((topic, bytes)) = rx.recv().await {
            let _ = broker.broadcast(topic, Message::new(bytes)).await;
        }
    });
}

/// Apply the captures and log levels of a registry state.
pub fn apply(
    captures: &std::collections::BTreeMap<String, Capture>,
    levels: &std::collections::BTreeMap<String, LogLevel>,
) {
    let now = funcatron_envelope::now_ms() as u64;
    tracing::debug!(
        captures = captures.len(),
        levels = levels.len(),
        "observe settings"
    );
    if let Ok(mut c) = CAPTURES.write() {
        *c = captures
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }
    let active: HashMap<String, String> = levels
        .iter()
        .filter(|(_, l)| l.until_ms.is_none_or(|u| u > now))
        .map(|(f, l)| (f.clone(), l.level.clone()))
        .collect();
    if let Some(hook) = LEVEL_HOOK.get() {
        hook(&active);
    }
}

fn send(topic: &'static str, bytes: Vec<u8>) {
    if let Some(o) = OBSERVE.get() {
        if o.tx.try_send((topic, bytes)).is_err() {
            metrics::counter!("runner_observe_dropped_total", "topic" => topic).increment(1);
        }
    }
}

/// A line a Func printed (or a failure about it), for `funcatron logs`.
pub fn func_log(func: &str, version: &str, request_id: &str, stream: &str, line: &str) {
    let Some(o) = OBSERVE.get() else { return };
    let v = json!({
        "at_ms": funcatron_envelope::now_ms() as u64,
        "func": func,
        "version": version,
        "request_id": request_id,
        "runner": o.runner,
        "stream": stream,
        "message": line,
    });
    send(LOGS_TOPIC, v.to_string().into_bytes());
}

fn redact_headers(v: &mut Value, redact: &[String]) {
    if let Some(list) = v.get_mut("headers").and_then(Value::as_array_mut) {
        for pair in list {
            if let Some(p) = pair.as_array_mut() {
                let hit = p
                    .first()
                    .and_then(Value::as_str)
                    .is_some_and(|k| redact.iter().any(|r| r.eq_ignore_ascii_case(k)));
                if hit && p.len() == 2 {
                    p[1] = Value::String("[redacted]".into());
                }
            }
        }
    }
}

/// After a reply is published: capture the pair if a capture for `func`
/// is running and this request is sampled.
pub fn maybe_capture(func: &str, version: &str, request: &Bytes, response: &[u8]) {
    if OBSERVE.get().is_none() {
        return;
    }
    let capture = match CAPTURES.read() {
        Ok(c) => match c.get(func) {
            Some(c) => c.clone(),
            None => return,
        },
        Err(_) => return,
    };
    let now = funcatron_envelope::now_ms() as u64;
    if capture.until_ms.is_some_and(|u| u <= now) || rand::random::<f64>() >= capture.sample {
        return;
    }
    let (Ok(mut req), Ok(mut resp)) = (
        serde_json::from_slice::<Value>(request),
        serde_json::from_slice::<Value>(response),
    ) else {
        return;
    };
    redact_headers(&mut req, &capture.redact);
    redact_headers(&mut resp, &capture.redact);
    // Fields that only matter on the wire.
    if let Some(m) = req.as_object_mut() {
        for k in ["reply_to", "reply_key", "deadline_ms"] {
            m.remove(k);
        }
    }
    if let Some(m) = resp.as_object_mut() {
        m.remove("reply_key");
    }
    let record = json!({
        "schema": "funcatron.capture/1",
        "capture": capture.id,
        "func": func,
        "version": version,
        "at_ms": now,
        "request": req,
        "response": resp,
    });
    metrics::counter!("runner_captured_total", "func" => func.to_owned()).increment(1);
    send(CAPTURE_TOPIC, record.to_string().into_bytes());
}
