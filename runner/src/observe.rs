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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use std::borrow::Cow;

use bytes::Bytes;
use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_control::headers;
use funcatron_control::names::{CAPTURE_TOPIC, LOGS_TOPIC, STATS_TOPIC};
use funcatron_control::state::{Capture, FuncLoad, LogLevel, RunnerStats};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What the publishing task sends.
enum Outgoing {
    /// A log line, ready.
    Log(Vec<u8>),
    /// A pair to turn into a capture record.
    Capture {
        capture: Box<Capture>,
        func: String,
        version: String,
        request: Bytes,
        response: Bytes,
    },
}

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
type Loads = Vec<(String, Weak<Load>)>;

/// Called with the per-Func log levels whenever they change (the binary
/// reloads its log filter).
pub type LevelHook = Arc<dyn Fn(&HashMap<String, String>) + Send + Sync>;

/// What one Runner reports beside its answers: its heartbeats, the lines
/// its Funcs print, the pairs its captures sample. Each Runner has its
/// own (two Runners in one process report under their own ids); a cheap
/// handle to clone into runtimes.
#[derive(Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("id", &self.inner.id)
            .field("publishing", &self.inner.tx.is_some())
            .finish()
    }
}

struct Inner {
    /// This Runner's id in heartbeats and log lines.
    id: String,
    /// To the publishing task; `None` for a detached observer.
    tx: Option<tokio::sync::mpsc::Sender<Outgoing>>,
    /// Captures running, by Func.
    captures: RwLock<HashMap<String, Capture>>,
    /// Every live version's load.
    loads: Mutex<Loads>,
    /// Applies per-Func log levels, if the binary gave one.
    levels: Option<LevelHook>,
}

/// The workspace's one lock idiom:
/// `lock().unwrap_or_else(|e| poisoned("what", e))`.
pub(crate) use funcatron_control::sync::poisoned;

/// A Runner id unique in the cluster: host, process and a random part
/// (several Runners may share a process).
pub fn new_runner_id() -> String {
    format!(
        "{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".into()),
        std::process::id(),
        &funcatron_envelope::new_request_id()[..6]
    )
}

impl Observer {
    /// An observer that publishes heartbeats (every second), log lines and
    /// captures on `broker` under `id` until it and its clones are dropped
    /// or `shutdown` fires.
    pub fn start(
        broker: &AnyBroker,
        id: String,
        levels: Option<LevelHook>,
        shutdown: &CancellationToken,
    ) -> Observer {
        let (tx, rx) = tokio::sync::mpsc::channel::<Outgoing>(4096);
        let o = Observer::with(id, Some(tx), levels);
        tokio::spawn(heartbeat(
            broker.clone(),
            Arc::downgrade(&o.inner),
            shutdown.clone(),
        ));
        tokio::spawn(publish(broker.clone(), rx));
        o
    }

    /// An observer that publishes nothing (checks, tests).
    pub fn detached() -> Observer {
        Observer::with(new_runner_id(), None, None)
    }

    fn with(
        id: String,
        tx: Option<tokio::sync::mpsc::Sender<Outgoing>>,
        levels: Option<LevelHook>,
    ) -> Observer {
        Observer {
            inner: Arc::new(Inner {
                id,
                tx,
                captures: RwLock::default(),
                loads: Mutex::default(),
                levels,
            }),
        }
    }

    /// This Runner's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// A new counter for a version of `func`, reported until it is dropped.
    pub fn load_for(&self, func: &str) -> Arc<Load> {
        let load = Arc::new(Load::default());
        self.inner
            .loads
            .lock()
            .unwrap_or_else(|e| poisoned("observe.loads", e))
            .push((func.to_owned(), Arc::downgrade(&load)));
        load
    }

    /// Per Func, the sum over its live versions.
    pub fn load_snapshot(&self) -> BTreeMap<String, FuncLoad> {
        let mut out = BTreeMap::<String, FuncLoad>::new();
        let mut loads = self
            .inner
            .loads
            .lock()
            .unwrap_or_else(|e| poisoned("observe.loads", e));
        loads.retain(|(_, w)| w.strong_count() > 0);
        for (func, w) in loads.iter() {
            let Some(l) = w.upgrade() else { continue };
            let e = out.entry(func.clone()).or_default();
            e.in_flight += l.in_flight();
            e.served += l.served.load(Ordering::Relaxed);
            e.busy_ms += l.busy_us.load(Ordering::Relaxed) as f64 / 1000.0;
        }
        out
    }

    /// Apply the captures and log levels of a registry state.
    pub fn apply(&self, captures: &BTreeMap<String, Capture>, levels: &BTreeMap<String, LogLevel>) {
        let now = funcatron_envelope::now_ms() as u64;
        tracing::debug!(
            captures = captures.len(),
            levels = levels.len(),
            "observe settings"
        );
        *self
            .inner
            .captures
            .write()
            .unwrap_or_else(|e| poisoned("observe.captures", e)) = captures
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let active: HashMap<String, String> = levels
            .iter()
            .filter(|(_, l)| l.until_ms.is_none_or(|u| u > now))
            .map(|(f, l)| (f.clone(), l.level.clone()))
            .collect();
        if let Some(hook) = &self.inner.levels {
            hook(&active);
        }
    }

    fn send(&self, out: Outgoing, topic: &'static str) {
        let Some(tx) = &self.inner.tx else { return };
        if tx.try_send(out).is_err() {
            metrics::counter!("runner_observe_dropped_total", "topic" => topic).increment(1);
        }
    }

    /// A line a Func printed (or a failure about it), for `funcatron logs`.
    /// Pass it through [`log_line`] first (the callers also write it to the
    /// Runner's own log).
    pub fn func_log(&self, func: &str, version: &str, request_id: &str, stream: &str, line: &str) {
        if self.inner.tx.is_none() {
            return;
        }
        let v = json!({
            "at_ms": funcatron_envelope::now_ms() as u64,
            "func": func,
            "version": version,
            "request_id": request_id,
            "runner": self.inner.id,
            "stream": stream,
            "message": line,
        });
        self.send(Outgoing::Log(v.to_string().into_bytes()), LOGS_TOPIC);
    }

    /// After a reply is published: capture the pair if a capture for
    /// `func` is running and this request is sampled. The record is built
    /// by the publishing task, off the request's path.
    pub fn maybe_capture(&self, func: &str, version: &str, request: &Bytes, response: &Bytes) {
        if self.inner.tx.is_none() {
            return;
        }
        let capture = match self
            .inner
            .captures
            .read()
            .unwrap_or_else(|e| poisoned("observe.captures", e))
            .get(func)
        {
            Some(c) => c.clone(),
            None => return,
        };
        let now = funcatron_envelope::now_ms() as u64;
        if capture.until_ms.is_some_and(|u| u <= now) || rand::random::<f64>() >= capture.sample {
            return;
        }
        metrics::counter!("runner_captured_total", "func" => func.to_owned()).increment(1);
        let job = Outgoing::Capture {
            capture: Box::new(capture),
            func: func.to_owned(),
            version: version.to_owned(),
            request: request.clone(),
            response: response.clone(),
        };
        self.send(job, CAPTURE_TOPIC);
    }
}

/// Broadcast the Runner's heartbeat every second while it lives.
async fn heartbeat(broker: AnyBroker, inner: Weak<Inner>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let o = Observer { inner };
        let stats = RunnerStats {
            runner: o.inner.id.clone(),
            at_ms: funcatron_envelope::now_ms() as u64,
            funcs: o.load_snapshot(),
        };
        drop(o);
        match serde_json::to_vec(&stats) {
            Ok(bytes) => {
                if let Err(e) = broker.broadcast(STATS_TOPIC, Message::new(bytes)).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a heartbeat"),
        }
    }
}

/// Publish log lines and capture records until every sender is dropped.
async fn publish(broker: AnyBroker, mut rx: tokio::sync::mpsc::Receiver<Outgoing>) {
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
                    (headers::FUNC.into(), func),
                    (headers::CAPTURE.into(), capture.id),
                ];
                (CAPTURE_TOPIC, m)
            }
        };
        if let Err(e) = broker.broadcast(msg.0, msg.1).await {
            metrics::counter!("runner_observe_dropped_total", "topic" => msg.0).increment(1);
            tracing::debug!(error = %e, topic = msg.0, "not published");
        }
    }
}

fn redact(headers: &mut [funcatron_envelope::Header<'_>], redact: &[String]) {
    for (k, v) in headers.iter_mut() {
        if redact.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            *v = std::borrow::Cow::Borrowed(funcatron_control::redact::REDACTED);
        }
    }
}

/// A text body with the capture's JSON fields redacted (base64 bodies are
/// not JSON text and stay as they are).
fn redact_body(body: &mut std::borrow::Cow<'_, str>, base64: bool, capture: &Capture) {
    if base64 {
        return;
    }
    if let Some(b) = funcatron_control::redact::json_body(body, &capture.redact_json_fields) {
        *body = std::borrow::Cow::Owned(b);
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
    if let Some(q) = funcatron_control::redact::query(&req.query, &capture.redact_query) {
        req.query = std::borrow::Cow::Owned(q);
    }
    redact_body(&mut req.body, req.body_base64, capture);
    redact_body(&mut resp.body, resp.body_base64, capture);
    // Fields that only matter on the wire.
    req.reply_to = None;
    req.reply_key = None;
    resp.reply_key = None;
    let mut out = Vec::with_capacity(request.len() + response.len() + 160);
    out.extend_from_slice(br#"{"schema":"#);
    serde_json::to_writer(&mut out, funcatron_control::state::CAPTURE_SCHEMA).ok()?;
    out.extend_from_slice(br#","capture":"#);
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

/// Longest Func log line kept, in bytes; the rest is cut (and said so).
pub const MAX_LOG_LINE_BYTES: usize = 8 * 1024;

/// A line a Func printed, safe to log: at most [`MAX_LOG_LINE_BYTES`]
/// (cut at a character boundary, with how much was cut), and control
/// characters other than tab escaped, so Func output cannot forge lines
/// in the Runner's log or move a terminal's cursor.
pub fn log_line(line: &str) -> Cow<'_, str> {
    let clean = !line.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f);
    if clean && line.len() <= MAX_LOG_LINE_BYTES {
        return Cow::Borrowed(line);
    }
    let mut end = line.len().min(MAX_LOG_LINE_BYTES);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 32);
    for c in line[..end].chars() {
        if (c.is_control() && c != '\t') || c == '\u{7f}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if end < line.len() {
        out.push_str(&format!(" [{} more bytes cut]", line.len() - end));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod line_tests {
    use super::{log_line, MAX_LOG_LINE_BYTES};

    #[test]
    fn func_lines_are_bounded_and_cannot_forge_log_lines() {
        assert_eq!(log_line("plain\ttext"), "plain\ttext");
        assert_eq!(
            log_line("ok\n2026-01-01 INFO forged\r\x1b[2J"),
            "ok\\n2026-01-01 INFO forged\\r\\u{1b}[2J"
        );
        let long = "é".repeat(MAX_LOG_LINE_BYTES);
        let cut = log_line(&long);
        assert!(cut.len() < MAX_LOG_LINE_BYTES + 40, "{}", cut.len());
        assert!(
            cut.ends_with(&format!(" [{} more bytes cut]", MAX_LOG_LINE_BYTES)),
            "{cut}"
        );
    }
}
