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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};

use bytes::Bytes;
use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_bundle::state::{
    Capture, FuncLoad, LogLevel, RunnerStats, CAPTURE_TOPIC, LOGS_TOPIC, STATS_TOPIC,
};
use serde_json::json;

/// What the publishing task sends.
enum Outgoing {
    /// A log line, ready.
    Log(Vec<u8>),
    /// A pair to turn into a capture record.
    Capture {
        capture: Capture,
        func: String,
        version: String,
        request: Bytes,
        response: Bytes,
    },
}

/// The publisher, process-wide (one Runner per process).
struct Observe {
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    runner: String,
}

static OBSERVE: OnceLock<Observe> = OnceLock::new();

/// Captures running, by Func (set by the follower, which may start first).
static CAPTURES: std::sync::LazyLock<RwLock<HashMap<String, Capture>>> =
    std::sync::LazyLock::new(RwLock::default);

/// The load of one Func version on this Runner: counted with atomics on
/// the request path, summed per Func by the heartbeat.
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicU64,
    served: AtomicU64,
    busy_us: AtomicU64,
}

impl Load {
    /// A request starts.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended after `took`.
    pub fn end(&self, took: std::time::Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.busy_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Every live version's load, by Func, for the heartbeat.
type Loads = std::sync::Mutex<Vec<(String, Weak<Load>)>>;
static LOADS: std::sync::LazyLock<Loads> = std::sync::LazyLock::new(Default::default);

/// A new counter for a version of `func`, reported until it is dropped.
pub fn load_for(func: &str) -> Arc<Load> {
    let load = Arc::new(Load::default());
    if let Ok(mut l) = LOADS.lock() {
        l.push((func.to_owned(), Arc::downgrade(&load)));
    }
    load
}

/// Per Func, the sum over its live versions.
fn load_snapshot() -> std::collections::BTreeMap<String, FuncLoad> {
    let mut out = std::collections::BTreeMap::<String, FuncLoad>::new();
    if let Ok(mut loads) = LOADS.lock() {
        loads.retain(|(_, w)| w.strong_count() > 0);
        for (func, w) in loads.iter() {
            let Some(l) = w.upgrade() else { continue };
            let e = out.entry(func.clone()).or_default();
            e.in_flight += l.in_flight();
            e.served += l.served.load(Ordering::Relaxed);
            e.busy_ms += l.busy_us.load(Ordering::Relaxed) as f64 / 1000.0;
        }
    }
    out
}

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
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(4096);
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
    let heartbeat = broker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(o) = OBSERVE.get() else { continue };
            let stats = RunnerStats {
                runner: o.runner.clone(),
                at_ms: funcatron_envelope::now_ms() as u64,
                funcs: load_snapshot(),
            };
            if let Ok(bytes) = serde_json::to_vec(&stats) {
                let _ = heartbeat.broadcast(STATS_TOPIC, Message::new(bytes)).await;
            }
        }
    });
    let broker = broker.clone();
    tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let msg = match out {
                Outgoing::Log(bytes) => (LOGS_TOPIC, Message::new(bytes)),
                Outgoing::Capture {
                    capture,
                    func,
                    version,
                    request,
                    response,
                } => {
                    let Some(bytes) = record(&capture, &func, &version, &request, &response) else {
                        continue;
                    };
                    let mut m = Message::new(bytes);
                    // The writer files it without parsing it.
                    m.headers = vec![
                        ("x-funcatron-func".into(), func),
                        ("x-funcatron-capture".into(), capture.id),
                    ];
                    (CAPTURE_TOPIC, m)
                }
            };
            let _ = broker.broadcast(msg.0, msg.1).await;
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

fn send_log(bytes: Vec<u8>) {
    if let Some(o) = OBSERVE.get() {
        if o.tx.try_send(Outgoing::Log(bytes)).is_err() {
            metrics::counter!("runner_observe_dropped_total", "topic" => LOGS_TOPIC).increment(1);
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
    send_log(v.to_string().into_bytes());
}

fn redact(headers: &mut [funcatron_envelope::Header<'_>], redact: &[String]) {
    for (k, v) in headers.iter_mut() {
        if redact.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            *v = std::borrow::Cow::Borrowed("[redacted]");
        }
    }
}

/// The capture record for one pair (typed, borrowing decode; no JSON tree).
fn record(
    capture: &Capture,
    func: &str,
    version: &str,
    request: &[u8],
    response: &[u8],
) -> Option<Vec<u8>> {
    let mut req = funcatron_envelope::Request::decode(request).ok()?;
    let mut resp = funcatron_envelope::Response::decode(response).ok()?;
    redact(&mut req.headers, &capture.redact);
    redact(&mut resp.headers, &capture.redact);
    // Fields that only matter on the wire.
    req.reply_to = None;
    req.reply_key = None;
    resp.reply_key = None;
    let mut out = Vec::with_capacity(request.len() + response.len() + 160);
    out.extend_from_slice(br#"{"schema":"funcatron.capture/1","capture":"#);
    serde_json::to_writer(&mut out, &capture.id).ok()?;
    out.extend_from_slice(br#","func":"#);
    serde_json::to_writer(&mut out, func).ok()?;
    out.extend_from_slice(br#","version":"#);
    serde_json::to_writer(&mut out, version).ok()?;
    out.extend_from_slice(
        format!(
            r#","at_ms":{},"request":"#,
            funcatron_envelope::now_ms() as u64
        )
        .as_bytes(),
    );
    serde_json::to_writer(&mut out, &req).ok()?;
    out.extend_from_slice(br#","response":"#);
    serde_json::to_writer(&mut out, &resp).ok()?;
    out.push(b'}');
    Some(out)
}

/// After a reply is published: capture the pair if a capture for `func`
/// is running and this request is sampled. The record is built by the
/// publishing task, off the request's path.
pub fn maybe_capture(func: &str, version: &str, request: &Bytes, response: &Bytes) {
    let Some(o) = OBSERVE.get() else { return };
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
    metrics::counter!("runner_captured_total", "func" => func.to_owned()).increment(1);
    let job = Outgoing::Capture {
        capture,
        func: func.to_owned(),
        version: version.to_owned(),
        request: request.clone(),
        response: response.clone(),
    };
    if o.tx.try_send(job).is_err() {
        metrics::counter!("runner_observe_dropped_total", "topic" => CAPTURE_TOPIC).increment(1);
    }
}
