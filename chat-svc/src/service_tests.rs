//! Service tests over the embedded store and the in-process bus: what each
//! event replies, what it broadcasts, and what it refuses.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use quckchat_proto::bus::{direct_event, DirectEvent, TopicEvent};
use quckchat_runtime::bus::{Bus, MemoryBus, Subjects, Subscription};
use quckchat_runtime::service::answer;
use quckchat_runtime::testkit;
use serde_json::{json, Value};

use super::*;
use crate::store::EmbeddedStore;

struct Fixture {
    service: ChatService,
    bus: Arc<dyn Bus>,
    topic: Subscription,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ChatStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let subjects = Subjects::new("qc");
    let topic = bus
        .subscribe(&subjects.topic("chat:c1"), None)
        .await
        .unwrap();
    let service = ChatService::new(store, bus.clone(), subjects);
    service
        .set_members("c1", &["alice".into(), "bob".into()])
        .await
        .unwrap();
    Fixture {
        service,
        bus,
        topic,
        _dir: dir,
    }
}

impl Fixture {
    async fn push(
        &self,
        user: &str,
        event: &str,
        payload: Value,
    ) -> (bool, Value, Vec<(String, Value)>) {
        let mut cmd = testkit::command("chat:c1", event, user, &payload);
        (cmd.conn_id, cmd.device_id) = ("k".into(), "d".into());
        let reply = testkit::decode(&answer(&self.service, cmd).await);
        (reply.ok, reply.response, reply.followups)
    }

    async fn ok(&self, user: &str, event: &str, payload: Value) -> Value {
        let (ok, response, _) = self.push(user, event, payload).await;
        assert!(ok, "{event} failed: {response}");
        response
    }

    async fn reason(&self, user: &str, event: &str, payload: Value) -> String {
        let (ok, response, _) = self.push(user, event, payload).await;
        assert!(!ok, "{event} should fail: {response}");
        response["reason"].as_str().unwrap().to_owned()
    }

    /// The next broadcast on chat:c1, with its excluded user.
    async fn broadcast(&mut self) -> (String, Value, String) {
        let msg = tokio::time::timeout(Duration::from_secs(2), self.topic.next())
            .await
            .unwrap()
            .unwrap();
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        (
            ev.event,
            serde_json::from_slice(&ev.payload).unwrap(),
            ev.exclude_user_id,
        )
    }

    async fn no_broadcast(&mut self) {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), self.topic.next())
                .await
                .is_err(),
            "nothing should be broadcast"
        );
    }

    async fn send(&mut self, user: &str, content: &str) -> Value {
        let m = self
            .ok(
                user,
                "message:send",
                json!({"type": "text", "content": content}),
            )
            .await["message"]
            .clone();
        assert_eq!(self.broadcast().await.0, "message:new");
        m
    }
}

fn obj(v: Value) -> Payload {
    Payload(v.as_object().unwrap().clone())
}

#[test]
fn send_validation_names_the_field() {
    let err = |v: Value| parse_send("c", "u", &obj(v)).unwrap_err().to_string();
    assert_eq!(
        err(json!({"type": "text", "content": 5})),
        "invalid payload: content must be a string"
    );
    assert_eq!(
        err(json!({"type": "text"})),
        "invalid payload: content is required"
    );
    assert!(err(json!({"type": "bogus", "content": "x"})).contains("type must be one of"));
    assert!(err(json!({"content": "x"})).contains("type is required"));
    assert!(err(json!({"type": "text", "content": "x", "metadata": [1]})).contains("metadata"));
    assert!(
        err(json!({"type": "text", "content": "x", "conversationId": "other"}))
            .contains("conversationId")
    );
    assert!(
        err(json!({"type": "text", "content": "x".repeat(MAX_CONTENT_CHARS + 1)}))
            .contains("exceeds")
    );
    assert!(
        err(json!({"type": "text", "content": "x", "clientMessageId": ""}))
            .contains("clientMessageId")
    );
    assert!(err(json!({"type": "text", "content": "  "})).contains("empty"));
    assert!(err(json!({"type": "text", "content": "x", "replyTo": "a b"})).contains("replyTo"));
}

#[test]
fn metadata_must_be_storable() {
    let err = |m: Value| {
        parse_send(
            "c",
            "u",
            &obj(json!({"type": "text", "content": "x", "metadata": m})),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(err(json!({"$set": 1})).contains("$"));
    assert!(err(json!({"a": {"b": [{"$where": 1}]}})).contains("$"));
    assert!(err(json!({"n": u64::MAX})).contains("64-bit"));
    assert!(err(json!({"big": "x".repeat(MAX_METADATA_BYTES)})).contains("exceeds"));
    assert!(parse_send(
        "c",
        "u",
        &obj(json!({"type": "text", "content": "x", "metadata": {"n": -5, "f": 1.5, "s": "$ok"}}))
    )
    .is_ok());
}

#[tokio::test]
async fn history_pages_stay_within_the_byte_bound() {
    let mut f = fixture().await;
    let big = "y".repeat(MAX_CONTENT_CHARS);
    for _ in 0..60 {
        f.ok(
            "alice",
            "message:send",
            json!({"type": "text", "content": big}),
        )
        .await;
        f.broadcast().await;
    }
    let page = f.ok("bob", "message:history", json!({"limit": 100})).await;
    assert!(page.to_string().len() <= MAX_PAGE_BYTES + 1024);
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.len() < 60 && seqs.last() == Some(&60),
        "the newest kept: {seqs:?}"
    );
    assert_eq!(page["hasMore"], true);
}

#[test]
fn emojis_are_validated() {
    let check = |e: &str| emoji_field(&obj(json!({ "emoji": e })));
    for good in ["👍", "👍🏽", "❤️", "🇫🇷", ":tada:", "👨‍👩‍👧"] {
        assert!(check(good).is_ok(), "{good}");
    }
    for bad in ["", "a", "👍👍", ":not-a-code:", "hello", " 👍"] {
        assert!(check(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn join_authorises_by_membership_and_reports_state() {
    let mut f = fixture().await;
    f.send("alice", "one").await;
    let joined = f.ok("bob", "phx_join", json!({})).await;
    assert_eq!(
        joined,
        json!({"conversationId": "c1", "lastSeq": 1, "readUpTo": 0})
    );
    assert_eq!(f.reason("eve", "phx_join", json!({})).await, "unauthorized");
    assert_eq!(
        f.reason(
            "eve",
            "message:send",
            json!({"type": "text", "content": "x"})
        )
        .await,
        "unauthorized"
    );
    assert_eq!(
        f.reason("bob", "phx_join", json!({"lastSeq": "x"})).await,
        "invalid payload: lastSeq must be a non-negative integer"
    );
    assert_eq!(
        f.reason("bob", "phx_join", json!([1])).await,
        "invalid payload: expected an object"
    );
    let (ok, response, _) = f.push("bob", "bogus", json!({})).await;
    assert!(!ok);
    assert_eq!(
        response,
        json!({"reason": "unknown event", "event": "bogus"})
    );
}

#[tokio::test]
async fn send_reply_to_must_name_a_message_here_and_nothing_is_stored_on_error() {
    let mut f = fixture().await;
    let first = f.send("alice", "first").await;
    let reply = f
        .ok(
            "bob",
            "message:send",
            json!({"type": "text", "content": "re", "replyTo": first["id"]}),
        )
        .await;
    assert_eq!(reply["message"]["replyTo"], first["id"]);
    assert_eq!(reply["message"]["seq"], 2);
    f.broadcast().await;
    let unknown = crate::store::new_message_id();
    let reason = f
        .reason(
            "bob",
            "message:send",
            json!({"type": "text", "content": "re", "replyTo": unknown}),
        )
        .await;
    assert!(reason.contains("replyTo"), "{reason}");
    f.no_broadcast().await;
    assert_eq!(
        f.service
            .store()
            .conversation("c1")
            .await
            .unwrap()
            .unwrap()
            .last_seq,
        2,
        "nothing stored"
    );
}

#[tokio::test]
async fn edit_delete_by_sender_only_with_broadcasts() {
    let mut f = fixture().await;
    let m = f.send("alice", "helo").await;
    let id = m["id"].clone();
    assert_eq!(
        f.reason(
            "bob",
            "message:edit",
            json!({"messageId": id, "content": "x"})
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        f.reason("alice", "message:edit", json!({"messageId": id}))
            .await,
        "invalid payload: content is required"
    );
    assert_eq!(
        f.reason("alice", "message:edit", json!({"content": "x"}))
            .await,
        "invalid payload: messageId is required"
    );
    let unknown = crate::store::new_message_id();
    assert_eq!(
        f.reason(
            "alice",
            "message:edit",
            json!({"messageId": unknown, "content": "x"})
        )
        .await,
        "not_found"
    );
    f.no_broadcast().await;
    let edited = f
        .ok(
            "alice",
            "message:edit",
            json!({"messageId": id, "content": "hello"}),
        )
        .await;
    assert_eq!(edited["message"]["content"], "hello");
    assert!(edited["message"]["editedAt"].is_string());
    let (event, payload, _) = f.broadcast().await;
    assert_eq!(
        (event.as_str(), &payload["message"]["content"]),
        ("message:edited", &json!("hello"))
    );

    assert_eq!(
        f.reason("bob", "message:delete", json!({"messageId": id}))
            .await,
        "forbidden"
    );
    assert_eq!(
        f.ok("alice", "message:delete", json!({"messageId": id}))
            .await,
        json!({"messageId": id})
    );
    let (event, payload, _) = f.broadcast().await;
    assert_eq!(event, "message:deleted");
    assert_eq!(
        (&payload["messageId"], &payload["conversationId"]),
        (&id, &json!("c1"))
    );
    assert!(payload["deletedAt"].is_string());
    assert_eq!(
        f.ok("alice", "message:delete", json!({"messageId": id}))
            .await,
        json!({"messageId": id})
    );
    f.no_broadcast().await;
    assert_eq!(
        f.reason(
            "alice",
            "message:edit",
            json!({"messageId": id, "content": "x"})
        )
        .await,
        "message deleted"
    );
}

#[tokio::test]
async fn reactions_reply_with_the_reactions_and_broadcast_changes_only() {
    let mut f = fixture().await;
    let id = f.send("alice", "hi").await["id"].clone();
    let r = f
        .ok(
            "bob",
            "message:reaction:add",
            json!({"messageId": id, "emoji": "👍"}),
        )
        .await;
    assert_eq!(r, json!({"messageId": id, "reactions": {"👍": ["bob"]}}));
    assert_eq!(
        f.broadcast().await.1,
        json!({"messageId": id, "userId": "bob", "emoji": "👍"})
    );
    f.ok(
        "bob",
        "message:reaction:add",
        json!({"messageId": id, "emoji": "👍"}),
    )
    .await;
    f.no_broadcast().await;
    let reason = f
        .reason(
            "bob",
            "message:reaction:add",
            json!({"messageId": id, "emoji": "nope"}),
        )
        .await;
    assert!(reason.contains("emoji"), "{reason}");
    let r = f
        .ok(
            "bob",
            "message:reaction:remove",
            json!({"messageId": id, "emoji": "👍"}),
        )
        .await;
    assert_eq!(r, json!({"messageId": id, "reactions": {}}));
    assert_eq!(f.broadcast().await.0, "message:reaction:removed");
}

#[tokio::test]
async fn read_receipts_are_monotonic_and_go_to_the_others() {
    let mut f = fixture().await;
    let m1 = f.send("alice", "1").await;
    f.send("alice", "2").await;
    assert_eq!(
        f.ok("bob", "message:read", json!({"seq": 2})).await,
        json!({"readUpTo": 2})
    );
    let (event, payload, except) = f.broadcast().await;
    assert_eq!((event.as_str(), except.as_str()), ("message:read", "bob"));
    assert_eq!(
        (
            &payload["userId"],
            &payload["seq"],
            &payload["conversationId"]
        ),
        (&json!("bob"), &json!(2), &json!("c1"))
    );
    assert!(payload["readAt"].is_string() && payload["messageId"].is_string());
    assert_eq!(
        f.ok("bob", "message:read", json!({"messageId": m1["id"]}))
            .await,
        json!({"readUpTo": 2})
    );
    f.no_broadcast().await;
    assert_eq!(
        f.reason("bob", "message:read", json!({"seq": 9})).await,
        "not_found"
    );
    assert_eq!(
        f.reason("bob", "message:read", json!({})).await,
        "invalid payload: messageId or seq is required"
    );
    assert_eq!(f.ok("bob", "phx_join", json!({})).await["readUpTo"], 2);
}

#[tokio::test]
async fn history_pages_and_limits() {
    let mut f = fixture().await;
    for i in 0..3 {
        f.send("alice", &i.to_string()).await;
    }
    let page = f.ok("bob", "message:history", json!({"limit": 2})).await;
    assert_eq!(
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(page["hasMore"], true);
    let page = f
        .ok("bob", "message:history", json!({"beforeSeq": 2}))
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page["hasMore"], false);
    assert_eq!(
        f.reason("bob", "message:history", json!({"limit": 101}))
            .await,
        "invalid payload: limit must be 1 to 100"
    );
}

#[tokio::test]
async fn join_with_last_seq_replays_what_was_missed() {
    let mut f = fixture().await;
    let m1 = f.send("alice", "1").await;
    f.send("alice", "2").await;
    // bob saw up to 2; then:
    f.ok(
        "alice",
        "message:edit",
        json!({"messageId": m1["id"], "content": "1'"}),
    )
    .await;
    f.broadcast().await;
    let m3 = f.send("alice", "3").await;
    f.ok("alice", "message:delete", json!({"messageId": m3["id"]}))
        .await;
    f.broadcast().await;
    let (ok, response, followups) = f.push("bob", "phx_join", json!({"lastSeq": 2})).await;
    assert!(ok);
    assert_eq!(response["lastSeq"], 3);
    assert_eq!(response["replayComplete"], true);
    let events: Vec<&str> = followups.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(events, vec!["message:edited", "message:new"]);
    assert_eq!(followups[0].1["message"]["content"], "1'");
    assert_eq!(followups[1].1["message"]["seq"], 3);
    assert!(
        followups[1].1["message"]["deletedAt"].is_string(),
        "a message deleted meanwhile arrives as a tombstone"
    );
    // Changes after message 3 was created are replayed again: the service
    // cannot know whether the client saw them, and they are idempotent.
    let (_, response, followups) = f.push("bob", "phx_join", json!({"lastSeq": 3})).await;
    assert_eq!(
        followups
            .iter()
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>(),
        vec!["message:deleted"]
    );
    assert_eq!(response["replayComplete"], true);
    let m4 = f.send("alice", "4").await;
    let (_, _, followups) = f.push("bob", "phx_join", json!({"lastSeq": 4})).await;
    assert!(
        followups.is_empty(),
        "nothing changed since message 4: {followups:?}"
    );
    assert_eq!(m4["seq"], 4);
}

#[test]
fn replay_is_bounded_in_bytes_keeping_the_newest() {
    let big = "x".repeat(MAX_CONTENT_CHARS);
    let messages: Vec<Message> = (1..=100)
        .map(|seq| {
            let mut m = crate::store::materialize(
                NewMessage {
                    conversation_id: "c".into(),
                    sender_id: "a".into(),
                    kind: "text".into(),
                    content: big.clone(),
                    client_message_id: None,
                    reply_to: None,
                    metadata: None,
                },
                seq,
                seq,
            );
            m.seq = seq;
            m
        })
        .collect();
    let (events, complete, from) = replay_events(crate::store::Replay {
        changed: Vec::new(),
        new: messages,
        complete: true,
    });
    assert!(!complete);
    let total: usize = events.iter().map(|(_, p)| p.to_string().len()).sum();
    assert!(total <= MAX_REPLAY_BYTES);
    let first = &events[0].1;
    assert_eq!(Some(first["message"]["seq"].as_u64().unwrap()), from);
    let last = &events.last().unwrap().1;
    assert_eq!(last["message"]["seq"], 100, "the newest are kept");
}

#[tokio::test]
async fn removed_member_is_refused_and_their_channels_close() {
    let mut f = fixture().await;
    let mut bob_events = f
        .bus
        .subscribe(&Subjects::new("qc").user("bob"), None)
        .await
        .unwrap();
    f.send("bob", "still here").await;
    f.service.remove_member("c1", "bob").await.unwrap();
    assert_eq!(
        f.reason(
            "bob",
            "message:send",
            json!({"type": "text", "content": "x"})
        )
        .await,
        "unauthorized"
    );
    let msg = tokio::time::timeout(Duration::from_secs(1), bob_events.next())
        .await
        .unwrap()
        .unwrap();
    let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
    assert_eq!(ev.topic, "chat:c1");
    assert!(matches!(ev.kind, Some(direct_event::Kind::Close(_))));
    // Upserting without alice closes hers too.
    let mut alice_events = f
        .bus
        .subscribe(&Subjects::new("qc").user("alice"), None)
        .await
        .unwrap();
    f.service
        .set_members("c1", &["carol".into()])
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), alice_events.next())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        f.reason("alice", "typing:start", json!({})).await,
        "unauthorized"
    );
}

#[tokio::test]
async fn typing_goes_to_the_others_and_is_throttled() {
    let mut f = fixture().await;
    assert_eq!(f.ok("alice", "typing:start", json!({})).await, json!({}));
    let (event, payload, except) = f.broadcast().await;
    assert_eq!((event.as_str(), except.as_str()), ("typing:start", "alice"));
    assert_eq!(payload, json!({"userId": "alice", "conversationId": "c1"}));
    f.ok("alice", "typing:start", json!({})).await;
    f.no_broadcast().await;
    f.ok("alice", "typing:stop", json!({})).await;
    assert_eq!(f.broadcast().await.0, "typing:stop");
}

/// The next typing event on the topic, or `None` if none comes within
/// `wait` (tokio's clock: paused tests move it).
async fn typing_event(topic: &mut Subscription, wait: Duration) -> Option<(String, String)> {
    let msg = tokio::time::timeout(wait, topic.next()).await.ok()??;
    let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
    Some((ev.event, ev.exclude_user_id))
}

fn typing_fixture() -> (Arc<dyn Bus>, Subjects, Typing) {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let subjects = Subjects::new("qc");
    let typing = Typing::new(Publisher::new(bus.clone(), subjects.clone()));
    (bus, subjects, typing)
}

#[tokio::test(start_paused = true)]
async fn typing_expires_by_itself() {
    let (bus, subjects, typing) = typing_fixture();
    let mut topic = bus
        .subscribe(&subjects.topic("chat:c1"), None)
        .await
        .unwrap();
    let start = Some(("typing:start".to_owned(), "alice".to_owned()));
    let stop = Some(("typing:stop".to_owned(), "alice".to_owned()));
    typing.start("c1", "alice").await;
    assert_eq!(typing_event(&mut topic, Duration::ZERO).await, start);
    tokio::time::sleep(TYPING_EXPIRY - Duration::from_secs(1)).await;
    // Still typing: the expiry moves; past the throttle, announced again.
    typing.start("c1", "alice").await;
    assert_eq!(typing_event(&mut topic, Duration::ZERO).await, start);
    assert_eq!(
        typing_event(&mut topic, TYPING_EXPIRY - Duration::from_secs(1)).await,
        None,
        "not expired yet: the second start moved the expiry"
    );
    assert_eq!(
        typing_event(&mut topic, Duration::from_secs(2)).await,
        stop,
        "expired one TYPING_EXPIRY after the last start"
    );
}

#[tokio::test(start_paused = true)]
async fn typing_start_is_throttled_then_announced_again() {
    let (bus, subjects, typing) = typing_fixture();
    let mut topic = bus
        .subscribe(&subjects.topic("chat:c1"), None)
        .await
        .unwrap();
    let start = Some(("typing:start".to_owned(), "alice".to_owned()));
    typing.start("c1", "alice").await;
    assert_eq!(typing_event(&mut topic, Duration::ZERO).await, start);
    tokio::time::sleep(TYPING_THROTTLE - Duration::from_millis(100)).await;
    typing.start("c1", "alice").await;
    assert_eq!(
        typing_event(&mut topic, Duration::ZERO).await,
        None,
        "a start within the throttle window is not re-broadcast"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    typing.start("c1", "alice").await;
    assert_eq!(
        typing_event(&mut topic, Duration::ZERO).await,
        start,
        "a start after the throttle window is broadcast again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_broadcast_in_seq_order() {
    let Fixture {
        service,
        mut topic,
        _dir,
        ..
    } = fixture().await;
    let service = Arc::new(service);
    let sends: Vec<_> = (0..40)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                let cmd = testkit::command(
                    "chat:c1",
                    "message:send",
                    if i % 2 == 0 { "alice" } else { "bob" },
                    &json!({"type": "text", "content": format!("m{i}")}),
                );
                assert!(testkit::decode(&answer(service.as_ref(), cmd).await).ok);
            })
        })
        .collect();
    for s in sends {
        s.await.unwrap();
    }
    let mut seqs = Vec::new();
    for _ in 0..40 {
        let msg = tokio::time::timeout(Duration::from_secs(2), topic.next())
            .await
            .unwrap()
            .unwrap();
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        let payload: Value = serde_json::from_slice(&ev.payload).unwrap();
        seqs.push(payload["message"]["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "published in seq order");
}

#[tokio::test]
async fn unknown_event_names_do_not_become_metric_labels() {
    let metrics = quckchat_runtime::admin::metrics_handle();
    let f = fixture().await;
    let (ok, _, _) = f.push("alice", "message:made-up-7f3a", json!({})).await;
    assert!(!ok);
    let text = metrics.render();
    assert!(!text.contains("made-up-7f3a"), "{text}");
    assert!(
        text.contains(
            r#"quckchat_commands_total{service="chat",event="other",result="unknown_event"}"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_retried_send_is_published_again_with_its_seq_and_gaps_can_be_read() {
    let mut f = fixture().await;
    let mut raw = f
        .bus
        .subscribe(&Subjects::new("qc").topic("chat:c1"), None)
        .await
        .unwrap();
    let send = json!({"type": "text", "content": "hi", "clientMessageId": "retry-1"});
    let first = f.ok("alice", "message:send", send.clone()).await;
    let again = f.ok("alice", "message:send", send).await;
    assert_eq!(first, again, "one message");
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(2), raw.next())
            .await
            .unwrap()
            .unwrap();
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        assert_eq!((ev.event.as_str(), ev.seq), ("message:new", 1));
    }
    f.broadcast().await;
    f.broadcast().await;
    for n in 2..=6 {
        f.send("bob", &format!("m{n}")).await;
    }
    // What a gateway that saw seq 2 and then 6 missed.
    let missed = f.service.missed("c1", 2, 6).await.unwrap();
    let seqs: Vec<u64> = missed.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(missed[0].1["message"]["content"], "m3");
    assert!(f.service.missed("c1", 5, 6).await.unwrap().is_empty());
    assert!(f.service.missed("c1", 6, 2).await.unwrap().is_empty());
}

/// Everyone is online, one device each.
struct AllOnline;

#[async_trait::async_trait]
impl crate::presence::PresenceLookup for AllOnline {
    async fn presence_state(
        &self,
        user_ids: &[String],
    ) -> Result<Value, quckchat_runtime::grpc::CallError> {
        Ok(user_ids
            .iter()
            .map(|u| (u.clone(), json!({"metas": [{"phx_ref": "r"}]})))
            .collect::<serde_json::Map<_, _>>()
            .into())
    }
}

async fn join_as_alice(service: &ChatService, topic: &str) -> testkit::Decoded {
    let mut cmd = testkit::command(topic, "phx_join", "alice", &json!({}));
    (cmd.conn_id, cmd.device_id) = ("k".into(), "d".into());
    testkit::decode(&answer(service, cmd).await)
}

#[tokio::test]
async fn a_join_lists_presence_only_in_conversations_up_to_the_size_bound() {
    let f = fixture().await;
    let service = f.service.with_presence(Arc::new(AllOnline));
    let state = |followups: &[(String, Value)]| {
        followups
            .iter()
            .find(|(event, _)| event == "presence_state")
            .map(|(_, state)| state.clone())
            .expect("a presence_state")
    };
    let small = join_as_alice(&service, "chat:c1").await;
    assert!(small.ok);
    assert_eq!(state(&small.followups).as_object().unwrap().len(), 2);

    let members: Vec<String> = (0..=MAX_PRESENCE_MEMBERS)
        .map(|i| {
            if i == 0 {
                "alice".into()
            } else {
                format!("m{i}")
            }
        })
        .collect();
    service.set_members("big", &members).await.unwrap();
    let big = join_as_alice(&service, "chat:big").await;
    assert!(big.ok);
    assert_eq!(
        state(&big.followups),
        json!({}),
        "past {MAX_PRESENCE_MEMBERS} members the state is empty"
    );
}

#[tokio::test]
async fn presence_get_answers_for_members_only() {
    let f = fixture().await;
    let reason = f
        .reason("alice", "presence:get", json!({"userIds": ["bob"]}))
        .await;
    assert_eq!(
        reason, "service unavailable",
        "no presence service configured"
    );

    let f = Fixture {
        service: f.service.with_presence(Arc::new(AllOnline)),
        ..f
    };
    let got = f
        .ok(
            "alice",
            "presence:get",
            json!({"userIds": ["bob", "stranger", "bob", "alice"]}),
        )
        .await;
    let mut shown: Vec<&String> = got["presence"].as_object().unwrap().keys().collect();
    shown.sort();
    assert_eq!(
        shown,
        ["alice", "bob"],
        "non-members are absent, repeats once"
    );

    let too_many: Vec<String> = (0..=MAX_PRESENCE_GET).map(|i| format!("u{i}")).collect();
    for bad in [
        json!({}),
        json!({"userIds": []}),
        json!({"userIds": "bob"}),
        json!({"userIds": [7]}),
        json!({"userIds": ["bad id!"]}),
        json!({"userIds": too_many}),
    ] {
        let reason = f.reason("alice", "presence:get", bad.clone()).await;
        assert!(
            reason.starts_with("invalid payload: userIds"),
            "{bad}: {reason}"
        );
    }
    let reason = f
        .reason("mallory", "presence:get", json!({"userIds": ["bob"]}))
        .await;
    assert_eq!(reason, "unauthorized");
}
