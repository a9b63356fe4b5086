//! Service tests over the in-process bus, memory call state and the
//! embedded call log: what each event replies, who hears what, what is
//! refused, and what reaches the log, chat and push.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use quckchat_proto::bus::{call_push, direct_event, CallPush, DirectEvent};
use quckchat_proto::signaling::signaling_service_server::SignalingService as _;
use quckchat_proto::signaling::{EndCallRequest, GetActiveCallRequest, ListCallsRequest};
use quckchat_runtime::bus::{Bus, MemoryBus, Subjects, Subscription};
use quckchat_runtime::grpc::CallError;
use quckchat_runtime::service::answer;
use quckchat_runtime::testkit;
use serde_json::{json, Value};

use super::*;
use crate::call::CallStage;
use crate::chat::Conversations;
use crate::grpc::SignalingGrpc;
use crate::ice::TurnAuth;
use crate::log::EmbeddedCallLog;
use crate::state::MemoryCallState;

/// Conversation c1 has a, b; c2 has a only. Records the call messages.
#[derive(Default)]
struct FakeChat {
    posted: Mutex<Vec<Call>>,
}

#[async_trait]
impl Conversations for FakeChat {
    async fn members(&self, id: &str) -> std::result::Result<Option<Vec<String>>, CallError> {
        Ok(match id {
            "c1" => Some(vec!["a".into(), "b".into()]),
            "c2" => Some(vec!["a".into()]),
            _ => None,
        })
    }
    async fn post_call_message(&self, call: &Call) -> std::result::Result<(), CallError> {
        self.posted.lock().unwrap().push(call.clone());
        Ok(())
    }
}

/// Huddles created for escalated calls: (conversation, creator).
#[derive(Default)]
struct FakeHuddles {
    created: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl crate::huddles::Huddles for FakeHuddles {
    async fn create(
        &self,
        conversation_id: &str,
        created_by: &str,
    ) -> std::result::Result<String, CallError> {
        let mut created = self.created.lock().unwrap();
        created.push((conversation_id.into(), created_by.into()));
        Ok(format!("h{}", created.len()))
    }
}

struct Fixture {
    service: Arc<SignalingService>,
    huddles: Arc<FakeHuddles>,
    chat: Arc<FakeChat>,
    /// Everything published under the prefix.
    all: Subscription,
    _dir: tempfile::TempDir,
}

/// A published user event: (user, event, payload, only conn, except conn).
type Sent = (String, String, Value, String, String);

async fn fixture_with(timing: CallTiming) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let subjects = Subjects::new("qc");
    let all = bus.subscribe("qc.>", None).await.unwrap();
    let chat = Arc::new(FakeChat::default());
    let huddles = Arc::new(FakeHuddles::default());
    let service = SignalingService::new(
        Arc::new(MemoryCallState::new()),
        Arc::new(EmbeddedCallLog::open(dir.path()).unwrap()),
        bus,
        subjects,
        IceConfig {
            stun_urls: vec!["stun:stun.example.org:3478".into()],
            turn_urls: vec!["turn:turn.example.org:3478".into()],
            turn_auth: Some(TurnAuth::Rest {
                secret: "s3cret".into(),
                lifetime: Duration::from_secs(600),
            }),
        },
        timing,
    )
    .with_chat(chat.clone())
    .with_huddles(huddles.clone());
    Fixture {
        service: Arc::new(service),
        huddles,
        chat,
        all,
        _dir: dir,
    }
}

async fn fixture() -> Fixture {
    fixture_with(CallTiming::default()).await
}

impl Fixture {
    /// `user` pushes from connection `conn`.
    async fn push(&self, user: &str, conn: &str, event: &str, payload: Value) -> (bool, Value) {
        let mut cmd = testkit::command("webrtc:lobby", event, user, &payload);
        (cmd.conn_id, cmd.device_id) = (conn.into(), format!("dev-{conn}"));
        let reply = testkit::decode(&answer(self.service.as_ref(), cmd).await);
        (reply.ok, reply.response)
    }

    async fn ok(&self, user: &str, conn: &str, event: &str, payload: Value) -> Value {
        let (ok, response) = self.push(user, conn, event, payload).await;
        assert!(ok, "{event} failed: {response}");
        response
    }

    async fn refused(&self, user: &str, conn: &str, event: &str, payload: Value) -> Value {
        let (ok, response) = self.push(user, conn, event, payload).await;
        assert!(!ok, "{event} should fail: {response}");
        response
    }

    /// User events and push hand-offs published until nothing comes for
    /// 100 ms.
    async fn drain(&mut self) -> (Vec<Sent>, Vec<CallPush>) {
        let (mut sent, mut pushes) = (Vec::new(), Vec::new());
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(100), self.all.next()).await
        {
            if msg.subject == "qc.svc.push.call" {
                pushes.push(CallPush::decode(msg.payload.as_ref()).unwrap());
                continue;
            }
            let Some(user) = msg.subject.strip_prefix("qc.user.") else {
                continue;
            };
            let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
            assert_eq!(ev.topic, "webrtc:lobby");
            let Some(direct_event::Kind::Push(p)) = ev.kind else {
                panic!("not a push")
            };
            sent.push((
                user.to_owned(),
                p.event,
                serde_json::from_slice(&p.payload).unwrap(),
                ev.conn_id,
                ev.except_conn_id,
            ));
        }
        (sent, pushes)
    }

    async fn sent(&mut self) -> Vec<Sent> {
        self.drain().await.0
    }

    async fn pushes(&mut self) -> Vec<CallPush> {
        self.drain().await.1
    }

    async fn ring(&self, conversation: Option<&str>) -> String {
        let mut payload = json!({"calleeId": "b", "callType": "video"});
        if let Some(c) = conversation {
            payload["conversationId"] = json!(c);
        }
        let reply = self.ok("a", "ka", "call:initiate", payload).await;
        reply["callId"].as_str().unwrap().to_owned()
    }

    async fn logged(&self, id: &str, stage: CallStage) -> Call {
        for _ in 0..100 {
            if let Some(call) = self.service.log().call(id).await.unwrap() {
                if call.stage == stage {
                    return call;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("call {id} never logged as {stage:?}")
    }
}

fn names(sent: &[Sent]) -> Vec<(&str, &str)> {
    sent.iter().map(|s| (s.0.as_str(), s.1.as_str())).collect()
}

#[tokio::test]
async fn join_gives_ice_servers_and_no_call() {
    let f = fixture().await;
    let reply = f.ok("a", "ka", "phx_join", json!({})).await;
    let servers = reply["iceServers"].as_array().unwrap();
    assert_eq!(servers[0], json!({"urls": ["stun:stun.example.org:3478"]}));
    let username = servers[1]["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "a");
    let expiry: i64 = expiry.parse().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now + 590..=now + 610).contains(&expiry), "{expiry}");
    assert_eq!(
        servers[1]["credential"],
        json!(crate::ice::rest_credential("s3cret", username))
    );
    assert!(reply.get("activeCall").is_none(), "{reply}");
    let mut cmd = testkit::command("webrtc:room1", "phx_join", "a", &json!({}));
    cmd.conn_id = "ka".into();
    let refused = testkit::decode(&answer(f.service.as_ref(), cmd).await);
    assert_eq!(refused.response, json!({"reason": "invalid topic"}));
}

#[tokio::test]
async fn a_call_rings_every_device_and_the_first_answer_silences_the_others() {
    let mut f = fixture().await;
    let id = f.ring(Some("c1")).await;
    let sent = f.sent().await;
    assert_eq!(names(&sent), [("b", "call:incoming")]);
    let (_, _, incoming, only, except) = &sent[0];
    assert_eq!((only.as_str(), except.as_str()), ("", ""), "every device");
    assert_eq!(incoming["callId"], json!(id));
    assert_eq!(incoming["callerId"], "a");
    assert_eq!(incoming["callType"], "video");
    assert_eq!(incoming["conversationId"], "c1");
    assert!(incoming["createdAt"].as_str().unwrap().ends_with('Z'));

    assert_eq!(
        f.ok("b", "kb2", "call:answer", json!({"callId": id})).await,
        json!({"callId": id})
    );
    let sent = f.sent().await;
    assert_eq!(names(&sent), [("a", "call:answered"), ("b", "call:ended")]);
    assert_eq!(
        sent[0].2,
        json!({"callId": id, "answeredBy": "b", "answeredByDevice": "dev-kb2"})
    );
    assert_eq!(sent[0].3, "ka", "only the caller's device in the call");
    assert_eq!(
        sent[1].2,
        json!({"callId": id, "reason": "answered_elsewhere"})
    );
    assert_eq!(
        sent[1].4, "kb2",
        "every callee device but the answering one"
    );
    assert_eq!(
        f.refused("b", "kb1", "call:answer", json!({"callId": id}))
            .await,
        json!({"reason": "answered_elsewhere"})
    );
    let logged = f.logged(&id, CallStage::Connected).await;
    assert_eq!(logged.callee_device, "dev-kb2");

    // Hang up: both sides hear it, with the talk time; chat gets the message.
    f.ok("a", "ka", "call:end", json!({"callId": id})).await;
    let sent = f.sent().await;
    assert_eq!(names(&sent), [("a", "call:ended"), ("b", "call:ended")]);
    assert_eq!(sent[0].2["reason"], "hangup");
    assert_eq!(sent[0].2["endedBy"], "a");
    assert!(sent[0].2["durationMs"].as_u64().is_some());
    let logged = f.logged(&id, CallStage::Ended).await;
    assert_eq!(logged.end_reason, Some(EndReason::Hangup));
    for _ in 0..50 {
        if !f.chat.posted.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.chat.posted.lock().unwrap()[0].id, id);
    // Ending again changes nothing and tells no one.
    f.ok("a", "ka", "call:end", json!({"callId": id})).await;
    assert!(f.sent().await.is_empty());
}

#[tokio::test]
async fn reject_from_one_device_tells_the_caller_and_stops_every_device() {
    let mut f = fixture().await;
    let id = f.ring(None).await;
    f.sent().await;
    f.ok(
        "b",
        "kb1",
        "call:reject",
        json!({"callId": id, "reason": "declined"}),
    )
    .await;
    let sent = f.sent().await;
    assert_eq!(
        names(&sent),
        [
            ("a", "call:rejected"),
            ("a", "call:ended"),
            ("b", "call:ended")
        ]
    );
    assert_eq!(sent[0].2, json!({"callId": id, "reason": "declined"}));
    assert_eq!(
        sent[2].2,
        json!({"callId": id, "reason": "rejected", "endedBy": "b"})
    );
    assert!(f.chat.posted.lock().unwrap().is_empty(), "no conversation");
}

#[tokio::test]
async fn busy_self_calls_and_bad_payloads_are_refused_clearly() {
    let mut f = fixture().await;
    let id = f.ring(None).await;
    assert_eq!(
        f.refused("c", "kc", "call:initiate", json!({"calleeId": "b"}))
            .await,
        json!({"reason": "busy"})
    );
    assert_eq!(
        f.refused("a", "ka", "call:initiate", json!({"calleeId": "c"}))
            .await,
        json!({"reason": "busy"})
    );
    let cases = [
        (json!({}), "invalid payload: calleeId is required"),
        (json!({"calleeId": "c"}), "busy"),
        (
            json!({"calleeId": "c c"}),
            "invalid payload: calleeId must be an id ([A-Za-z0-9_-], 1 to 64)",
        ),
        (
            json!({"calleeId": "d", "callType": "hologram"}),
            "invalid payload: callType must be \"audio\" or \"video\"",
        ),
        (
            json!({"calleeId": "d", "conversationId": 5}),
            "invalid payload: conversationId must be a string",
        ),
    ];
    for (payload, reason) in cases {
        assert_eq!(
            f.refused("a", "ka", "call:initiate", payload.clone()).await["reason"],
            reason,
            "{payload}"
        );
    }
    assert_eq!(
        f.refused("e", "ke", "call:initiate", json!({"calleeId": "e"}))
            .await["reason"],
        "invalid payload: calleeId must be another user than the caller"
    );
    assert_eq!(
        f.refused(
            "e",
            "ke",
            "call:initiate",
            json!({"calleeId": "b", "conversationId": "nope"})
        )
        .await,
        json!({"reason": "not_found"})
    );
    assert_eq!(
        f.refused("a", "ka2", "call:answer", json!({})).await["reason"],
        "invalid payload: callId is required"
    );
    assert_eq!(
        f.refused(
            "b",
            "kb",
            "call:answer",
            json!({"callId": "000000000000000000000000"})
        )
        .await,
        json!({"reason": "not_found"})
    );
    assert_eq!(
        f.refused("a", "ka", "call:hold", json!({"callId": id}))
            .await,
        json!({"reason": "unknown event", "event": "call:hold"})
    );
    f.sent().await;
}

#[tokio::test]
async fn a_conversation_call_needs_both_parties_in_it() {
    let mut f = fixture().await;
    assert_eq!(
        f.refused(
            "a",
            "ka",
            "call:initiate",
            json!({"calleeId": "b", "conversationId": "c2"})
        )
        .await,
        json!({"reason": "forbidden"})
    );
    assert!(f.sent().await.is_empty());
}

#[tokio::test]
async fn a_connected_call_escalates_into_a_huddle_of_its_conversation() {
    let mut f = fixture().await;
    let ringing = f.ring(Some("c1")).await;
    assert!(f
        .refused("a", "ka", "call:escalate", json!({"callId": ringing}))
        .await["reason"]
        .as_str()
        .unwrap()
        .contains("callId must be a connected call"));
    f.ok("b", "kb", "call:answer", json!({"callId": ringing}))
        .await;
    f.sent().await;
    assert_eq!(
        f.refused("b", "kb-other", "call:escalate", json!({"callId": ringing}))
            .await,
        json!({"reason": "forbidden"}),
        "only from the device in the call"
    );
    assert_eq!(
        f.refused("c", "kc", "call:escalate", json!({"callId": ringing}))
            .await,
        json!({"reason": "forbidden"})
    );
    let reply = f
        .ok("b", "kb", "call:escalate", json!({"callId": ringing}))
        .await;
    let escalated = json!({"callId": ringing, "huddleId": "h1", "conversationId": "c1"});
    assert_eq!(reply, escalated);
    assert_eq!(
        *f.huddles.created.lock().unwrap(),
        [("c1".to_owned(), "b".to_owned())]
    );
    let sent = f.sent().await;
    assert_eq!(
        names(&sent),
        [
            ("a", "call:escalated"),
            ("b", "call:escalated"),
            ("a", "call:ended"),
            ("b", "call:ended")
        ]
    );
    assert_eq!(sent[0].2, escalated);
    assert_eq!(sent[2].2["reason"], json!("escalated"));
    assert_eq!(
        f.logged(&ringing, CallStage::Ended).await.end_reason,
        Some(EndReason::Escalated)
    );
    assert_eq!(
        f.refused("a", "ka", "call:escalate", json!({"callId": ringing}))
            .await,
        json!({"reason": "call_ended"}),
        "escalated once"
    );

    // A call without a conversation needs one named, with both parties in it.
    let plain = f.ring(None).await;
    f.ok("b", "kb", "call:answer", json!({"callId": plain}))
        .await;
    assert_eq!(
        f.refused("a", "ka", "call:escalate", json!({"callId": plain}))
            .await,
        json!({"reason": "invalid payload: conversationId is required: the call names no conversation"})
    );
    assert_eq!(
        f.refused(
            "a",
            "ka",
            "call:escalate",
            json!({"callId": plain, "conversationId": "c2"})
        )
        .await,
        json!({"reason": "forbidden"})
    );
    let reply = f
        .ok(
            "a",
            "ka",
            "call:escalate",
            json!({"callId": plain, "conversationId": "c1"}),
        )
        .await;
    assert_eq!(reply["huddleId"], json!("h2"));
}

#[tokio::test]
async fn glare_makes_one_connected_call() {
    let mut f = fixture().await;
    let id = f.ring(None).await;
    f.sent().await;
    let reply = f
        .ok(
            "b",
            "kb",
            "call:initiate",
            json!({"calleeId": "a", "callType": "audio"}),
        )
        .await;
    assert_eq!(reply, json!({"callId": id, "merged": true}));
    let sent = f.sent().await;
    assert_eq!(names(&sent), [("a", "call:answered"), ("b", "call:ended")]);
    assert_eq!(sent[1].4, "kb");
    // Relays flow both ways between the two devices.
    f.ok(
        "a",
        "ka",
        "webrtc:offer",
        json!({"callId": id, "sdp": "v=0"}),
    )
    .await;
    f.ok(
        "b",
        "kb",
        "webrtc:answer",
        json!({"callId": id, "sdp": "v=0 b"}),
    )
    .await;
    let sent = f.sent().await;
    assert_eq!(
        names(&sent),
        [("b", "webrtc:offer"), ("a", "webrtc:answer")]
    );
    assert_eq!(
        sent[0].2,
        json!({"callId": id, "from": "a", "fromDeviceId": "dev-ka", "sdp": "v=0"})
    );
    assert_eq!((sent[0].3.as_str(), sent[1].3.as_str()), ("kb", "ka"));
}

#[tokio::test]
async fn relays_are_checked_bounded_and_go_to_one_device() {
    let mut f = fixture().await;
    let id = f.ring(None).await;
    f.ok(
        "a",
        "ka",
        "webrtc:offer",
        json!({"callId": id, "sdp": "early"}),
    )
    .await;
    f.ok("b", "kb", "call:answer", json!({"callId": id})).await;
    f.sent().await;
    let candidate = json!({"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host", "sdpMid": "0"});
    f.ok(
        "b",
        "kb",
        "webrtc:ice-candidate",
        json!({"callId": id, "candidate": candidate}),
    )
    .await;
    f.ok(
        "a",
        "ka",
        "webrtc:ice-candidate",
        json!({"callId": id, "candidates": [candidate, candidate]}),
    )
    .await;
    let sent = f.sent().await;
    assert_eq!(
        names(&sent),
        [("a", "webrtc:ice-candidate"), ("b", "webrtc:ice-candidate")]
    );
    assert_eq!(sent[0].2["candidate"], candidate);
    assert_eq!(sent[1].2["candidates"].as_array().unwrap().len(), 2);
    for (user, conn) in [("z", "kz"), ("b", "kb-other"), ("a", "ka-other")] {
        assert_eq!(
            f.refused(
                user,
                conn,
                "webrtc:offer",
                json!({"callId": id, "sdp": "x"})
            )
            .await,
            json!({"reason": "forbidden"}),
            "{user}/{conn}"
        );
    }
    assert!(f.sent().await.is_empty(), "nothing reached the parties");
    let big = "a".repeat(MAX_RELAY_BYTES);
    assert_eq!(
        f.refused("a", "ka", "webrtc:offer", json!({"callId": id, "sdp": big}))
            .await,
        json!({"reason": "payload too large", "limit": MAX_RELAY_BYTES})
    );
    for (payload, reason) in [
        (json!({"callId": id}), "invalid payload: sdp is required"),
        (
            json!({"callId": id, "sdp": 1}),
            "invalid payload: sdp must be a string or an object",
        ),
        (json!({"sdp": "x"}), "invalid payload: callId is required"),
    ] {
        assert_eq!(
            f.refused("a", "ka", "webrtc:offer", payload).await["reason"],
            reason
        );
    }
    assert_eq!(
        f.refused(
            "a",
            "ka",
            "webrtc:ice-candidate",
            json!({"callId": id, "candidates": {}})
        )
        .await["reason"],
        "invalid payload: candidates must be an array"
    );
}

#[tokio::test]
async fn the_ring_timeout_ends_a_call_with_a_missed_call_for_push() {
    let mut f = fixture_with(CallTiming {
        ring_timeout: Duration::from_millis(100),
        disconnect_grace: Duration::from_secs(20),
    })
    .await;
    let id = f.ring(Some("c1")).await;
    let pushes = f.pushes().await;
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].kind, call_push::Kind::Incoming as i32);
    assert_eq!(
        (pushes[0].call_id.as_str(), pushes[0].callee_id.as_str()),
        (id.as_str(), "b")
    );
    assert_eq!(pushes[0].ring_expires_at_ms - pushes[0].created_at_ms, 100);
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.service.sweep().await;
    f.service.sweep().await;
    let (sent, pushes) = f.drain().await;
    assert_eq!(names(&sent), [("a", "call:ended"), ("b", "call:ended")]);
    assert_eq!(sent[0].2, json!({"callId": id, "reason": "no_answer"}));
    let mut kinds: Vec<(i32, &str)> = pushes
        .iter()
        .map(|p| (p.kind, p.end_reason.as_str()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            (call_push::Kind::Missed as i32, "no_answer"),
            (call_push::Kind::Ended as i32, "no_answer"),
        ],
        "once, though swept twice"
    );
    let logged = f.logged(&id, CallStage::Ended).await;
    assert_eq!(logged.end_reason, Some(EndReason::NoAnswer));
}

#[tokio::test]
async fn push_hand_offs_say_incoming_ended_and_missed() {
    let mut f = fixture().await;
    let id = f.ring(None).await;
    f.ok("a", "ka", "call:end", json!({"callId": id})).await;
    let mut pushes = Vec::new();
    for _ in 0..5 {
        pushes.extend(f.pushes().await);
        if pushes.len() >= 3 {
            break;
        }
    }
    let mut kinds: Vec<(i32, String)> = pushes
        .iter()
        .map(|p| (p.kind, p.end_reason.clone()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            (call_push::Kind::Incoming as i32, String::new()),
            (call_push::Kind::Missed as i32, "cancelled".into()),
            (call_push::Kind::Ended as i32, "cancelled".into()),
        ]
    );
}

#[tokio::test]
async fn leaving_and_rejoining_the_lobby_resumes_the_call() {
    let mut f = fixture().await;
    let id = f.ring(None).await;
    f.ok("b", "kb", "call:answer", json!({"callId": id})).await;
    f.ok("b", "kb", "phx_leave", json!({})).await;
    f.sent().await;
    let reply = f.ok("b", "kb-new", "phx_join", json!({})).await;
    assert_eq!(reply["activeCall"]["callId"], json!(id));
    assert_eq!(reply["activeCall"]["state"], "connected");
    assert_eq!(reply["activeCall"]["onThisDevice"], true);
    f.ok(
        "a",
        "ka",
        "webrtc:offer",
        json!({"callId": id, "sdp": "restart"}),
    )
    .await;
    let sent = f.sent().await;
    assert_eq!(sent[0].3, "kb-new");
}

#[tokio::test]
async fn grpc_reads_ends_and_lists_calls() {
    let f = fixture().await;
    let grpc = SignalingGrpc::new_for_tests(f.service.clone());
    let none = grpc
        .get_active_call(tonic::Request::new(GetActiveCallRequest {
            user_id: "a".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.call, None);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = f.ring(None).await;
        let active = grpc
            .get_active_call(tonic::Request::new(GetActiveCallRequest {
                user_id: "b".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .call
            .unwrap();
        assert_eq!(
            (active.call_id.as_str(), active.state.as_str()),
            (id.as_str(), "ringing")
        );
        let ended = grpc
            .end_call(tonic::Request::new(EndCallRequest {
                call_id: id.clone(),
                reason: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (ended.state.as_str(), ended.end_reason.as_str()),
            ("ended", "failed")
        );
        f.logged(&id, CallStage::Ended).await;
        ids.push(id);
    }
    let err = grpc
        .end_call(tonic::Request::new(EndCallRequest {
            call_id: "000000000000000000000000".into(),
            reason: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = grpc
        .end_call(tonic::Request::new(EndCallRequest {
            call_id: ids[0].clone(),
            reason: "exploded".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Pages of 2, newest first.
    let page = grpc
        .list_calls(tonic::Request::new(ListCallsRequest {
            user_id: "a".into(),
            page_size: 2,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = page.calls.iter().map(|c| c.call_id.clone()).collect();
    assert_eq!(got, [ids[2].clone(), ids[1].clone()]);
    let rest = grpc
        .list_calls(tonic::Request::new(ListCallsRequest {
            user_id: "a".into(),
            page_size: 2,
            page_token: page.next_page_token,
        }))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = rest.calls.iter().map(|c| c.call_id.clone()).collect();
    assert_eq!(got, [ids[0].clone()]);
    assert_eq!(rest.next_page_token, "");
}

#[tokio::test]
async fn a_declined_call_is_not_a_missed_one_a_vanished_caller_is() {
    let mut f = fixture_with(CallTiming {
        ring_timeout: Duration::from_secs(45),
        disconnect_grace: Duration::from_millis(50),
    })
    .await;
    let kinds = |pushes: &[CallPush]| {
        let mut k: Vec<(i32, String)> = pushes
            .iter()
            .map(|p| (p.kind, p.end_reason.clone()))
            .collect();
        k.sort();
        k
    };
    let id = f.ring(None).await;
    f.ok("b", "kb", "call:reject", json!({"callId": id})).await;
    assert_eq!(
        kinds(&f.pushes().await),
        [
            (call_push::Kind::Incoming as i32, String::new()),
            (call_push::Kind::Ended as i32, "rejected".into()),
        ]
    );
    // The caller's device leaves while it rings and never comes back.
    f.ring(None).await;
    f.ok("a", "ka", "phx_leave", json!({})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.service.sweep().await;
    assert_eq!(
        kinds(&f.pushes().await),
        [
            (call_push::Kind::Incoming as i32, String::new()),
            (call_push::Kind::Missed as i32, "disconnected".into()),
            (call_push::Kind::Ended as i32, "disconnected".into()),
        ]
    );
}
