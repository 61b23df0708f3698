//! Rows (m): a chain of three Lua Funcs (`echo-lua | to-upper | echo-lua`,
//! one `POST /_funcatron/chain`) against the same three Funcs called one
//! after another by the client (three POSTs on one keep-alive
//! connection, the latency of a call being the three together), at
//! concurrency 1 and 64, over RabbitMQ (edge routing, unless
//! `--embedded-only`) and on the embedded broker. Target: the chain's p50
//! at most 0.8x the three calls' and its throughput at least 1.25x.

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use funcatron_broker::{AmqpBroker, AnyBroker, EmbeddedBroker};
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

use crate::{connect, drive, row, start_path, Stats};

/// The chain the rows measure, and the calls it stands for.
const CHAIN: &str = "echo-lua | to-upper | echo-lua";
const CALLS: [&str; 3] = ["/echo-lua/", "/to-upper/", "/echo-lua/"];
const INPUT: &[u8] = b"chain bench input";
const OUTPUT: &[u8] = b"CHAIN BENCH INPUT";

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One POST on `send`: its body, checked to be a 200.
async fn post(
    send: &mut Conn,
    addr: std::net::SocketAddr,
    path: &str,
    chain: Option<&str>,
    body: Bytes,
) -> Result<Bytes> {
    if send.ready().await.is_err() {
        *send = connect(addr).await?;
    }
    let mut req = hyper::Request::post(format!("http://{addr}{path}"))
        .header("host", "localhost")
        .header("content-type", "text/plain");
    if let Some(c) = chain {
        req = req.header("x-funcatron-chain", c);
    }
    let resp = send.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status == 200,
        "bad answer {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body)
}

/// `total` operations from `concurrency` callers: the chain in one
/// request (`chained`), or the three calls in turn.
async fn load(
    addr: std::net::SocketAddr,
    chained: bool,
    concurrency: usize,
    total: usize,
) -> Result<Stats> {
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        conns.push(Arc::new(tokio::sync::Mutex::new(connect(addr).await?)));
    }
    let conns = Arc::new(conns);
    drive(concurrency, total, move |worker| {
        let conns = Arc::clone(&conns);
        async move {
            let mut send = conns[worker % conns.len()].lock().await;
            let out = if chained {
                post(
                    &mut send,
                    addr,
                    "/_funcatron/chain",
                    Some(CHAIN),
                    Bytes::from_static(INPUT),
                )
                .await?
            } else {
                let mut body = Bytes::from_static(INPUT);
                for path in CALLS {
                    body = post(&mut send, addr, path, None, body).await?;
                }
                body
            };
            anyhow::ensure!(
                out.as_ref() == OUTPUT,
                "wrong output {}",
                String::from_utf8_lossy(&out)
            );
            Ok(())
        }
    })
    .await
}

/// The rows on one broker.
async fn on(
    name: &str,
    make: impl Fn() -> AnyBroker,
    bundles: &std::path::Path,
    c1: usize,
    c64: usize,
) -> Result<()> {
    let stop = CancellationToken::new();
    let addr = start_path(make, bundles, funcatron_ingress::edge::Routing::Edge, &stop).await?;
    let calls1 = load(addr, false, 1, c1).await.context("three calls, c=1")?;
    row(&format!("(m) {name}: three calls in turn, c=1"), calls1);
    let chain1 = load(addr, true, 1, c1).await.context("chain, c=1")?;
    row(&format!("(m) {name}: 3-stage chain, c=1"), chain1);
    let calls64 = load(addr, false, 64, c64)
        .await
        .context("three calls, c=64")?;
    row(&format!("(m) {name}: three calls in turn, c=64"), calls64);
    let chain64 = load(addr, true, 64, c64).await.context("chain, c=64")?;
    row(&format!("(m) {name}: 3-stage chain, c=64"), chain64);
    stop.cancel();
    println!(
        "ratio chain/three calls p50 at c=1, {name}:      {:.2}x (target <= 0.8x)",
        chain1.p50_ms / calls1.p50_ms
    );
    println!(
        "ratio chain/three calls throughput at c=64, {name}: {:.2} (target >= 1.25)",
        chain64.rps / calls64.rps
    );
    Ok(())
}

/// Rows (m): over RabbitMQ at `amqp` (unless `embedded_only`), then on
/// the embedded broker. `c64` operations at c=64, a tenth at c=1.
pub(crate) async fn rows(
    amqp: &str,
    bundles: &std::path::Path,
    embedded_only: bool,
    c64: usize,
) -> Result<()> {
    // Each operation is three requests' work: a third as many operations
    // as the other rows' requests.
    let c64 = (c64 / 3).max(300);
    let c1 = (c64 / 10).max(100);
    if !embedded_only {
        let url = amqp.to_owned();
        on(
            "RabbitMQ",
            || AnyBroker::Amqp(AmqpBroker::connect(&url)),
            bundles,
            c1,
            c64,
        )
        .await?;
    }
    let embedded = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    on("embedded", || embedded.clone(), bundles, c1, c64).await
}
