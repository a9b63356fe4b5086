//! Two huddle-svc replicas over real NATS, one Redis and one MongoDB-wire
//! store: eight devices joining and toggling at once through both replicas
//! get every version exactly once (1..=N, no gap, no duplicate), a full room
//! admits exactly the allowed number whoever races, and a departure begun on
//! a replica that is then stopped is announced by the other, once.
//!
//! Needs NATS (`NATS_URL`), Redis (`REDIS_URL`) and `TEST_MONGODB_URL`;
//! `scripts/test.sh` provides them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use quckchat_huddle::config::HuddleSettings;
use quckchat_huddle::service::HuddleService;
use quckchat_huddle::state::{RedisRoomState, RoomState};
use quckchat_huddle::store::{HuddleStore, MongoHuddleStore};
use quckchat_proto::bus::TopicEvent;
use quckchat_runtime::bus::{Bus, NatsBus, Subjects, Subscription};
use quckchat_runtime::service::answer;
use quckchat_runtime::testkit;
use quckchat_signaling::ice::IceConfig;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Replica {
    service: Arc<HuddleService>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

struct Cluster {
    subjects: Subjects,
    redis_prefix: String,
    mongo_url: String,
    /// A gateway's view: topic events.
    watcher: Arc<dyn Bus>,
}

fn settings(max: usize) -> HuddleSettings {
    HuddleSettings {
        max_participants: max,
        grace: Duration::from_millis(500),
        audit_every: Duration::from_secs(60),
        ice: IceConfig {
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_auth: None,
        },
    }
}

async fn cluster() -> Cluster {
    let db = testkit::unique("huddle_replicas");
    Cluster {
        subjects: Subjects::new(testkit::unique("hudrep")),
        redis_prefix: testkit::unique("hudrep"),
        mongo_url: testkit::with_database(&testkit::mongodb_url(), &db),
        watcher: Arc::new(
            NatsBus::connect(&testkit::nats_url(), "watcher")
                .await
                .expect("NATS"),
        ),
    }
}

impl Cluster {
    /// A replica with its own NATS connection, Redis pool and MongoDB client
    /// (no chat: every user is a member).
    async fn replica(&self, name: &str, max: usize) -> Replica {
        let bus: Arc<dyn Bus> = Arc::new(
            NatsBus::connect(&testkit::nats_url(), name)
                .await
                .expect("NATS"),
        );
        let state: Arc<dyn RoomState> = Arc::new(
            RedisRoomState::connect(&testkit::redis_url(), &self.redis_prefix)
                .await
                .expect("Redis"),
        );
        let store: Arc<dyn HuddleStore> = Arc::new(
            MongoHuddleStore::connect(&self.mongo_url)
                .await
                .expect("MongoDB"),
        );
        let service = Arc::new(HuddleService::new(
            store,
            state,
            bus,
            self.subjects.clone(),
            settings(max),
        ));
        let stop = CancellationToken::new();
        let worker = service
            .clone()
            .start(stop.clone(), Duration::from_secs(2))
            .await
            .unwrap();
        Replica {
            service,
            stop,
            worker,
        }
    }

    async fn watch(&self, topic: &str) -> Subscription {
        self.watcher
            .subscribe(&self.subjects.topic(topic), None)
            .await
            .unwrap()
    }

    async fn cleanup(&self) {
        let redis = quckchat_runtime::ephemeral::RedisPool::connect(
            &testkit::redis_url(),
            &self.redis_prefix,
        )
        .await
        .unwrap();
        redis.clear().await.unwrap();
        let client = mongodb::Client::with_uri_str(&self.mongo_url)
            .await
            .unwrap();
        if let Some(db) = client.default_database() {
            db.drop().await.unwrap();
        }
    }
}

async fn push(r: &Replica, topic: &str, user: &str, event: &str, payload: Value) -> (bool, Value) {
    let mut cmd = testkit::command(topic, event, user, &payload);
    cmd.node_id = "gw1".into();
    let reply = testkit::decode(&answer(r.service.as_ref(), cmd).await);
    (reply.ok, reply.response)
}

async fn create(r: &Replica) -> String {
    let (ok, reply) = push(
        r,
        "huddle:lobby",
        "u0",
        "huddle:create",
        json!({"conversationId": "c1"}),
    )
    .await;
    assert!(ok, "{reply}");
    reply["huddle"]["id"].as_str().unwrap().to_owned()
}

/// Versions of the participant events on a topic until it is quiet.
async fn versions(sub: &mut Subscription, quiet: Duration) -> Vec<u64> {
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, sub.next()).await {
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        if ev.event.starts_with("huddle:participant:") {
            let payload: Value = serde_json::from_slice(&ev.payload).unwrap();
            out.push(payload["version"].as_u64().unwrap());
        }
    }
    out
}

#[tokio::test]
async fn racing_replicas_give_every_version_once() {
    let c = cluster().await;
    let (r1, r2) = (c.replica("hud-1", 8).await, c.replica("hud-2", 8).await);
    let id = create(&r1).await;
    let topic = format!("huddle:{id}");
    let mut events = c.watch(&topic).await;
    // 8 devices join at once, half through each replica, then each toggles
    // its audio twice and raises its hand, all at once.
    let joins = (0..8).map(|i| {
        let r = if i % 2 == 0 { &r1 } else { &r2 };
        let topic = topic.clone();
        async move { push(r, &topic, &format!("u{i}"), "phx_join", json!({})).await }
    });
    for (ok, reply) in futures::future::join_all(joins).await {
        assert!(ok, "{reply}");
    }
    let changes = (0..8).flat_map(|i| {
        [
            ("huddle:toggle-audio", json!({"enabled": false})),
            ("huddle:toggle-audio", json!({"enabled": true})),
            ("huddle:raise-hand", json!({"raised": true})),
        ]
        .into_iter()
        .map(move |(event, payload)| (i, event, payload))
    });
    let changes = changes.map(|(i, event, payload)| {
        let r = if i % 2 == 0 { &r2 } else { &r1 };
        let topic = topic.clone();
        async move { push(r, &topic, &format!("u{i}"), event, payload).await }
    });
    for (ok, reply) in futures::future::join_all(changes).await {
        assert!(ok, "{reply}");
    }
    let mut seen = versions(&mut events, Duration::from_millis(500)).await;
    seen.sort_unstable();
    // 8 joins and, per device, at most 3 changes (a toggle raced by its own
    // undo can change nothing): every version once, none skipped.
    let room = r2.service.state().load(&id).await.unwrap();
    assert_eq!(seen, (1..=room.version).collect::<Vec<_>>());
    assert!(room.version >= 8 + 8, "{}", room.version);
    assert_eq!(room.participants.len(), 8);
    for r in [r1, r2] {
        r.stop.cancel();
        r.worker.await.unwrap();
    }
    c.cleanup().await;
}

#[tokio::test]
async fn a_full_room_admits_exactly_its_size_whoever_races() {
    let c = cluster().await;
    let (r1, r2) = (c.replica("hud-1", 3).await, c.replica("hud-2", 3).await);
    let id = create(&r1).await;
    let topic = format!("huddle:{id}");
    let joins = (0..10).map(|i| {
        let r = if i % 2 == 0 { &r1 } else { &r2 };
        let topic = topic.clone();
        async move { push(r, &topic, &format!("u{i}"), "phx_join", json!({})).await }
    });
    let replies = futures::future::join_all(joins).await;
    let admitted = replies.iter().filter(|(ok, _)| *ok).count();
    assert_eq!(admitted, 3, "{replies:?}");
    assert!(replies
        .iter()
        .filter(|(ok, _)| !ok)
        .all(|(_, r)| r == &json!({"reason": "huddle_full"})));
    for r in [r1, r2] {
        r.stop.cancel();
        r.worker.await.unwrap();
    }
    c.cleanup().await;
}

#[tokio::test]
async fn a_departure_outlives_the_replica_that_began_it() {
    let c = cluster().await;
    let (r1, r2) = (c.replica("hud-1", 8).await, c.replica("hud-2", 8).await);
    let id = create(&r1).await;
    let topic = format!("huddle:{id}");
    // Watched before the joins: `push` answers in-process, so the joins'
    // events may still be on their way to NATS when it returns.
    let mut events = c.watch(&topic).await;
    for user in ["u1", "u2"] {
        assert!(push(&r1, &topic, user, "phx_join", json!({})).await.0);
    }
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(3), events.next())
            .await
            .expect("a join announced")
            .unwrap();
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        assert_eq!(ev.event, "huddle:participant:joined");
    }
    // u1's socket leaves through r1, which is stopped at once.
    assert!(push(&r1, &topic, "u1", "phx_leave", json!({})).await.0);
    let left_at = Instant::now();
    r1.stop.cancel();
    r1.worker.await.unwrap();
    let mut lefts = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), events.next()).await {
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        let payload: Value = serde_json::from_slice(&ev.payload).unwrap();
        lefts.push((
            ev.event,
            payload["userId"].clone(),
            payload["version"].clone(),
        ));
        if lefts.len() == 1 {
            let after = left_at.elapsed();
            assert!(
                after >= Duration::from_millis(450),
                "before the grace: {after:?} {lefts:?}"
            );
        }
    }
    assert_eq!(
        lefts,
        [("huddle:participant:left".to_owned(), json!("u1"), json!(3))],
        "announced once, by the surviving replica"
    );
    r2.stop.cancel();
    r2.worker.await.unwrap();
    c.cleanup().await;
}
