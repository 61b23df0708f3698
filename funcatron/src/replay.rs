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
//!
//! Captured requests may carry credentials (what the capture did not
//! redact): replay follows no redirect, sends every request to the origin
//! given on the command line only (a captured path that would make the URL
//! name another host is refused), and never resends redacted values. An
//! HTTP target goes through the outbound address policy
//! (`funcatron_control::outbound`): a loopback, private or metadata
//! address needs `--allow-outbound`.

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
    /// Where an HTTP `--target` may be (loopback, private and metadata
    /// addresses need `--allow-outbound`).
    #[command(flatten)]
    outbound: crate::OutboundArgs,
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
    !v.contains(funcatron_control::redact::REDACTED)
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

/// The URL of a captured request under `base`: refused unless it is on
/// `base`'s origin (a captured path such as `@evil.example/` or
/// `//evil.example/` would otherwise name another host).
fn same_origin_url(base: &str, p: &Pair) -> Result<reqwest::Url> {
    let mut url = format!("{}{}", base.trim_end_matches('/'), p.path);
    if !p.query.is_empty() {
        url = format!("{url}?{}", p.query);
    }
    let base = reqwest::Url::parse(base).with_context(|| format!("--target {base}"))?;
    let url = reqwest::Url::parse(&url).with_context(|| format!("{} {}", p.method, p.path))?;
    if url.origin() != base.origin() || !url.username().is_empty() || url.password().is_some() {
        bail!(
            "{} {}: not on the origin of --target, not sent",
            p.method,
            p.path
        );
    }
    Ok(url)
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
            let url = same_origin_url(base, p)?;
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
                    base: None,
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
    // No redirects: a redirect would carry the captured request (and its
    // credentials) to an origin the operator did not name.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the HTTP client")?;
    let target = if a.target.starts_with("http://") || a.target.starts_with("https://") {
        let policy = a.outbound.policy()?;
        policy.check_url(&a.target)?;
        let to_target = policy
            .client(reqwest::Client::builder())
            .context("building the HTTP client")?;
        (Target::Http(a.target.clone()), to_target)
    } else {
        // A Func that is not there keeps `/`: its requests answer 404.
        let v: Option<FuncDetail> = a
            .remote
            .get(&http, &format!("/v1/funcs/{}", a.target))?
            .send()
            .await?
            .json()
            .await
            .ok();
        let base_path = match v.and_then(|v| v.routes) {
            Some(Routes::Effective(r)) => r.base_path,
            _ => "/".to_owned(),
        };
        let to_api = http.clone();
        (
            Target::Func {
                remote: a.remote.clone(),
                name: a.target.clone(),
                base_path,
            },
            to_api,
        )
    };
    let (target, http) = (Arc::new(target.0), target.1);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    fn args(file: &std::path::Path, target: &str) -> ReplayArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: ReplayArgs,
        }
        let file = file.display().to_string();
        <Cli as clap::Parser>::try_parse_from([
            "replay",
            file.as_str(),
            "--target",
            target,
            "--allow-outbound",
            "127.0.0.1",
        ])
        .unwrap()
        .a
    }

    /// The target answers a 302 to another server: replay reports the 302
    /// and the other server never sees the request or its credentials.
    #[tokio::test]
    async fn redirects_are_not_followed_and_credentials_stay_on_the_target() {
        let elsewhere_hits = Arc::new(AtomicUsize::new(0));
        let hits = Arc::clone(&elsewhere_hits);
        let elsewhere = serve(axum::Router::new().fallback(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async { "got it" }
        }))
        .await;
        let target_auth = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&target_auth);
        let location = format!("{elsewhere}/stolen");
        let target = serve(
            axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
                if let Some(v) = headers.get("authorization") {
                    seen.lock().unwrap().push(v.to_str().unwrap().to_owned());
                }
                let location = location.clone();
                async move {
                    (
                        axum::http::StatusCode::FOUND,
                        [(axum::http::header::LOCATION, location)],
                    )
                }
            }),
        )
        .await;

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pairs.jsonl");
        let record = serde_json::json!({
            "schema": funcatron_control::state::CAPTURE_SCHEMA,
            "request": {"method": "GET", "path": "/x", "query": "",
                "headers": [["authorization", "Bearer captured"], ["cookie", "c=1"],
                            ["x-api-key", "[redacted]"]],
                "body": ""},
            "response": {"status": 200, "headers": [], "body": "got it"},
        });
        std::fs::write(&file, format!("{record}\n")).unwrap();

        let differ = run(args(&file, &target)).await.unwrap();
        assert!(differ, "the 302 is reported as a difference");
        assert_eq!(
            target_auth.lock().unwrap().as_slice(),
            ["Bearer captured"],
            "the target given on the command line gets the request"
        );
        assert_eq!(
            elsewhere_hits.load(Ordering::SeqCst),
            0,
            "the redirect was followed to another origin"
        );
    }

    /// A captured path that would make the URL name another host is not
    /// sent.
    #[test]
    fn a_captured_path_cannot_change_the_origin() {
        let pair = |path: &str| Pair {
            method: "GET".into(),
            path: path.into(),
            query: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
            status: 200,
            resp_headers: Vec::new(),
            resp_body: Vec::new(),
        };
        let base = "http://127.0.0.1:8080";
        assert!(same_origin_url(base, &pair("/ok")).is_ok());
        for evil in ["@evil.example/x", ".evil.example/x", ":9999/x"] {
            assert!(
                same_origin_url(base, &pair(evil)).is_err(),
                "{evil} was sent"
            );
        }
        assert!(!resendable("x-api-key", "[redacted]"));
    }

    /// Without `--allow-outbound`, a loopback or metadata target is
    /// refused before anything is sent.
    #[tokio::test]
    async fn an_internal_target_needs_the_operators_allowlist() {
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&hits);
        let target = serve(axum::Router::new().fallback(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            async { "hi" }
        }))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pairs.jsonl");
        let record = serde_json::json!({
            "schema": funcatron_control::state::CAPTURE_SCHEMA,
            "request": {"method": "GET", "path": "/x", "query": "", "headers": [], "body": ""},
            "response": {"status": 200, "headers": [["content-type", "text/plain; charset=utf-8"]], "body": "hi"},
        });
        std::fs::write(&file, format!("{record}\n")).unwrap();
        for url in [target.as_str(), "http://169.254.169.254"] {
            let mut a = args(&file, url);
            a.outbound = crate::OutboundArgs::default();
            let e = run(a).await.unwrap_err().to_string();
            assert!(e.contains("--allow-outbound"), "{url}: {e}");
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "a refused target was sent to"
        );
        assert!(
            !run(args(&file, &target)).await.unwrap(),
            "allowed, it replays"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
