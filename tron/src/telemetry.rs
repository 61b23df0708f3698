//! Telemetry a Tron with a store keeps: recent Func log lines (for
//! `funcatron logs`) and capture files.
//!
//! Runner -> `funcatron.logs` / `funcatron.capture` topics -> **Tron
//! (here)** -> the log ring and live followers, and one JSON Lines file per
//! Func under `<store>/captures/`. The registry's collector feeds it and
//! stops a capture that reached its maximum. Each record is redacted again
//! with its capture's lists ([`funcatron_control::redact`]) before it is
//! written, whatever the Runner that sent it did.

use funcatron_control::sync::poisoned;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use funcatron_broker::Message;
use funcatron_control::headers;
use funcatron_control::state::Capture;

/// Log lines kept for `funcatron logs`.
const KEPT_LINES: usize = 5000;
/// Most bytes the kept log lines may hold together.
const KEPT_BYTES: usize = 8 * 1024 * 1024;
/// Longest log record accepted from the topic (a Runner cuts a Func's
/// line at 8 KiB; anything much larger did not come from one).
const MAX_RECORD_BYTES: usize = 32 * 1024;

/// The log ring and capture files of one Tron.
pub struct Telemetry {
    /// The store directory (capture files go under `captures/`).
    store: PathBuf,
    /// Recent Func log lines (JSON), newest last, and their total bytes.
    logs: Mutex<(VecDeque<Arc<str>>, usize)>,
    /// New log lines, for followers.
    live_logs: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Pairs written per capture id.
    captured: Mutex<HashMap<String, u64>>,
    /// Every capture this Tron has seen, by id: pairs still in flight when
    /// a capture stops are written too (and redacted with its lists).
    known_captures: Mutex<HashMap<String, Capture>>,
    /// Capture files kept open for appending, by Func.
    capture_files: Mutex<HashMap<String, std::fs::File>>,
}

impl Telemetry {
    /// Telemetry kept in the store at `store`.
    pub fn new(store: &Path) -> Self {
        Telemetry {
            store: store.to_owned(),
            logs: Mutex::new((VecDeque::new(), 0)),
            live_logs: tokio::sync::broadcast::channel(1024).0,
            captured: Mutex::default(),
            known_captures: Mutex::default(),
            capture_files: Mutex::default(),
        }
    }

    /// Remember the captures of a state (so their pairs are written).
    pub fn know(&self, captures: &BTreeMap<String, Capture>) {
        let mut known = self
            .known_captures
            .lock()
            .unwrap_or_else(|e| poisoned("telemetry.known_captures", e));
        for c in captures.values() {
            known.insert(c.id.clone(), c.clone());
        }
    }

    /// The capture file of `func` (JSON Lines).
    pub fn capture_path(&self, func: &str) -> Option<PathBuf> {
        funcatron_bundle::valid_name(func)
            .then(|| self.store.join("captures").join(format!("{func}.jsonl")))
    }

    /// Append a captured pair to its Func's file, up to the capture's max.
    /// The Func and capture come in message headers: the record is written
    /// as it arrived (redacted with the capture's lists where it holds
    /// something they name), through a file kept open. Returns the Func
    /// and capture id when this pair was the capture's last.
    pub fn write_capture(&self, msg: &Message) -> Option<(String, String)> {
        let (func, id) = (msg.header(headers::FUNC)?, msg.header(headers::CAPTURE)?);
        // Not a capture this Tron started or adopted: nothing.
        let capture = self
            .known_captures
            .lock()
            .unwrap_or_else(|e| poisoned("telemetry.known_captures", e))
            .get(id)?
            .clone();
        let max = capture.max;
        let n = {
            let mut counts = self
                .captured
                .lock()
                .unwrap_or_else(|e| poisoned("telemetry.captured", e));
            let n = counts.entry(id.to_owned()).or_insert(0);
            if max.is_some_and(|m| *n >= m) {
                return None;
            }
            *n += 1;
            *n
        };
        let path = self.capture_path(func)?;
        let redacted = funcatron_control::redact::record(&msg.payload, &capture);
        let record = redacted.as_deref().unwrap_or(&msg.payload);
        if let Err(e) = self.append(func, &path, record) {
            tracing::error!(func, error = %e, "cannot write a captured pair");
        }
        max.is_some_and(|m| n >= m)
            .then(|| (func.to_owned(), id.to_owned()))
    }

    fn append(&self, func: &str, path: &Path, record: &[u8]) -> std::io::Result<()> {
        let mut files = self
            .capture_files
            .lock()
            .unwrap_or_else(|e| poisoned("telemetry.capture_files", e));
        if !path.is_file() {
            files.remove(func);
        }
        let file = match files.entry(func.to_owned()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                e.insert(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                )
            }
        };
        let mut line = Vec::with_capacity(record.len() + 1);
        line.extend_from_slice(record);
        line.push(b'\n');
        std::io::Write::write_all(file, &line)
    }

    /// Keep a log line (JSON text) and pass it to followers.
    pub fn remember_log(&self, bytes: &[u8]) {
        let Ok(text) = std::str::from_utf8(bytes) else {
            metrics::counter!("tron_bad_log_lines_total").increment(1);
            return;
        };
        if text.len() > MAX_RECORD_BYTES {
            metrics::counter!("tron_bad_log_lines_total").increment(1);
            return;
        }
        let line: Arc<str> = Arc::from(text);
        {
            let mut guard = self
                .logs
                .lock()
                .unwrap_or_else(|e| poisoned("telemetry.logs", e));
            let (logs, bytes) = &mut *guard;
            while logs.len() >= KEPT_LINES || (*bytes + line.len() > KEPT_BYTES && !logs.is_empty())
            {
                if let Some(old) = logs.pop_front() {
                    *bytes -= old.len();
                }
            }
            *bytes += line.len();
            logs.push_back(Arc::clone(&line));
        }
        // No follower is listening: nothing to do.
        let _ = self.live_logs.send(line);
    }

    /// Recent log lines (JSON) and a receiver of new ones.
    pub fn logs(&self) -> (Vec<Arc<str>>, tokio::sync::broadcast::Receiver<Arc<str>>) {
        let rx = self.live_logs.subscribe();
        let recent = self
            .logs
            .lock()
            .unwrap_or_else(|e| poisoned("telemetry.logs", e))
            .0
            .iter()
            .cloned()
            .collect();
        (recent, rx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_log_ring_is_bounded_in_bytes_and_refuses_huge_records() {
        let dir = tempfile::tempdir().unwrap();
        let t = Telemetry::new(dir.path());
        let line = format!("{{\"message\":\"{}\"}}", "x".repeat(30 * 1024));
        for _ in 0..1000 {
            t.remember_log(line.as_bytes());
        }
        let (kept, _) = t.logs();
        let bytes: usize = kept.iter().map(|l| l.len()).sum();
        assert!(bytes <= KEPT_BYTES && bytes > KEPT_BYTES / 2, "{bytes}");
        t.remember_log("y".repeat(MAX_RECORD_BYTES + 1).as_bytes());
        let (after, _) = t.logs();
        assert!(after.iter().all(|l| !l.starts_with('y')));
    }
}
