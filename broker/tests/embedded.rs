//! The embedded broker's delivery guarantees, through the public [`Broker`]
//! seam only:
//!
//! - a bounded queue applies backpressure: once it holds `capacity`
//!   messages a publish waits (the embedded adapter waits for room rather
//!   than failing with `BrokerError::Full`) and completes as soon as a
//!   consumer takes a message; a publish still waiting when its queue is
//!   deleted fails with `NoRoute`;
//! - a delivery dropped without ack or nack is requeued and delivered again
//!   with `redelivered` set, also when the queue is full at that moment;
//! - `nack(true)` redelivers, `nack(false)` discards;
//! - `AnyBroker::dead_letter` moves a message to `funcatron.dead` with the
//!   reason and source headers and acknowledges it, or requeues it when the
//!   dead-letter queue cannot take it.
//!
//! Nothing here sleeps: a waiting publish is shown pending by polling its
//! future, and every wait for progress has a deadline.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use funcatron_broker::{
    AnyBroker, Broker, BrokerError, ConsumeOptions, Delivery, EmbeddedBroker, Message, QueueDepth,
    QueueKind, Subscription,
};
use funcatron_control::headers::{DEAD_REASON, DEAD_SOURCE};
use funcatron_control::names::DEAD_LETTERS;

const MANUAL: ConsumeOptions = ConsumeOptions {
    prefetch: 10,
    auto_ack: false,
};

/// Fail the test instead of hanging when something that should happen
/// promptly does not.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn next(sub: &mut Subscription) -> Delivery {
    within("the next delivery", sub.next())
        .await
        .expect("subscription closed")
}

async fn depth(broker: &impl Broker, queue: &str) -> QueueDepth {
    broker.depth(queue).await.expect("depth")
}

fn depth_of(ready: u64, unacked: u64, consumers: u64) -> QueueDepth {
    QueueDepth {
        ready,
        unacked: Some(unacked),
        consumers,
    }
}

#[tokio::test]
async fn publish_to_an_undeclared_queue_is_no_route() {
    let broker = EmbeddedBroker::new(4);
    let err = broker
        .publish("nowhere", Message::new("x"))
        .await
        .expect_err("published to a queue that does not exist");
    assert!(
        matches!(&err, BrokerError::NoRoute(q) if q == "nowhere"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_full_queue_makes_publishers_wait_until_a_consumer_takes_a_message() {
    let broker = EmbeddedBroker::new(2);
    let q = "bounded";
    broker.declare(q, QueueKind::Work).await.expect("declare");
    broker.publish(q, Message::new("m1")).await.expect("m1");
    broker.publish(q, Message::new("m2")).await.expect("m2");
    assert_eq!(depth(&broker, q).await, depth_of(2, 0, 0));

    // The third publish cannot complete while the queue is full, however
    // often it is polled.
    let mut third = pin!(broker.publish(q, Message::new("m3")));
    for _ in 0..10 {
        assert!(
            futures::poll!(third.as_mut()).is_pending(),
            "a publish into a full queue completed"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        depth(&broker, q).await.ready,
        2,
        "the waiting message got in"
    );

    // A consumer takes one message: there is room, the publish completes.
    let mut sub = broker
        .consume(q, QueueKind::Work, MANUAL)
        .await
        .expect("consume");
    let d1 = next(&mut sub).await;
    assert_eq!(d1.message.payload, "m1");
    within("the waiting publish", third)
        .await
        .expect("the waiting publish failed");
    assert_eq!(depth(&broker, q).await, depth_of(2, 1, 1));
    d1.ack().await.expect("ack");

    // Nothing was lost or reordered by the wait.
    for want in ["m2", "m3"] {
        let d = next(&mut sub).await;
        assert_eq!(d.message.payload, want);
        assert!(!d.redelivered);
        d.ack().await.expect("ack");
    }
    assert_eq!(depth(&broker, q).await, depth_of(0, 0, 1));
}

#[tokio::test]
async fn a_publish_waiting_on_a_full_queue_fails_when_the_queue_is_deleted() {
    let broker = EmbeddedBroker::new(1);
    broker
        .declare("doomed", QueueKind::Work)
        .await
        .expect("declare");
    broker
        .publish("doomed", Message::new("m1"))
        .await
        .expect("m1");
    let mut waiting = pin!(broker.publish("doomed", Message::new("m2")));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    broker.delete("doomed");
    let err = within("the waiting publish", waiting)
        .await
        .expect_err("a publish into a deleted queue succeeded");
    assert!(matches!(err, BrokerError::NoRoute(_)), "{err:?}");
}

#[tokio::test]
async fn a_delivery_dropped_unsettled_is_requeued_and_redelivered() {
    let broker = EmbeddedBroker::new(8);
    let q = "drops";
    let mut sub = broker
        .consume(q, QueueKind::Work, MANUAL)
        .await
        .expect("consume");
    let sent = Message {
        headers: vec![("x-request-id".into(), "r-1".into())],
        persistent: true,
        ..Message::new("payload")
    };
    broker.publish(q, sent.clone()).await.expect("publish");

    let first = next(&mut sub).await;
    assert!(!first.redelivered, "a first delivery is marked redelivered");
    assert_eq!(first.message, sent);
    assert_eq!(depth(&broker, q).await, depth_of(0, 1, 1));

    // A handler that forgets (or panics with) its delivery.
    drop(first);
    assert_eq!(depth(&broker, q).await, depth_of(1, 0, 1));

    let again = next(&mut sub).await;
    assert!(
        again.redelivered,
        "a requeued delivery is not marked redelivered"
    );
    assert_eq!(again.message, sent, "the requeued message changed");
    again.ack().await.expect("ack");
    assert_eq!(depth(&broker, q).await, depth_of(0, 0, 1));
}

#[tokio::test]
async fn a_delivery_dropped_while_its_queue_is_full_comes_back_once_there_is_room() {
    let broker = EmbeddedBroker::new(1);
    let q = "full-drop";
    let mut sub = broker
        .consume(q, QueueKind::Work, MANUAL)
        .await
        .expect("consume");
    broker.publish(q, Message::new("m1")).await.expect("m1");
    let d1 = next(&mut sub).await;
    broker.publish(q, Message::new("m2")).await.expect("m2");
    // The queue is full (m2): dropping m1 cannot put it back right away.
    drop(d1);
    let d2 = next(&mut sub).await;
    assert_eq!(d2.message.payload, "m2");
    d2.ack().await.expect("ack");
    let again = next(&mut sub).await;
    assert_eq!(again.message.payload, "m1", "the dropped message was lost");
    assert!(again.redelivered);
    again.ack().await.expect("ack");
    assert_eq!(depth(&broker, q).await, depth_of(0, 0, 1));
}

#[tokio::test]
async fn nack_with_requeue_redelivers_and_without_discards() {
    let broker = EmbeddedBroker::new(8);
    let q = "nacks";
    let mut sub = broker
        .consume(q, QueueKind::Work, MANUAL)
        .await
        .expect("consume");
    for m in ["a", "b", "c"] {
        broker.publish(q, Message::new(m)).await.expect("publish");
    }

    let a = next(&mut sub).await;
    assert_eq!(a.message.payload, "a");
    a.nack(true).await.expect("nack");
    assert_eq!(depth(&broker, q).await, depth_of(3, 0, 1));

    let b = next(&mut sub).await;
    assert_eq!(b.message.payload, "b");
    b.nack(false).await.expect("nack");
    assert_eq!(depth(&broker, q).await, depth_of(2, 0, 1));

    // c, then the requeued a; b is gone.
    let c = next(&mut sub).await;
    assert_eq!(
        (c.message.payload.as_ref(), c.redelivered),
        (&b"c"[..], false)
    );
    c.ack().await.expect("ack");
    let a = next(&mut sub).await;
    assert_eq!(
        (a.message.payload.as_ref(), a.redelivered),
        (&b"a"[..], true)
    );
    a.ack().await.expect("ack");
    assert_eq!(depth(&broker, q).await, depth_of(0, 0, 1));
}

#[tokio::test]
async fn dead_letter_moves_the_message_with_reason_and_source_headers() {
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(8));
    let source = "funcatron.func.hello.1";
    broker
        .declare(DEAD_LETTERS, QueueKind::Work)
        .await
        .expect("declare");
    let mut sub = broker
        .consume(source, QueueKind::Work, MANUAL)
        .await
        .expect("consume");
    let garbage = Message {
        headers: vec![("x-request-id".into(), "r-9".into())],
        ttl_ms: Some(30_000),
        ..Message::new(&b"\xff\xfe not an envelope"[..])
    };
    broker
        .publish(source, garbage.clone())
        .await
        .expect("publish");

    let d = next(&mut sub).await;
    broker
        .dead_letter(source, d, "undecodable envelope: expected value")
        .await;
    // Acknowledged on the source queue, not requeued.
    assert_eq!(depth(&broker, source).await, depth_of(0, 0, 1));

    let mut dead = broker
        .consume(DEAD_LETTERS, QueueKind::Work, MANUAL)
        .await
        .expect("consume dead letters");
    let got = next(&mut dead).await;
    assert_eq!(got.message.payload, garbage.payload);
    assert_eq!(
        got.message.header(DEAD_REASON),
        Some("undecodable envelope: expected value")
    );
    assert_eq!(got.message.header(DEAD_SOURCE), Some(source));
    assert_eq!(
        got.message.header("x-request-id"),
        Some("r-9"),
        "original header lost"
    );
    assert_eq!(got.message.ttl_ms, None, "a dead letter must not expire");
    assert!(got.message.persistent);
    got.ack().await.expect("ack");
}

#[tokio::test]
async fn dead_letter_requeues_when_the_dead_letter_queue_is_missing() {
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(8));
    let source = "requests";
    let mut sub = broker
        .consume(source, QueueKind::Work, MANUAL)
        .await
        .expect("consume");
    broker
        .publish(source, Message::new("keep me"))
        .await
        .expect("publish");
    let d = next(&mut sub).await;
    // No funcatron.dead queue was declared: the publish there fails.
    broker.dead_letter(source, d, "undecodable").await;
    let again = next(&mut sub).await;
    assert_eq!(again.message.payload, "keep me", "the message was dropped");
    assert!(again.redelivered);
    assert_eq!(again.message.header(DEAD_REASON), None);
    again.ack().await.expect("ack");
}

/// A delayed publish reaches its queue once its delay has passed (virtual
/// time: the test does not wait), shortest delay first; a queue that does
/// not exist is refused at once.
#[tokio::test(start_paused = true)]
async fn delayed_publishes_arrive_after_their_delay() {
    let broker = EmbeddedBroker::new(10);
    broker.declare("t", QueueKind::Work).await.unwrap();
    let mut sub = broker.consume("t", QueueKind::Work, MANUAL).await.unwrap();
    let started = tokio::time::Instant::now();
    broker
        .publish_delayed("t", Message::new("long"), 5_000)
        .await
        .unwrap();
    broker
        .publish_delayed("t", Message::new("short"), 1_000)
        .await
        .unwrap();
    assert_eq!(
        depth(&broker, "t").await.ready,
        0,
        "nothing arrives at once"
    );
    let first = sub.next().await.unwrap();
    assert_eq!(&first.message.payload[..], b"short");
    assert!(started.elapsed() >= Duration::from_millis(1_000));
    assert!(started.elapsed() < Duration::from_millis(5_000));
    let second = sub.next().await.unwrap();
    assert_eq!(&second.message.payload[..], b"long");
    assert!(started.elapsed() >= Duration::from_millis(5_000));
    assert!(matches!(
        broker
            .publish_delayed("missing", Message::new("x"), 10)
            .await,
        Err(BrokerError::NoRoute(_))
    ));
}
