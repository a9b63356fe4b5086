//! Service tests over the in-process bus, memory room state and the
//! embedded huddle store: what each event replies, who hears what with
//! which version, what is refused, and how participants go away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use quckchat_proto::bus::{direct_event, ConnectionAudit, DirectEvent, TopicEvent};
use quckchat_runtime::bus::{Bus, MemoryBus, Subjects, Subscription};
use quckchat_runtime::grpc::CallError;
use quckchat_runtime::service::answer;
use quckchat_runtime::testkit;
use quckchat_signaling::call::Call;
use quckchat_signaling::ice::IceConfig;
use serde_json::{json, Value};

use super::*;
use crate::huddle::Room;
use crate::state::MemoryRoomState;
use crate::store::EmbeddedHuddleStore;

/// Conversation c1 has a, b, c; c2 has d only.
struct FakeChat;

#[async_trait]
impl Conversations for FakeChat {
    async fn members(&self, id: &str) -> std::result::Result<Option<Vec<String>>, CallError> {
        Ok(match id {
            "c1" => Some(vec!["a".into(), "b".into(), "c".into()]),
            "c2" => Some(vec!["d".into()]),
            _ => None,
        })
    }
    async fn post_call_message(&self, _call: &Call) -> std::result::Result<(), CallError> {
        Ok(())
    }
}

/// Something published: a topic event, a user event (with the one
/// connection it is for) or a channel close for one connection.
#[derive(Debug, Clone, PartialEq)]
enum Out {
    Topic {
        topic: String,
        event: String,
        payload: Value,
    },
    User {
        user: String,
        conn: String,
        topic: String,
        event: String,
        payload: Value,
    },
    Close {
        user: String,
        conn: String,
        topic: String,
    },
}

struct Fixture {
    service: Arc<HuddleService>,
    bus: Arc<dyn Bus>,
    /// Topic events and user events (not `qc.>`: a subscription to the
    /// gateways' audit subjects would answer for gateways that are gone).
    topics: Subscription,
    users: Subscription,
    _dir: tempfile::TempDir,
}

fn settings(max: usize) -> HuddleSettings {
    HuddleSettings {
        max_participants: max,
        grace: Duration::from_millis(300),
        audit_every: Duration::from_secs(1),
        ice: IceConfig {
            stun_urls: vec!["stun:stun.example.org:3478".into()],
            turn_urls: Vec::new(),
            turn_auth: None,
        },
    }
}

/// Memory state whose commits take a random 0–3 ms after they applied (a
/// Redis round trip): commands racing on one room finish out of order.
struct SlowState(MemoryRoomState);

#[async_trait]
impl RoomState for SlowState {
    async fn load(&self, id: &str) -> std::result::Result<Room, StateError> {
        self.0.load(id).await
    }
    async fn commit(&self, id: &str, room: &Room) -> std::result::Result<bool, StateError> {
        let applied = self.0.commit(id, room).await?;
        let ms = uuid::Uuid::new_v4().as_bytes()[0] % 4;
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
        Ok(applied)
    }
    async fn remove(&self, id: &str) -> std::result::Result<(), StateError> {
        self.0.remove(id).await
    }
    async fn due(&self, now: i64) -> std::result::Result<Vec<String>, StateError> {
        self.0.due(now).await
    }
    async fn live(&self) -> std::result::Result<Vec<String>, StateError> {
        self.0.live().await
    }
    async fn ping(&self) -> std::result::Result<(), StateError> {
        self.0.ping().await
    }
}

async fn fixture_with(max: usize) -> Fixture {
    fixture_on(max, Arc::new(MemoryRoomState::new())).await
}

async fn fixture_on(max: usize, state: Arc<dyn RoomState>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let topics = bus.subscribe("qc.topic.>", None).await.unwrap();
    let users = bus.subscribe("qc.user.>", None).await.unwrap();
    let service = HuddleService::new(
        Arc::new(EmbeddedHuddleStore::open(dir.path()).unwrap()),
        state,
        bus.clone(),
        Subjects::new("qc"),
        settings(max),
    )
    .with_chat(Arc::new(FakeChat));
    Fixture {
        service: Arc::new(service),
        bus,
        topics,
        users,
        _dir: dir,
    }
}

async fn fixture() -> Fixture {
    fixture_with(8).await
}

impl Fixture {
    /// `user` pushes on `topic` from connection `conn` (device `dev-<conn>`)
    /// of gateway node `gw1`.
    async fn push(
        &self,
        topic: &str,
        user: &str,
        conn: &str,
        event: &str,
        payload: Value,
    ) -> (bool, Value) {
        let device = format!("dev-{conn}");
        self.push_from(topic, user, conn, &device, event, payload)
            .await
    }

    /// `user` pushes from connection `conn` of device `device`.
    async fn push_from(
        &self,
        topic: &str,
        user: &str,
        conn: &str,
        device: &str,
        event: &str,
        payload: Value,
    ) -> (bool, Value) {
        let mut cmd = testkit::command(topic, event, user, &payload);
        (cmd.conn_id, cmd.device_id, cmd.node_id) = (conn.into(), device.into(), "gw1".into());
        let reply = testkit::decode(&answer(self.service.as_ref(), cmd).await);
        (reply.ok, reply.response)
    }

    async fn ok(&self, topic: &str, user: &str, conn: &str, event: &str, payload: Value) -> Value {
        let (ok, response) = self.push(topic, user, conn, event, payload).await;
        assert!(ok, "{event} failed: {response}");
        response
    }

    async fn refused(
        &self,
        topic: &str,
        user: &str,
        conn: &str,
        event: &str,
        payload: Value,
    ) -> Value {
        let (ok, response) = self.push(topic, user, conn, event, payload).await;
        assert!(!ok, "{event} should fail: {response}");
        response
    }

    /// Everything published until nothing comes for 100 ms.
    async fn out(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(100), async {
                tokio::select! {
                    m = self.topics.next() => m,
                    m = self.users.next() => m,
                }
            });
            let Ok(Some(msg)) = next.await else { break };
            if msg.subject.starts_with("qc.topic.") {
                let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
                out.push(Out::Topic {
                    topic: ev.topic,
                    event: ev.event,
                    payload: serde_json::from_slice(&ev.payload).unwrap(),
                });
            } else if let Some(user) = msg.subject.strip_prefix("qc.user.") {
                let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
                out.push(match ev.kind.unwrap() {
                    direct_event::Kind::Push(p) => Out::User {
                        user: user.into(),
                        conn: ev.conn_id,
                        topic: ev.topic,
                        event: p.event,
                        payload: serde_json::from_slice(&p.payload).unwrap(),
                    },
                    direct_event::Kind::Close(_) => Out::Close {
                        user: user.into(),
                        conn: ev.conn_id,
                        topic: ev.topic,
                    },
                });
            }
        }
        out
    }

    /// Creates a huddle in c1 by a; returns its id (events drained).
    async fn huddle(&mut self) -> String {
        let reply = self
            .ok(
                "huddle:lobby",
                "a",
                "ka",
                "huddle:create",
                json!({"conversationId": "c1", "title": "standup"}),
            )
            .await;
        self.out().await;
        reply["huddle"]["id"].as_str().unwrap().to_owned()
    }
}

/// `(event, version, userId)` of the participant events among `out`.
fn participant_events(out: &[Out]) -> Vec<(String, u64, String)> {
    out.iter()
        .filter_map(|o| match o {
            Out::Topic { event, payload, .. } if event.starts_with("huddle:participant:") => {
                Some((
                    event.clone(),
                    payload["version"].as_u64().unwrap(),
                    payload["participant"]["userId"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                ))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn create_tells_the_conversation_and_checks_membership() {
    let mut f = fixture().await;
    let reply = f
        .ok(
            "huddle:lobby",
            "a",
            "ka",
            "huddle:create",
            json!({"conversationId": "c1", "title": "standup"}),
        )
        .await;
    let huddle = &reply["huddle"];
    assert_eq!(
        (
            huddle["conversationId"].clone(),
            huddle["title"].clone(),
            huddle["createdBy"].clone()
        ),
        (json!("c1"), json!("standup"), json!("a"))
    );
    assert_eq!(huddle["participantCount"], json!(0));
    let out = f.out().await;
    assert_eq!(
        out,
        vec![Out::Topic {
            topic: "chat:c1".into(),
            event: "huddle:created".into(),
            payload: json!({"huddle": huddle})
        }]
    );
    let stored = f
        .service
        .store()
        .get(huddle["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.title.as_deref(), Some("standup"));

    let lobby = |payload| f.refused("huddle:lobby", "a", "ka", "huddle:create", payload);
    assert_eq!(
        lobby(json!({"conversationId": "c2"})).await,
        json!({"reason": "forbidden"})
    );
    assert_eq!(
        lobby(json!({"conversationId": "nope"})).await,
        json!({"reason": "not_found"})
    );
    assert_eq!(
        lobby(json!({"conversationId": "c1", "title": "x".repeat(201)})).await,
        json!({"reason": "invalid payload: title must be at most 200 bytes"})
    );
    assert!(lobby(json!({"conversationId": 7})).await["reason"]
        .as_str()
        .unwrap()
        .starts_with("invalid payload"));
    assert_eq!(
        f.refused(
            "huddle:lobby",
            "a",
            "ka",
            "huddle:raise-hand",
            json!({"raised": true})
        )
        .await,
        json!({"reason": "unknown event", "event": "huddle:raise-hand"})
    );
    assert!(f.out().await.is_empty(), "refusals publish nothing");
}

#[tokio::test]
async fn join_replies_with_the_room_and_versions_rise_without_gaps() {
    let mut f = fixture().await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    let first = f
        .ok(&topic, "a", "ka", "phx_join", json!({"video": true}))
        .await;
    assert_eq!(first["version"], json!(1));
    assert_eq!(first["huddle"]["id"], json!(id));
    assert_eq!(
        first["iceServers"][0]["urls"],
        json!(["stun:stun.example.org:3478"])
    );
    let me = &first["participants"][0];
    assert_eq!(
        (
            me["userId"].clone(),
            me["deviceId"].clone(),
            me["audio"].clone(),
            me["video"].clone(),
            me["screen"].clone(),
            me["handRaised"].clone()
        ),
        (
            json!("a"),
            json!("dev-ka"),
            json!(true),
            json!(true),
            json!(false),
            json!(false)
        )
    );
    // The same user on a second device: a second participant, nobody kicked.
    let second = f.ok(&topic, "a", "ka2", "phx_join", json!({})).await;
    let third = f
        .ok(&topic, "b", "kb", "phx_join", json!({"audio": false}))
        .await;
    assert_eq!(
        (second["version"].clone(), third["version"].clone()),
        (json!(2), json!(3))
    );
    assert_eq!(third["participants"].as_array().unwrap().len(), 3);
    let out = f.out().await;
    assert_eq!(
        participant_events(&out),
        vec![
            ("huddle:participant:joined".into(), 1, "a".into()),
            ("huddle:participant:joined".into(), 2, "a".into()),
            ("huddle:participant:joined".into(), 3, "b".into()),
        ]
    );
    let counts: Vec<Value> = out
        .iter()
        .filter_map(|o| match o {
            Out::Topic {
                topic,
                event,
                payload,
            } if topic == "chat:c1" && event == "huddle:updated" => {
                Some(payload["participantCount"].clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![json!(1), json!(2), json!(3)]);
    let list = f
        .ok(&topic, "b", "kb", "huddle:participants", json!({}))
        .await;
    assert_eq!(list["version"], json!(3));
    assert_eq!(list["participants"], third["participants"]);
}

#[tokio::test]
async fn joins_are_refused_clearly() {
    let mut f = fixture_with(2).await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    assert_eq!(
        f.refused(&topic, "d", "kd", "phx_join", json!({})).await,
        json!({"reason": "unauthorized"})
    );
    assert_eq!(
        f.refused("huddle:unknown1", "a", "ka", "phx_join", json!({}))
            .await,
        json!({"reason": "not_found"})
    );
    assert!(f
        .refused(&topic, "a", "ka", "phx_join", json!({"audio": "yes"}))
        .await["reason"]
        .as_str()
        .unwrap()
        .starts_with("invalid payload"));
    f.ok(&topic, "a", "ka", "phx_join", json!({})).await;
    f.ok(&topic, "b", "kb", "phx_join", json!({})).await;
    assert_eq!(
        f.refused(&topic, "c", "kc", "phx_join", json!({})).await,
        json!({"reason": "huddle_full"})
    );
    // A device already in comes back even when full.
    f.ok(&topic, "b", "kb", "phx_join", json!({})).await;
}

#[tokio::test]
async fn toggles_hand_and_one_screen_sharer() {
    let mut f = fixture().await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    f.ok(&topic, "a", "ka", "phx_join", json!({})).await;
    f.ok(&topic, "b", "kb", "phx_join", json!({})).await;
    f.out().await;
    assert_eq!(
        f.ok(
            &topic,
            "a",
            "ka",
            "huddle:toggle-audio",
            json!({"enabled": false})
        )
        .await,
        json!({"version": 3})
    );
    f.ok(
        &topic,
        "a",
        "ka",
        "huddle:raise-hand",
        json!({"raised": true}),
    )
    .await;
    f.ok(
        &topic,
        "a",
        "ka",
        "huddle:toggle-screen",
        json!({"enabled": true}),
    )
    .await;
    assert_eq!(
        f.refused(
            &topic,
            "b",
            "kb",
            "huddle:toggle-screen",
            json!({"enabled": true})
        )
        .await,
        json!({"reason": "screen_in_use"})
    );
    // No change, no event.
    f.ok(
        &topic,
        "a",
        "ka",
        "huddle:raise-hand",
        json!({"raised": true}),
    )
    .await;
    assert!(f
        .refused(&topic, "a", "ka", "huddle:toggle-video", json!({}))
        .await["reason"]
        .as_str()
        .unwrap()
        .contains("enabled must be a boolean"));
    assert_eq!(
        f.refused(
            &topic,
            "c",
            "kc",
            "huddle:raise-hand",
            json!({"raised": true})
        )
        .await,
        json!({"reason": "forbidden"}),
        "a member who has not joined"
    );
    let out = f.out().await;
    assert_eq!(
        participant_events(&out),
        vec![
            ("huddle:participant:updated".into(), 3, "a".into()),
            ("huddle:participant:updated".into(), 4, "a".into()),
            ("huddle:participant:updated".into(), 5, "a".into()),
        ]
    );
    let Out::Topic { payload, .. } = &out[2] else {
        panic!()
    };
    assert_eq!(
        (
            payload["participant"]["audio"].clone(),
            payload["participant"]["handRaised"].clone(),
            payload["participant"]["screen"].clone()
        ),
        (json!(false), json!(true), json!(true))
    );
    assert!(
        out.iter()
            .all(|o| !matches!(o, Out::Topic { event, .. } if event == "huddle:updated")),
        "the count did not change"
    );
}

#[tokio::test]
async fn relays_reach_only_their_target() {
    let mut f = fixture().await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    for (user, conn) in [("a", "ka"), ("b", "kb1"), ("b", "kb2"), ("c", "kc")] {
        f.ok(&topic, user, conn, "phx_join", json!({})).await;
    }
    f.out().await;
    f.ok(
        &topic,
        "a",
        "ka",
        "webrtc:offer",
        json!({"to": "b", "toDeviceId": "dev-kb2", "sdp": "v=0"}),
    )
    .await;
    assert_eq!(
        f.out().await,
        vec![Out::User {
            user: "b".into(),
            conn: "kb2".into(),
            topic: topic.clone(),
            event: "webrtc:offer".into(),
            payload: json!({"from": "a", "fromDeviceId": "dev-ka", "sdp": "v=0"}),
        }]
    );
    f.ok(
        &topic,
        "c",
        "kc",
        "webrtc:ice-candidate",
        json!({"to": "b", "candidate": {"candidate": "x"}}),
    )
    .await;
    let conns: Vec<String> = f
        .out()
        .await
        .into_iter()
        .map(|o| match o {
            Out::User { conn, .. } => conn,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(conns, vec!["kb1", "kb2"], "every device of b, nobody else");
    assert_eq!(
        f.refused(
            &topic,
            "a",
            "ka",
            "webrtc:answer",
            json!({"to": "zed", "sdp": "v=0"})
        )
        .await,
        json!({"reason": "not_found"})
    );
    assert_eq!(
        f.refused(
            &topic,
            "d",
            "kd",
            "webrtc:offer",
            json!({"to": "a", "sdp": "v=0"})
        )
        .await,
        json!({"reason": "forbidden"})
    );
    assert!(f
        .refused(&topic, "a", "ka", "webrtc:offer", json!({"to": "b"}))
        .await["reason"]
        .as_str()
        .unwrap()
        .contains("sdp is required"));
    assert_eq!(
        f.refused(
            &topic,
            "a",
            "ka",
            "webrtc:offer",
            json!({"to": "b", "sdp": "x".repeat(70_000)})
        )
        .await["reason"],
        json!("payload too large")
    );
    assert!(f.out().await.is_empty());
}

#[tokio::test]
async fn a_socket_leaving_stays_for_the_grace_and_a_rejoin_shows_nothing() {
    let mut f = fixture().await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    f.ok(&topic, "a", "ka", "phx_join", json!({})).await;
    f.ok(&topic, "b", "kb", "phx_join", json!({})).await;
    f.out().await;
    // b's socket drops and b reconnects within the grace (a new socket).
    f.ok(&topic, "b", "kb", "phx_leave", json!({})).await;
    let (ok, back) = f
        .push_from(&topic, "b", "kb-new", "dev-kb", "phx_join", json!({}))
        .await;
    assert!(ok);
    assert_eq!(back["version"], json!(2), "no leave, no join");
    tokio::time::sleep(Duration::from_millis(400)).await;
    f.service.sweep().await;
    assert!(participant_events(&f.out().await).is_empty());
    // a leaves the channel for good: one `left`, after the grace.
    f.ok(&topic, "a", "ka", "phx_leave", json!({})).await;
    f.service.sweep().await;
    assert!(
        participant_events(&f.out().await).is_empty(),
        "not before the grace"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    f.service.sweep().await;
    f.service.sweep().await;
    let out = f.out().await;
    assert_eq!(
        participant_events(&out),
        vec![("huddle:participant:left".into(), 3, "a".into())]
    );
    // huddle:leave is at once.
    let (ok, _) = f
        .push_from(&topic, "b", "kb-new", "dev-kb", "huddle:leave", json!({}))
        .await;
    assert!(ok);
    assert_eq!(
        participant_events(&f.out().await),
        vec![("huddle:participant:left".into(), 4, "b".into())]
    );
    // The room persists empty.
    let again = f.ok(&topic, "a", "ka3", "phx_join", json!({})).await;
    assert_eq!(again["version"], json!(5));
}

#[tokio::test]
async fn audits_remove_participants_of_closed_sockets_and_dead_gateways() {
    let mut f = fixture().await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    // a and b on gw1 (which answers: b's socket is closed); c on gw-dead.
    f.ok(&topic, "a", "ka", "phx_join", json!({})).await;
    f.ok(&topic, "b", "kb", "phx_join", json!({})).await;
    let mut cmd = testkit::command(&topic, "phx_join", "c", &json!({}));
    cmd.node_id = "gw-dead".into();
    assert!(testkit::decode(&answer(f.service.as_ref(), cmd).await).ok);
    let mut asks = f
        .bus
        .subscribe(&Subjects::new("qc").gateway_audit("gw1"), None)
        .await
        .unwrap();
    let bus = f.bus.clone();
    tokio::spawn(async move {
        while let Some(ask) = asks.next().await {
            let ids = ConnectionAudit::decode(ask.payload.as_ref())
                .unwrap()
                .conn_ids;
            let closed = ConnectionAudit {
                conn_ids: ids.into_iter().filter(|i| i == "kb").collect(),
            };
            bus.publish(
                &ask.reply.unwrap(),
                None,
                Vec::new(),
                closed.encode_to_vec().into(),
            )
            .await
            .unwrap();
        }
    });
    f.out().await;
    f.service.audit().await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    f.service.sweep().await;
    assert_eq!(
        participant_events(&f.out().await),
        vec![("huddle:participant:left".into(), 4, "b".into())],
        "b's socket is closed; one unanswered audit is not enough for gw-dead"
    );
    f.service.audit().await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    f.service.sweep().await;
    f.service.sweep().await;
    assert_eq!(
        participant_events(&f.out().await),
        vec![("huddle:participant:left".into(), 5, "c".into())]
    );
    let room = f.service.state().load(&id).await.unwrap();
    assert_eq!(room.participants.len(), 1);
    assert_eq!(room.participants[0].user_id, "a");
}

#[tokio::test]
async fn the_creator_moderates_and_ends() {
    let mut f = fixture().await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    for (user, conn) in [("a", "ka"), ("b", "kb"), ("c", "kc")] {
        f.ok(&topic, user, conn, "phx_join", json!({})).await;
    }
    f.out().await;
    assert_eq!(
        f.refused(&topic, "b", "kb", "huddle:end", json!({})).await,
        json!({"reason": "forbidden"})
    );
    f.ok(&topic, "a", "ka", "huddle:mute", json!({"userId": "b"}))
        .await;
    f.ok(&topic, "a", "ka", "huddle:remove", json!({"userId": "c"}))
        .await;
    let out = f.out().await;
    assert_eq!(
        participant_events(&out),
        vec![
            ("huddle:participant:updated".into(), 4, "b".into()),
            ("huddle:participant:left".into(), 5, "c".into())
        ]
    );
    // The removed socket hears its own leave on its own path, then the close.
    let at = |o: &Out| {
        out.iter()
            .position(|x| x == o)
            .unwrap_or_else(|| panic!("{o:?} not in {out:?}"))
    };
    let own_left = out
        .iter()
        .position(|o| matches!(o, Out::User { conn, event, .. } if conn == "kc" && event == "huddle:participant:left"))
        .expect("the removed socket's own left");
    assert!(
        own_left
            < at(&Out::Close {
                user: "c".into(),
                conn: "kc".into(),
                topic: topic.clone()
            })
    );
    f.ok(
        &topic,
        "b",
        "kb",
        "huddle:invite",
        json!({"userIds": ["c"]}),
    )
    .await;
    assert_eq!(
        f.out().await,
        vec![Out::User {
            user: "c".into(),
            conn: String::new(),
            topic: "webrtc:lobby".into(),
            event: "huddle:invited".into(),
            payload: json!({"huddleId": id, "conversationId": "c1", "title": "standup", "from": "b"}),
        }]
    );
    assert_eq!(
        f.refused(
            &topic,
            "b",
            "kb",
            "huddle:invite",
            json!({"userIds": ["d"]})
        )
        .await,
        json!({"reason": "forbidden"})
    );
    f.ok(&topic, "a", "ka", "huddle:end", json!({})).await;
    let out = f.out().await;
    let at = |o: &Out| {
        out.iter()
            .position(|x| x == o)
            .unwrap_or_else(|| panic!("{o:?} not in {out:?}"))
    };
    for (user, conn) in [("a", "ka"), ("b", "kb")] {
        let ended = at(&Out::User {
            user: user.into(),
            conn: conn.into(),
            topic: topic.clone(),
            event: "huddle:ended".into(),
            payload: json!({"huddleId": id}),
        });
        let closed = at(&Out::Close {
            user: user.into(),
            conn: conn.into(),
            topic: topic.clone(),
        });
        assert!(ended < closed, "huddle:ended before phx_close: {out:?}");
    }
    assert!(out.contains(&Out::Topic {
        topic: "chat:c1".into(),
        event: "huddle:ended".into(),
        payload: json!({"huddleId": id})
    }));
    assert_eq!(
        f.refused(&topic, "a", "ka", "phx_join", json!({})).await,
        json!({"reason": "not_found"})
    );
    assert_eq!(
        f.refused(&topic, "a", "ka", "huddle:end", json!({})).await,
        json!({"reason": "not_found"})
    );
}

#[tokio::test]
async fn grpc_creates_lists_moderates_and_ends() {
    use quckchat_proto::huddle::huddle_service_server::HuddleService as _;
    use quckchat_proto::huddle::{
        CreateRequest, EndRequest, GetRequest, ListByConversationRequest, ListParticipantsRequest,
        ParticipantRequest,
    };
    use tonic::Request;

    let mut f = fixture().await;
    let api = crate::grpc::HuddleGrpc::new(f.service.clone());
    let created = api
        .create(Request::new(CreateRequest {
            conversation_id: "c1".into(),
            title: "retro".into(),
            created_by: "a".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            created.conversation_id.as_str(),
            created.title.as_str(),
            created.participant_count
        ),
        ("c1", "retro", 0)
    );
    let refused = api
        .create(Request::new(CreateRequest {
            conversation_id: "c2".into(),
            title: String::new(),
            created_by: "a".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let bad = api
        .create(Request::new(CreateRequest {
            conversation_id: "c 1".into(),
            title: String::new(),
            created_by: "a".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let topic = format!("huddle:{}", created.id);
    f.ok(&topic, "b", "kb1", "phx_join", json!({})).await;
    f.ok(&topic, "b", "kb2", "phx_join", json!({})).await;
    f.ok(&topic, "c", "kc", "phx_join", json!({})).await;
    f.out().await;
    let got = api
        .get(Request::new(GetRequest {
            huddle_id: created.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.participant_count, 3);
    let listed = api
        .list_by_conversation(Request::new(ListByConversationRequest {
            conversation_id: "c1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.huddles, vec![got.clone()]);
    let muted = api
        .mute_participant(Request::new(ParticipantRequest {
            huddle_id: created.id.clone(),
            user_id: "b".into(),
            device_id: "dev-kb2".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let audio: Vec<(String, bool)> = muted
        .participants
        .iter()
        .map(|p| (p.device_id.clone(), p.audio))
        .collect();
    assert_eq!(
        audio,
        [
            ("dev-kb1".into(), true),
            ("dev-kb2".into(), false),
            ("dev-kc".into(), true)
        ]
    );
    assert_eq!(muted.version, 4);
    let removed = api
        .remove_participant(Request::new(ParticipantRequest {
            huddle_id: created.id.clone(),
            user_id: "b".into(),
            device_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.participants.len(), 1, "both of b's devices");
    assert_eq!(removed.version, 6);
    let out = f.out().await;
    for conn in ["kb1", "kb2"] {
        assert!(out.contains(&Out::Close {
            user: "b".into(),
            conn: conn.into(),
            topic: topic.clone()
        }));
    }
    let ended = api
        .end(Request::new(EndRequest {
            huddle_id: created.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(ended.ended_at_ms > 0);
    assert_eq!(ended.participant_count, 0);
    let again = api
        .end(Request::new(EndRequest {
            huddle_id: created.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, ended, "ending twice returns it unchanged");
    let none = api
        .list_participants(Request::new(ListParticipantsRequest {
            huddle_id: "nohuddle".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(none.code(), tonic::Code::NotFound);
    assert!(api
        .list_by_conversation(Request::new(ListByConversationRequest {
            conversation_id: "c1".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .huddles
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_publishes_a_rooms_events_in_version_order() {
    let mut f = fixture_on(8, Arc::new(SlowState(MemoryRoomState::new()))).await;
    let id = f.huddle().await;
    let topic = format!("huddle:{id}");
    let users = ["a", "b", "c"];
    for (i, user) in users.iter().enumerate() {
        for d in 0..2 {
            let conn = format!("k{i}{d}");
            f.ok(&topic, user, &conn, "phx_join", json!({})).await;
        }
    }
    f.out().await;
    let service = f.service.clone();
    let pushes: Vec<_> = (0..60)
        .map(|n| {
            let (service, topic) = (service.clone(), topic.clone());
            tokio::spawn(async move {
                let (i, d) = (n % 3, (n / 3) % 2);
                let mut cmd = testkit::command(
                    &topic,
                    "huddle:toggle-audio",
                    users[i],
                    &json!({"enabled": (n / 6) % 2 == 1}),
                );
                (cmd.conn_id, cmd.device_id) = (format!("k{i}{d}"), format!("dev-k{i}{d}"));
                assert!(testkit::decode(&answer(service.as_ref(), cmd).await).ok);
            })
        })
        .collect();
    for p in pushes {
        p.await.unwrap();
    }
    let versions: Vec<u64> = participant_events(&f.out().await)
        .into_iter()
        .map(|(_, v, _)| v)
        .collect();
    assert!(!versions.is_empty());
    assert!(
        versions.windows(2).all(|w| w[1] == w[0] + 1),
        "published out of order: {versions:?}"
    );
}
