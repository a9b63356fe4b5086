//! Who gets which push, with recording providers: offline members get one
//! push per message (never the sender, never an online member), a job
//! handled twice pushes nothing twice, calls go to VoIP and FCM tokens,
//! dead tokens are removed after one attempt, `Retry-After` is honoured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use quckchat_proto::bus::{call_push, CallPush, MessagePush};
use quckchat_proto::push::{Notification as NotifyNotification, NotifyRequest};
use quckchat_runtime::grpc::CallError;
use quckchat_runtime::time::now_ms;

use super::*;
use crate::apps::Apps;
use crate::deliver::{Deliverer, RetryPolicy};
use crate::devices::{Device, EmbeddedDevices, Platform};
use crate::providers::{Notification, Outcome, Provider};
use crate::sent::MemorySentLog;

/// Records every push; answers from a script per token (default: sent).
#[derive(Default)]
struct Recorder {
    name: &'static str,
    sent: Mutex<Vec<(String, Notification, Instant)>>,
    script: Mutex<std::collections::HashMap<String, Vec<Outcome>>>,
}

impl Recorder {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            ..Self::default()
        })
    }

    fn tokens(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _, _)| t.clone())
            .collect();
        t.sort();
        t
    }

    fn answer(&self, token: &str, outcomes: Vec<Outcome>) {
        self.script.lock().unwrap().insert(token.into(), outcomes);
    }
}

#[async_trait]
impl Provider for Recorder {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn send(&self, device: &Device, n: &Notification) -> Outcome {
        self.sent
            .lock()
            .unwrap()
            .push((device.token.clone(), n.clone(), Instant::now()));
        let mut script = self.script.lock().unwrap();
        match script.get_mut(&device.token) {
            Some(outcomes) if !outcomes.is_empty() => outcomes.remove(0),
            _ => Outcome::Sent,
        }
    }
}

/// `online` users are online; c1 = {alice, bob, carol}.
struct World {
    online: HashSet<String>,
}

#[async_trait]
impl Online for World {
    async fn online(&self, users: &[String]) -> Result<HashSet<String>, CallError> {
        Ok(users
            .iter()
            .filter(|u| self.online.contains(*u))
            .cloned()
            .collect())
    }
}

#[async_trait]
impl ChatInfo for World {
    async fn members(&self, id: &str) -> Result<Option<Arc<Vec<String>>>, CallError> {
        Ok((id == "c1").then(|| Arc::new(vec!["alice".into(), "bob".into(), "carol".into()])))
    }
    async fn unread_total(&self, user: &str) -> Result<u64, CallError> {
        Ok(if user == "bob" { 7 } else { 0 })
    }
}

struct Fixture {
    service: PushService,
    fcm: Arc<Recorder>,
    apns: Arc<Recorder>,
    devices: Arc<EmbeddedDevices>,
    _dir: tempfile::TempDir,
}

async fn fixture(online: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let devices = Arc::new(EmbeddedDevices::open(dir.path()).unwrap());
    let (fcm, apns) = (Recorder::new("fcm"), Recorder::new("apns"));
    let apps = Apps::new()
        .with_fcm("", fcm.clone())
        .with_apns("", apns.clone());
    let deliverer = Arc::new(Deliverer::new(
        Arc::new(apps),
        devices.clone(),
        Arc::new(MemorySentLog::new()),
        RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(20),
            max_wait: Duration::from_secs(5),
        },
        8,
    ));
    let world = Arc::new(World {
        online: online.iter().map(|u| (*u).to_owned()).collect(),
    });
    let service = PushService::new(devices.clone(), world.clone(), world, deliverer, true);
    for (user, platform, token) in [
        ("alice", Platform::Fcm, "fcm-alice"),
        ("bob", Platform::Fcm, "fcm-bob"),
        ("bob", Platform::Apns, "apns-bob"),
        ("bob", Platform::ApnsVoip, "voip-bob"),
        ("carol", Platform::Apns, "apns-carol"),
    ] {
        devices
            .register(&Device {
                user_id: user.into(),
                platform,
                token: token.into(),
                app: None,
                locale: None,
                updated_at_ms: 1,
            })
            .await
            .unwrap();
    }
    Fixture {
        service,
        fcm,
        apns,
        devices,
        _dir: dir,
    }
}

fn message(id: &str, sender: &str) -> Job {
    Job::Message(MessagePush {
        conversation_id: "c1".into(),
        message_id: id.into(),
        seq: 42,
        sender_id: sender.into(),
        preview: "lunch?".into(),
        message_type: "text".into(),
        created_at_ms: 1,
    })
}

fn call(kind: call_push::Kind, id: &str) -> Job {
    Job::Call(CallPush {
        kind: kind as i32,
        call_id: id.into(),
        caller_id: "alice".into(),
        callee_id: "bob".into(),
        call_type: "video".into(),
        conversation_id: "c1".into(),
        created_at_ms: now_ms(),
        ring_expires_at_ms: now_ms() + 45_000,
        end_reason: "answered".into(),
    })
}

#[tokio::test]
async fn offline_members_get_one_push_per_message_the_sender_and_online_none() {
    let f = fixture(&["carol"]).await;
    let tally = f.service.handle(&message("m1", "alice")).await.unwrap();
    assert_eq!(tally.get("sent"), Some(&2), "{tally:?}");
    assert_eq!(
        f.fcm.tokens(),
        ["fcm-bob"],
        "alice sent it, carol is online"
    );
    assert_eq!(f.apns.tokens(), ["apns-bob"], "no alert to a VoIP token");
    let (_, n, _) = f.fcm.sent.lock().unwrap()[0].clone();
    assert_eq!(n.kind, Kind::Message);
    assert_eq!(n.body.as_deref(), Some("lunch?"));
    assert_eq!(n.badge, Some(7));
    assert_eq!(n.collapse_id.as_deref(), Some("c1"));
    assert_eq!(
        [
            &n.data["conversationId"],
            &n.data["messageId"],
            &n.data["seq"]
        ],
        ["c1", "m1", "42"]
    );
    // The same message again (a retried send, a redelivery): nothing more.
    let again = f.service.handle(&message("m1", "alice")).await.unwrap();
    assert_eq!(again.get("already_sent"), Some(&2), "{again:?}");
    assert_eq!(f.fcm.tokens().len() + f.apns.tokens().len(), 2);
}

#[tokio::test]
async fn a_ringing_call_goes_to_voip_and_fcm_and_its_end_withdraws_it() {
    let f = fixture(&[]).await;
    f.service
        .handle(&call(call_push::Kind::Incoming, "k1"))
        .await
        .unwrap();
    assert_eq!(f.fcm.tokens(), ["fcm-bob"]);
    assert_eq!(f.apns.tokens(), ["voip-bob"], "VoIP, not the alert token");
    let (_, n, _) = f.apns.sent.lock().unwrap()[0].clone();
    assert_eq!((n.kind, n.title.clone()), (Kind::IncomingCall, None));
    assert_eq!(n.data["callId"], "k1");
    assert!(n.ttl <= Duration::from_secs(45) && n.ttl > Duration::from_secs(40));
    f.service
        .handle(&call(call_push::Kind::Ended, "k1"))
        .await
        .unwrap();
    let ended: Vec<Kind> = f
        .apns
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(|(_, n, _)| n.kind)
        .collect();
    assert_eq!(ended, [Kind::IncomingCall, Kind::CallEnded]);
    // A call that never rang a device withdraws nothing.
    f.service
        .handle(&call(call_push::Kind::Ended, "k2"))
        .await
        .unwrap();
    assert_eq!(f.apns.sent.lock().unwrap().len(), 2);
    f.service
        .handle(&call(call_push::Kind::Missed, "k1"))
        .await
        .unwrap();
    let missed: Vec<String> = f
        .apns
        .sent
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n, _)| n.kind == Kind::MissedCall)
        .map(|(t, n, _)| format!("{t}: {}", n.body.clone().unwrap()))
        .collect();
    assert_eq!(missed, ["apns-bob: Missed video call"]);
}

#[tokio::test]
async fn an_online_callee_gets_no_push() {
    let f = fixture(&["bob"]).await;
    let tally = f
        .service
        .handle(&call(call_push::Kind::Incoming, "k1"))
        .await
        .unwrap();
    assert!(tally.is_empty(), "{tally:?}");
    assert!(f.fcm.tokens().is_empty() && f.apns.tokens().is_empty());
}

#[tokio::test]
async fn a_dead_token_is_removed_after_one_attempt_and_retry_after_is_honoured() {
    let f = fixture(&[]).await;
    f.fcm.answer(
        "fcm-alice",
        vec![Outcome::DeadToken {
            reason: "UNREGISTERED".into(),
        }],
    );
    f.fcm.answer(
        "fcm-bob",
        vec![Outcome::Retry {
            after: Some(Duration::from_secs(1)),
            reason: "429".into(),
        }],
    );
    let started = Instant::now();
    let tally = f.service.handle(&message("m2", "carol")).await.unwrap();
    assert_eq!(tally.get("dead_token"), Some(&1), "{tally:?}");
    let sent = f.fcm.sent.lock().unwrap().clone();
    let alice: Vec<_> = sent.iter().filter(|(t, _, _)| t == "fcm-alice").collect();
    assert_eq!(alice.len(), 1, "a dead token is never retried");
    let bob: Vec<Instant> = sent
        .iter()
        .filter(|(t, _, _)| t == "fcm-bob")
        .map(|(_, _, at)| *at)
        .collect();
    assert_eq!(bob.len(), 2);
    assert!(
        bob[1] - bob[0] >= Duration::from_secs(1),
        "retried before Retry-After"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let left = f.devices.devices_of(&["alice".into()]).await.unwrap();
    assert!(left.is_empty(), "the dead token is gone: {left:?}");
}

#[tokio::test]
async fn notify_reaches_the_named_users_offline_only_when_asked() {
    let f = fixture(&["alice"]).await;
    let request = |only_offline| {
        Job::Notify(NotifyRequest {
            user_ids: vec!["alice".into(), "carol".into(), "carol".into()],
            notification: Some(NotifyNotification {
                title: "Welcome".into(),
                body: String::new(),
                data: [("k".to_owned(), "v".to_owned())].into(),
                collapse_id: String::new(),
            }),
            only_offline,
            notification_id: format!("n{only_offline}"),
        })
    };
    f.service.handle(&request(true)).await.unwrap();
    assert_eq!(
        (f.fcm.tokens(), f.apns.tokens()),
        (vec![], vec!["apns-carol".to_owned()])
    );
    f.service.handle(&request(false)).await.unwrap();
    assert_eq!(f.fcm.tokens(), ["fcm-alice"]);
    let (_, n, _) = f.fcm.sent.lock().unwrap()[0].clone();
    assert_eq!(
        (n.title.as_deref(), n.body.as_deref()),
        (Some("Welcome"), None)
    );
    assert_eq!(n.data["k"], "v");
}
