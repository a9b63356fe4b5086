//! The bus conformance suite: one set of behaviours every [`Bus`]
//! implementation must show. Run by this crate's tests against [`MemoryBus`]
//! and a real NATS server; each case uses its own random subject prefix so
//! runs can share one NATS.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Bus, BusError, BusMessage, Handler, Subscription};

const WAIT: Duration = Duration::from_secs(2);
const QUIET: Duration = Duration::from_millis(150);

/// Runs every case, each with a fresh bus from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Bus>>,
{
    publish_subscribe_with_headers(make().await).await;
    wildcards(make().await).await;
    queue_groups_share_messages(make().await).await;
    request_reply(make().await).await;
    request_without_responders_fails_fast(make().await).await;
    request_times_out(make().await).await;
    dropping_a_subscription_unsubscribes(make().await).await;
    many_subscriptions_each_get_their_own_subject_in_order(make().await).await;
    handlers_get_their_subjects_messages_in_order_until_dropped(make().await).await;
    invalid_subjects_are_refused(make().await).await;
}

fn prefix() -> String {
    format!("conf{}", uuid::Uuid::new_v4().simple())
}

async fn recv(sub: &mut Subscription, wait: Duration) -> Option<BusMessage> {
    tokio::time::timeout(wait, sub.next()).await.ok().flatten()
}

async fn publish(bus: &Arc<dyn Bus>, subject: &str, body: &'static str) {
    bus.publish(
        subject,
        None,
        Vec::new(),
        Bytes::from_static(body.as_bytes()),
    )
    .await
    .unwrap();
}

pub async fn publish_subscribe_with_headers(bus: Arc<dyn Bus>) {
    let p = prefix();
    let mut sub = bus.subscribe(&format!("{p}.a"), None).await.unwrap();
    let mut other = bus.subscribe(&format!("{p}.b"), None).await.unwrap();
    bus.publish(
        &format!("{p}.a"),
        None,
        vec![("traceparent".into(), "00-abc-def-01".into())],
        Bytes::from_static(b"hello"),
    )
    .await
    .unwrap();
    let msg = recv(&mut sub, WAIT)
        .await
        .expect("subscriber gets the message");
    assert_eq!(msg.subject, format!("{p}.a"));
    assert_eq!(&msg.payload[..], b"hello");
    assert_eq!(msg.header("traceparent"), Some("00-abc-def-01"));
    assert!(
        recv(&mut other, QUIET).await.is_none(),
        "other subject gets nothing"
    );
}

pub async fn wildcards(bus: Arc<dyn Bus>) {
    let p = prefix();
    let mut one = bus.subscribe(&format!("{p}.topic.*"), None).await.unwrap();
    let mut tail = bus.subscribe(&format!("{p}.>"), None).await.unwrap();
    publish(&bus, &format!("{p}.topic.x"), "1").await;
    publish(&bus, &format!("{p}.topic.x.y"), "2").await;
    assert_eq!(&recv(&mut one, WAIT).await.unwrap().payload[..], b"1");
    assert!(
        recv(&mut one, QUIET).await.is_none(),
        "* matches one token only"
    );
    assert_eq!(&recv(&mut tail, WAIT).await.unwrap().payload[..], b"1");
    assert_eq!(&recv(&mut tail, WAIT).await.unwrap().payload[..], b"2");
}

pub async fn queue_groups_share_messages(bus: Arc<dyn Bus>) {
    let p = prefix();
    let subject = format!("{p}.work");
    let mut g1 = bus.subscribe(&subject, Some("workers")).await.unwrap();
    let mut g2 = bus.subscribe(&subject, Some("workers")).await.unwrap();
    let mut all = bus.subscribe(&subject, None).await.unwrap();
    for _ in 0..40 {
        publish(&bus, &subject, "job").await;
    }
    let mut plain = 0;
    while recv(&mut all, QUIET).await.is_some() {
        plain += 1;
    }
    let (mut n1, mut n2) = (0, 0);
    while recv(&mut g1, QUIET).await.is_some() {
        n1 += 1;
    }
    while recv(&mut g2, QUIET).await.is_some() {
        n2 += 1;
    }
    assert_eq!(plain, 40, "a plain subscriber gets every message");
    assert_eq!(n1 + n2, 40, "each message goes to exactly one group member");
    assert!(n1 > 0 && n2 > 0, "group members share the load ({n1}/{n2})");
}

pub async fn request_reply(bus: Arc<dyn Bus>) {
    let p = prefix();
    let subject = format!("{p}.echo");
    let mut sub = bus.subscribe(&subject, Some("svc")).await.unwrap();
    let responder = bus.clone();
    let task = tokio::spawn(async move {
        let msg = sub.next().await.unwrap();
        let mut body = msg.payload.to_vec();
        body.extend_from_slice(msg.header("x-n").unwrap_or("?").as_bytes());
        super::respond(responder.as_ref(), &msg, Bytes::from(body))
            .await
            .unwrap();
    });
    let reply = bus
        .request(
            &subject,
            vec![("x-n".into(), "7".into())],
            Bytes::from_static(b"ping"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"ping7");
    task.await.unwrap();
}

pub async fn request_without_responders_fails_fast(bus: Arc<dyn Bus>) {
    let p = prefix();
    let started = std::time::Instant::now();
    let err = bus
        .request(
            &format!("{p}.nobody"),
            Vec::new(),
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NoResponders(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting for the timeout"
    );
}

pub async fn request_times_out(bus: Arc<dyn Bus>) {
    let p = prefix();
    let subject = format!("{p}.silent");
    let _sub = bus.subscribe(&subject, None).await.unwrap();
    let started = std::time::Instant::now();
    let err = bus
        .request(
            &subject,
            Vec::new(),
            Bytes::new(),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::TimedOut(_)), "{err:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

pub async fn dropping_a_subscription_unsubscribes(bus: Arc<dyn Bus>) {
    let p = prefix();
    let subject = format!("{p}.gone");
    let sub = bus.subscribe(&subject, None).await.unwrap();
    drop(sub);
    // Unsubscribing reaches a NATS server asynchronously; allow a bound.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let res = bus
            .request(
                &subject,
                Vec::new(),
                Bytes::new(),
                Duration::from_millis(100),
            )
            .await;
        match res {
            Err(BusError::NoResponders(_)) => break,
            other if std::time::Instant::now() > deadline => {
                panic!("still subscribed after drop: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut watcher = bus.subscribe(&subject, None).await.unwrap();
    publish(&bus, &subject, "again").await;
    assert_eq!(
        &recv(&mut watcher, WAIT).await.unwrap().payload[..],
        b"again"
    );
}

/// A node holds one subscription per connected user and per topic: many
/// subjects, made and dropped all the time; each subscription gets its
/// subject's messages only, in the order published, also when one subject
/// has two subscribers and one of them leaves.
pub async fn many_subscriptions_each_get_their_own_subject_in_order(bus: Arc<dyn Bus>) {
    const SUBJECTS: usize = 300;
    const EACH: usize = 5;
    let p = prefix();
    let subject = |i: usize| format!("{p}.user.u{i}");
    let subscribed = futures::future::join_all((0..SUBJECTS).map(|i| {
        let bus = bus.clone();
        let subject = subject(i);
        async move { bus.subscribe(&subject, None).await.unwrap() }
    }))
    .await;
    let mut subs: Vec<Option<Subscription>> = subscribed.into_iter().map(Some).collect();
    let mut second = bus.subscribe(&subject(0), None).await.unwrap();
    // Every third subscription leaves before anything is published; the
    // second subscriber of subject 0 stays.
    for (i, sub) in subs.iter_mut().enumerate() {
        if i % 3 == 0 {
            sub.take();
        }
    }
    for n in 0..EACH {
        for i in 0..SUBJECTS {
            bus.publish(
                &subject(i),
                None,
                Vec::new(),
                Bytes::from(format!("{i}:{n}")),
            )
            .await
            .unwrap();
        }
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let Some(sub) = sub else { continue };
        for n in 0..EACH {
            let msg = recv(sub, WAIT).await.expect("a message of its own subject");
            assert_eq!(msg.subject, subject(i));
            assert_eq!(&msg.payload[..], format!("{i}:{n}").as_bytes());
        }
        assert!(recv(sub, Duration::from_millis(1)).await.is_none());
    }
    for n in 0..EACH {
        let msg = recv(&mut second, WAIT).await.unwrap();
        assert_eq!(&msg.payload[..], format!("0:{n}").as_bytes());
    }
}

/// A handler that forwards what it is given to a channel.
struct Forward(tokio::sync::mpsc::UnboundedSender<Option<BusMessage>>);

impl Handler for Forward {
    fn on_message(&self, msg: BusMessage) {
        let _ = self.0.send(Some(msg));
    }
    fn on_end(&self) {
        let _ = self.0.send(None);
    }
}

/// [`Bus::subscribe_with`]: the handler gets its subject's messages, in
/// order and no other; once the guard is dropped, nothing.
pub async fn handlers_get_their_subjects_messages_in_order_until_dropped(bus: Arc<dyn Bus>) {
    let p = prefix();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let guard = bus
        .subscribe_with(&format!("{p}.user.a"), Arc::new(Forward(tx)))
        .await
        .unwrap();
    for n in 0..50 {
        publish(&bus, &format!("{p}.user.b"), "other").await;
        bus.publish(
            &format!("{p}.user.a"),
            None,
            vec![("n".into(), n.to_string())],
            Bytes::from(n.to_string()),
        )
        .await
        .unwrap();
    }
    for n in 0..50 {
        let msg = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a message in time")
            .flatten()
            .expect("a message, not the end");
        assert_eq!(msg.subject, format!("{p}.user.a"));
        assert_eq!(&msg.payload[..], n.to_string().as_bytes());
        assert_eq!(msg.header("n"), Some(n.to_string().as_str()));
    }
    drop(guard);
    // Unsubscribing reaches a NATS server asynchronously: a watcher
    // subscribed after the drop sees the next message, the handler not.
    let mut watcher = bus.subscribe(&format!("{p}.user.a"), None).await.unwrap();
    publish(&bus, &format!("{p}.user.a"), "after").await;
    assert_eq!(
        &recv(&mut watcher, WAIT).await.unwrap().payload[..],
        b"after"
    );
    match tokio::time::timeout(QUIET, rx.recv()).await {
        Err(_) | Ok(None) | Ok(Some(None)) => {}
        Ok(Some(Some(msg))) => panic!("delivered after the guard was dropped: {msg:?}"),
    }
}

pub async fn invalid_subjects_are_refused(bus: Arc<dyn Bus>) {
    let err = bus.subscribe("a..b", None).await.err().unwrap();
    assert!(matches!(err, BusError::InvalidSubject(_)));
    let err = bus
        .publish("a.*", None, Vec::new(), Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::InvalidSubject(_)));
    let err = bus
        .request("has space", Vec::new(), Bytes::new(), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::InvalidSubject(_)));
}
