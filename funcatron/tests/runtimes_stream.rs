//! Answers streamed by Python and Node.js Funcs from generators, every role
//! in this process on the embedded broker, the workers real (sandboxed)
//! child processes: piece by piece to a client asking for
//! text/event-stream, collected into one answer for the others; a Func
//! failing or dying midway cuts the stream off; a client leaving closes
//! the generator and keeps the worker.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_ingress::IngressOptions;
use funcatron_runner::RunnerOptions;
use futures::StreamExt as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The example Funcs' path prefixes: the same operations in each runtime.
const RUNTIMES: &[&str] = &["py-stream", "node-stream"];

/// Largest answer sent whole in these tests (the Runner's default is
/// 16 MiB): small enough for a Func to outgrow quickly.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// How long any one event may take to come.
const EVENT_WAIT: Duration = Duration::from_secs(30);

struct Cluster {
    c: InProcess,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    cluster_with(|_| {}).await
}

/// [`cluster`] with the loaded bundles changed by `edit` first.
async fn cluster_with(edit: impl Fn(&mut funcatron_bundle::Bundle)) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path(), &["hello", "python-stream", "node-stream"]);
    let mut bundles = load(dir.path());
    bundles.iter_mut().for_each(edit);
    let mut runner = RunnerOptions {
        workers: 2,
        max_reply_bytes: MAX_REPLY_BYTES,
        ..RunnerOptions::default()
    };
    // One worker per Func: `whoami` tells whether it was replaced.
    runner.worker.concurrency = 1;
    runner.worker.cache_dir = test_cache_dir();
    let c = spawn_cluster(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        bundles,
        IngressOptions::default(),
        Some(runner),
    )
    .await;
    wait_ready(&format!("{}/hello/ready", c.base)).await;
    // Direct requests are chosen at the edge: wait for the route table.
    wait_edge_table(&c.base).await;
    Cluster { c, _dir: dir }
}

type Body = std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Read from `stream` until one whole event (ending in a blank line) is in
/// `buf`; return its text (`None`: the answer ended).
async fn next_event(stream: &mut Body, buf: &mut String) -> Option<String> {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let event = buf[..end].to_owned();
            buf.drain(..end + 2);
            return Some(event);
        }
        let piece = tokio::time::timeout(EVENT_WAIT, stream.next())
            .await
            .expect("the next event never came")?
            .unwrap();
        buf.push_str(std::str::from_utf8(&piece).unwrap());
    }
}

/// What is left of an answer's body: its bytes, or the error it ended on.
async fn rest(stream: &mut Body) -> Result<Vec<u8>, reqwest::Error> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(EVENT_WAIT, stream.next())
            .await
            .expect("the answer neither went on nor ended")
        {
            None => return Ok(got),
            Some(Ok(b)) => got.extend_from_slice(&b),
            Some(Err(e)) => return Err(e),
        }
    }
}

/// `GET base/path` asking for server-sent events: the answer's status and
/// headers, and its body as a stream.
async fn sse(base: &str, path: &str) -> (u16, reqwest::header::HeaderMap, Body) {
    let r = reqwest::Client::new()
        .get(format!("{base}/{path}"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    (
        r.status().as_u16(),
        r.headers().clone(),
        Box::pin(r.bytes_stream()),
    )
}

async fn whoami(base: &str, prefix: &str) -> String {
    let v: Value = reqwest::get(format!("{base}/{prefix}/whoami"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["worker"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn each_yielded_piece_reaches_an_sse_client_before_the_generator_ends() {
    let k = cluster().await;
    for prefix in RUNTIMES {
        // The generator yields `ready`, then waits for a word from this
        // port, which the test sends only once it has read `ready`.
        let release = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = release.local_addr().unwrap().port();
        let (status, headers, mut body) =
            sse(&k.c.base, &format!("{prefix}/events?n=2&port={port}")).await;
        assert_eq!(status, 200, "{prefix}");
        assert_eq!(headers["content-type"], "text/event-stream", "{prefix}");
        assert_eq!(headers["cache-control"], "no-cache", "{prefix}");
        assert!(
            !headers.contains_key("content-length"),
            "{prefix}: streamed, not sent whole"
        );
        let mut buf = String::new();
        assert_eq!(
            next_event(&mut body, &mut buf).await.unwrap(),
            "data: ready",
            "{prefix}"
        );
        let (mut waiting, _) = tokio::time::timeout(EVENT_WAIT, release.accept())
            .await
            .expect("the generator never asked for its word")
            .unwrap();
        waiting.write_all(b"go").await.unwrap();
        drop(waiting);
        for want in ["data: go", "id: 1\ndata: 1", "id: 2\ndata: 2"] {
            assert_eq!(
                next_event(&mut body, &mut buf).await.unwrap(),
                want,
                "{prefix}"
            );
        }
        assert!(
            next_event(&mut body, &mut buf).await.is_none(),
            "{prefix}: ended"
        );
        assert!(buf.is_empty(), "{prefix}: {buf:?}");

        // Bytes: pieces larger than a frame's largest are split on the way
        // and arrive whole; the default content type of bytes.
        let (status, headers, mut body) =
            sse(&k.c.base, &format!("{prefix}/blocks?kib=1536")).await;
        assert_eq!(status, 200, "{prefix}");
        assert_eq!(
            headers["content-type"], "application/octet-stream",
            "{prefix}"
        );
        let got = rest(&mut body).await.unwrap();
        assert_eq!(got, blocks(1536), "{prefix}");
    }
}

/// What `blocks?kib=n` answers: `n` KiB of `A`, of `B`, of `C`.
fn blocks(kib: usize) -> Vec<u8> {
    [b'A', b'B', b'C']
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, kib * 1024))
        .collect()
}

#[tokio::test]
async fn without_sse_the_pieces_are_collected_into_one_answer() {
    let k = cluster().await;
    let http = reqwest::Client::new();
    for prefix in RUNTIMES {
        let r = http
            .get(format!("{}/{prefix}/events?n=2", k.c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
        assert_eq!(r.headers()["content-type"], "text/event-stream", "{prefix}");
        assert!(
            r.headers().contains_key("server-timing"),
            "{prefix}: answered from the queue"
        );
        assert_eq!(
            r.text().await.unwrap(),
            "data: ready\n\nid: 1\ndata: 1\n\nid: 2\ndata: 2\n\n",
            "{prefix}"
        );

        // A collected answer within the limit, in pieces of a frame's
        // largest.
        let r = http
            .get(format!("{}/{prefix}/blocks?kib=1024", k.c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
        assert_eq!(
            r.headers()["content-length"],
            (3 * 1024 * 1024).to_string(),
            "{prefix}"
        );
        assert_eq!(r.bytes().await.unwrap().as_ref(), blocks(1024), "{prefix}");

        // Past the limit an answer sent whole may have: refused; the
        // worker stopped its generator when told and serves on.
        let before = whoami(&k.c.base, prefix).await;
        let r = http
            .get(format!("{}/{prefix}/blocks?kib=1536", k.c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{prefix}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "reply_too_large", "{prefix}: {v}");
        assert_eq!(whoami(&k.c.base, prefix).await, before, "{prefix}: kept");
    }
}

/// `GET prefix/op?port=` as server-sent events, where `op` yields
/// `first`, waits for a word from the port, then fails: the client has
/// the piece, then a broken answer (never a complete one).
async fn cut_off_after_first(base: &str, prefix: &str, op: &str) {
    let release = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = release.local_addr().unwrap().port();
    let (status, headers, mut body) = sse(base, &format!("{prefix}/{op}?port={port}")).await;
    assert_eq!(status, 200, "{prefix}/{op}");
    assert_eq!(
        headers["content-type"], "text/plain; charset=utf-8",
        "{prefix}/{op}: a str first piece, no content type given"
    );
    let mut buf = String::new();
    assert_eq!(
        next_event(&mut body, &mut buf).await.unwrap(),
        "data: first",
        "{prefix}/{op}"
    );
    let (mut waiting, _) = tokio::time::timeout(EVENT_WAIT, release.accept())
        .await
        .expect("the Func never asked for its word")
        .unwrap();
    waiting.write_all(b"go").await.unwrap();
    drop(waiting);
    assert!(
        rest(&mut body).await.is_err(),
        "{prefix}/{op}: the stream is cut off"
    );
}

#[tokio::test]
async fn a_func_failing_or_dying_mid_stream_cuts_the_stream_off() {
    let k = cluster().await;
    let http = reqwest::Client::new();
    for prefix in RUNTIMES {
        // The generator raises after its first piece.
        let before = whoami(&k.c.base, prefix).await;
        cut_off_after_first(&k.c.base, prefix, "fail").await;
        // Collected, the same failure is a plain 500.
        let r = http
            .get(format!("{}/{prefix}/fail", k.c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "{prefix}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "func_error", "{prefix}: {v}");
        assert_eq!(
            whoami(&k.c.base, prefix).await,
            before,
            "{prefix}: a Func that raises keeps its worker"
        );

        // The worker dies after its first piece: cut off, and replaced.
        cut_off_after_first(&k.c.base, prefix, "crash").await;
        assert_ne!(
            whoami(&k.c.base, prefix).await,
            before,
            "{prefix}: a new worker"
        );
        let r = http
            .get(format!("{}/{prefix}/crash", k.c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "{prefix}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "func_crashed", "{prefix}: {v}");

        // Failing at once after the first piece: whatever the client
        // gets, it is not a complete answer.
        let r = http
            .get(format!("{}/{prefix}/fail", k.c.base))
            .header("accept", "text/event-stream")
            .send()
            .await;
        if let Ok(r) = r {
            if r.status() == 200 {
                assert!(r.bytes().await.is_err(), "{prefix}: cut off");
            }
        }
    }
}

#[tokio::test]
async fn a_client_leaving_closes_the_generator_and_the_worker_serves_on() {
    let k = cluster().await;
    for prefix in RUNTIMES {
        let before = whoami(&k.c.base, prefix).await;
        let told = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = told.local_addr().unwrap().port();
        let (status, _, mut body) = sse(&k.c.base, &format!("{prefix}/forever?port={port}")).await;
        assert_eq!(status, 200, "{prefix}");
        let mut buf = String::new();
        assert_eq!(
            next_event(&mut body, &mut buf).await.unwrap(),
            "data: tick 1",
            "{prefix}"
        );
        drop(body);
        // The generator's `finally` runs (it was closed, not killed).
        let (mut s, _) = tokio::time::timeout(EVENT_WAIT, told.accept())
            .await
            .expect("the generator was never closed")
            .unwrap();
        let mut said = String::new();
        s.read_to_string(&mut said).await.unwrap();
        drop(s);
        assert_eq!(said, "closed", "{prefix}");
        assert_eq!(whoami(&k.c.base, prefix).await, before, "{prefix}: kept");
    }
}

#[tokio::test]
async fn the_time_limit_covers_the_whole_stream() {
    let limit = Duration::from_millis(1500);
    let k = cluster_with(|b| {
        if b.name.ends_with("-stream") {
            b.timeout_ms = Some(limit.as_millis() as u64);
        }
    })
    .await;
    for prefix in RUNTIMES {
        let before = whoami(&k.c.base, prefix).await;
        // Never told to stop (the port is never read): it ticks until its
        // time limit, where the stream is cut and the worker killed.
        let told = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = told.local_addr().unwrap().port();
        let started = Instant::now();
        let (status, _, mut body) = sse(&k.c.base, &format!("{prefix}/forever?port={port}")).await;
        assert_eq!(status, 200, "{prefix}");
        let mut buf = String::new();
        assert_eq!(
            next_event(&mut body, &mut buf).await.unwrap(),
            "data: tick 1",
            "{prefix}"
        );
        assert!(rest(&mut body).await.is_err(), "{prefix}: cut off");
        assert!(started.elapsed() >= limit, "{prefix}: not before the limit");
        assert_ne!(
            whoami(&k.c.base, prefix).await,
            before,
            "{prefix}: replaced"
        );
    }
}
