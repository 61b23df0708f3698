//! HTTPS on a listener, with a certificate the test makes: a client that
//! trusts it is served (HTTP/1.1 and HTTP/2), plain HTTP is not, and a
//! client that never starts its handshake is disconnected.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use axum::routing::get;
use axum::Router;
use funcatron_listener::{serve, tls_config, Limits};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Certs {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    pem: String,
}

fn certs() -> Certs {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let pem = made.cert.pem();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    Certs {
        _dir: dir,
        cert,
        key,
        pem,
    }
}

#[tokio::test]
async fn https_is_served_to_a_client_that_trusts_the_certificate() -> Result<()> {
    let c = certs();
    let limits = Limits {
        tls: Some(tls_config(&c.cert, &c.key)?),
        header_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let router = Router::new().route("/", get(|| async { "secret hello" }));
    tokio::spawn(serve("tls-test", listener, router, limits, stop.clone()));

    let root = reqwest::Certificate::from_pem(c.pem.as_bytes())?;
    for http2 in [false, true] {
        let mut client = reqwest::Client::builder().add_root_certificate(root.clone());
        // HTTP/2 is chosen by ALPN when the client offers it.
        if !http2 {
            client = client.http1_only();
        }
        let r = client
            .build()?
            .get(format!("https://localhost:{port}/"))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.version(),
            if http2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            }
        );
        assert_eq!(r.text().await?, "secret hello");
    }
    // A client that does not trust it gets no answer.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()?;
    assert!(untrusting
        .get(format!("https://localhost:{port}/"))
        .send()
        .await
        .is_err());
    // Plain HTTP on the HTTPS port is not served.
    let plain = reqwest::get(format!("http://localhost:{port}/")).await;
    assert!(plain.is_err(), "{plain:?}");
    // A client that never starts its handshake is disconnected.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await??;
    assert_eq!(n, 0);
    stop.cancel();
    Ok(())
}

#[test]
fn unreadable_certificates_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = tls_config(&junk, &junk).unwrap_err().to_string();
    assert!(
        err.contains("certificate") && err.contains("junk.pem"),
        "{err}"
    );
    let c = certs();
    let err = tls_config(&c.cert, &junk).unwrap_err().to_string();
    assert!(err.contains("key") && err.contains("junk.pem"), "{err}");
}
