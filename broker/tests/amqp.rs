//! The AMQP adapter against a real RabbitMQ (`FUNCATRON_TEST_AMQP`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`):
//!
//! - publish / consume / ack round trip keeps the payload, headers and the
//!   persistent flag, and an ack really settles (prefetch 1 proves it);
//! - a publish to a queue that does not exist, and the `depth` of one, is
//!   `BrokerError::NoRoute` and leaves the connection and its publisher
//!   channel usable;
//! - `AnyBroker::dead_letter` of an undecodable message lands on
//!   `funcatron.dead` with the reason and source headers, and is
//!   acknowledged on its source queue;
//! - reconnect: when RabbitMQ closes this adapter's connection (found by its
//!   `connection_name`, so no other client is disturbed) `connected()` goes
//!   false then true, the open subscription resubscribes, the unacknowledged
//!   delivery comes back `redelivered`, and publishing works again;
//! - the declaration race fixed in dc03be7: a queue `declare`d while the
//!   supervisor is redeclaring its snapshot on a fresh connection (no live
//!   connection yet) is declared on the broker once the connection is live.
//!   A small TCP proxy holds the supervisor's first `queue.declare` frame so
//!   the test declares inside that window deterministically.
//!
//! Every test uses queues with fresh random names and deletes them at the
//! end. Nothing sleeps: waits are on the `connected()` watch or polls with a
//! deadline.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use funcatron_broker::{
    AmqpBroker, AnyBroker, Broker, BrokerError, ConsumeOptions, Delivery, Message, QueueKind,
    Subscription,
};
use funcatron_control::headers::{DEAD_REASON, DEAD_SOURCE};
use funcatron_control::names::DEAD_LETTERS;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(20);

fn amqp_uri() -> String {
    std::env::var("FUNCATRON_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A name no other test run uses.
fn unique(what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "funcatron-test.{what}.{}.{nanos:x}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn next(sub: &mut Subscription) -> Delivery {
    within("the next delivery", sub.next())
        .await
        .expect("subscription closed")
}

/// A connected adapter whose RabbitMQ connection is named `name`.
async fn connect(name: &str) -> AmqpBroker {
    let uri = amqp_uri();
    let sep = if uri.contains('?') { '&' } else { '?' };
    let broker = AmqpBroker::connect(&format!("{uri}{sep}connection_name={name}"));
    assert!(
        broker.wait_connected(DEADLINE).await,
        "cannot connect to RabbitMQ at {}",
        amqp_uri()
    );
    broker
}

/// Delete test queues through a connection of the test's own.
async fn delete_queues(queues: &[&str]) {
    let connection = Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .expect("cleanup connection");
    let channel = connection.create_channel().await.expect("cleanup channel");
    for q in queues {
        channel
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }
    let _ = connection.close(200, "cleanup done".into()).await;
}

fn manual(prefetch: u16) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        auto_ack: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_payload_headers_and_persistence() {
    let broker = connect(&unique("round-trip")).await;
    let q = unique("round-trip");
    broker.declare(&q, QueueKind::Work).await.expect("declare");
    // Prefetch 1: the second message can only arrive once the first is acked.
    let mut sub = broker
        .consume(&q, QueueKind::Work, manual(1))
        .await
        .expect("consume");

    let durable = Message {
        headers: vec![
            ("x-funcatron-operation".into(), "getHello".into()),
            ("x-request-id".into(), "ü-1".into()),
        ],
        persistent: true,
        ttl_ms: Some(60_000),
        ..Message::new(&b"\x00binary\xffpayload"[..])
    };
    let transient = Message::new("second");
    broker
        .publish(&q, durable.clone())
        .await
        .expect("publish 1");
    broker
        .publish(&q, transient.clone())
        .await
        .expect("publish 2");

    let d = next(&mut sub).await;
    assert_eq!(d.message.payload, durable.payload);
    assert_eq!(d.message.header("x-funcatron-operation"), Some("getHello"));
    assert_eq!(d.message.header("x-request-id"), Some("ü-1"));
    assert_eq!(d.message.headers.len(), 2);
    assert!(d.message.persistent, "delivery mode 2 was lost");
    assert!(!d.redelivered);
    d.ack().await.expect("ack");

    let d = next(&mut sub).await;
    assert_eq!(d.message.payload, transient.payload);
    assert!(d.message.headers.is_empty());
    assert!(!d.message.persistent);
    d.ack().await.expect("ack");

    let depth = broker.depth(&q).await.expect("depth");
    assert_eq!((depth.ready, depth.consumers), (0, 1));
    drop(sub);
    delete_queues(&[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_missing_queue_is_no_route() {
    let broker = connect(&unique("no-route")).await;
    let mut up = broker.connected();
    assert!(*up.borrow_and_update());
    let missing = unique("missing");
    let err = broker
        .publish(&missing, Message::new("lost?"))
        .await
        .expect_err("a publish to a missing queue was confirmed");
    assert!(
        matches!(&err, BrokerError::NoRoute(q) if *q == missing),
        "{err:?}"
    );
    assert!(matches!(
        broker.depth(&missing).await,
        Err(BrokerError::NoRoute(_))
    ));

    // The returned message did not break the shared publisher channel.
    let q = unique("after-no-route");
    broker.declare(&q, QueueKind::Work).await.expect("declare");
    broker
        .publish(&q, Message::new("fine"))
        .await
        .expect("publish after NoRoute");
    assert_eq!(broker.depth(&q).await.expect("depth").ready, 1);
    // Neither the returned message nor the broker closing the channel of
    // the missing queue's `depth` cost the connection (lapin reports that
    // channel error as a connection event; it used to tear the connection
    // down).
    assert!(
        !up.has_changed().expect("broker gone"),
        "the connection went down"
    );
    delete_queues(&[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_of_an_undecodable_message_lands_on_the_dead_letter_queue() {
    let amqp = connect(&unique("dead-letter")).await;
    let broker = AnyBroker::Amqp(amqp);
    let source = unique("dead-source");
    broker
        .declare(DEAD_LETTERS, QueueKind::Work)
        .await
        .expect("declare dead letters");
    broker
        .declare(&source, QueueKind::Work)
        .await
        .expect("declare source");
    let mut sub = broker
        .consume(&source, QueueKind::Work, manual(1))
        .await
        .expect("consume source");

    // Not an envelope at all; unique so it can be told apart from other
    // dead letters that may be waiting in the shared queue.
    let payload = format!("\u{fffd}{{ not json {}", unique("garbage"));
    let garbage = Message {
        headers: vec![("x-request-id".into(), "r-dead".into())],
        ..Message::new(payload.clone())
    };
    broker.publish(&source, garbage).await.expect("publish");
    let reason = "undecodable envelope: expected value at line 1 column 1";
    let d = next(&mut sub).await;
    broker.dead_letter(&source, d, reason).await;

    // It was acknowledged on the source (prefetch 1: the marker could not be
    // delivered otherwise) and not requeued (the marker comes, not it).
    broker
        .publish(&source, Message::new("marker"))
        .await
        .expect("publish marker");
    let marker = next(&mut sub).await;
    assert_eq!(marker.message.payload, "marker");
    marker.ack().await.expect("ack marker");

    // Find it among the dead letters; put anyone else's back.
    let mut dead = broker
        .consume(DEAD_LETTERS, QueueKind::Work, manual(1000))
        .await
        .expect("consume dead letters");
    let mut others = Vec::new();
    let found = loop {
        let d = next(&mut dead).await;
        if d.message.payload == payload.as_bytes() {
            break d;
        }
        others.push(d);
    };
    for d in others {
        d.nack(true).await.expect("requeue another dead letter");
    }
    assert_eq!(found.message.header(DEAD_REASON), Some(reason));
    assert_eq!(found.message.header(DEAD_SOURCE), Some(source.as_str()));
    assert_eq!(found.message.header("x-request-id"), Some("r-dead"));
    assert!(found.message.persistent, "dead letters are persistent");
    found.ack().await.expect("ack dead letter");
    drop(dead);
    drop(sub);
    delete_queues(&[&source]).await;
}

/// `rabbitmqctl` with its output, failing the test if it fails.
async fn rabbitmqctl(args: &[&str]) -> String {
    let out = within(
        "rabbitmqctl",
        tokio::process::Command::new("rabbitmqctl")
            .args(args)
            .output(),
    )
    .await
    .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pids of the connections RabbitMQ lists with this connection name.
async fn connection_pids(name: &str) -> Vec<String> {
    rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"])
        .await
        .lines()
        .filter(|l| l.contains(&format!("\"{name}\"")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_rabbitmq_closes_the_connection() {
    let name = unique("reconnect");
    let broker = connect(&name).await;
    let q = unique("reconnect");
    broker.declare(&q, QueueKind::Work).await.expect("declare");
    let mut sub = broker
        .consume(&q, QueueKind::Work, manual(10))
        .await
        .expect("consume");
    broker
        .publish(&q, Message::new("before"))
        .await
        .expect("publish");
    let held = next(&mut sub).await;
    assert_eq!(held.message.payload, "before");
    assert!(!held.redelivered);

    // Record every value `connected()` takes from now on.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut up = broker.connected();
    assert!(*up.borrow_and_update());
    let watcher = tokio::spawn(async move {
        while up.changed().await.is_ok() {
            if seen_tx.send(*up.borrow_and_update()).is_err() {
                return;
            }
        }
    });

    let pids = connection_pids(&name).await;
    assert_eq!(
        pids.len(),
        1,
        "expected one connection named {name}: {pids:?}"
    );
    rabbitmqctl(&[
        "close_connection",
        &pids[0],
        "funcatron broker reconnect test",
    ])
    .await;

    assert_eq!(
        within("connected() to go false", seen.recv()).await,
        Some(false),
        "the adapter did not notice the closed connection"
    );
    assert_eq!(
        within("connected() to go true again", seen.recv()).await,
        Some(true),
        "the adapter did not reconnect"
    );
    assert!(*broker.connected().borrow());
    let new_pids = connection_pids(&name).await;
    assert_eq!(new_pids.len(), 1, "{new_pids:?}");
    assert_ne!(new_pids, pids, "still the old connection");

    // The delivery held on the dead channel cannot be settled any more;
    // RabbitMQ requeued it when the connection closed.
    // (lapin reports success for it; the ack just goes nowhere.)
    let _ = held.ack().await;
    broker
        .publish(&q, Message::new("after"))
        .await
        .expect("publish after reconnecting");
    // The same subscription resubscribed on the new connection.
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut sub).await;
        got.push((
            String::from_utf8_lossy(&d.message.payload).into_owned(),
            d.redelivered,
        ));
        d.ack().await.expect("ack on the new connection");
    }
    got.sort();
    assert_eq!(
        got,
        [("after".to_owned(), false), ("before".to_owned(), true)]
    );
    watcher.abort();
    drop(sub);
    delete_queues(&[&q]).await;
}

/// A TCP proxy to RabbitMQ for one connection, which forwards nothing until
/// `start`, then holds back the client's first `queue.declare` frame: it
/// reports `paused` and forwards that frame and the rest once `release`d.
struct DeclareGate {
    port: u16,
    start: oneshot::Sender<()>,
    paused: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

/// Scan the complete frames in `buf` from `pos` on: `Ok` with the offset
/// of the first `queue.declare` method frame (class 50, method 10), or
/// `Err` with where the complete frames end.
fn find_queue_declare(buf: &[u8], mut pos: usize) -> Result<usize, usize> {
    // A frame: type (1), channel (2), size (4), payload (size), 0xCE.
    while let Some(header) = buf.get(pos..pos + 7) {
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let end = pos + 7 + size + 1;
        if buf.len() < end {
            break;
        }
        if header[0] == 1 && buf.get(pos + 7..pos + 11) == Some(&[0, 50, 0, 10]) {
            return Ok(pos);
        }
        pos = end;
    }
    Err(pos)
}

/// `amqp://{userinfo}@{host:port}/{vhost...}` split into its three parts.
fn split_uri(uri: &str) -> (&str, String, &str) {
    let rest = uri.strip_prefix("amqp://").expect("an amqp:// URI");
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, "%2f"));
    let (userinfo, host) = authority
        .rsplit_once('@')
        .unwrap_or(("guest:guest", authority));
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    (userinfo, host, vhost)
}

async fn declare_gate(upstream_addr: String) -> DeclareGate {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let (start, started) = oneshot::channel::<()>();
    let (paused_tx, paused) = oneshot::channel();
    let (release, released) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("accept");
        started.await.expect("start");
        let upstream = TcpStream::connect(upstream_addr).await.expect("upstream");
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut up_rx, mut up_tx) = upstream.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut up_rx, &mut client_tx).await;
        });
        // Client to server: forward whole frames until the first
        // queue.declare, which is held back.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut header_sent = false;
        loop {
            let n = client_rx.read(&mut chunk).await.expect("read client");
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            // First the 8-byte protocol header "AMQP\0\0\x09\x01".
            if !header_sent {
                if buf.len() < 8 {
                    continue;
                }
                up_tx.write_all(&buf[..8]).await.expect("forward");
                buf.drain(..8);
                header_sent = true;
            }
            match find_queue_declare(&buf, 0) {
                Ok(at) => {
                    up_tx.write_all(&buf[..at]).await.expect("forward");
                    buf.drain(..at);
                    break;
                }
                Err(complete) => {
                    up_tx.write_all(&buf[..complete]).await.expect("forward");
                    buf.drain(..complete);
                }
            }
        }
        let _ = paused_tx.send(());
        let _ = released.await;
        up_tx.write_all(&buf).await.expect("forward");
        let _ = tokio::io::copy(&mut client_rx, &mut up_tx).await;
    });
    DeclareGate {
        port,
        start,
        paused,
        release,
    }
}

/// The race fixed in dc03be7. The supervisor snapshots the declared queues,
/// redeclares them on the new connection and only then publishes it; a
/// `declare` in between records its queue but finds no live connection.
/// Before the fix that queue was never declared on RabbitMQ, so publishing
/// to it gave `NoRoute` for the life of the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_while_the_connection_is_being_set_up_gets_declared() {
    let uri = amqp_uri();
    let (userinfo, upstream, vhost) = split_uri(&uri);
    let gate = declare_gate(upstream).await;
    let broker = AmqpBroker::connect(&format!(
        "amqp://{userinfo}@127.0.0.1:{}/{vhost}",
        gate.port
    ));
    let early = unique("race-early");
    let late = unique("race-late");

    // Recorded before any connection exists, so in the supervisor's snapshot.
    let r = broker.declare(&early, QueueKind::Work).await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    gate.start.send(()).expect("start the proxy");

    // The supervisor is connected and redeclaring its snapshot (`early`):
    // it has not published the connection yet.
    within("the supervisor's first queue.declare", gate.paused)
        .await
        .expect("proxy gone");
    assert!(!*broker.connected().borrow());
    let r = broker.declare(&late, QueueKind::Work).await;
    assert!(
        matches!(r, Err(BrokerError::Unavailable(_))),
        "the declare was not inside the window: {r:?}"
    );
    gate.release.send(()).expect("release the proxy");
    assert!(broker.wait_connected(DEADLINE).await, "never connected");

    // The queue from the snapshot is there at once.
    broker
        .depth(&early)
        .await
        .expect("the snapshot queue exists");
    // The late one is declared by the supervisor just after the connection
    // goes live: wait for it, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        match broker.depth(&late).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("{late}, declared while the connection was being set up, never reached RabbitMQ: {e}")
            }
            Err(_) => {}
        }
    }
    broker
        .publish(&late, Message::new("routed"))
        .await
        .expect("publish to the late queue");
    let mut sub = broker
        .consume(&late, QueueKind::Work, manual(1))
        .await
        .expect("consume");
    let d = next(&mut sub).await;
    assert_eq!(d.message.payload, "routed");
    d.ack().await.expect("ack");
    drop(sub);
    delete_queues(&[&early, &late]).await;
}

/// The TLS listener `scripts/test.sh` configures (its CA in
/// `FUNCATRON_TEST_TLS_DIR`, default `/var/tmp/funcatron-test-tls`).
fn amqps_uri() -> (String, String) {
    let dir = std::env::var("FUNCATRON_TEST_TLS_DIR")
        .unwrap_or_else(|_| "/var/tmp/funcatron-test-tls".to_owned());
    let ca = format!("{dir}/ca.pem");
    let uri = std::env::var("FUNCATRON_TEST_AMQPS")
        .unwrap_or_else(|_| "amqps://guest:guest@localhost:5671/%2f".to_owned());
    (uri, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_connects_with_the_cacertfile_and_not_without() {
    let (uri, ca) = amqps_uri();
    assert!(
        std::path::Path::new(&ca).is_file(),
        "{ca}: no test CA (scripts/test.sh makes it and RabbitMQ's TLS listener)"
    );
    // Without the CA the server's certificate is not trusted.
    let untrusted = lapin::DefaultConnectionBuilder::new()
        .expect("runtime")
        .with_uri_str(uri.clone())
        .connect()
        .await;
    assert!(untrusted.is_err(), "connected without trusting the CA");

    let name = unique("amqps");
    let broker = AmqpBroker::connect(&format!("{uri}?cacertfile={ca}&connection_name={name}"));
    assert!(
        broker.wait_connected(DEADLINE).await,
        "cannot connect to RabbitMQ over TLS at {uri}"
    );
    let q = unique("amqps");
    broker.declare(&q, QueueKind::Work).await.expect("declare");
    let mut sub = broker
        .consume(&q, QueueKind::Work, manual(1))
        .await
        .expect("consume");
    broker
        .publish(&q, Message::new("over tls"))
        .await
        .expect("publish");
    let d = next(&mut sub).await;
    assert_eq!(&d.message.payload[..], b"over tls");
    d.ack().await.expect("ack");
    // RabbitMQ reports the connection as TLS.
    let listed = rabbitmqctl(&["-q", "list_connections", "client_properties", "ssl"]).await;
    let line = listed
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed: {listed}"));
    assert!(line.trim_end().ends_with("true"), "{line}");
    drop(sub);
    delete_queues(&[&q]).await;
}

/// Delayed publishes wait in RabbitMQ (a durable delay queue per delay,
/// whose TTL dead-letters into the target), keep their headers, and a
/// short delay is not held up behind a longer one published first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_publishes_arrive_after_their_delay_shortest_first() {
    let broker = connect(&unique("delayed")).await;
    let target = unique("delayed-target");
    broker.declare(&target, QueueKind::Work).await.unwrap();
    let mut sub = broker
        .consume(&target, QueueKind::Work, manual(10))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let long = Message {
        payload: "long".into(),
        headers: vec![("x-attempt".into(), "2".into())],
        persistent: true,
        ..Message::default()
    };
    broker.publish_delayed(&target, long, 1500).await.unwrap();
    broker
        .publish_delayed(&target, Message::new("short"), 300)
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!(&first.message.payload[..], b"short");
    assert!(started.elapsed() >= Duration::from_millis(300));
    first.ack().await.unwrap();
    let second = next(&mut sub).await;
    assert_eq!(&second.message.payload[..], b"long");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(second.message.header("x-attempt"), Some("2"));
    second.ack().await.unwrap();
    drop(sub);
    delete_queues(&[
        &target,
        &funcatron_control::names::delay_queue(&target, 300),
        &funcatron_control::names::delay_queue(&target, 1500),
    ])
    .await;
}

/// `amqp_uri()` with `query` added to its query string.
fn with_query(uri: &str, query: &str) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{query}")
}

/// A broker URL listing a node that is down first and the real node
/// second: the adapter moves on to the second at once and works there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_url_moves_on_from_a_node_that_is_down() {
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let uri = amqp_uri();
    let at = uri.rfind('@').expect("a URI with credentials") + 1;
    let cluster = format!("{}{dead},{}", &uri[..at], &uri[at..]);
    let name = unique("cluster");
    let broker = AmqpBroker::connect(&with_query(&cluster, &format!("connection_name={name}")));
    assert!(
        broker.wait_connected(DEADLINE).await,
        "never connected through {cluster}"
    );
    assert_eq!(connection_pids(&name).await.len(), 1);
    let q = unique("cluster");
    broker.declare(&q, QueueKind::Work).await.expect("declare");
    let mut sub = broker
        .consume(&q, QueueKind::Work, manual(1))
        .await
        .expect("consume");
    broker
        .publish(&q, Message::new("hi"))
        .await
        .expect("publish");
    let d = next(&mut sub).await;
    assert_eq!(&d.message.payload[..], b"hi");
    d.ack().await.expect("ack");
    drop(sub);
    delete_queues(&[&q]).await;
}

/// `queue_type=quorum`: work queues (and delay queues) are quorum queues,
/// private reply queues stay classic, and publish, consume and a delayed
/// publish work on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_work_queues_carry_messages_and_delays() {
    let name = unique("quorum");
    let broker = AmqpBroker::connect(&with_query(
        &amqp_uri(),
        &format!("queue_type=quorum&connection_name={name}"),
    ));
    assert!(broker.wait_connected(DEADLINE).await);
    let (work, reply) = (unique("quorum-work"), unique("quorum-reply"));
    broker
        .declare(&work, QueueKind::Work)
        .await
        .expect("declare");
    let _replies = broker
        .consume(
            &reply,
            QueueKind::Exclusive,
            ConsumeOptions {
                prefetch: 10,
                auto_ack: true,
            },
        )
        .await
        .expect("consume replies");
    let types = |listing: String, q: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(q))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
    };
    let listing = rabbitmqctl(&["-q", "list_queues", "name", "type"]).await;
    assert_eq!(
        types(listing.clone(), &work).as_deref(),
        Some("quorum"),
        "{listing}"
    );
    assert_eq!(
        types(listing.clone(), &reply).as_deref(),
        Some("classic"),
        "{listing}"
    );

    let mut sub = broker
        .consume(&work, QueueKind::Work, manual(2))
        .await
        .expect("consume");
    broker
        .publish(&work, Message::new("now"))
        .await
        .expect("publish");
    let d = next(&mut sub).await;
    assert_eq!(&d.message.payload[..], b"now");
    d.ack().await.expect("ack");
    broker
        .publish_delayed(&work, Message::new("later"), 50)
        .await
        .expect("publish delayed");
    let d = next(&mut sub).await;
    assert_eq!(&d.message.payload[..], b"later");
    d.ack().await.expect("ack");
    let listing = rabbitmqctl(&["-q", "list_queues", "name", "type"]).await;
    let delay = funcatron_control::names::delay_queue(&work, 50);
    assert_eq!(
        types(listing.clone(), &delay).as_deref(),
        Some("quorum"),
        "{listing}"
    );
    drop(sub);
    delete_queues(&[&work, &delay]).await;
}
