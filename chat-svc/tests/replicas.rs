//! Two chat-svc replicas over real NATS and one MongoDB-wire database:
//! concurrent senders get a gap-free, duplicate-free seq, and a send retried
//! on both replicas at once stores one message.
//!
//! Needs NATS (`NATS_URL`, default 127.0.0.1:4222) and `TEST_MONGODB_URL`;
//! `scripts/test.sh` provides both.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use quckchat_chat::commands;
use quckchat_chat::service::ChatService;
use quckchat_chat::store::{ChatStore, MongoStore};
use quckchat_runtime::bus::{Bus, BusError, BusMessage, Headers, NatsBus, Subjects, Subscription};
use quckchat_runtime::testkit;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A replica's bus connection, counting the commands it answered: a reply
/// goes to the requester's inbox, every other publish is on a subject under
/// the cluster's prefix.
struct CountingBus {
    inner: Arc<dyn Bus>,
    prefix: String,
    replies: Arc<AtomicUsize>,
}

#[async_trait]
impl Bus for CountingBus {
    async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        if !subject.starts_with(&self.prefix) {
            self.replies.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.publish(subject, reply, headers, payload).await
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        self.inner.subscribe(subject, queue_group).await
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<BusMessage, BusError> {
        self.inner.request(subject, headers, payload, timeout).await
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

struct Cluster {
    nats: String,
    mongo_url: String,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    store: Arc<dyn ChatStore>,
    stop: CancellationToken,
    /// Commands answered, per replica.
    served: std::sync::Mutex<Vec<Arc<AtomicUsize>>>,
}

/// Starts `n` replicas, each with its own NATS connection and MongoDB client.
async fn cluster(n: usize) -> Cluster {
    let nats = testkit::nats_url();
    let prefix = testkit::unique("replicas");
    let url = testkit::mongodb_url();
    let subjects = Subjects::new(prefix);
    let store: Arc<dyn ChatStore> = Arc::new(MongoStore::connect(&url).await.expect("MongoDB"));
    let bus: Arc<dyn Bus> = Arc::new(NatsBus::connect(&nats, "client").await.unwrap());
    let c = Cluster {
        nats,
        mongo_url: url,
        bus,
        subjects,
        store,
        stop: CancellationToken::new(),
        served: std::sync::Mutex::new(Vec::new()),
    };
    for _ in 0..n {
        c.add_replica().await;
    }
    c
}

impl Cluster {
    /// Starts one more replica; it takes commands once this returns.
    async fn add_replica(&self) {
        let i = self.served().len();
        let replies = Arc::new(AtomicUsize::new(0));
        let nats: Arc<dyn Bus> = Arc::new(
            NatsBus::connect(&self.nats, &format!("replica-{i}"))
                .await
                .expect("NATS"),
        );
        let bus: Arc<dyn Bus> = Arc::new(CountingBus {
            inner: nats,
            prefix: format!("{}.", self.subjects.prefix()),
            replies: replies.clone(),
        });
        let store: Arc<dyn ChatStore> =
            Arc::new(MongoStore::connect(&self.mongo_url).await.expect("MongoDB"));
        let service = Arc::new(ChatService::new(store, bus.clone(), self.subjects.clone()));
        commands::serve(
            service,
            bus,
            &self.subjects,
            self.stop.clone(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        self.served.lock().unwrap().push(replies);
    }

    /// Commands each replica has answered so far.
    fn served(&self) -> Vec<usize> {
        self.served
            .lock()
            .unwrap()
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect()
    }

    /// Stops the replicas and drops the test database.
    async fn finish(&self) {
        self.stop.cancel();
        let client = mongodb::Client::with_uri_str(&self.mongo_url)
            .await
            .unwrap();
        client.default_database().unwrap().drop().await.unwrap();
    }

    async fn push(&self, user: &str, event: &str, payload: Value) -> (bool, Value) {
        let cmd = testkit::command("chat:c1", event, user, &payload);
        let msg = self
            .bus
            .request(
                &self.subjects.command("chat"),
                Vec::new(),
                cmd.encode_to_vec().into(),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let reply = testkit::decode_bytes(&msg.payload);
        (reply.ok, reply.response)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_two_replicas_get_seq_one_to_n() {
    let c = cluster(2).await;
    let senders = ["a", "b", "c", "d"];
    c.store
        .upsert_conversation("c1", &senders.map(str::to_owned))
        .await
        .unwrap();
    const EACH: usize = 10;
    let c = Arc::new(c);
    let tasks: Vec<_> = senders
        .iter()
        .map(|s| {
            let c = c.clone();
            let s = (*s).to_owned();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..EACH {
                    let (ok, r) = c
                        .push(
                            &s,
                            "message:send",
                            json!({"type": "text", "content": format!("{s}{i}")}),
                        )
                        .await;
                    assert!(ok, "{r}");
                    seqs.push(r["message"]["seq"].as_u64().unwrap());
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a sender's messages keep their order: {seqs:?}"
        );
        all.extend(seqs);
    }
    let n = (senders.len() * EACH) as u64;
    let distinct: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len() as u64, n);
    assert_eq!(
        distinct,
        (1..=n).collect(),
        "seq 1..N, no gap, no duplicate"
    );
    assert_eq!(
        c.store.conversation("c1").await.unwrap().unwrap().last_seq,
        n
    );
    // Each replica took a share: the seq held across two writers, not one.
    // (NATS picks a queue member at random; all 40 on one is 2^-39.)
    let served = c.served();
    assert_eq!(
        served.iter().sum::<usize>(),
        senders.len() * EACH,
        "{served:?}"
    );
    assert!(
        served.iter().all(|&s| s > 0),
        "both replicas served: {served:?}"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_served_by_the_other_replica_returns_the_original() {
    let c = cluster(1).await;
    c.store
        .upsert_conversation("c1", &["a".into()])
        .await
        .unwrap();
    let payload = json!({"type": "text", "content": "once", "clientMessageId": "cm-1"});
    let (ok, first) = c.push("a", "message:send", payload.clone()).await;
    assert!(ok, "{first}");
    assert_eq!(c.served(), vec![1], "the only replica stored it");
    // A second replica joins; retry until it has answered one (each retry
    // goes to either replica at random).
    c.add_replica().await;
    let mut retries = 0;
    while c.served()[1] == 0 {
        retries += 1;
        assert!(retries <= 200, "replica 1 never served: {:?}", c.served());
        let (ok, r) = c.push("a", "message:send", payload.clone()).await;
        assert!(ok, "{r}");
        assert_eq!(r["message"], first["message"], "the original, not a copy");
    }
    let (_, next) = c
        .push(
            "a",
            "message:send",
            json!({"type": "text", "content": "next"}),
        )
        .await;
    assert_eq!(
        next["message"]["seq"], 2,
        "one message stored for every retry"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_on_two_replicas_store_one_message() {
    let c = Arc::new(cluster(2).await);
    c.store
        .upsert_conversation("c1", &["a".into()])
        .await
        .unwrap();
    let payload = json!({"type": "text", "content": "once", "clientMessageId": "cm-1"});
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (c, p) = (c.clone(), payload.clone());
            tokio::spawn(async move { c.push("a", "message:send", p).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        let (ok, r) = t.await.unwrap();
        assert!(ok, "{r}");
        assert_eq!(r["message"]["seq"], 1);
        ids.insert(r["message"]["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "one message for every retry");
    let (_, next) = c
        .push(
            "a",
            "message:send",
            json!({"type": "text", "content": "next"}),
        )
        .await;
    assert_eq!(next["message"]["seq"], 2, "no seq lost to the retries");
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_removing_a_member_in_mongodb_closes_their_channel() {
    let c = cluster(1).await;
    c.store
        .upsert_conversation("c1", &["a".into(), "b".into()])
        .await
        .unwrap();
    let (ok, r) = c
        .push(
            "b",
            "message:send",
            json!({"type": "text", "content": "hi"}),
        )
        .await;
    assert!(ok, "{r}");
    let mut b_events = c.bus.subscribe(&c.subjects.user("b"), None).await.unwrap();
    // The NestJS backend edits the shared collection directly.
    let client = mongodb::Client::with_uri_str(&c.mongo_url).await.unwrap();
    client
        .default_database()
        .unwrap()
        .collection::<mongodb::bson::Document>("conversations")
        .update_one(
            mongodb::bson::doc! {"_id": "c1"},
            mongodb::bson::doc! {"$set": {"participants": ["a"]}},
        )
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), b_events.next())
        .await
        .expect("phx_close for b within 5 s")
        .unwrap();
    let ev = quckchat_proto::bus::DirectEvent::decode(msg.payload.as_ref()).unwrap();
    assert_eq!(ev.topic, "chat:c1");
    let (ok, r) = c
        .push(
            "b",
            "message:send",
            json!({"type": "text", "content": "again"}),
        )
        .await;
    assert!(!ok);
    assert_eq!(
        r["reason"], "unauthorized",
        "refused at once, not after the cache TTL"
    );
    c.finish().await;
}
