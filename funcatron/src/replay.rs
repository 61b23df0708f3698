//! `funcatron replay FILE --target URL|FUNC`: captured traffic as a
//! regression test.
//!
//! Each captured request (JSON Lines from `funcatron capture export`, schema
//! `funcatron.capture/1`) is sent again, to any HTTP endpoint (`--target
//! http://...`, path and query appended) or to a Func through a Tron's
//! management API (`--target FUNC`), and the answer is compared with the
//! recorded one: the status, the headers named by `--header`, and the body
//! (equal as JSON when both are JSON, after removing the `--ignore` JSON
//! pointers; else byte for byte). Prints a line per difference and a
//! summary; the command exits 1 when any answer differs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use funcatron_tron::mgmt::api::{FuncDetail, InvokeRequest, Routes};
use serde_json::Value;

/// `funcatron replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// Captured pairs (JSON Lines).
    file: PathBuf,
    /// An HTTP base URL, or a Func name (called through the management API).
    #[arg(long)]
    target: String,
    /// Requests per second (default: as fast as answers come).
    #[arg(long)]
    rate: Option<f64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Response header to compare too (repeatable; default content-type).
    #[arg(long = "header", default_values_t = vec!["content-type".to_string()])]
    headers: Vec<String>,
    /// JSON pointer removed from both bodies before comparing (repeatable),
    /// e.g. `/timestamp` or `/items/0/id`.
    #[arg(long = "ignore")]
    ignore: Vec<String>,
    #[command(flatten)]
    remote: crate::client::Remote,
}

/// A recorded request and answer.
struct Pair {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    status: u16,
    resp_headers: Vec<(String, String)>,
    resp_body: Vec<u8>,
}

fn body_of(v: &Value) -> Vec<u8> {
    let text = v["body"].as_str().unwrap_or_default();
    if v["body_base64"].as_bool().unwrap_or(false) {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap_or_default()
    } else {
        text.as_bytes().to_vec()
    }
}

fn headers_of(v: &Value) -> Vec<(String, String)> {
    v["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get(0)?.as_str()?.to_ascii_lowercase(),
                p.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn parse(line: &str, n: usize) -> Result<Pair> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("line {n}: not JSON"))?;
    if v["schema"] != funcatron_control::state::CAPTURE_SCHEMA {
        bail!("line {n}: not a funcatron.capture/1 record");
    }
    let (req, resp) = (&v["request"], &v["response"]);
    Ok(Pair {
        method: req["method"].as_str().unwrap_or("GET").to_owned(),
        path: req["path"].as_str().unwrap_or("/").to_owned(),
        query: req["query"].as_str().unwrap_or_default().to_owned(),
        headers: headers_of(req),
        body: body_of(req),
        status: resp["status"].as_u64().unwrap_or(0) as u16,
        resp_headers: headers_of(resp),
        resp_body: body_of(resp),
    })
}

/// Hop-by-hop and per-connection headers, and values redacted at capture.
fn resendable(k: &str, v: &str) -> bool {
    v != "[redacted]"
        && !matches!(
            k,
            "host"
                | "content-length"
                | "connection"
                | "transfer-encoding"
                | "keep-alive"
                | "x-request-id"
        )
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

enum Target {
    Http(String),
    Func {
        remote: crate::client::Remote,
        name: String,
        base_path: String,
    },
}

async fn send(http: &reqwest::Client, target: &Target, p: &Pair) -> Result<Answer> {
    let r = match target {
        Target::Http(base) => {
            let mut url = format!("{}{}", base.trim_end_matches('/'), p.path);
            if !p.query.is_empty() {
                url = format!("{url}?{}", p.query);
            }
            let method = reqwest::Method::from_bytes(p.method.as_bytes())?;
            let mut rb = http.request(method, url).body(p.body.clone());
            for (k, v) in p.headers.iter().filter(|(k, v)| resendable(k, v)) {
                rb = rb.header(k, v);
            }
            rb.send().await?
        }
        Target::Func {
            remote,
            name,
            base_path,
        } => {
            let rel = p
                .path
                .strip_prefix(base_path.as_str())
                .filter(|_| base_path != "/")
                .unwrap_or(&p.path);
            let headers = p
                .headers
                .iter()
                .filter(|(k, v)| resendable(k, v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            remote
                .post(http, &format!("/v1/funcs/{name}/invoke"))?
                .json(&InvokeRequest {
                    method: Some(p.method.clone()),
                    path: Some(if rel.is_empty() { "/" } else { rel }.to_owned()),
                    query: Some(p.query.clone()),
                    headers,
                    body: Some(String::from_utf8_lossy(&p.body).into_owned()),
                })
                .send()
                .await?
        }
    };
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = r.bytes().await?.to_vec();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Where two JSON values differ, as pointers.
fn json_diff(a: &Value, b: &Value, at: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = format!("{at}/{k}");
                match y.get(k) {
                    Some(w) => json_diff(v, w, p, out),
                    None => out.push(format!("{p}: {v} -> (missing)")),
                }
            }
            for (k, w) in y {
                if !x.contains_key(k) {
                    out.push(format!("{at}/{k}: (missing) -> {w}"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                json_diff(v, w, format!("{at}/{i}"), out);
            }
        }
        _ if a != b => out.push(format!(
            "{}: {a} -> {b}",
            if at.is_empty() { "/" } else { &at }
        )),
        _ => {}
    }
}

fn strip(mut v: Value, ignore: &[String]) -> Value {
    for p in ignore {
        let (parent, last) = match p.rsplit_once('/') {
            Some(x) => x,
            None => continue,
        };
        match v.pointer_mut(parent) {
            Some(Value::Object(m)) => {
                m.remove(last);
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = last.parse::<usize>() {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            _ => {}
        }
    }
    v
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() > 200 {
        format!("{}...", &s[..s.floor_char_boundary(200)])
    } else {
        s.into_owned()
    }
}

/// The differences between a recorded answer and a new one.
fn compare(p: &Pair, a: &Answer, headers: &[String], ignore: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if p.status != a.status {
        out.push(format!("status: {} -> {}", p.status, a.status));
    }
    for h in headers {
        let h = h.to_ascii_lowercase();
        let old = p.resp_headers.iter().find(|(k, _)| *k == h).map(|(_, v)| v);
        let new = a.headers.iter().find(|(k, _)| *k == h).map(|(_, v)| v);
        if old != new {
            out.push(format!("header {h}: {old:?} -> {new:?}"));
        }
    }
    match (
        serde_json::from_slice::<Value>(&p.resp_body),
        serde_json::from_slice::<Value>(&a.body),
    ) {
        (Ok(x), Ok(y)) => {
            let mut d = Vec::new();
            json_diff(&strip(x, ignore), &strip(y, ignore), String::new(), &mut d);
            out.extend(d.into_iter().map(|d| format!("body {d}")));
        }
        _ if p.resp_body != a.body => out.push(format!(
            "body: {:?} -> {:?}",
            snippet(&p.resp_body),
            snippet(&a.body)
        )),
        _ => {}
    }
    out
}

/// Replay and compare; `true` when any answer differs.
pub async fn run(a: ReplayArgs) -> Result<bool> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let pairs: Vec<Pair> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse(l, i + 1))
        .collect::<Result<_>>()?;
    let http = reqwest::Client::new();
    let target = if a.target.starts_with("http://") || a.target.starts_with("https://") {
        Target::Http(a.target.clone())
    } else {
        // A Func that is not there keeps `/`: its requests answer 404.
        let v: Option<FuncDetail> = http
            .get(a.remote.url(&format!("/v1/funcs/{}", a.target)))
            .send()
            .await?
            .json()
            .await
            .ok();
        let base_path = match v.and_then(|v| v.routes) {
            Some(Routes::Effective(r)) => r.base_path,
            _ => "/".to_owned(),
        };
        Target::Func {
            remote: a.remote.clone(),
            name: a.target.clone(),
            base_path,
        }
    };
    let target = Arc::new(target);
    let pairs = Arc::new(pairs);
    let limit = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let mut pace = a
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let mut tasks = Vec::with_capacity(pairs.len());
    for i in 0..pairs.len() {
        if let Some(p) = &mut pace {
            p.tick().await;
        }
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let (http, target, pairs) = (http.clone(), Arc::clone(&target), Arc::clone(&pairs));
        tasks.push(tokio::spawn(async move {
            let r = send(&http, &target, &pairs[i]).await;
            drop(permit);
            r
        }));
    }
    let mut differ = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let p = &pairs[i];
        let diffs = match t.await? {
            Ok(answer) => compare(p, &answer, &a.headers, &a.ignore),
            Err(e) => vec![format!("request failed: {e}")],
        };
        if !diffs.is_empty() {
            differ += 1;
            println!("#{} {} {}: differs", i + 1, p.method, p.path);
            for d in diffs {
                println!("    {d}");
            }
        }
    }
    println!(
        "replayed {}: {} same, {} differ",
        pairs.len(),
        pairs.len() - differ,
        differ
    );
    Ok(differ > 0)
}
