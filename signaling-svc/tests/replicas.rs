//! Two signaling-svc replicas over real NATS, one Redis and one MongoDB-wire
//! call log: answers raced from two devices on two replicas have exactly one
//! winner, two callers racing for one callee get one ring, and a call keeps
//! its ring timeout when the replica that started it is gone.
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
use quckchat_proto::bus::{direct_event, DirectEvent};
use quckchat_runtime::bus::{Bus, NatsBus, Subjects, Subscription};
use quckchat_runtime::service::answer;
use quckchat_runtime::testkit;
use quckchat_signaling::calls::CallTiming;
use quckchat_signaling::ice::IceConfig;
use quckchat_signaling::log::{CallLog, MongoCallLog};
use quckchat_signaling::service::SignalingService;
use quckchat_signaling::state::{CallState, RedisCallState};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Replica {
    service: Arc<SignalingService>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

struct Cluster {
    subjects: Subjects,
    redis_prefix: String,
    mongo_url: String,
    /// A client's own connection, to watch user subjects.
    watcher: Arc<dyn Bus>,
}

async fn cluster() -> Cluster {
    let db = testkit::unique("signaling_replicas");
    Cluster {
        subjects: Subjects::new(testkit::unique("sigrep")),
        redis_prefix: testkit::unique("sigrep"),
        mongo_url: testkit::with_database(&testkit::mongodb_url(), &db),
        watcher: Arc::new(
            NatsBus::connect(&testkit::nats_url(), "watcher")
                .await
                .expect("NATS"),
        ),
    }
}

impl Cluster {
    /// A replica with its own NATS connection, Redis pool and MongoDB client.
    async fn replica(&self, name: &str, timing: CallTiming) -> Replica {
        let bus: Arc<dyn Bus> = Arc::new(
            NatsBus::connect(&testkit::nats_url(), name)
                .await
                .expect("NATS"),
        );
        let state: Arc<dyn CallState> = Arc::new(
            RedisCallState::connect(&testkit::redis_url(), &self.redis_prefix)
                .await
                .expect("Redis"),
        );
        let log: Arc<dyn CallLog> = Arc::new(
            MongoCallLog::connect(&self.mongo_url)
                .await
                .expect("MongoDB"),
        );
        let service = Arc::new(SignalingService::new(
            state,
            log,
            bus,
            self.subjects.clone(),
            IceConfig {
                stun_urls: Vec::new(),
                turn_urls: Vec::new(),
                turn_auth: None,
            },
            timing,
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

    async fn watch(&self, user: &str) -> Subscription {
        self.watcher
            .subscribe(&self.subjects.user(user), None)
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

async fn push(r: &Replica, user: &str, conn: &str, event: &str, payload: Value) -> (bool, Value) {
    let mut cmd = testkit::command("webrtc:lobby", event, user, &payload);
    (cmd.conn_id, cmd.device_id) = (conn.into(), format!("dev-{conn}"));
    let reply = testkit::decode(&answer(r.service.as_ref(), cmd).await);
    (reply.ok, reply.response)
}

/// The next push event on a user subject, or `None` within `wait`.
async fn next_event(sub: &mut Subscription, wait: Duration) -> Option<(String, Value)> {
    let msg = tokio::time::timeout(wait, sub.next()).await.ok()??;
    let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
    match ev.kind {
        Some(direct_event::Kind::Push(p)) => {
            Some((p.event, serde_json::from_slice(&p.payload).unwrap()))
        }
        _ => None,
    }
}

#[tokio::test]
async fn answers_raced_on_two_replicas_have_one_winner() {
    let c = cluster().await;
    let r1 = c.replica("sig-1", CallTiming::default()).await;
    let r2 = c.replica("sig-2", CallTiming::default()).await;
    let mut caller_events = c.watch("alice").await;
    for round in 0..10 {
        let (ok, reply) = push(
            &r1,
            "alice",
            "ka",
            "call:initiate",
            json!({"calleeId": "bob"}),
        )
        .await;
        assert!(ok, "{reply}");
        let id = reply["callId"].clone();
        let (a, b) = tokio::join!(
            push(&r1, "bob", "phone", "call:answer", json!({"callId": id})),
            push(&r2, "bob", "laptop", "call:answer", json!({"callId": id})),
        );
        let winners = [&a, &b].iter().filter(|(ok, _)| *ok).count();
        assert_eq!(winners, 1, "round {round}: {a:?} {b:?}");
        let loser = if a.0 { &b.1 } else { &a.1 };
        assert_eq!(loser, &json!({"reason": "answered_elsewhere"}));
        // The caller hears exactly one answer.
        let mut answered = 0;
        while let Some((event, payload)) =
            next_event(&mut caller_events, Duration::from_millis(300)).await
        {
            if event == "call:answered" {
                assert_eq!(payload["callId"], id);
                answered += 1;
            }
        }
        assert_eq!(answered, 1, "round {round}");
        let (ok, _) = push(&r2, "alice", "ka", "call:end", json!({"callId": id})).await;
        assert!(ok);
    }
    for r in [r1, r2] {
        r.stop.cancel();
        r.worker.await.unwrap();
    }
    c.cleanup().await;
}

#[tokio::test]
async fn two_callers_racing_for_one_callee_ring_once() {
    let c = cluster().await;
    let r1 = c.replica("sig-1", CallTiming::default()).await;
    let r2 = c.replica("sig-2", CallTiming::default()).await;
    for round in 0..10 {
        let (a, b) = tokio::join!(
            push(
                &r1,
                "carol",
                "kc",
                "call:initiate",
                json!({"calleeId": "dave"})
            ),
            push(
                &r2,
                "erin",
                "ke",
                "call:initiate",
                json!({"calleeId": "dave"})
            ),
        );
        let rang: Vec<_> = [&a, &b].into_iter().filter(|(ok, _)| *ok).collect();
        assert_eq!(rang.len(), 1, "round {round}: {a:?} {b:?}");
        let busy = if a.0 { &b.1 } else { &a.1 };
        assert_eq!(busy, &json!({"reason": "busy"}));
        let id = rang[0].1["callId"].clone();
        let (ok, _) = push(&r1, "dave", "kd", "call:reject", json!({"callId": id})).await;
        assert!(ok);
    }
    for r in [r1, r2] {
        r.stop.cancel();
        r.worker.await.unwrap();
    }
    c.cleanup().await;
}

#[tokio::test]
async fn the_ring_timeout_fires_after_the_replica_that_started_it_is_gone() {
    let c = cluster().await;
    let timing = CallTiming {
        ring_timeout: Duration::from_secs(1),
        disconnect_grace: Duration::from_secs(20),
    };
    let r1 = c.replica("sig-1", timing).await;
    let r2 = c.replica("sig-2", timing).await;
    let mut callee_events = c.watch("frank").await;
    let (ok, reply) = push(
        &r1,
        "gina",
        "kg",
        "call:initiate",
        json!({"calleeId": "frank"}),
    )
    .await;
    assert!(ok, "{reply}");
    let started = Instant::now();
    // The replica that rang it stops at once (its sweeper with it).
    r1.stop.cancel();
    r1.worker.await.unwrap();
    let (event, _) = next_event(&mut callee_events, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(event, "call:incoming");
    let (event, payload) = next_event(&mut callee_events, Duration::from_secs(5))
        .await
        .expect("call:ended from the surviving replica");
    assert_eq!(event, "call:ended");
    assert_eq!(
        payload,
        json!({"callId": reply["callId"], "reason": "no_answer"})
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let logged = r2
        .service
        .log()
        .call(reply["callId"].as_str().unwrap())
        .await
        .unwrap();
    // Written beside the event: give the write a moment.
    let logged = match logged {
        Some(l) if l.end_reason.is_some() => l,
        _ => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            r2.service
                .log()
                .call(reply["callId"].as_str().unwrap())
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(logged.end_reason.map(|r| r.as_str()), Some("no_answer"));
    r2.stop.cancel();
    r2.worker.await.unwrap();
    c.cleanup().await;
}
