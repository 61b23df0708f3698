//! The listener's limits against real sockets: a client that never
//! finishes its headers, one that stalls inside its body, an idle
//! kept-alive connection, and more connections than the limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use funcatron_listener::{is_body_timeout, serve, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Upper bound for what should happen within a few hundred milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);

fn limits() -> Limits {
    Limits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        max_connections: 100,
        shutdown_grace: Duration::from_secs(1),
        tls: None,
    }
}

struct Server {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(limits: Limits) -> Result<Server> {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    let router = Router::new()
        .route(
            "/",
            get(
                move |ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    async move { addr.ip().to_string() }
                },
            ),
        )
        .route(
            "/body",
            post(|body: Body| async move {
                match axum::body::to_bytes(body, 1 << 20).await {
                    Ok(b) => (StatusCode::OK, format!("{} bytes", b.len())),
                    Err(e) if is_body_timeout(&e) => {
                        (StatusCode::REQUEST_TIMEOUT, "body timeout".to_owned())
                    }
                    Err(e) => (StatusCode::BAD_REQUEST, e.to_string()),
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                // A slow Func: longer than the idle timeout.
                tokio::time::sleep(Duration::from_millis(600)).await;
                "done"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(serve("test", listener, router, limits, stop.clone()));
    Ok(Server { addr, hits, stop })
}

/// Read until the server closes; returns what it sent.
async fn read_to_close(s: &mut TcpStream) -> Result<String> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Read one response head and body of known small size.
async fn read_response(s: &mut TcpStream) -> Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await??;
        anyhow::ensure!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>())
                })
                .transpose()?
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Ok(text);
            }
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() -> Result<()> {
    let server = start(Limits {
        header_timeout: Duration::from_millis(200),
        ..limits()
    })
    .await?;
    let mut s = TcpStream::connect(server.addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await?;
    let answer = read_to_close(&mut s).await?;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408() -> Result<()> {
    let server = start(Limits {
        body_timeout: Duration::from_millis(200),
        ..limits()
    })
    .await?;
    let mut s = TcpStream::connect(server.addr).await?;
    s.write_all(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await?;
    let answer = read_response(&mut s).await?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A body that keeps coming is fine.
    let mut s = TcpStream::connect(server.addr).await?;
    s.write_all(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        .await?;
    let answer = read_response(&mut s).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("3 bytes"),
        "{answer}"
    );
    Ok(())
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_but_a_slow_request_is_not() -> Result<()> {
    let server = start(Limits {
        idle_timeout: Duration::from_millis(200),
        ..limits()
    })
    .await?;
    let mut s = TcpStream::connect(server.addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let answer = read_response(&mut s).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1"),
        "{answer}"
    );
    // Nothing more: the server closes the connection (the header timeout is
    // 30 s, so only the idle timeout can close it within the patience).
    assert_eq!(read_to_close(&mut s).await?, "");

    // A request in progress longer than the idle timeout is answered.
    let mut s = TcpStream::connect(server.addr).await?;
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let answer = read_response(&mut s).await?;
    assert!(answer.ends_with("done"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_slot() -> Result<()> {
    let server = start(Limits {
        max_connections: 1,
        ..limits()
    })
    .await?;
    let mut a = TcpStream::connect(server.addr).await?;
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    read_response(&mut a).await?;
    // The second connection's request is written while the first holds the
    // only slot; the first is served again meanwhile, the second not.
    let mut b = TcpStream::connect(server.addr).await?;
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    read_response(&mut a).await?;
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    drop(a);
    let answer = read_response(&mut b).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
    Ok(())
}
